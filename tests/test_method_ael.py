"""AEL (finetune/methods/ael.py): its building blocks on hand-made tensors (copy-paste, adaptive CutMix, the class
confidence and its bank, the re-weighted consistency loss), one step of the method, the bank's all-reduce over two
processes, and tiny end-to-end runs on the S2 and SAR demo data (checkpointed bank, bit-exact resume)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.errors import UserInputError
from conftest import REPO, assert_same_last_weights, cut_back, launch
from finetune.deeplab import create_segmenter
from finetune.losses import build_segmentation_loss
from finetune.methods.ael import (
    AEL,
    AELConfig,
    adaptive_cutmix_masks,
    class_confidence,
    class_confidence_sums,
    class_presence,
    class_probabilities,
    copy_paste,
    reweighted_consistency,
    sampling_mask,
    update_confidence_bank,
)
from finetune.methods.base import SegSetup
from finetune.methods.common import mix, pseudo_labels

CONFIG = str(REPO / "configs" / "finetune" / "demo.yaml")
SAR_CONFIG = str(REPO / "configs" / "finetune" / "demo_sar.yaml")
BANK_KEYS = ("confidence", "bank_images", "bank_valid", "bank_classes", "bank_count", "bank_next")


# ------------------------------------------------------------------------------------------------------------
# Building blocks on hand-made tensors
# ------------------------------------------------------------------------------------------------------------
def test_copy_paste_composes_image_label_and_valid_of_the_chosen_classes():
    x = torch.stack([torch.arange(6.0).view(1, 2, 3), 100 + torch.arange(6.0).view(1, 2, 3)])  # (2, 1, 2, 3)
    y = torch.tensor([[[0, 0, 0], [0, 0, 0]],
                      [[1, 2, 255], [2, 1, 0]]])
    v = torch.ones(2, 2, 3, dtype=torch.bool)
    v[1, 1, 1] = False
    partner, paste = torch.tensor([1, 0]), torch.tensor([True, False])

    img, lab, val, alpha = copy_paste(x, y, v, partner, paste, torch.tensor([1]))
    # sample 0 receives sample 1's class-1 pixels (0, 0) and (1, 1); sample 1 (no paste) is unchanged
    assert torch.equal(img[0, 0], torch.tensor([[100.0, 1, 2], [3, 104, 5]]))
    assert torch.equal(lab[0], torch.tensor([[1, 0, 0], [0, 1, 0]]))
    assert torch.equal(val[0], torch.tensor([[True, True, True], [True, False, True]]))  # valid comes along
    assert torch.equal(img[1], x[1]) and torch.equal(lab[1], y[1]) and torch.equal(val[1], v[1])
    assert int(alpha.sum()) == 2

    img, lab, _, _ = copy_paste(x, y, v, partner, paste, torch.tensor([1, 2]))
    assert torch.equal(img[0, 0], torch.tensor([[100.0, 101, 2], [103, 104, 5]]))
    assert torch.equal(lab[0], torch.tensor([[1, 2, 0], [2, 1, 0]]))  # 255 (ignore) is never pasted


def test_class_confidence_is_the_mean_true_class_probability_and_zero_for_absent_classes():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])  # 4 pixels, 3 classes
    logits = p.log().T.reshape(1, 3, 1, 4)  # softmax(log p) = p
    target = torch.tensor([[[0, 0, 1, 255]]])
    sums, counts = class_confidence_sums(logits, target, 3)
    assert torch.allclose(sums, torch.tensor([1.2, 0.8, 0.0]), atol=1e-6)
    assert torch.equal(counts, torch.tensor([2.0, 1.0, 0.0]))
    # class 0: (0.7 + 0.5) / 2; class 1: 0.8; class 2 absent (its only high-probability pixel is ignored): 0
    assert torch.allclose(class_confidence(logits, target, 3), torch.tensor([0.6, 0.8, 0.0]), atol=1e-6)


def test_bank_update_momentum_by_hand():
    bank = torch.tensor([0.5, 0.5, 0.5])
    new = update_confidence_bank(bank, torch.tensor([0.6, 0.8, 0.0]), 0.999)
    assert torch.allclose(new, torch.tensor([0.5001, 0.5003, 0.4995]), atol=1e-7)
    assert torch.allclose(update_confidence_bank(new, torch.tensor([1.0, 0.0, 0.0]), 0.9),
                          torch.tensor([0.9 * 0.5001 + 0.1, 0.9 * 0.5003, 0.9 * 0.4995]), atol=1e-7)


def test_class_sampling_favours_low_confidence_and_skips_excluded_classes():
    bank = torch.tensor([0.0, 0.75, 1.0])
    e = [math.e, math.exp(0.5), 1.0]  # exp((1 - bank)^0.5) = exp(1), exp(0.5), exp(0)
    q = class_probabilities(bank, 0.5)
    assert torch.allclose(q, torch.tensor(e, dtype=q.dtype) / sum(e))
    q = class_probabilities(bank, 0.5, torch.tensor([False, True, True]))
    assert q[0] == 0 and torch.allclose(q[1:], torch.tensor(e[1:], dtype=q.dtype) / sum(e[1:]))


def _partner_map() -> torch.Tensor:
    """A 6x6 class map: an L-shaped class-1 region, one diagonal neighbour at (4, 5), an isolated pixel at (5, 0)."""
    m = torch.zeros(6, 6, dtype=torch.long)
    for yx in ((1, 2), (1, 3), (2, 2), (3, 2), (3, 3), (3, 4), (4, 5), (5, 0)):
        m[yx] = 1
    return m


def test_adaptive_cutmix_cuts_the_bounding_box_of_a_predicted_region_and_mixes_images_and_targets():
    pred = torch.stack([_partner_map(), _partner_map()])
    valid = torch.ones(2, 6, 6, dtype=torch.bool)
    u = torch.tensor([[0.3, 0.0, 0.0, 0.0], [0.3, 0.0, 0.0, 1.0]], dtype=torch.float64)
    # sample 0: class 1, regions above 0.05 * 36 = 1.8 px: the L plus its 8-connected diagonal neighbour (7 px)
    # -> box rows 1..4, cols 2..5; the isolated pixel is too small. Sample 1: class 2 is absent -> random box of
    # half the area: height fraction exp(0 * log 0.5) = 1 (6 rows), width 0.5 (3 cols), left = round(3 * 1.0) = 3
    masks, found = adaptive_cutmix_masks(pred, valid, torch.tensor([1, 2]), 0.05, 0.5, u)
    expected = torch.zeros(2, 6, 6, dtype=torch.bool)
    expected[0, 1:5, 2:6] = True
    expected[1, :, 3:6] = True
    assert torch.equal(masks, expected) and found.tolist() == [True, False]

    # invalid pixels belong to no region: without (4, 5) the box shrinks to rows 1..3, cols 2..4
    valid[0, 4, 5] = False
    masks, _ = adaptive_cutmix_masks(pred, valid, torch.tensor([1, 2]), 0.05, 0.5, u)
    assert torch.equal(masks[0].nonzero().amin(0), torch.tensor([1, 2]))
    assert torch.equal(masks[0].nonzero().amax(0), torch.tensor([3, 4])) and int(masks[0].sum()) == 9

    # mixing: the student sees the partner's pixels inside the box, the target follows the partner's prediction
    x_u, x_b = torch.zeros(2, 3, 6, 6), torch.ones(2, 3, 6, 6)
    t_u = torch.tensor([4.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 6, 6)  # teacher: class 0 on x_u
    t_b = torch.tensor([0.0, 0.0, 4.0]).view(1, 3, 1, 1).expand(2, 3, 6, 6)  # class 2 on the partner
    v_u, v_b = torch.ones(2, 6, 6, dtype=torch.bool), torch.zeros(2, 6, 6, dtype=torch.bool)
    v_b[:, :, 5] = True  # the partner is valid only in its last column
    mixed = mix(x_u, x_b, masks)
    assert torch.equal(mixed, masks.unsqueeze(1).expand(2, 3, 6, 6).float())
    labels, conf, _ = pseudo_labels(mix(t_u, t_b, masks), 0.0, mix(v_u, v_b, masks))
    want = torch.where(masks, torch.full_like(labels, 2), torch.zeros_like(labels))
    want[masks & ~v_b] = 255  # invalid partner pixels are never pseudo-labelled
    assert torch.equal(labels, want)
    assert torch.allclose(conf, torch.full_like(conf, math.exp(4) / (math.exp(4) + 2)))


def test_class_presence_counts_valid_pixels_above_the_area_threshold():
    pred = _partner_map().unsqueeze(0)
    valid = torch.ones(1, 6, 6, dtype=torch.bool)
    # class 0: 28 px, class 1: 8 px, class 2: none; threshold 0.2 * 36 = 7.2 px
    assert class_presence(pred, valid, 3, 0.2).tolist() == [[1, 1, 0]]
    valid[0, 1, :] = False  # class 1 loses 2 px -> 6 < 7.2
    assert class_presence(pred, valid, 3, 0.2).tolist() == [[1, 0, 0]]
    assert class_presence(pred, valid, 3, 0.0).tolist() == [[1, 1, 0]]  # an absent class is never present


def test_sampling_keeps_pixels_with_the_class_rate_of_the_students_prediction():
    bank = torch.tensor([0.2, 0.6, 1.0])  # 1 - bank = 0.8, 0.4, 0 -> d = 1, 0.5, 0
    pred = torch.tensor([[[0, 1, 1, 2]]])
    rand = torch.tensor([[[0.01, 0.4, 0.6, 0.99]]])
    assert sampling_mask(pred, bank, 1.0, rand).tolist() == [[[True, False, True, False]]]
    assert sampling_mask(pred, bank, 2.0, rand).tolist() == [[[True, False, False, False]]]  # d = 1, 0.25, 0


def test_reweighted_consistency_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).T.reshape(1, 2, 1, 3)
    pseudo = torch.tensor([[[0, 0, 255]]])
    conf = torch.tensor([[[0.9, 0.6, 0.5]]])
    ce0, ce1 = math.log(1 + math.exp(-2)), math.log(1 + math.e)
    w0, w1, w2 = 0.81, 0.36, 0.25  # conf ** 2
    kept = reweighted_consistency(logits, conf, pseudo, 2.0)
    assert kept.item() == pytest.approx((w0 * ce0 + w1 * ce1) / (w0 + w1), rel=1e-6)
    every = reweighted_consistency(logits, conf, pseudo, 2.0, denominator="all")  # the reference's denominator
    assert every.item() == pytest.approx((w0 * ce0 + w1 * ce1) / (w0 + w1 + w2), rel=1e-6)
    keep = torch.tensor([[[True, False, True]]])
    assert reweighted_consistency(logits, conf, pseudo, 2.0, keep=keep).item() == pytest.approx(ce0, rel=1e-6)
    assert reweighted_consistency(logits, conf, pseudo, 2.0, keep=keep, denominator="all").item() == \
        pytest.approx(w0 * ce0 / (w0 + w2), rel=1e-6)


# ------------------------------------------------------------------------------------------------------------
# The method, one step at a time
# ------------------------------------------------------------------------------------------------------------
def _method(**kw) -> AEL:
    torch.manual_seed(0)
    model = create_segmenter("test_resnet", "v3+", 3, 4)
    for m in model.modules():  # no dropout: the test recomputes the student's output
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    method = AEL(AELConfig(**kw), model, SegSetup(3, build_segmentation_loss("ce", 3), class_names=("a", "b", "c")))
    return method.train()


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (2, 16, 16), generator=g)  # class 2 never labelled
    y[:, 0, :] = 255
    x_u = torch.randn(2, 4, 16, 16, generator=g)
    ones = torch.ones(2, 16, 16, dtype=torch.bool)
    return {"labelled": {"image": torch.randn(2, 4, 16, 16, generator=g), "mask": y, "valid": ones},
            "unlabelled": {"image": x_u, "strong": x_u.unsqueeze(1) + 0.1, "valid": ones}}


def test_step_updates_the_bank_fills_the_cutmix_bank_and_survives_a_state_dict_round_trip():
    method = _method(copy_paste=False, bank_size=2, bank_push=1)
    for step in range(3):
        batch = _batch(step)
        with torch.no_grad():
            student = method.model(batch["labelled"]["image"]).logits
        before = method.confidence.clone()
        out = method.forward(batch, step=step)
        out["loss"].backward()
        method.after_optimizer_step(step, 0)
        want = update_confidence_bank(before, class_confidence(student, batch["labelled"]["mask"], 3), 0.999)
        assert torch.allclose(method.confidence, want, atol=1e-7, rtol=0)
        assert method.confidence[2] < before[2]  # the unlabelled class decays: it will be drawn more
        assert torch.isfinite(out["loss"]) and int(method.bank_count) == min(step + 1, 2)
        mixed = float(out["cutmix_frac"])
        assert mixed == 0.0 if step == 0 else mixed > 0.0  # the bank is empty at the first step: no mixing
        if step == 0:  # EMA warm-up: decay min(1 - 1/1, 0.99) = 0 -> the teacher is the student
            assert all(torch.equal(a, b) for a, b in zip(method.teacher.parameters(), method.model.parameters()))
    # a ring buffer of the first image of each step's unlabelled batch: step 2's image replaced step 0's
    assert torch.equal(method.bank_images[0], _batch(2)["unlabelled"]["image"][0])
    assert torch.equal(method.bank_images[1], _batch(1)["unlabelled"]["image"][0]) and int(method.bank_next) == 1

    # partners hold the drawn class whenever some bank image does
    slots, classes = method._pick_partners(method.confidence, 32, torch.Generator().manual_seed(1))
    presence = method.bank_classes.bool()
    for s, c in zip(slots.tolist(), classes.tolist()):
        assert presence[s, c] or not presence[:, c].any()

    fresh = _method(copy_paste=False, bank_size=2)
    fresh.load_state_dict(method.state_dict(), strict=True)  # the lazily sized bank takes the checkpoint's shape
    for key in BANK_KEYS:
        assert torch.equal(getattr(fresh, key), getattr(method, key)), key
    assert AEL.eval_prefix == "model." and method.eval_prefix == "teacher." and method.eval_model is method.teacher


def test_switches_off_and_strong_view_step():
    """The ablations of the paper (no CutMix bank, no sampling, no labelled consistency) and the strong view run."""
    method = _method(adaptive_cutmix=False, dynamic_sampling=False, labelled_consistency=False, student_view="strong",
                     copy_paste_exclude=(0,), copy_paste_prob=1.0, copy_paste_classes=8, consistency_denominator="all")
    out = method.forward(_batch(0))
    assert torch.isfinite(out["loss"]) and "loss_cons_l" not in out and "sampled_frac" not in out
    assert "bank_images" not in method.state_dict() and "confidence" in method.state_dict()
    # class 0 is excluded and class 2 never labelled: every pasted pixel carries label 1, from the partner
    lab = _batch(0)["labelled"]
    x, y, _, alpha = method._copy_paste(lab["image"], lab["mask"], lab["valid"], method.confidence,
                                        torch.Generator().manual_seed(0))
    assert alpha.any() and bool((y[alpha] == 1).all()) and torch.equal(y[alpha], lab["mask"].flip(0)[alpha])
    assert torch.equal(x.permute(0, 2, 3, 1)[alpha], lab["image"].flip(0).permute(0, 2, 3, 1)[alpha])


def test_config_and_classes_are_checked():
    for bad in ({"ema_decay": 1.5}, {"bank_size": 0}, {"copy_paste_exclude": (1, 1)}, {"gamma": -1.0}):
        with pytest.raises(ValueError, match="ael."):
            AELConfig(**bad).validate()
    with pytest.raises(UserInputError, match=r"copy_paste_exclude lists \[3\].*0 a, 1 b, 2 c"):
        _method(copy_paste_exclude=(3,))
    with pytest.raises(UserInputError, match="excludes every class"):
        _method(copy_paste_exclude=(0, 1, 2))


def test_rampup_longer_than_the_run_is_refused():
    class Ctx:
        total_steps = 4

    with pytest.raises(UserInputError, match=r"ael.rampup_steps=5 is longer than the run \(4 steps\)"):
        _method(rampup_steps=5).on_train_start(Ctx())


# ------------------------------------------------------------------------------------------------------------
# End to end through accelerate launch
# ------------------------------------------------------------------------------------------------------------
def _overrides(root: Path, steps: int = 4) -> list[str]:
    return ["method=ael", f"data.root={root}", "data.batch_size=2",
            "data.unlabelled_batch_size=2", "model.arch=test_resnet",
            f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=2", "trainer.checkpoint_every=2",
            "trainer.progress_bar=false", "optim.warmup_steps=1", "eval.batch_size=4",
            f"ael.rampup_steps={min(2, steps)}",  # the demo recipe's 150-step ramp-up is longer than these runs
            "augment.crop_size=null"]  # the whole 32 px tiny tiles (the demo recipe crops 64 px tiles)


@pytest.fixture(scope="module")
def s2_run(tiny_demo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ael") / "s2"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run),
                                   *_overrides(tiny_demo / "s2" / "source")])
    return run


def test_s2_run_reports_metrics_and_exports_the_teacher(s2_run):
    final = json.loads((s2_run / "metrics.json").read_text())
    assert final["method"] == "ael" and final["last"]["step"] == 4 and 0 <= final["last"]["mIoU"] <= 100
    for key in ("loss_sup", "loss_cons_u", "loss_cons_l", "cutmix_frac", "confidence/water", "confidence/bare soil"):
        assert key in final["train"], key
    card = json.loads((s2_run / "model.json").read_text())
    assert card["method"] == "ael" and card["state_dict_prefix"] == "teacher."
    state = load_file(str(s2_run / "checkpoints" / "last.safetensors"))
    prefix = card["state_dict_prefix"]
    fresh = create_segmenter(card["arch"], card["version"], card["num_classes"], len(card["bands"]),
                             output_stride=card["output_stride"], aux=card["aux"],
                             aspp_channels=card["aspp_channels"], decoder_channels=card["decoder_channels"])
    fresh.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    # the bank is in the checkpoint: moved from its 0.5 start, the CutMix bank filled one image per step
    assert state["confidence"].shape == (6,) and not torch.equal(state["confidence"], torch.full((6,), 0.5))
    assert int(state["bank_count"]) == 4 and state["bank_images"].shape == (16, 12, 32, 32)


def test_resume_mid_run_matches_uninterrupted(s2_run, tiny_demo, tmp_path):
    cut = cut_back(s2_run, tmp_path / "cut")
    res = launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume",
                                         *_overrides(tiny_demo / "s2" / "source")])
    assert "resumed from" in res.stdout + res.stderr
    a = assert_same_last_weights(s2_run, cut)  # student, teacher, confidence bank and CutMix bank
    assert set(BANK_KEYS) <= a.keys()


def _sar_with_splits(tiny_demo: Path, tmp_path: Path) -> Path:
    """A copy of the tiny demo SAR data with labelled / unlabelled splits (the demo writes train_all and val only)."""
    root = tmp_path / "sar"
    shutil.copytree(tiny_demo / "sar", root)
    ids = (root / "splits" / "train_all.txt").read_text().split()
    (root / "splits" / "labelled_1_8.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "splits" / "unlabelled_1_8.txt").write_text("\n".join(ids[2:]) + "\n")
    return root


def test_sar_building_run(tiny_demo, tmp_path):
    run = tmp_path / "sar_run"
    root = _sar_with_splits(tiny_demo, tmp_path)
    launch("finetune/semisup.py", ["--config", SAR_CONFIG, "--output-dir", str(run), *_overrides(root),
                                   "data.labelled_split=labelled_1_8", "data.unlabelled_split=unlabelled_1_8"])
    final = json.loads((run / "metrics.json").read_text())
    assert final["method"] == "ael" and final["best_metric"] == "IoU/building"
    for key in ("IoU/building", "building_f1", "building_precision", "building_recall"):
        assert key in final["last"], key
    assert {"confidence/background", "confidence/building"} <= final["train"].keys()
    assert json.loads((run / "model.json").read_text())["bands"] == ["HH", "HV", "VH", "VV"]


DUMP_SCRIPT = '''
"""finetune/semisup.py, saving after every step this process's AEL banks and its local class-confidence sums."""
import sys

import torch

import finetune.methods.ael as ael

out_dir, local = sys.argv[1], {}
_sums, _after = ael.class_confidence_sums, ael.AEL.after_optimizer_step


def recording_sums(*args, **kwargs):
    local["sums"], local["counts"] = _sums(*args, **kwargs)
    return local["sums"], local["counts"]


def dumping_after(self, step, epoch):
    _after(self, step, epoch)
    state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in %r}
    state.update({k: v.detach().cpu().clone() for k, v in local.items()})
    torch.save(state, f"{out_dir}/rank{self._rank}_step{step}.pt")


ael.class_confidence_sums = recording_sums
ael.AEL.after_optimizer_step = dumping_after
from finetune.semisup import main  # noqa: E402

main(sys.argv[2:])
''' % (BANK_KEYS,)


@pytest.mark.slow
def test_two_processes_hold_the_same_banks_after_every_step(tiny_demo, tmp_path):
    """Each rank writes its banks after every step: equal on both ranks, and the confidence update uses the
    pixel-weighted mean over both ranks' labelled batches (sums and counts all-reduced)."""
    script = tmp_path / "dump_banks.py"
    script.write_text(DUMP_SCRIPT)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    steps = 3
    launch(str(script), [str(dumps), "--config", CONFIG, "--output-dir", str(tmp_path / "run"),
                         *_overrides(tiny_demo / "s2" / "source", steps=steps), "data.labelled_split=train_all",
                         "trainer.eval_every=3"], processes=2)
    prev = torch.full((6,), 0.5)
    for step in range(steps):
        r0, r1 = (torch.load(dumps / f"rank{r}_step{step}.pt") for r in (0, 1))
        for key in BANK_KEYS:
            assert torch.equal(r0[key], r1[key]), (step, key)
        assert not torch.equal(r0["counts"], r1["counts"])  # the ranks saw different labelled pixels
        sums, counts = r0["sums"] + r1["sums"], r0["counts"] + r1["counts"]
        mean = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        assert torch.allclose(r0["confidence"], 0.999 * prev + 0.001 * mean, atol=1e-7, rtol=0), step
        prev = r0["confidence"]
        assert int(r0["bank_count"]) == 2 * (step + 1)  # one image per rank per step, gathered
    assert not torch.equal(r0["bank_images"][0], r0["bank_images"][1])  # rank 0's and rank 1's images
