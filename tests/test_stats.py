"""Streaming band statistics against numpy, the stats CLI, and real BigEarthNet values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.bands import BandStats, get_sensor
from common.datasets import SegmentationDataset
from common.stats import RunningBandStats, compute_band_stats, main, mean_shift
from conftest import random_s2, write_tif

REPO = Path(__file__).resolve().parents[1]


def _tiny_dir(tmp_path):
    rng = np.random.default_rng(7)
    arrays = []
    for k in range(3):
        a = random_s2(rng, size=12)
        a[:, k, :] = 0  # a nodata row (all bands)
        a[3, 5, 5] = 0  # nodata in a single band invalidates the pixel
        arrays.append(a)
        write_tif(tmp_path / "imgs" / f"x{k}.tif", a, nodata=0)
    return tmp_path / "imgs", arrays


def _numpy_stats(arrays, band_idx):
    vals = []
    for a in arrays:
        valid = (a[band_idx] != 0).all(axis=0)  # validity over the bands read
        vals.append(a[band_idx][:, valid].astype(np.float64) / 10000)
    v = np.concatenate(vals, axis=1)
    return v.mean(axis=1), v.std(axis=1), v.shape[1]


def test_stats_match_numpy_with_nodata(tmp_path):
    root, arrays = _tiny_dir(tmp_path)
    stats = compute_band_stats(root, "S2L2A", ["B04", "B02"], glob="*.tif")
    mean, std, n = _numpy_stats(arrays, [3, 1])
    np.testing.assert_allclose([stats.mean["B04"], stats.mean["B02"]], mean, rtol=1e-6)
    np.testing.assert_allclose([stats.std["B04"], stats.std["B02"]], std, rtol=1e-5)
    assert stats.count["B04"] == n == 3 * (12 * 11 - 1)
    assert stats.sensor == "S2L2A" and stats.source["samples"] == 3
    # the same from a dataset object
    ds = SegmentationDataset(root.parent, None, image_dir="imgs", labelled=False, bands=["B04", "B02"])
    ds_stats = compute_band_stats(ds)
    assert ds_stats.mean == pytest.approx(stats.mean) and ds_stats.std == pytest.approx(stats.std)


def test_running_merge_is_exact_and_stable():
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 1.0, size=(2, 50, 40))  # large offset: naive sum of squares would lose digits
    r = RunningBandStats(["a", "b"])
    for chunk in np.array_split(x, 5, axis=2):
        r.update(chunk)
    out = r.result()
    np.testing.assert_allclose([out.mean["a"], out.mean["b"]], x.reshape(2, -1).mean(1), rtol=1e-12)
    np.testing.assert_allclose([out.std["a"], out.std["b"]], x.reshape(2, -1).std(1), rtol=1e-9)
    with pytest.raises(ValueError, match="no valid pixels"):
        RunningBandStats(["c"]).result()


def test_stats_cli(tmp_path):
    root, arrays = _tiny_dir(tmp_path)
    out = tmp_path / "stats.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "common.stats", "--root", str(root), "--glob", "*.tif", "--sensor", "S2L2A",
         "--bands", "B02", "B08", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["bands"] == ["B02", "B08"] and data["format"].startswith("eoseg-band-stats")
    stats = BandStats.from_json(out)
    mean, _, _ = _numpy_stats(arrays, [1, 7])
    np.testing.assert_allclose([stats.mean["B02"], stats.mean["B08"]], mean, rtol=1e-6)
    assert main(["--root", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")]) == 2


def test_stats_of_a_split_read_only_the_listed_tiles(tmp_path, capsys):
    root, arrays = _tiny_dir(tmp_path)
    split = tmp_path / "train.txt"
    split.write_text("x2\nx0\n")
    out = tmp_path / "stats.json"
    assert main(["--root", str(root), "--glob", "*.tif", "--split", str(split), "--bands", "B02", "--out",
                 str(out)]) == 0
    stats = BandStats.from_json(out)
    mean, std, n = _numpy_stats([arrays[0], arrays[2]], [1])  # x1 left out
    assert stats.count["B02"] == n and stats.source["samples"] == 2
    np.testing.assert_allclose([stats.mean["B02"], stats.std["B02"]], [mean[0], std[0]], rtol=1e-6)
    split.write_text("x0\nx9\n")  # an id without a file: named, exit 2
    assert main(["--root", str(root), "--glob", "*.tif", "--split", str(split), "--out", str(out)]) == 2
    assert "x9" in capsys.readouterr().err
    assert main(["--root", str(root), "--split", str(tmp_path / "none.txt"), "--out", str(out)]) == 2


def test_mean_shift_between_domains_by_hand(tmp_path, capsys):
    src = BandStats(mean={"VV": -10.0, "VH": -17.0}, std={"VV": 4.0, "VH": 5.0}, sensor="S1")
    tgt = BandStats(mean={"VV": -11.5, "VH": -16.5, "HH": 0.0}, std={"VV": 3.0, "VH": 3.0, "HH": 1.0}, sensor="S1")
    norm = BandStats(mean={"VV": -11.0, "VH": -17.0}, std={"VV": 5.0, "VH": 2.0}, sensor="S1")
    assert mean_shift(src, tgt) == {"VV": (-1.5, -0.375), "VH": (0.5, 0.1)}  # in the source's std
    assert mean_shift(src, tgt, norm) == {"VV": (-1.5, -0.3), "VH": (0.5, 0.25)}  # in the normalisation's std
    paths = []
    for name, stats in (("s", src), ("t", tgt), ("n", norm)):
        paths.append(str(tmp_path / f"{name}.json"))
        stats.to_json(paths[-1])
    assert main(["--compare", *paths]) == 0
    out = capsys.readouterr().out
    assert "VV      -10 -> -11.5: -1.5 = -0.300 std" in out and "largest shift 0.300 std" in out
    assert main(["--compare", paths[1], paths[0]]) == 2  # the target holds a band (HH) the other file lacks
    assert "lacks band(s) ['HH']" in capsys.readouterr().err
    BandStats(mean={"VV": 0.0, "VH": 0.0}, std={"VV": 1.0, "VH": 1.0}, sensor="S2L2A").to_json(tmp_path / "o.json")
    assert main(["--compare", paths[0], str(tmp_path / "o.json")]) == 2
    assert "other sensors (S1 vs S2L2A)" in capsys.readouterr().err
    BandStats(mean={"VV": 0.0, "VH": 0.0}, std={"VV": 0.0, "VH": 1.0}, sensor="S1").to_json(tmp_path / "f.json")
    assert main(["--compare", paths[0], paths[1], str(tmp_path / "f.json")]) == 2  # no division by a zero std
    assert "['VV'] have std 0" in capsys.readouterr().err
    assert main(["--compare", paths[0]]) == 2  # two or three files
    assert main(["--compare", paths[0], str(tmp_path / "none.json")]) == 2


def test_stats_on_real_bigearthnet(bigearthnet_s2, bigearthnet_s1, tmp_path):
    s2 = compute_band_stats(bigearthnet_s2, "S2L2A")
    assert s2.source["layout"] == "band_files" and s2.count["B01"] == 6 * 120 * 120
    ref = get_sensor("S2L2A")
    for b in ("B02", "B04", "B08", "B12"):
        assert 0.2 * ref.mean[b] < s2.mean[b] < 5 * ref.mean[b]  # same order as the reference statistics
    s1 = compute_band_stats(bigearthnet_s1, "S1", ["VV", "VH"], max_samples=3)
    assert -25 < s1.mean["VH"] < s1.mean["VV"] < 0 and s1.source["samples"] == 3
