"""Deterministic data order and per-sample random streams.

The order of an epoch is a pure function of ``(seed, epoch)`` and a sample's augmentation randomness a pure function
of ``(seed, epoch, index)``. So the data a step sees does not depend on the number of DataLoader workers, on which
process loads it, or on whether the run was interrupted and resumed.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochSampler", "AugmentedDataset", "CachedDataset", "sample_rng", "seed_worker", "weighted_epoch_indices"]


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``(seed, epoch)``; call :meth:`set_epoch` before each epoch.

    Every process draws the same permutation; Accelerate shards the batches across processes. With ``weights_fn``
    (class-aware sampling: rare-class sampling, class-balanced picks) an epoch is ``length`` indices drawn with
    replacement with probability proportional to ``weights_fn(epoch)`` (``None``: a plain permutation), from a
    generator seeded by ``(seed, epoch)``: still a pure function of the epoch, so resume stays exact.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, with_epoch: bool = False,
                 weights_fn: Callable[[int], np.ndarray | None] | None = None):
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0
        self.with_epoch = with_epoch  # yield (epoch, index): the epoch travels to persistent DataLoader workers
        self.weights_fn = weights_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        weights = self.weights_fn(self.epoch) if self.weights_fn is not None else None
        if weights is not None:
            order = weighted_epoch_indices(weights, self.seed, self.epoch, self.length)
        elif not self.shuffle:
            order = list(range(self.length))
        else:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        if self.with_epoch:
            return iter([(self.epoch, i) for i in order])
        return iter(order)

    def __len__(self) -> int:
        return self.length


def weighted_epoch_indices(weights: np.ndarray, seed: int, epoch: int, length: int | None = None) -> list[int]:
    """``length`` indices drawn with replacement, with probability proportional to ``weights``, from a generator
    seeded by ``(seed, epoch)``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("sampling weights must be a 1-D array of finite non-negative values with a positive sum")
    rng = np.random.default_rng([seed, epoch, 7919])
    return rng.choice(len(w), size=len(w) if length is None else length, replace=True, p=w / w.sum()).tolist()


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch."""
    return np.random.default_rng([seed, epoch, index])


class AugmentedDataset(Dataset):
    """Applies ``transform(sample, rng)`` with a per-(seed, epoch, index) generator.

    An item is addressed by ``index`` (the epoch of the last :meth:`set_epoch`) or by ``(epoch, index)``: the
    engine's sampler sends the pair (:attr:`epoch_in_index`), so that persistent DataLoader workers, whose copy of
    the dataset never sees ``set_epoch``, draw each epoch's augmentations (and keep their tile cache across epochs).

    Args:
        base: a dataset returning sample dicts.
        transform: ``transform(sample, rng) -> sample`` (or any object, e.g. a list of crops).
        seed: the run's seed.
    """

    epoch_in_index = True

    def __init__(self, base: Dataset, transform: Callable[[dict, np.random.Generator], Any], seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        return self.transform(self.base[index], sample_rng(self.seed, epoch, index))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/random seeds from torch's per-worker seed.

    (OpenCV's thread count is left alone: ``cv2.setNumThreads`` in a worker forked from a process whose OpenCV pool
    already ran can deadlock.)"""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


class CachedDataset(Dataset):
    """Keeps each sample of ``base`` in memory after its first read.

    For datasets that fit in RAM (the demo data, a few thousand tiles): decoding the GeoTIFFs again every epoch is
    most of the CPU cost of a training step otherwise. Put it *below* the random augmentation
    (``AugmentedDataset(CachedDataset(tiles), transform)``): the cached samples are never modified, the transforms
    make new arrays. With DataLoader workers every worker process fills its own copy.
    """

    def __init__(self, base: Dataset):
        self.base = base
        self._cache: dict[int, Any] = {}

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        sample = self._cache.get(index)
        if sample is None:
            sample = self._cache[index] = self.base[index]
        return sample
