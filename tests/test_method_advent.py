"""ADVENT (finetune/methods/advent.py): entropy and self-information maps, the class-ratio prior and IntraDA's
entropy-ranked split on hand-made tensors; one step of each mode (which module gets which gradient, the source 0 /
target 1 convention and the released weights, recomputed by hand); tiny end-to-end runs (MinEnt + AdvEnt + prior,
the prior from the source labels, bit-exact resume, the intra-domain stage from a first run, two processes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from safetensors.torch import load_file

from common.errors import UserInputError
from conftest import REPO, assert_same_last_weights, cut_back, launch
from finetune.discriminator import bce_to_label, valid_fraction
from finetune.methods.advent import (
    Advent,
    AdventConfig,
    IntraConfig,
    class_prior_loss,
    entropy_loss,
    entropy_rank_split,
    masked_cross_entropy,
    normalised_entropy,
    self_information,
    source_class_prior,
)
from test_method_adaptsegnet import RecordingCtx, check_gradient_isolation, segmenter, setup, uda_batch

CONFIG = str(REPO / "configs" / "finetune" / "demo_uda.yaml")


def logits_of(*probs: list[float]) -> torch.Tensor:
    """(1, K, 1, N) logits whose softmax at pixel n is probs[n]."""
    return torch.tensor(probs, dtype=torch.float64).log().T.reshape(1, len(probs[0]), 1, len(probs)).float()


# ------------------------------------------------------------------------------------------------------------
# Building blocks by hand
# ------------------------------------------------------------------------------------------------------------
def test_entropy_and_self_information_by_hand():
    two = torch.tensor([[0.0, 0.0], [0.0, -1000.0]]).T.reshape(1, 2, 1, 2)  # p = (0.5, 0.5) and (1, 0)
    assert torch.allclose(self_information(two)[0, :, 0, 0], torch.tensor([0.5, 0.5]))  # 0.5 ln 2 / ln 2
    assert torch.allclose(normalised_entropy(two)[0, 0], torch.tensor([1.0, 0.0]), atol=1e-6)
    # three classes, p = (0.7, 0.2, 0.1): -p ln p / ln 3 = (0.227262, 0.292995, 0.209590), sum 0.729847
    three = logits_of([0.7, 0.2, 0.1])
    assert torch.allclose(self_information(three)[0, :, 0, 0], torch.tensor([0.227262, 0.292995, 0.209590]),
                          atol=1e-6)
    assert abs(float(normalised_entropy(three)) - 0.729847) < 1e-6
    with pytest.raises(ValueError):
        self_information(torch.zeros(1, 1, 2, 2))


def test_entropy_loss_averages_valid_pixels_of_the_selected_samples():
    x = logits_of([0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3])  # entropies 0.729847 and 1
    valid = torch.tensor([[[True, False]]])
    assert abs(float(entropy_loss(x, valid)) - 0.729847) < 1e-6  # the nodata pixel does not count
    assert abs(float(entropy_loss(x)) - (0.729847 + 1) / 2) < 1e-6
    both = torch.cat([x, logits_of([1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3])])
    assert abs(float(entropy_loss(both, sample_weight=torch.tensor([0.0, 1.0]))) - 1.0) < 1e-6
    assert float(entropy_loss(both, sample_weight=torch.zeros(2))) == 0.0


def test_class_prior_by_hand():
    assert torch.allclose(source_class_prior(torch.tensor([2.0, 1.0, 1.0])), torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(source_class_prior(torch.zeros(4)), torch.full((4,), 0.25))
    prior = torch.tensor([0.5, 0.3, 0.2])  # mu = 0.5 -> (0.25, 0.15, 0.10)
    x = logits_of([0.7, 0.2, 0.1], [0.9, 0.05, 0.05], [0.01, 0.01, 0.98])
    valid = torch.tensor([[[True, True, False]]])
    # valid pixels' mean (0.8, 0.125, 0.075): hinge (0, 0.025, 0.025) -> 0.05
    assert abs(float(class_prior_loss(x, prior, 0.5, valid)) - 0.05) < 1e-6
    # with the nodata pixel the mean is (0.5367, 0.0867, 0.3767): hinge (0, 0.0633, 0) -> 0.063333
    assert abs(float(class_prior_loss(x, prior, 0.5)) - (0.15 - 0.26 / 3)) < 1e-6
    assert float(class_prior_loss(x, prior, 0.0, valid)) == 0.0


def test_entropy_ranked_split_and_masked_cross_entropy():
    scores = torch.tensor([0.3, 0.1, 0.2, 0.1, float("inf")])
    assert entropy_rank_split(scores, 0.5).tolist() == [False, True, False, True, False]  # floor(2.5), ties by index
    assert entropy_rank_split(scores, 0.67).tolist() == [False, True, True, True, False]
    logits = torch.zeros(1, 2, 1, 2, requires_grad=True)
    assert float(masked_cross_entropy(logits, torch.tensor([[[0, 255]]])).detach()) == pytest.approx(math.log(2))
    empty = masked_cross_entropy(logits, torch.full((1, 1, 2), 255))
    empty.backward()
    assert float(empty.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------------------------
# One step of each mode, recomputed by hand
# ------------------------------------------------------------------------------------------------------------
def _hand_disc(method, level: str, maps_s, v_s, maps_t, v_t) -> tuple[float, float, float]:
    d = getattr(method, f"disc_{level}")
    d_s, d_t = d(maps_s * v_s.unsqueeze(1)), d(maps_t * v_t.unsqueeze(1))
    w_s, w_t = valid_fraction(v_s, d_s.shape[-2:], 2), valid_fraction(v_t, d_t.shape[-2:], 2)
    return (float(bce_to_label(d_t, 0.0, w_t)), 0.5 * float(bce_to_label(d_s, 0.0, w_s)),
            0.5 * float(bce_to_label(d_t, 1.0, w_t)))


def test_both_modes_with_prior_step_by_hand():
    cfg = AdventConfig(mode="both", class_prior_weight=0.1)
    method = Advent(cfg, segmenter(), setup())
    method.class_prior.copy_(torch.tensor([0.6, 0.3, 0.1]))
    batch = uda_batch()
    ctx = RecordingCtx(method)
    logs = method.training_step(batch, ctx)
    assert set(logs) == {"loss_seg", "loss_seg_aux", "loss_entropy", "loss_entropy_aux", "loss_class_prior",
                         "loss_adv", "loss_adv_aux", "loss_disc", "loss_disc_aux"}
    check_gradient_isolation(ctx, ["disc_main", "disc_aux"])
    src, tgt = batch["source"], batch["target"]
    with torch.no_grad():
        out_s, out_t = method.model(src["image"]), method.model(tgt["image"])
        ent = {lv: float(entropy_loss(o, tgt["valid"])) for lv, o in (("main", out_t.logits), ("aux", out_t.aux))}
        cp = float(class_prior_loss(out_t.logits, method.class_prior, 0.5, tgt["valid"]))
        hand = {lv: _hand_disc(method, lv, self_information(s), src["valid"], self_information(t), tgt["valid"])
                for lv, s, t in (("main", out_s.logits, out_t.logits), ("aux", out_s.aux, out_t.aux))}
    want = 0.001 * ent["main"] + 0.0002 * ent["aux"] + 0.1 * cp + 0.001 * hand["main"][0] + 0.0002 * hand["aux"][0]
    assert abs(ctx.backwards[1][1] - want) < 1e-6
    assert abs(float(logs["loss_entropy"]) - ent["main"]) < 1e-6 and abs(float(logs["loss_class_prior"]) - cp) < 1e-6
    disc = [hand["main"][1], hand["main"][2], hand["aux"][1], hand["aux"][2]]
    assert [n for n, _ in ctx.backwards] == ["main", "main", "disc_main", "disc_main", "disc_aux", "disc_aux"]
    for (name, value), w in zip(ctx.backwards[2:], disc):
        assert abs(value - w) < 1e-6, name


def test_minent_mode_has_no_discriminator():
    method = Advent(AdventConfig(mode="minent", levels=("main",)), segmenter(aux=False), setup())
    assert method.trainable == ("model",) and set(method.optimizers()) == {"main"}
    ctx = RecordingCtx(method)
    logs = method.training_step(uda_batch(), ctx)
    assert set(logs) == {"loss_seg", "loss_entropy"} and [n for n, _ in ctx.steps] == ["main"]
    with pytest.raises(UserInputError, match=r"model\.aux=true.*advent\.levels=\[main\]"):
        Advent(AdventConfig(), segmenter(aux=False), setup())
    for bad in (dict(ent_weight=-1.0), dict(levels=("aux", "aux")), dict(intra=IntraConfig(easy_fraction=1.0))):
        with pytest.raises(ValueError, match="advent"):
            AdventConfig(**bad).validate()


def test_intra_step_easy_tiles_are_source_like():
    method = Advent(AdventConfig(intra=IntraConfig(enabled=True)), segmenter(), setup())
    method.intra_easy = torch.tensor([True, False])  # target tile 0 easy, tile 1 hard (the batch's indices 0, 1)
    method.train()
    assert not method.labeller.training and not any(p.requires_grad for p in method.labeller.parameters())
    batch = uda_batch()
    ctx = RecordingCtx(method)
    logs = method.training_step(batch, ctx)
    assert {"loss_pseudo", "easy_frac", "loss_adv", "loss_disc"} <= set(logs) and float(logs["easy_frac"]) == 0.5
    check_gradient_isolation(ctx, ["disc_main", "disc_aux"])
    assert all(p.grad is None for p in method.labeller.parameters())
    tgt = batch["target"]
    with torch.no_grad():
        out_t = method.model(tgt["image"])
        pseudo = method.labeller(tgt["image"]).logits.argmax(1)
        pseudo[1] = 255  # hard tile: no pseudo-label
        pseudo[~tgt["valid"]] = 255
        assert abs(float(logs["loss_pseudo"]) - float(masked_cross_entropy(out_t.logits, pseudo))) < 1e-6
        d = method.disc_main(self_information(out_t.logits) * tgt["valid"].unsqueeze(1))
        w = valid_fraction(tgt["valid"], d.shape[-2:], 2)
        e = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
        adv = float(bce_to_label(d, 0.0, w * (1 - e)))  # G: the hard tile should look easy
        disc = 0.5 * (float(bce_to_label(d, 0.0, w * e)) + float(bce_to_label(d, 1.0, w * (1 - e))))
    assert abs(float(logs["loss_adv"]) - adv) < 1e-6 and abs(float(logs["loss_disc"]) - disc) < 1e-6


# ------------------------------------------------------------------------------------------------------------
# End to end (in-process finetune.uda.main; two processes through accelerate launch)
# ------------------------------------------------------------------------------------------------------------
def overrides(root: Path, steps: int = 4, *extra: str) -> list[str]:
    return ["method=advent", f"data.root={root}", "model.arch=test_resnet", "model.version=v2", "model.aux=true",
            "data.batch_size=2", f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=2",
            "trainer.checkpoint_every=2", "trainer.progress_bar=false", "optim.name=sgd", "optim.lr=0.01",
            "optim.warmup_steps=1", "eval.batch_size=8", "advent.mode=both", "advent.class_prior_weight=0.1", *extra]


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory) -> Path:
    from finetune.uda import main

    out = tmp_path_factory.mktemp("advent") / "run"
    main(["--config", CONFIG, "--output-dir", str(out), *overrides(tiny_demo / "s2" / "source")])
    return out


def test_run_logs_losses_and_holds_the_source_prior(run, tiny_demo):
    final = json.loads((run / "metrics.json").read_text())
    assert final["method"] == "advent" and final["selection"] == "validation" and final["last"]["step"] == 4
    assert 0 <= final["last"]["target_val/mIoU"] <= 100
    for key in ("loss_seg", "loss_seg_aux", "loss_entropy", "loss_entropy_aux", "loss_class_prior", "loss_adv",
                "loss_adv_aux", "loss_disc", "loss_disc_aux"):
        assert key in final["train"] and math.isfinite(final["train"][key]), key
    state = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("disc_main.") for k in state) and any(k.startswith("disc_aux.") for k in state)
    # the prior: the label histogram of the valid pixels of every source training tile (some have nodata edges)
    root = tiny_demo / "s2" / "source"
    counts = np.zeros(6)
    nodata = 0
    for tile in (root / "splits" / "train_all.txt").read_text().split():
        with rasterio.open(root / "images" / f"{tile}.tif") as src:
            invalid = (src.read() == src.nodata).any(0)
        with rasterio.open(root / "masks" / f"{tile}.tif") as src:
            m = src.read(1)
        nodata += int(invalid.sum())
        counts += np.bincount(m[(m != 255) & ~invalid].ravel(), minlength=6)[:6]
    assert nodata > 0  # nodata pixels exist and do not count
    assert torch.allclose(state["class_prior"], torch.tensor(counts / counts.sum(), dtype=torch.float32), atol=1e-7)


def test_resume_mid_run_matches_uninterrupted(run, tiny_demo, tmp_path):
    from finetune.uda import main

    cut = cut_back(run, tmp_path / "cut")
    main(["--config", CONFIG, "--output-dir", str(cut), "--resume", *overrides(tiny_demo / "s2" / "source")])
    assert_same_last_weights(run, cut)  # segmenter, both discriminators, class prior


def test_intra_domain_stage_from_a_first_run(run, tiny_demo, tmp_path):
    from finetune.uda import main

    out = tmp_path / "intra"
    final = main(["--config", CONFIG, "--output-dir", str(out),
                  *overrides(tiny_demo / "s2" / "source", 2, "advent.mode=advent", "advent.class_prior_weight=0",
                             "advent.intra.enabled=true", f"model.init_from={run}", "model.init_checkpoint=last")])
    assert {"loss_pseudo", "easy_frac", "loss_adv", "loss_disc"} <= set(final["train"])
    assert math.isfinite(final["train"]["loss_pseudo"]) and 0 <= final["last"]["target_val/mIoU"] <= 100
    split = out / "intra_split"
    easy, hard = (split / "easy.txt").read_text().split(), (split / "hard.txt").read_text().split()
    target = (tiny_demo / "s2" / "target" / "splits" / "train_all.txt").read_text().split()
    assert len(easy) == int(len(target) * 0.67) and sorted(easy + hard) == sorted(target)
    scores = {line.split("\t")[0]: float(line.split("\t")[1])
              for name in ("easy", "hard") for line in (split / f"{name}_entropy.tsv").read_text().splitlines()}
    assert max(scores[t] for t in easy) <= min(scores[t] for t in hard)
    state = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert int(state["intra_easy"].sum()) == len(easy) and state["intra_entropy"].shape == (len(target),)
    # the labeller is the first run's segmenter, frozen
    first = load_file(str(run / "checkpoints" / "last.safetensors"))
    for key, value in first.items():
        if key.startswith("model."):
            assert torch.equal(state["labeller." + key[len("model."):]], value), key


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    out = tmp_path / "ddp"
    launch("finetune/uda.py", ["--config", CONFIG, "--output-dir", str(out),
                               *overrides(tiny_demo / "s2" / "source", 2)], processes=2)
    final = json.loads((out / "metrics.json").read_text())
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4
    assert all(math.isfinite(final["train"][k]) for k in ("loss_entropy", "loss_adv", "loss_disc", "loss_class_prior"))
    assert json.loads((out / "metrics.json").read_text())["selection"] == "validation"
