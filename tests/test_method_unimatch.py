"""UniMatch (finetune/methods/unimatch.py) and DeepLab's feature-perturbation path: CutMix of images and
pseudo-labels with the same boxes, the loss weighting and normalisation on hand-made tensors; training through
``accelerate launch`` on a CNN and a plain ViT (one process, two processes), and an exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import finetune.methods.unimatch as um
from conftest import REPO, assert_same_last_weights, cut_back, launch
from finetune.deeplab import SegmenterOutput, create_segmenter
from finetune.methods.base import SegSetup
from finetune.methods.unimatch import UniMatch, UniMatchConfig, total_loss, unsup_ce

torch.set_num_threads(1)
CONFIG = str(REPO / "configs" / "finetune" / "demo.yaml")
K = 3


# ---------------------------------------------------------------------------------------------- feature perturbation
def test_feature_dropout_forward_shapes_dtypes_and_clean_half():
    torch.manual_seed(0)
    model = create_segmenter("test_resnet", "v3+", K, 4, aux=True).eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        plain = model(x, return_aux=True)
        out = model(x, return_aux=True, return_features=True, feature_dropout=0.5,
                    generator=torch.Generator().manual_seed(1))
        again = model(x, feature_dropout=0.5, generator=torch.Generator().manual_seed(1))
        other = model(x, feature_dropout=0.5, generator=torch.Generator().manual_seed(2))
    assert out.logits.shape == out.perturbed.shape == out.aux.shape == (2, K, 32, 32)
    assert out.logits.dtype == out.perturbed.dtype == torch.float32
    # eval-mode BatchNorm: the clean half is the plain prediction; the aux head reads the clean features
    assert torch.allclose(out.logits, plain.logits, atol=1e-5) and torch.allclose(out.aux, plain.aux, atol=1e-5)
    assert [f.shape[0] for f in out.features] == [2] * len(out.features) and out.decoder_input.shape[0] == 2
    assert not torch.allclose(out.perturbed, out.logits, atol=1e-3)
    assert torch.equal(again.perturbed, out.perturbed) and not torch.equal(other.perturbed, out.perturbed)
    assert plain.perturbed is None
    with pytest.raises(ValueError, match="feature dropout"):
        model(x, feature_dropout=1.0)


def test_decode_dropped_is_channel_dropout_of_the_head_input():
    torch.manual_seed(0)
    model = create_segmenter("test_resnet", "v2", K, 4).eval()  # v2: the head reads the deepest feature only
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        feats = model.encode(x)
        out = model.decode_dropped(feats, 0.25, size=(32, 32), generator=torch.Generator().manual_seed(3))
        deepest = feats[-1]
        keep = torch.empty(2, deepest.shape[1], 1, 1).bernoulli_(0.75, generator=torch.Generator().manual_seed(3))
        assert 0 < keep.sum() < keep.numel()  # some channels dropped, some kept
        expected = model.decode([*feats[:-1], deepest * keep / 0.75], size=(32, 32)).logits
    assert torch.allclose(out.perturbed, expected, atol=1e-5)


def test_feature_dropout_on_a_plain_vit_train_mode_and_bf16():
    torch.manual_seed(0)
    model = create_segmenter("test_vit", "v3", K, 4, output_stride=None, aux=True).train()
    assert model.used_features == (0, 1) and model.backbone.reductions == [16, 16]
    x = torch.randn(2, 4, 32, 32)
    out = model(x, feature_dropout=0.5, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == out.perturbed.shape == out.aux.shape == (2, K, 32, 32)
    out.perturbed.logsumexp(1).mean().backward()  # the perturbed stream trains the encoder too
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, feature_dropout=0.5, generator=torch.Generator().manual_seed(0))
    assert low.logits.dtype == low.perturbed.dtype == torch.bfloat16 and torch.isfinite(low.perturbed.float()).all()


# ---------------------------------------------------------------------------------------------- hand-made tensors
class _Echo(nn.Module):
    """Predicts class ``round(x[:, 0])`` with confidence ~0.9999 (logit 10) and records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, return_aux=None, feature_dropout=0.0, generator=None) -> SegmenterOutput:
        self.inputs.append(x.detach().clone())
        logits = 10.0 * F.one_hot(x[:, 0].round().long().clamp(0, K - 1), K).permute(0, 3, 1, 2).float() + self.bias
        return SegmenterOutput(logits, perturbed=logits * 0.5 if feature_dropout else None)


def _batch() -> dict:
    """3 unlabelled 4x4 samples: band 0 is the class (sample i: class i), band 1 tags the view (weak 0, s1 10 + i,
    s2 20 + i); sample 1 has an invalid first column."""
    x_w = torch.zeros(3, 2, 4, 4)
    for i in range(3):
        x_w[i, 0] = i
    s1, s2 = x_w.clone(), x_w.clone()
    for i in range(3):
        s1[i, 1], s2[i, 1] = 10 + i, 20 + i
    valid = torch.ones(3, 4, 4, dtype=torch.bool)
    valid[1, :, 0] = False
    return {"labelled": {"image": torch.zeros(2, 2, 4, 4), "mask": torch.zeros(2, 4, 4, dtype=torch.long)},
            "unlabelled": {"image": x_w, "strong": torch.stack([s1, s2], 1), "valid": valid}}


def _boxes() -> tuple[torch.Tensor, torch.Tensor]:
    box1 = torch.zeros(3, 4, 4, dtype=torch.bool)
    box1[0, :2, :2] = True  # sample 0 takes its top-left corner from sample 2
    box1[1, :, :2] = True  # sample 1 takes its left half (its invalid column included) from sample 0
    box2 = torch.zeros(3, 4, 4, dtype=torch.bool)
    box2[2] = True  # sample 2 is all sample 1 (the invalid column too)
    return box1, box2


@pytest.mark.parametrize("partner_eval_mode", [True, False])
def test_cutmix_mixes_images_and_pseudo_labels_with_the_same_box(monkeypatch, partner_eval_mode):
    boxes = iter(_boxes())
    monkeypatch.setattr(um, "cutmix_masks", lambda *a, **k: next(boxes))
    calls = []
    monkeypatch.setattr(um, "unsup_ce", lambda logits, labels, valid: calls.append((labels, valid)) or logits.sum())
    net = _Echo()
    method = UniMatch(UniMatchConfig(partner_eval_mode=partner_eval_mode), net,
                      SegSetup(K, nn.CrossEntropyLoss(ignore_index=255))).train()
    batch = _batch()
    method(batch)
    assert len(net.inputs) == (3 if partner_eval_mode else 2) and net.training
    s1, s2 = batch["unlabelled"]["strong"][:, 0], batch["unlabelled"]["strong"][:, 1]
    mixed = net.inputs[-1]  # the strong pass: mixed s1 then mixed s2
    exp1, exp2 = s1.clone(), s2.clone()
    exp1[0, :, :2, :2] = s1[2, :, :2, :2]
    exp1[1, :, :, :2] = s1[0, :, :, :2]
    exp2[2] = s2[1]
    assert torch.equal(mixed[:3], exp1) and torch.equal(mixed[3:], exp2)

    (y1, v1), (y2, v2), (y_fp, v_fp) = calls  # s1, s2, feature perturbation
    lab1 = torch.tensor([0, 1, 2]).view(3, 1, 1).repeat(1, 4, 4)
    lab1[0, :2, :2] = 2
    lab1[1, :, :2] = 0  # sample 1's invalid column is now sample 0's valid pixels
    assert torch.equal(y1, lab1) and bool(v1.all())
    lab2 = torch.tensor([0, 1, 1]).view(3, 1, 1).repeat(1, 4, 4)
    lab2[1:, :, 0] = 255  # sample 1's invalid column: in sample 1 and, through the box, in sample 2
    valid2 = torch.ones(3, 4, 4, dtype=torch.bool)
    valid2[1:, :, 0] = False
    assert torch.equal(y2, lab2) and torch.equal(v2, valid2)
    lab_fp = torch.tensor([0, 1, 2]).view(3, 1, 1).repeat(1, 4, 4)
    lab_fp[1, :, 0] = 255
    assert torch.equal(y_fp, lab_fp) and torch.equal(v_fp, batch["unlabelled"]["valid"])


def test_threshold_leaves_low_confidence_pixels_unlabelled(monkeypatch):
    calls = []
    monkeypatch.setattr(um, "unsup_ce", lambda logits, labels, valid: calls.append(labels) or logits.sum())
    method = UniMatch(UniMatchConfig(threshold=0.99995, cutmix_p=0.0), _Echo(),
                      SegSetup(K, nn.CrossEntropyLoss(ignore_index=255)))
    method.train()(_batch())
    assert all(bool((labels == 255).all()) for labels in calls)  # confidence 0.99991 < 0.99995: nothing kept
    out = UniMatch(UniMatchConfig(threshold=0.9999, cutmix_p=0.0), _Echo(),
                   SegSetup(K, nn.CrossEntropyLoss(ignore_index=255))).train()(_batch())
    assert out["mask_ratio"].item() == 1.0  # every valid pixel kept (44 of 48; the ratio counts valid ones)


def test_loss_weighting_by_hand(monkeypatch):
    # known per-stream losses: L_s = 1 (criterion), L_s1 = 2, L_s2 = 3, L_fp = 4 (unsup_ce in call order)
    values = iter([2.0, 3.0, 4.0])
    monkeypatch.setattr(um, "unsup_ce", lambda *a: torch.tensor(next(values)))
    method = UniMatch(UniMatchConfig(), _Echo(), SegSetup(K, lambda logits, target: torch.tensor(1.0))).train()
    out = method(_batch())
    # (L_s + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2 = (1 + 0.5 + 0.75 + 2) / 2
    assert out["loss"].item() == pytest.approx(2.125)
    assert (out["loss_sup"].item(), out["loss_s1"].item(), out["loss_s2"].item(), out["loss_fp"].item()) == (1, 2, 3, 4)
    one = torch.tensor(1.0)
    cfg = UniMatchConfig(sup_weight=1.0, unsup_weight=1.0, fp_weight=0.5, strong_weight=1.0)
    assert total_loss(cfg, one, 2 * one, 3 * one, 4 * one).item() == pytest.approx(1 + 2 + 0.5 * 5)


def test_unsup_ce_divides_by_all_valid_pixels():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 255, 255]]])  # pixel 1 below the threshold, pixel 2 invalid
    valid = torch.tensor([[[True, True, False]]])
    ce0 = math.log(1 + math.exp(-2.0))
    assert unsup_ce(logits, labels, valid).item() == pytest.approx(ce0 / 2)
    assert unsup_ce(logits, torch.full_like(labels, 255), torch.zeros_like(valid)).item() == 0.0


class _Shifted(_Echo):
    """``_Echo`` whose class is ``round(x[:, 0]) + shift`` (mod K), with a buffer (copied by the teacher's EMA)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 0
        self.register_buffer("running", torch.zeros(()))

    def forward(self, x, return_aux=None, feature_dropout=0.0, generator=None) -> SegmenterOutput:
        return super().forward(torch.cat([(x[:, :1].round() + self.shift) % K, x[:, 1:]], 1), return_aux,
                               feature_dropout, generator)


def test_ema_teacher_labels_every_weak_view(monkeypatch):
    """V2 option: the pseudo-labels of the strong views and of the feature-perturbed stream are the EMA teacher's
    (eval mode), not the student's; no extra student pass for the partner."""
    boxes = iter(_boxes())
    monkeypatch.setattr(um, "cutmix_masks", lambda *a, **k: next(boxes))
    calls = []
    monkeypatch.setattr(um, "unsup_ce", lambda logits, labels, valid: calls.append(labels) or logits.sum())
    net = _Shifted()
    method = UniMatch(UniMatchConfig(teacher_ema=0.9), net, SegSetup(K, nn.CrossEntropyLoss(ignore_index=255)))
    method.train()
    assert not method.teacher.training and net.training  # the teacher always predicts in eval mode
    method.teacher.shift = 1  # the teacher says class i + 1 where the student says i
    method(_batch())
    assert len(net.inputs) == 2  # labelled + weak, strong views: no eval-mode student pass
    (y1, y2, y_fp) = calls
    lab_fp = torch.tensor([1, 2, 0]).view(3, 1, 1).repeat(1, 4, 4)
    lab_fp[1, :, 0] = 255
    assert torch.equal(y_fp, lab_fp)
    lab1 = torch.tensor([1, 2, 0]).view(3, 1, 1).repeat(1, 4, 4)
    lab1[0, :2, :2] = 0  # partner 2's teacher label
    lab1[1, :, :2] = 1  # partner 0's teacher label
    assert torch.equal(y1, lab1)
    lab2 = torch.tensor([1, 2, 2]).view(3, 1, 1).repeat(1, 4, 4)
    lab2[1:, :, 0] = 255
    assert torch.equal(y2, lab2)


def test_ema_teacher_update_by_hand():
    net = _Shifted()
    method = UniMatch(UniMatchConfig(teacher_ema=0.9), net, SegSetup(K, nn.CrossEntropyLoss(ignore_index=255)))
    with torch.no_grad():
        net.bias.fill_(1.0)
        net.running.fill_(3.0)
    method.after_optimizer_step(0, 0)  # a_0 = min(1 - 1 / 2, 0.9) = 0.5: 0.5 * 0 + 0.5 * 1
    assert method.teacher.bias.item() == pytest.approx(0.5) and method.teacher.running.item() == 3.0
    method.after_optimizer_step(100, 0)  # a = min(1 - 1 / 102, 0.9) = 0.9: 0.9 * 0.5 + 0.1 * 1
    assert method.teacher.bias.item() == pytest.approx(0.55)
    assert not method.teacher.bias.requires_grad
    plain = UniMatch(UniMatchConfig(), _Shifted(), SegSetup(K, nn.CrossEntropyLoss(ignore_index=255)))
    assert not hasattr(plain, "teacher") and not any(k.startswith("teacher.") for k in plain.state_dict())
    plain.after_optimizer_step(0, 0)  # V1: nothing to update


def test_ema_teacher_evaluated_when_asked():
    net = _Shifted()
    setup = SegSetup(K, nn.CrossEntropyLoss(ignore_index=255))
    method = UniMatch(UniMatchConfig(teacher_ema=0.99, eval_model="teacher"), net, setup)
    assert method.eval_model is method.teacher and method.eval_prefix == "teacher."
    assert {"teacher.bias", "teacher.running", "model.bias"} <= set(method.state_dict())
    student = UniMatch(UniMatchConfig(teacher_ema=0.99), _Shifted(), setup)
    assert student.eval_model is student.model and student.eval_prefix == "model."


def test_config_is_validated():
    with pytest.raises(ValueError, match="feature_dropout"):
        UniMatchConfig(feature_dropout=0.0).validate()
    with pytest.raises(ValueError, match="cutmix_area"):
        UniMatchConfig(cutmix_area=(0.5, 0.2)).validate()
    with pytest.raises(ValueError, match="teacher_ema"):
        UniMatchConfig(teacher_ema=1.0).validate()
    with pytest.raises(ValueError, match="needs a teacher"):
        UniMatchConfig(eval_model="teacher").validate()
    with pytest.raises(ValueError, match="eval_model"):
        UniMatchConfig(teacher_ema=0.9, eval_model="ema").validate()


def test_teacher_without_ema_is_one_message_and_exit_2(tmp_path, capsys):
    from finetune.semisup import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "run"), "--cpu", "method=unimatch",
              "unimatch.eval_model=teacher"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unimatch.eval_model: teacher needs a teacher" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


# ---------------------------------------------------------------------------------------------- end to end
def _overrides(root: Path, steps: int = 4, labelled: str = "labelled_1_8", arch: str = "test_resnet") -> list[str]:
    return [f"data.root={root / 's2' / 'source'}", "method=unimatch", "data.batch_size=2",
            "data.unlabelled_batch_size=2",
            f"data.labelled_split={labelled}", f"model.arch={arch}", f"trainer.max_steps={steps}",
            "trainer.log_every=1", "trainer.eval_every=2", "trainer.checkpoint_every=2",
            "trainer.progress_bar=false", "optim.warmup_steps=1", "eval.batch_size=4"]


def _check_run(run: Path, steps: int) -> dict:
    from finetune.predict import load_run_model

    final = json.loads((run / "metrics.json").read_text())
    assert final["method"] == "unimatch" and final["steps"] == steps and 0 <= final["last"]["mIoU"] <= 100
    for key in ("loss", "loss_sup", "loss_s1", "loss_s2", "loss_fp", "mask_ratio"):
        assert math.isfinite(final["train"][key]), key
    card = json.loads((run / "model.json").read_text())
    assert card["method"] == "unimatch" and card["state_dict_prefix"] == "model."
    state = load_file(str(run / "checkpoints" / "last.safetensors"))
    net = load_run_model(run, "last").net  # a fresh DeepLab from model.json, loaded strictly
    for key, value in net.state_dict().items():
        assert torch.equal(value, state["model." + key]), key
    return final


@pytest.fixture(scope="module")
def uni_run(tiny_demo, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("unimatch") / "run"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run), *_overrides(tiny_demo)])
    return run


def test_trains_end_to_end(uni_run):
    _check_run(uni_run, 4)


def test_trains_on_a_plain_vit(tiny_demo, tmp_path):
    from finetune.semisup import main  # in this process (no launcher start-up)

    run = tmp_path / "vit"
    main(["--config", CONFIG, "--output-dir", str(run), "--cpu", *_overrides(tiny_demo, steps=2, arch="test_vit"),
          "model.version=v3"])
    _check_run(run, 2)
    assert json.loads((run / "model.json").read_text())["arch"] == "test_vit"


def test_trains_from_a_dino_vit_export(tiny_demo, tmp_path):
    """UniMatch V2's setting: a plain ViT encoder pretrained with DINO (here by ssl/pretrain.py, 2 steps) and
    exported; the fine-tuning starts from that export (its backbone weights are loaded, bands and normalisation from
    its sidecar). With the backbone frozen the trained one must still be the export, tensor for tensor."""
    from eo_ssl.pretrain import main as pretrain
    from finetune.semisup import main

    pre = tmp_path / "dino_vit"
    pretrain(["--config", str(REPO / "configs" / "pretrain" / "demo.yaml"), "--output-dir", str(pre), "--cpu",
              f"data.root={tiny_demo}", "data.batch_size=4", "model.arch=test_vit", "dino.out_dim=64",
              "dino.hidden_dim=32", "dino.bottleneck_dim=16", "augment.global_size=32", "augment.local_size=16",
              "augment.local_number=2", "trainer.max_steps=2", "trainer.epochs=null", "trainer.eval_every=2",
              "trainer.checkpoint_every=2", "trainer.progress_bar=false", "optim.warmup_epochs=0",
              "optim.warmup_steps=1", f"probe.root={tiny_demo / 's2' / 'source'}", "probe.k=3"])
    export = pre / "backbone.safetensors"
    assert json.loads(export.with_suffix(".json").read_text())["architecture"] == "test_vit"
    run = tmp_path / "uni_vit"
    main(["--config", CONFIG, "--output-dir", str(run), "--cpu", *_overrides(tiny_demo, steps=2, arch="test_vit"),
          "model.version=v3", f"model.weights={export}", "model.freeze_backbone=true"])
    _check_run(run, 2)
    assert json.loads((run / "model.json").read_text())["weights_init"] == str(export)
    exported = load_file(str(export))
    trained = load_file(str(run / "checkpoints" / "last.safetensors"))
    matched = 0
    for key, value in exported.items():
        found = [k for k in trained if k.startswith("model.backbone.") and k.endswith("." + key)]
        if found and trained[found[0]].shape == value.shape:
            torch.testing.assert_close(trained[found[0]], value, rtol=0, atol=0)
            matched += 1
    assert matched >= len(exported) - 2, (matched, len(exported))  # all but the final norm / head of the export


def test_resume_mid_run_matches_uninterrupted(uni_run, tiny_demo, tmp_path):
    cut = cut_back(uni_run, tmp_path / "cut")
    res = launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(cut), "--resume",
                                         *_overrides(tiny_demo)])
    assert "resumed from" in res.stdout + res.stderr
    assert_same_last_weights(uni_run, cut)  # CutMix boxes and dropout masks come from the step's generator: identical after the resume


def test_ema_teacher_trains_exports_and_resumes(tiny_demo, tmp_path):
    """``unimatch.teacher_ema`` with the teacher evaluated: the card names ``teacher.``, the teacher's weights load
    strictly into a fresh DeepLab, and a run resumed from its step-2 checkpoint ends bit-identical (teacher too)."""
    from finetune.predict import load_run_model
    from finetune.semisup import main

    over = [*_overrides(tiny_demo), "unimatch.teacher_ema=0.9", "unimatch.eval_model=teacher"]
    run = tmp_path / "ema"
    main(["--config", CONFIG, "--output-dir", str(run), "--cpu", *over])
    card = json.loads((run / "model.json").read_text())
    assert card["state_dict_prefix"] == "teacher."
    state = load_file(str(run / "checkpoints" / "last.safetensors"))
    net = load_run_model(run, "last").net
    for key, value in net.state_dict().items():
        assert torch.equal(value, state["teacher." + key]), key
    assert any(not torch.equal(state["teacher." + k], state["model." + k]) for k in net.state_dict()
               if state["model." + k].is_floating_point())  # an average, not a copy, of the student
    cut = cut_back(run, tmp_path / "cut")
    main(["--config", CONFIG, "--output-dir", str(cut), "--cpu", "--resume", *over])
    assert_same_last_weights(run, cut)


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    run = tmp_path / "ddp"
    launch("finetune/semisup.py", ["--config", CONFIG, "--output-dir", str(run),
                                   *_overrides(tiny_demo, steps=2, labelled="train_all")], processes=2)
    final = _check_run(run, 2)
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4
