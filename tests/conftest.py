"""Shared fixtures: tiny generated GeoTIFFs with a real CRS/transform, and the shared real BigEarthNet sample data."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest
import rasterio
from affine import Affine

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIGEARTHNET = SHARED_DATA / "bigearthnet"

TEST_CRS = "EPSG:32633"
"""UTM zone 33N, as in the first BigEarthNet example patch."""
TEST_ORIGIN = (404400.0, 5342400.0)
TEST_PIXEL = 10.0

S2L2A_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared sample data not found at {path} (expected ../shared/data next to the repository)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` relative to the repository root (skips when absent)."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def bigearthnet_s2() -> Path:
    """Folder of the real BigEarthNet-S2 example patches."""
    return _require(BIGEARTHNET / "BigEarthNet-S2-Example")


@pytest.fixture(scope="session")
def bigearthnet_s1() -> Path:
    """Folder of the real BigEarthNet-S1 example patches."""
    return _require(BIGEARTHNET / "BigEarthNet-S1-Example")


@pytest.fixture(scope="session")
def s2_patch(bigearthnet_s2: Path) -> Path:
    """One real BigEarthNet-S2 patch folder."""
    return sorted(p for p in bigearthnet_s2.iterdir() if p.is_dir())[0]


@pytest.fixture(scope="session")
def s1_patch(bigearthnet_s1: Path) -> Path:
    """One real BigEarthNet-S1 patch folder."""
    return sorted(p for p in bigearthnet_s1.iterdir() if p.is_dir())[0]


GeoTiffFactory = Callable[..., Path]


def write_tif(
    path: Path,
    array: np.ndarray,
    *,
    crs: str | None = TEST_CRS,
    origin: tuple[float, float] = TEST_ORIGIN,
    pixel: float = TEST_PIXEL,
    nodata: float | None = None,
    band_names: Sequence[str] | None = None,
) -> Path:
    """Write a GeoTIFF with plain rasterio (independent of the code under test)."""
    arr = array[None] if array.ndim == 2 else array
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype,
        crs=crs, transform=Affine(pixel, 0.0, origin[0], 0.0, -pixel, origin[1]), nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(arr)
        for i, name in enumerate(band_names or [], start=1):
            dst.set_band_description(i, name)
    return path


@pytest.fixture
def make_tif(tmp_path: Path) -> GeoTiffFactory:
    """Factory ``make_tif(name, array, **kwargs) -> Path`` writing under ``tmp_path``."""

    def factory(name: str, array: np.ndarray, **kwargs) -> Path:
        return write_tif(tmp_path / name, array, **kwargs)

    return factory


def random_s2(rng: np.random.Generator, size: int = 16, bands: int = 12) -> np.ndarray:
    """Plausible uint16 Sentinel-2 DN (reflectance 0.02..0.4)."""
    return rng.integers(200, 4000, size=(bands, size, size)).astype(np.uint16)


@pytest.fixture
def seg_root(tmp_path: Path) -> Path:
    """Tiny segmentation dataset: 4 tiles of 12-band S2 (16x16, nodata 0), masks with 3 classes, split files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "seg"
    for k in range(4):
        img = random_s2(rng)
        img[:, 0, :4] = 0  # nodata pixels in every band
        mask = rng.integers(0, 3, size=(16, 16)).astype(np.uint8)
        mask[15, 15] = 255
        write_tif(root / "images" / f"t{k}.tif", img, nodata=0)
        write_tif(root / "masks" / f"t{k}.tif", mask)
    (root / "splits").mkdir()
    (root / "splits" / "train_all.txt").write_text("t0\nt1\nt2\n")
    (root / "splits" / "labelled.txt").write_text("t0\nt1\n")
    (root / "splits" / "unlabelled.txt").write_text("t2\n")
    (root / "splits" / "val.txt").write_text("t3\n")
    return root


# ------------------------------------------------------------------------------------------------------------
# End-to-end helpers: a tiny demo dataset and `accelerate launch` of the entry points
# ------------------------------------------------------------------------------------------------------------
TINY_DEMO = dict(tiles=16, val_tiles=8, size=32, sar_scenes=2, sar_grid=2, sar_size=32, sar_overlap=8)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo dataset at a tiny size (16 + 8 tiles of 32 px per domain, 8 SAR tiles)."""
    from common.demo_data import generate

    out = tmp_path_factory.mktemp("demo") / "demo"
    generate(out, seed=0, **TINY_DEMO)
    return out


def write_s2_export(out: Path, arch: str, **meta_kw) -> Path:
    """A 12-band S2L2A backbone export of ``arch`` as ssl/export.py writes it (random weights, seed 0), the registry's
    S2L2A normalisation; ``meta_kw``: further :class:`~common.weights.ExportMeta` fields (e.g. ``stem_pool``)."""
    import timm
    import torch

    from common.bands import get_sensor
    from common.weights import ExportMeta, Normalisation, write_export

    torch.manual_seed(0)
    model = timm.create_model(arch, in_chans=12, num_classes=0)
    spec = get_sensor("S2L2A")
    meta = ExportMeta(arch, 12, list(S2L2A_BANDS), "S2L2A",
                      Normalisation("dn_to_reflectance", [float(v) for v in spec.mean_array()],
                                    [float(v) for v in spec.std_array()]),
                      int(model.num_features), {"method": "dino"}, **meta_kw)
    path, _ = write_export(model.state_dict(), meta, out)
    return path


def launch(script: str, args: Sequence[str], processes: int = 1, timeout: int = 300, check: bool = True):
    """Run an entry point through ``accelerate launch`` on the CPU (two real gloo processes when processes=2)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd += [script, *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def cut_back(run: Path, cut: Path, last_step: int = 4, drop: Sequence[str] = ()) -> Path:
    """Copy the finished run ``run`` to ``cut`` and cut it back to its previous checkpoint, as if it had stopped
    there: the checkpoint of ``last_step``, ``last``/``best`` weights, ``metrics.json`` and ``drop`` are removed."""
    import shutil

    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / f"step_{last_step:08d}")
    for name in ("checkpoints/last.safetensors", "checkpoints/best.safetensors", "metrics.json", *drop):
        (cut / name).unlink(missing_ok=True)
    return cut


def assert_same_last_weights(a: Path, b: Path) -> dict:
    """``checkpoints/last.safetensors`` of two runs hold the same keys and bit-identical tensors; returns ``a``'s."""
    import torch
    from safetensors.torch import load_file

    wa = load_file(str(a / "checkpoints" / "last.safetensors"))
    wb = load_file(str(b / "checkpoints" / "last.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    return wa
