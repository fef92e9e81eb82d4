"""K-fold splits: disjoint, complete, grouped, and better balanced than random; the CLI and its outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.splits import (
    fold_summary,
    groups_from_regex,
    make_folds,
    mask_class_statistics,
    read_ids,
    main,
)
from conftest import TEST_ORIGIN, write_tif

K_CLASSES = 4


def _constructed(n_tiles=60, seed=0):
    """Tiles in pairs (groups) with a common class, a medium class and a rare, lumpy class."""
    rng = np.random.default_rng(seed)
    ids = [f"loc{i // 2:02d}_t{i % 2}" for i in range(n_tiles)]
    pixels = np.zeros((n_tiles, K_CLASSES), np.int64)
    objects = np.zeros_like(pixels)
    pixels[:, 0] = 1000
    medium = rng.random(n_tiles) < 0.3
    pixels[medium, 1] = rng.integers(50, 400, medium.sum())
    rare = np.zeros(n_tiles, bool)
    rare[rng.choice(n_tiles, 8, replace=False)] = True
    pixels[rare, 2] = rng.integers(10, 200, rare.sum())
    pixels[:, 3] = rng.integers(0, 30, n_tiles) * (rng.random(n_tiles) < 0.5)
    objects[:] = (pixels > 0) * rng.integers(1, 6, pixels.shape)
    return ids, pixels, objects


def _deviation(folds, pixels, objects, n_folds):
    return sum(fold_summary([str(i) for i in range(len(folds))], folds, pixels, objects)["balance"].values())


def test_folds_disjoint_complete_grouped_and_balanced():
    ids, pixels, objects = _constructed()
    groups = groups_from_regex(ids, r"^(loc\d+)_")
    folds = make_folds(ids, pixels, objects, 5, groups=groups, seed=0)
    assert folds.shape == (len(ids),) and set(folds.tolist()) == set(range(5))
    for g in set(groups):  # groups stay in one fold
        assert len({int(f) for f, gg in zip(folds, groups) if gg == g}) == 1
    val_sets = [{i for i, f in zip(ids, folds) if f == k} for k in range(5)]
    assert sum(len(v) for v in val_sets) == len(ids) and set().union(*val_sets) == set(ids)
    assert all(8 <= len(v) <= 16 for v in val_sets)  # sizes roughly equal (12 each ideally)
    ours = _deviation(folds, pixels, objects, 5)
    rng = np.random.default_rng(123)
    uniq = sorted(set(groups))
    random_devs = []
    for _ in range(20):
        gfold = dict(zip(uniq, rng.permutation(np.arange(len(uniq)) % 5)))
        random_devs.append(_deviation(np.array([gfold[g] for g in groups]), pixels, objects, 5))
    assert ours < np.mean(random_devs) * 0.6, (ours, np.mean(random_devs))


def test_mask_class_statistics_counts_objects():
    m = np.zeros((8, 8), np.uint8)
    m[0:2, 0:2] = 1
    m[5:7, 5:7] = 1
    m[3, 3] = 2
    m[4, 4] = 2  # diagonal neighbour: separate with 4-connectivity, joined with 8
    m[7, 0] = 255
    pixels, objects = mask_class_statistics(m, 3)
    assert pixels.tolist() == [64 - 8 - 2 - 1, 8, 2] and objects.tolist() == [1, 2, 2]
    assert mask_class_statistics(m, 3, connectivity=2)[1].tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="outside"):
        mask_class_statistics(m, 2)


def test_cli_writes_fold_files_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    masks = tmp_path / "masks"
    for i in range(12):
        m = rng.integers(0, 2, (8, 8)).astype(np.uint8)
        if i % 4 == 0:
            m[2:4, 2:4] = 2
        write_tif(masks / f"site{i // 3}_tile{i}.tif", m)
    out = tmp_path / "folds"
    args = ["--masks", str(masks), "--num-classes", "3", "--folds", "3", "--out", str(out)]
    assert main(args + ["--group-by", r"site(?P<group>\d+)_"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_groups"] == 4 and len(summary["per_fold"]) == 3
    assert all(len(f["class_pixel_fraction"]) == 3 for f in summary["per_fold"])
    all_ids = {p.stem for p in masks.iterdir()}
    for k in range(3):
        train, val = set(read_ids(out / f"fold_{k}_train.txt")), set(read_ids(out / f"fold_{k}_val.txt"))
        assert train.isdisjoint(val) and train | val == all_ids
        assert len({i.split("_")[0] for i in val} & {i.split("_")[0] for i in train}) == 0  # sites not split
    # JSON mapping id -> group, and a missing id in it
    mapping = {p.stem: "pair" if p.stem in ("site0_tile0", "site0_tile1") else p.stem for p in masks.iterdir()}
    (tmp_path / "groups.json").write_text(json.dumps(mapping))
    assert main(args + ["--group-by", str(tmp_path / "groups.json")]) == 0
    del mapping["site0_tile0"]
    (tmp_path / "groups.json").write_text(json.dumps(mapping))
    assert main(args + ["--group-by", str(tmp_path / "groups.json")]) == 2
    # labels outside the class list are reported with the file name
    assert main(args[:3] + ["2"] + args[4:]) == 2


def test_overlap_grouping(tmp_path, capsys):
    masks = tmp_path / "masks"
    x0, y0 = TEST_ORIGIN
    # a, b overlap; c only touches b; d is far away; e overlaps d
    for name, dx in (("a", 0), ("b", 50), ("c", 130), ("d", 1000), ("e", 1040)):
        write_tif(masks / f"{name}.tif", np.ones((8, 8), np.uint8), origin=(x0 + dx, y0))
    out = tmp_path / "folds"
    args = ["--masks", str(masks), "--num-classes", "2", "--folds", "2", "--out", str(out), "--group-by", "overlap"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_groups"] == 3
    val0 = set(read_ids(out / "fold_0_val.txt"))
    assert ({"a", "b"} <= val0 or not {"a", "b"} & val0) and ({"d", "e"} <= val0 or not {"d", "e"} & val0)
    assert "wrote 2 folds" in capsys.readouterr().out
