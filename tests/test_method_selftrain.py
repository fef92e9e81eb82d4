"""DAFormer / MIC self-training (finetune/methods/selftrain.py): the quality weight, ClassMix masks, MIC block
masks, the feature-distance cells and rare-class sampling on hand-made tensors, one step with and without a
backbone export, and end to end: with and without an export, bit-exact resume, and (slow) two processes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_same_last_weights, cut_back, launch
from safetensors.torch import load_file

import finetune.methods.selftrain as selftrain_module
from common.errors import UserInputError
from common.sampling import weighted_epoch_indices
from finetune.deeplab import create_segmenter
from finetune.losses import build_segmentation_loss
from finetune.methods.base import SegSetup
from finetune.methods.common import mix
from finetune.methods.selftrain import (
    SelfTrain,
    align_distribution,
    SelfTrainConfig,
    block_masks,
    check_mic_blocks,
    class_pixel_counts,
    classmix_masks,
    export_backbone_copy,
    feature_distance_mask,
    masked_feature_distance,
    normalised_entropy,
    quality_pseudo_labels,
    rare_class_probabilities,
    rare_class_tile_weights,
    weighted_ce,
)

CONFIG = str(REPO / "configs" / "finetune" / "demo_uda.yaml")


# ------------------------------------------------------------------------------------------------------------
# Hand-made tensors
# ------------------------------------------------------------------------------------------------------------
def test_quality_weight_is_the_share_of_confident_valid_pixels():
    # softmax confidences 0.982, 0.731, 0.999 (invalid), 0.5
    logits = torch.tensor([[4.0, 0.0], [0.0, 1.0], [0.0, 7.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 4)
    valid = torch.tensor([[[True, True, False, True]]])
    labels, weights, q = quality_pseudo_labels(logits, valid, 0.9)
    assert labels.tolist() == [[[0, 1, 255, 0]]]  # the invalid pixel is never pseudo-labelled
    assert q.item() == pytest.approx(1 / 3)  # one of three valid pixels is above 0.9 (the invalid one not counted)
    assert torch.allclose(weights, torch.tensor([[[1 / 3, 1 / 3, 0.0, 1 / 3]]]))
    _, _, q = quality_pseudo_labels(logits, valid, 0.7)
    assert q.item() == pytest.approx(2 / 3)


def test_distribution_alignment_by_hand():
    # one pixel p = (0.6, 0.3, 0.1); pi_s = (0.2, 0.3, 0.5); pbar_t = (0.5, 0.3, 0.2): ratio (0.4, 1, 2.5)
    # -> (0.24, 0.30, 0.25) / 0.79: the argmax moves from class 0 to class 1
    probs = torch.tensor([0.6, 0.3, 0.1]).reshape(1, 3, 1, 1)
    out = align_distribution(probs, torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.24, 0.30, 0.25]) / 0.79)
    # a class the running mean has never seen keeps weight 0 (no division by zero): ratio (0.4, 0.6, 0)
    out = align_distribution(probs, torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.24, 0.18, 0.0]) / 0.42)


def test_classmix_masks_are_exactly_the_chosen_classes_pixels():
    labels = torch.tensor([[[0, 1, 2, 255], [2, 2, 1, 0]],
                           [[3, 3, 3, 3], [3, 255, 3, 3]],
                           [[255, 255, 255, 255], [255, 255, 255, 255]]])
    for seed in range(5):
        masks, chosen = classmix_masks(labels, torch.Generator().manual_seed(seed))
        assert len(chosen[0]) == 2 and set(chosen[0].tolist()) <= {0, 1, 2}  # ceil(3 / 2) of 0, 1, 2; never 255
        assert chosen[1].tolist() == [3] and chosen[2].numel() == 0
        for i in range(3):
            want = torch.isin(labels[i], chosen[i]) if chosen[i].numel() else torch.zeros_like(labels[i], dtype=bool)
            assert torch.equal(masks[i], want)
    # the mixed label / weight: source where pasted, target pseudo-label and quality elsewhere
    pseudo = torch.full_like(labels, 5)
    w = torch.full(labels.shape, 0.25)
    y_mix, w_mix = mix(pseudo, labels, masks), mix(w, torch.ones_like(w), masks)
    assert torch.equal(y_mix[masks], labels[masks]) and bool((y_mix[~masks] == 5).all())
    assert bool((w_mix[masks] == 1).all()) and bool((w_mix[~masks] == 0.25).all())


def test_mic_blocks_too_large_for_the_crops_are_refused_with_the_largest_size_that_fits():
    check_mic_blocks(8, 48, 48)  # 6 blocks per side
    check_mic_blocks(16, 64, 80)  # 4 on the short side
    with pytest.raises(UserInputError, match=r"mic_block_size=64 is too large for the 48 x 48 px target crops: 1 "
                                             r"block\(s\) per side.*at most 12"):
        check_mic_blocks(64, 48, 48)
    with pytest.raises(UserInputError, match="at most 8"):
        check_mic_blocks(16, 32, 40)  # 2 blocks on the short side


def test_mic_block_masks_drop_the_configured_ratio_in_whole_blocks():
    g = torch.Generator().manual_seed(0)
    keep = block_masks(64, 64, 64, 0.7, 8, g)
    assert keep.shape == (64, 64, 64) and set(keep.unique().tolist()) <= {0.0, 1.0}
    assert 1.0 - keep.mean().item() == pytest.approx(0.7, abs=0.02)  # 64 * 64 blocks
    blocks = keep.view(64, 8, 8, 8, 8)  # (B, gy, y, gx, x): each 8 x 8 block is all kept or all masked
    assert torch.equal(blocks.amax((2, 4)), blocks.amin((2, 4)))
    assert block_masks(2, 16, 16, 0.7, 64, g).shape == (2, 16, 16)  # block larger than the image: one block


def test_weighted_ce_and_feature_distance_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).T.reshape(1, 2, 1, 2)  # p = (.25, .75), (.5, .5)
    labels = torch.tensor([[[1, 255]]])
    w = torch.tensor([[[0.5, 1.0]]])
    assert weighted_ce(logits, labels, w).item() == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-6)

    # 4 x 4 labels -> 2 x 2 cells: (0, 0, 0, 1) class 0 at 0.75, (1, 1, 2, 2) none above 0.75,
    # (2, 2, 2, 2) class 2, (255 x 3, 1) the ignore label dominates
    y = torch.tensor([[[0, 0, 1, 1], [0, 1, 2, 2], [2, 2, 255, 255], [2, 2, 255, 1]]])
    assert feature_distance_mask(y, (2, 2), 3, None, 0.75).tolist() == [[[True, False], [True, False]]]
    assert feature_distance_mask(y, (2, 2), 3, (2,), 0.75).tolist() == [[[False, False], [True, False]]]
    assert feature_distance_mask(y, (2, 2), 3, None, 0.5).tolist() == [[[True, True], [True, False]]]
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    b[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 at cell (0, 0)
    b[0, :, 1, 1] = torch.tensor([6.0, 8.0])  # distance 10 at cell (1, 1), outside the mask
    mask = torch.tensor([[[True, False], [True, False]]])
    assert masked_feature_distance(a, b, mask).item() == pytest.approx(2.5)
    assert masked_feature_distance(a, b, torch.zeros_like(mask)).item() == 0.0


def test_rare_class_probabilities_and_tile_weights_give_the_drawn_frequencies():
    p = rare_class_probabilities(torch.tensor([90.0, 9.0, 1.0, 0.0]), 0.1)
    f = np.array([0.9, 0.09, 0.01])
    e = np.exp((1 - f) / 0.1)
    assert np.allclose(p[:3].numpy(), e / e.sum()) and p[3] == 0  # an absent class is never drawn

    # six tiles of one class each (class 0: 3 tiles, class 1: 2, class 2: 1), class 3 only under the min share
    labels = torch.tensor([0, 0, 0, 1, 1, 2]).view(6, 1, 1).expand(6, 10, 10).clone()
    labels[5, 0, 0] = 3
    counts = class_pixel_counts(labels, torch.ones_like(labels, dtype=torch.bool), 4)
    assert counts[5].tolist() == [0, 0, 99, 1] and counts[:, :3].sum() == 599
    weights, probs = rare_class_tile_weights(counts, torch.full((6,), 100.0), 0.5, 0.05)
    assert probs[3] == 0 and probs.sum().item() == pytest.approx(1.0)  # class 3 held by no tile (1 px <= 5 px)
    want = rare_class_probabilities(counts.sum(0), 0.5)[:3]  # f_c over every pixel (class 3's too), as DAFormer
    assert torch.allclose(probs[:3], want / want.sum())
    # per tile: P(c) / |S_c| -> drawing tiles draws classes with P(c)
    assert np.allclose(weights, [probs[0] / 3] * 3 + [probs[1] / 2] * 2 + [probs[2]])
    draws = np.asarray(weighted_epoch_indices(weights, seed=0, epoch=0, length=200_000))
    cls = np.array([0, 0, 0, 1, 1, 2])[draws]
    freq = np.bincount(cls, minlength=3) / len(cls)
    assert np.allclose(freq, probs[:3].numpy(), atol=0.005)
    assert rare_class_tile_weights(counts, torch.full((6,), 1000.0), 0.5, 0.5)[0] is None  # no tile > 500 px


def test_normalised_entropy_bounds():
    uniform, sure = torch.zeros(1, 4, 1, 1), torch.tensor([50.0, 0, 0, 0]).view(1, 4, 1, 1)
    assert normalised_entropy(uniform).item() == pytest.approx(1.0)
    assert normalised_entropy(sure).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The method, one step at a time
# ------------------------------------------------------------------------------------------------------------
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_segmenter("test_resnet", "v3+", 3, 4)


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (2, 32, 32), generator=g)
    y[:, :2] = 255
    x_t = torch.randn(2, 4, 32, 32, generator=g)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[0, :, :4] = False
    x_s = torch.randn(2, 4, 32, 32, generator=g)
    return {"source": {"image": x_s, "mask": y, "valid": torch.ones_like(valid), "strong": x_s.unsqueeze(1) + 0.1},
            "target": {"image": x_t, "valid": valid, "strong": torch.stack([x_t + 0.1, x_t - 0.1], 1)}}


def test_step_with_and_without_an_export_backbone():
    shared = _model()
    exported = lambda: copy.deepcopy(shared)  # (make_model with model.weights: the same backbone)
    setup = SegSetup(3, build_segmentation_loss("ce", 3), make_model=exported, weights="backbone.safetensors")
    method = SelfTrain(SelfTrainConfig(mic_block_size=8), exported(), setup).train()
    assert method.fd_backbone is not None and not method.fd_backbone.training
    assert all(not p.requires_grad for p in method.fd_backbone.parameters())
    out = method.forward(_batch(0), step=0)
    assert torch.isfinite(out["loss"]) and {"loss_fd", "loss_mix", "loss_mic", "pseudo_quality"} <= out.keys()
    assert out["mic_masked"].item() == pytest.approx(0.7, abs=0.2)
    out["loss"].backward()
    frozen = {k: v.clone() for k, v in method.fd_backbone.state_dict().items()}
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.01)
    method.after_optimizer_step(0, 0)  # EMA warm-up: decay min(1 - 1/2, 0.999) = 0.5
    t = dict(method.teacher.named_parameters())
    for n, p in method.model.named_parameters():
        assert torch.allclose(t[n], p - 0.005, atol=1e-6), n
    assert all(torch.equal(v, frozen[k]) for k, v in method.fd_backbone.state_dict().items())
    assert any(k.startswith("fd_backbone.") for k in method.state_dict())

    random_init = SegSetup(3, build_segmentation_loss("ce", 3), make_model=lambda: _model(1))
    plain = SelfTrain(SelfTrainConfig(mic_block_size=8), _model(), random_init).train()
    assert plain.fd_backbone is None and "skipped" in plain.fd_note
    out = plain.forward(_batch(1))
    assert "loss_fd" not in out and torch.isfinite(out["loss"])
    assert export_backbone_copy(random_init) is None  # no model.weights
    assert export_backbone_copy(SegSetup(3, None, make_model=exported, weights="w.safetensors",
                                         init_from="runs/x")) is None  # model.init_from: another run's weights
    with pytest.raises(RuntimeError, match="on_train_start"):
        plain.sampling_weights("source", 0)
    assert plain.sampling_weights("target", 0) is None


def test_distribution_alignment_keeps_a_running_mean_of_the_teachers_valid_target_pixels():
    setup = SegSetup(3, build_segmentation_loss("ce", 3), make_model=lambda: _model(1))
    method = SelfTrain(SelfTrainConfig(mic_block_size=8, distribution_alignment=True, da_momentum=0.9), _model(),
                       setup).train()
    method.da_source_prior.copy_(torch.tensor([0.5, 0.3, 0.2]))
    means = []
    for seed in (0, 1):
        batch = _batch(seed)
        with torch.no_grad():
            p = method.teacher(batch["target"]["image"], return_aux=False).logits.float().softmax(1)
        v = batch["target"]["valid"]
        means.append(p.permute(1, 0, 2, 3)[:, v].mean(1))  # over valid pixels only
        method.forward(batch)
        if seed == 0:  # the first batch sets pbar_t as it is
            torch.testing.assert_close(method.da_target_mean, means[0])
    torch.testing.assert_close(method.da_target_mean, 0.9 * means[0] + 0.1 * means[1])
    assert {"da_source_prior", "da_target_mean"} <= set(method.state_dict())  # checkpointed
    with pytest.raises(ValueError, match="da_momentum"):
        SelfTrainConfig(da_momentum=1.5).validate()


def test_more_target_than_source_tiles_pair_them_cyclically():
    """data.unlabelled_batch_size != data.batch_size: target tile i is mixed with source tile i mod B_s (the
    reference's batches are equal). 3 target tiles, 2 source tiles: tile 2 gets source tile 0's classes."""
    random_init = SegSetup(3, build_segmentation_loss("ce", 3), make_model=lambda: _model(1))
    method = SelfTrain(SelfTrainConfig(mic_block_size=8, mix_weight=1.0), _model(), random_init).train()
    batch = _batch(2)
    t = batch["target"]
    t["image"], t["valid"], t["strong"] = (torch.cat([v, v[:1]]) for v in (t["image"], t["valid"], t["strong"]))
    seen = {}
    real_mix = selftrain_module.mix

    def spy(a, b, mask):
        seen.setdefault("b", []).append(b)
        return real_mix(a, b, mask)

    selftrain_module.mix = spy
    try:
        out = method.forward(batch, step=0)
    finally:
        selftrain_module.mix = real_mix
    assert torch.isfinite(out["loss"])
    x_pasted = seen["b"][0]
    assert x_pasted.shape[0] == 3 and torch.equal(x_pasted[2], batch["source"]["strong"][0, 0])
    assert torch.equal(x_pasted[1], batch["source"]["strong"][1, 0])


def test_config_is_checked():
    for bad in ({"mic_ratio": 1.0}, {"rcs_temperature": 0.0}, {"fd_min_ratio": 0.0}, {"mic_block_size": 0}):
        with pytest.raises(ValueError, match="selftrain."):
            SelfTrainConfig(**bad).validate()


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------
def _tiny(root: Path, steps: int = 4) -> list[str]:
    return [f"data.root={root}", "method=selftrain", "model.arch=test_resnet", "data.batch_size=2",
            f"trainer.max_steps={steps}", "trainer.eval_every=2", "trainer.checkpoint_every=2",
            "trainer.progress_bar=false", "trainer.log_every=1", "optim.warmup_steps=1", "eval.batch_size=8",
            "selftrain.mic_block_size=8", "selftrain.rcs_temperature=0.5"]


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory) -> Path:
    from finetune.uda import main

    out = tmp_path_factory.mktemp("selftrain") / "run"
    main(["--config", CONFIG, "--output-dir", str(out), *_tiny(tiny_demo / "s2" / "source"),
          "trainer.best_metric=target_entropy", "trainer.best_mode=min"])
    return out


def test_run_without_an_export_reports_target_entropy(run, capsys):
    final = json.loads((run / "metrics.json").read_text())
    assert final["method"] == "selftrain" and final["best_metric"] == "target_entropy"
    assert 0.0 <= final["last"]["target_entropy"] <= 1.0 and "target_val/mIoU" in final["last"]
    for key in ("loss_sup", "loss_mix", "loss_mic", "pseudo_quality", "mix_frac", "mic_masked"):
        assert key in final["train"], key
    assert "loss_fd" not in final["train"]
    state = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("teacher.") for k in state) and not any(k.startswith("fd_backbone.") for k in state)


def test_a_run_with_distribution_alignment_takes_the_source_prior_from_the_masks(tiny_demo, tmp_path, capsys):
    from finetune.uda import main

    out = tmp_path / "run"
    main(["--config", CONFIG, "--output-dir", str(out), *_tiny(tiny_demo / "s2" / "source", steps=2),
          "selftrain.distribution_alignment=true", "trainer.eval_every=2"])
    assert "distribution alignment to the source pixel classes" in capsys.readouterr().out
    state = load_file(str(out / "checkpoints" / "last.safetensors"))
    prior, mean = state["da_source_prior"], state["da_target_mean"]
    assert prior.sum().item() == pytest.approx(1.0) and mean.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (prior > 0).sum() >= 2


def test_run_with_an_export_keeps_the_frozen_backbone(tiny_demo, tmp_path):
    import timm

    from common.weights import ExportMeta, Normalisation, write_export
    from finetune.uda import main

    stats = json.loads((tiny_demo / "s2" / "stats.json").read_text())
    torch.manual_seed(1)
    net = timm.create_model("test_resnet", in_chans=12, num_classes=0)
    meta = ExportMeta("test_resnet", 12, list(stats["bands"]), "S2L2A",
                      Normalisation("dn_to_reflectance", [stats["mean"][b] for b in stats["bands"]],
                                    [stats["std"][b] for b in stats["bands"]]), int(net.num_features),
                      {"method": "dino"})
    export, _ = write_export(net.state_dict(), meta, tmp_path / "backbone.safetensors")
    out = tmp_path / "run"
    final = main(["--config", CONFIG, "--output-dir", str(out), *_tiny(tiny_demo / "s2" / "source", steps=2),
                  f"model.weights={export}", "selftrain.fd_classes=[0,5]", "selftrain.fd_min_ratio=0.5"])
    assert "loss_fd" in final["train"] and final["train"]["loss_fd"] >= 0.0
    state = load_file(str(out / "checkpoints" / "last.safetensors"))
    exported = load_file(str(export))
    fd = {k[len("fd_backbone.model."):]: v for k, v in state.items() if k.startswith("fd_backbone.model.")}
    assert fd and all(torch.equal(fd[k], exported[k]) for k in exported if k in fd)  # frozen: still the export
    assert len([k for k in exported if k in fd]) >= len(exported) - 2


def test_resume_mid_run_matches_uninterrupted(run, tiny_demo, tmp_path):
    from finetune.uda import main

    cut = cut_back(run, tmp_path / "cut")
    main(["--config", CONFIG, "--output-dir", str(cut), "--resume", *_tiny(tiny_demo / "s2" / "source"),
          "trainer.best_metric=target_entropy", "trainer.best_mode=min"])
    assert_same_last_weights(run, cut)  # student and teacher
    fa, fb = (json.loads((d / "metrics.json").read_text()) for d in (run, cut))
    assert fa["last"]["target_entropy"] == fb["last"]["target_entropy"]


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    out = tmp_path / "run2"
    res = launch("finetune/uda.py", ["--config", CONFIG, "--output-dir", str(out),
                                     *_tiny(tiny_demo / "s2" / "source", steps=2)], processes=2)
    assert "rare-class sampling P(c)" in res.stdout + res.stderr
    final = json.loads((out / "metrics.json").read_text())
    assert final["num_processes"] == 2 and 0.0 <= final["last"]["target_entropy"] <= 1.0
    assert final["train"]["loss"] == final["train"]["loss"]  # finite


def test_the_masked_pass_leaves_batchnorm_running_statistics_alone():
    """MIC's masked images are a sample of neither domain: with ``mic_freeze_bn_stats`` the forward inside
    ``bn_stats_frozen`` normalises with batch statistics (same output and gradients) but leaves the running
    statistics and restores each layer's momentum."""
    from finetune.methods.common import bn_stats_frozen

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.1),
                              torch.nn.BatchNorm2d(4, momentum=None)).train()
    x = torch.randn(2, 3, 8, 8)
    before = copy.deepcopy(net.state_dict())
    with bn_stats_frozen(net):
        frozen_out = net(x)
    after = copy.deepcopy(net.state_dict())
    for k in before:
        if "running" in k:
            assert torch.equal(before[k], after[k]), k
    assert net[1].momentum == 0.1 and net[2].momentum is None
    free_out = net(x)  # the same batch statistics normalise the output
    assert torch.allclose(frozen_out, free_out)
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])  # outside: updated as usual
    updated = net[1].running_mean.clone()
    with bn_stats_frozen(net, frozen=False):
        net(x)
    assert not torch.equal(net[1].running_mean, updated)
