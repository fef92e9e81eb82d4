"""Shared building blocks: bands, raster I/O, datasets, backbones, schedules, EMA, engine, config."""
