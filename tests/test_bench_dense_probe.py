"""bench/dense_probe.py: the ridge probe and the mIoU it reports against hand-computed values, and a run on the tiny
demo data that writes the per-stage table for an export and a random init."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO, write_s2_export

sys.path.insert(0, str(REPO / "bench"))
import dense_probe


def test_miou_by_hand():
    pred = torch.tensor([0, 0, 1, 1, 2])
    target = torch.tensor([0, 1, 1, 1, 255])  # the last pixel is ignored
    # class 0: 1 / 2, class 1: 2 / 3, class 2: absent from both -> left out of the mean
    assert dense_probe.miou(pred, target, 3) == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_ridge_fit_by_hand():
    # one feature 0, 1, 2, 3 (mean 1.5, std 1.29099), labels 0, 0, 1, 1, no penalty: least squares onto one-hot
    # targets. Class-1 score = 0.5 + 0.4 * (x - 1.5) (the regression line through (0, 0), (1, 0), (2, 1), (3, 1)
    # has slope 0.4, intercept -0.1), class-0 score = 1 - that; the boundary is at x = 1.5.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    w, mean, std = dense_probe.ridge_fit(x, torch.tensor([0, 0, 1, 1]), 2, lam=0.0)
    assert mean.item() == pytest.approx(1.5) and std.item() == pytest.approx(1.2909944, rel=1e-6)
    # in standardised units: slope 0.4 * std, bias 0.5 for class 1
    assert w[:, 1].tolist() == pytest.approx([0.4 * 1.2909944, 0.5], rel=1e-6)
    assert w[:, 0].tolist() == pytest.approx([-0.4 * 1.2909944, 0.5], rel=1e-6)
    probe = torch.tensor([[1.4], [1.6], [-5.0], [9.0]], dtype=torch.float64)
    assert dense_probe.ridge_predict(probe, w, mean, std).tolist() == [0, 1, 0, 1]
    # a penalty shrinks the slope towards 0
    w2, _, _ = dense_probe.ridge_fit(x, torch.tensor([0, 0, 1, 1]), 2, lam=1.0)
    assert 0 < w2[0, 1].item() < w[0, 1].item()


def test_pixels_upsamples_to_the_tile():
    maps = torch.arange(4.0).reshape(1, 1, 2, 2)
    px = dense_probe.pixels(maps, (4, 4))
    assert px.shape == (16, 1)
    assert px[0].item() == 0.0 and px[-1].item() == 3.0  # corners keep their cell's value (align_corners=False)


def test_a_run_on_the_tiny_demo_writes_the_table(tiny_demo, tmp_path):
    export = write_s2_export(tmp_path / "export", "resnet18")
    out = tmp_path / "dense_probe.json"
    res = dense_probe.main(["--data", str(tiny_demo), "--export", f"mine={export}", "--random-seeds", "0",
                            "--max-pixels", "2000", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert torch.is_grad_enabled()  # the probe runs under no_grad without switching autograd off for its caller
    assert saved == json.loads(json.dumps(res))
    assert set(saved["backbones"]) == {"mine", "random_s0"}
    for entry in saved["backbones"].values():
        assert entry["strides"] == [2, 4, 8, 16, 32]
        assert len(entry["stages"]) == 5 and all(0.0 <= v <= 100.0 for v in entry["stages"])
    assert 0.0 < saved["raw_bands"] <= 100.0
    assert saved["setup"]["train_split"] == "labelled_1_8" and saved["setup"]["train_tiles"] >= 1
    table = dense_probe.markdown_table(saved).splitlines()
    assert table[0] == "| backbone | stride 2 | stride 4 | stride 8 | stride 16 | stride 32 | all stages |"
    assert table[2].startswith("| mine | ") and len(table) == 4
