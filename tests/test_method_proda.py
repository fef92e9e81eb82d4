"""ProDA (finetune/methods/proda.py): prototype weights, rectified pseudo-labels and the prototype update on a
2-class 2-D example by hand, symmetric CE and the regularisers by hand, the distillation KL (>= 0; the released
formula negative), prototype initialisation against a pass done by hand, and end to end: stage 1 from a source-only
run, stage 2 from the stage-1 run into a student from a backbone export, and (slow) two processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, launch
from safetensors.torch import load_file

from common.errors import UserInputError
from finetune.deeplab import create_segmenter
from finetune.losses import build_segmentation_loss
from finetune.methods.base import SegSetup
from finetune.methods.proda import (
    ProDA,
    ProDAConfig,
    class_mean_features,
    degeneration_regulariser,
    initial_prototypes,
    kl_divergence,
    prototype_distances,
    prototype_weights,
    rectified_pseudo_labels,
    resize,
    symmetric_ce,
    teacher_hard_labels,
    update_prototypes,
    valid_cells,
)

CONFIG = str(REPO / "configs" / "finetune" / "demo_uda.yaml")


def _map(*pixels) -> torch.Tensor:
    """``(1, C, 1, P)`` from P per-pixel vectors of length C."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


# ------------------------------------------------------------------------------------------------------------
# Hand-made tensors
# ------------------------------------------------------------------------------------------------------------
def test_prototype_weights_and_rectified_labels_by_hand():
    # prototypes eta_0 = (0, 0), eta_1 = (3, 4); pixel A at (0, 0), pixel B at (3, 0), pixel C (invalid) at (3, 4)
    protos = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    feats = _map((0.0, 0.0), (3.0, 0.0), (3.0, 4.0))
    d = prototype_distances(feats, protos)
    assert torch.allclose(d[0, :, 0], torch.tensor([[0.0, 3.0, 5.0], [5.0, 4.0, 0.0]]))
    w = prototype_weights(d, 1.0)
    wa = torch.tensor([1.0, math.exp(-5.0)]) / (1.0 + math.exp(-5.0))  # softmax(-0, -5)
    wb = torch.tensor([1.0, math.exp(-1.0)]) / (1.0 + math.exp(-1.0))  # softmax(-3, -4)
    assert torch.allclose(w[0, :, 0, 0], wa) and torch.allclose(w[0, :, 0, 1], wb)
    # the paper divides by tau; the released code multiplies (same at tau = 1, not at tau = 2)
    w2 = prototype_weights(d, 2.0)
    assert torch.allclose(w2[0, :, 0, 1], torch.tensor([1.0, math.exp(-0.5)]) / (1.0 + math.exp(-0.5)))
    assert not torch.allclose(w2, (-d * 2.0).softmax(1))

    # the warm-up model prefers class 1 on A and B; the prototypes flip both to class 0
    p0 = _map((0.3, 0.7), (0.4, 0.6), (0.1, 0.9))
    valid = torch.tensor([[[True, True, False]]])
    labels, conf = rectified_pseudo_labels(p0, w, valid)
    assert labels.tolist() == [[[0, 0, 255]]]  # the invalid pixel is never pseudo-labelled
    rb = wb * torch.tensor([0.4, 0.6])
    assert conf[0, 0, 1].item() == pytest.approx(float(rb[0] / rb.sum()), rel=1e-6)  # 0.2924 / 0.4538 = 0.644
    labels, _ = rectified_pseudo_labels(p0, w, valid, threshold=0.65)  # B's normalised confidence is below
    assert labels.tolist() == [[[0, 255, 255]]]


def test_class_means_and_prototype_update_by_hand():
    feats = _map((1.0, 1.0), (3.0, 1.0), (0.0, 2.0), (9.0, 9.0))
    logits = _map((2.0, 0.0), (2.0, 0.0), (0.0, 2.0), (0.0, 2.0))  # classes 0, 0, 1, 1
    valid = torch.tensor([[[True, True, True, False]]])
    means, ok = class_mean_features(feats, logits, valid, 2, min_pixels=2)
    assert torch.allclose(means[0, 0], torch.tensor([2.0, 1.0]))  # mean of (1, 1) and (3, 1)
    assert torch.allclose(means[0, 1], torch.tensor([0.0, 2.0]))  # the invalid (9, 9) is left out
    assert ok.tolist() == [[True, False]]  # class 1 has one valid pixel < 2

    protos = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    means = torch.tensor([[[1.0, 1.0], [7.0, 7.0]], [[2.0, 0.0], [0.0, 0.0]]])
    ok = torch.tensor([[True, False], [True, True]])
    update_prototypes(protos, means, ok, 0.9)  # image by image, in order
    # eta_0: 0.9 * (0, 0) + 0.1 * (1, 1) = (0.1, 0.1), then 0.9 * (0.1, 0.1) + 0.1 * (2, 0) = (0.29, 0.09)
    # eta_1: untouched by image 0, then 0.9 * (3, 4) + 0.1 * (0, 0) = (2.7, 3.6)
    assert torch.allclose(protos, torch.tensor([[0.29, 0.09], [2.7, 3.6]]), atol=1e-6)


def test_symmetric_ce_and_regularisers_by_hand():
    logits = _map((0.0, math.log(3.0)), (5.0, 0.0))  # p = (0.25, 0.75); the second pixel is ignored
    labels = torch.tensor([[[0, 255]]])
    loss, ce, rce = symmetric_ce(logits, labels, alpha=0.1, beta=1.0)
    assert ce.item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert rce.item() == pytest.approx(-0.75 * math.log(1e-4), rel=1e-5)  # -sum_k p_k log clamp(onehot_k, 1e-4)
    assert loss.item() == pytest.approx(0.1 * math.log(4.0) - 0.75 * math.log(1e-4), rel=1e-5)
    _, ce_none, rce_none = symmetric_ce(logits, torch.full_like(labels, 255), 0.1, 1.0)
    assert ce_none.item() == 0.0 and rce_none.item() == 0.0  # nothing labelled: 0, not NaN

    two = _map((0.0, math.log(3.0)), (math.log(3.0), 0.0))  # p = (0.25, 0.75) and (0.75, 0.25)
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    mrkld = -(math.log(0.25) + math.log(0.75)) / 2
    assert degeneration_regulariser(two, valid, "mrkld").item() == pytest.approx(mrkld, rel=1e-6)
    assert degeneration_regulariser(two, valid, "mrent").item() == pytest.approx(
        0.25 * math.log(0.25) + 0.75 * math.log(0.75), rel=1e-6)
    assert degeneration_regulariser(two, valid, "mean_kl").item() == pytest.approx(0.0, abs=1e-7)  # mean uniform
    one = torch.tensor([[[True, False]]])
    assert degeneration_regulariser(two, one, "mean_kl").item() == pytest.approx(
        0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-5)  # KL((0.25, 0.75) || uniform)


def _released_kl(p_student: torch.Tensor, p_teacher: torch.Tensor) -> torch.Tensor:
    """The released ``step_distillation``: ``F.kl_div`` fed probabilities, averaged over every element."""
    return F.kl_div(p_student, p_teacher, reduction="none").mean()


def test_distillation_kl_is_the_true_kl_and_the_released_formula_is_negative():
    p_t, p_s = _map((0.5, 0.5)), _map((0.9, 0.1))
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    true_kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    assert kl_divergence(p_t, p_s.log(), valid).item() == pytest.approx(true_kl / 2, rel=1e-6)  # (1/K) sum_k
    released = 0.5 * (math.log(0.5) - 0.9) + 0.5 * (math.log(0.5) - 0.1)  # sum_k p_t (log p_t - p_s)
    assert _released_kl(p_s, p_t).item() == pytest.approx(released / 2, rel=1e-6) and released < 0
    assert kl_divergence(p_t, p_t.log(), valid).item() == pytest.approx(0.0, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 3, 3, generator=g).softmax(1), torch.randn(2, 5, 3, 3, generator=g)
    assert kl_divergence(a, b.log_softmax(1), torch.ones(2, 3, 3, dtype=torch.bool)) > 0

    # minimising the fixed KL matches the teacher; the released formula drives the student to the teacher's argmax
    target = _map((0.7, 0.3))
    for loss_fn, want in ((lambda z: kl_divergence(target, z.log_softmax(1), valid), 0.7),
                          (lambda z: _released_kl(z.softmax(1), target), 1.0)):
        z = torch.zeros(1, 2, 1, 1, requires_grad=True)
        opt = torch.optim.SGD([z], lr=5.0)
        for _ in range(500):
            opt.zero_grad()
            loss_fn(z).backward()
            opt.step()
        assert z.softmax(1)[0, 0].item() == pytest.approx(want, abs=0.02)


def _net(k: int = 3, bands: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter("test_resnet", "v3+", k, bands).eval()


def test_initial_prototypes_equal_a_pass_by_hand_and_shards_sum():
    k, stride, min_px = 3, 4, 2
    net = _net(k)
    g = torch.Generator().manual_seed(1)
    tiles = []
    for i in range(5):
        valid = torch.ones(32, 32, dtype=torch.bool)
        valid[: 4 * i, :8] = False
        tiles.append({"image": torch.randn(4, 32, 32, generator=g), "valid": valid})
    identity = lambda t, op: t  # (one process)
    loader = torch.utils.data.DataLoader(tiles, batch_size=2)
    protos, counts = initial_prototypes(net, loader, k, 256, stride, min_px, identity, torch.device("cpu"))

    sums, n = torch.zeros(k, 256, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    with torch.no_grad():
        for t in tiles:  # one image at a time, classes with >= min_px valid cells predicted
            out = net(t["image"][None], return_features=True)
            f, z = resize(out.decoder_input, (8, 8))[0], resize(out.logits, (8, 8))[0]
            v = valid_cells(t["valid"][None], (8, 8))[0]
            pred = z.argmax(0)
            for c in range(k):
                sel = (pred == c) & v
                if sel.sum() >= min_px:
                    sums[c] += f[:, sel].double().mean(1)
                    n[c] += 1
    assert torch.equal(counts, n) and n.sum() > 0
    want = torch.where(n[:, None] > 0, sums / n.clamp_min(1)[:, None], torch.zeros_like(sums)).float()
    assert torch.allclose(protos, want, atol=1e-5)

    # two shards (rank::2) whose sums and counts are added: the same prototypes
    parts = {}

    def shard_reduce(t, op):
        parts.setdefault(t.shape, []).append(t)
        return t

    for r in range(2):
        initial_prototypes(net, torch.utils.data.DataLoader(tiles[r::2], batch_size=2), k, 256, stride, min_px,
                           shard_reduce, torch.device("cpu"))
    s = sum(parts[(k, 256)])
    c = sum(parts[(k,)])
    assert torch.allclose(torch.where(c[:, None] > 0, s / c.clamp_min(1)[:, None], 0 * s).float(), protos, atol=1e-5)


def test_teacher_hard_labels_flip_threshold_and_invalid():
    class Fixed(torch.nn.Module):
        """Class-1 score x + (3, 0, -3) along the width (position-dependent: flipping changes it), class 0 score 0."""

        def forward(self, x, return_aux=False):
            from finetune.deeplab import SegmenterOutput
            return SegmenterOutput(torch.cat([torch.zeros_like(x), x + torch.tensor([3.0, 0.0, -3.0])], 1))

    x = torch.tensor([[[[1.0, 0.0, 0.0]]]])
    valid = torch.tensor([[[True, True, False]]])
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # (2-class softmax)
    labels, conf = teacher_hard_labels(Fixed(), x, valid, 0.95, flip=False)
    assert labels.tolist() == [[[1, 255, 255]]]  # sigmoid(4) = 0.982 kept, 0.5 not, the invalid pixel never
    assert conf[0, 0, 0].item() == pytest.approx(sig(4.0), rel=1e-6)
    # with the flip: pixel 0 averages sigmoid(4) with the mirrored prediction sigmoid(1 - 3) -> 0.5506
    labels, conf = teacher_hard_labels(Fixed(), x, valid, 0.5, flip=True)
    assert conf[0, 0, 0].item() == pytest.approx((sig(4.0) + sig(-2.0)) / 2, rel=1e-6)
    assert labels.tolist() == [[[1, 255, 255]]]  # 0.5 is not above the threshold 0.5 (released: conf <= thr out)
    labels, _ = teacher_hard_labels(Fixed(), x, valid, 0.95, flip=True)
    assert labels.tolist() == [[[255, 255, 255]]]


def _setup(k: int = 3, make=None, weights: str | None = None) -> SegSetup:
    return SegSetup(k, build_segmentation_loss("ce", k), make_model=make, class_names=("a", "b", "c"),
                    weights=weights)


def _batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (2, 32, 32), generator=g)
    x_t = torch.randn(2, 4, 32, 32, generator=g)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[1, :8] = False
    return {"source": {"image": torch.randn(2, 4, 32, 32, generator=g), "mask": y, "valid": torch.ones_like(valid)},
            "target": {"image": x_t, "valid": valid, "strong": x_t.unsqueeze(1) + 0.1}}


def test_stage1_step_updates_prototypes_and_ema_and_round_trips():
    method = ProDA(ProDAConfig(proto_momentum=0.5, proto_min_pixels=1), _net().train(), _setup()).train()
    method.prototypes.normal_(generator=torch.Generator().manual_seed(0))
    before = method.prototypes.clone()
    out = method.forward(_batch(0))
    assert torch.isfinite(out["loss"]) and out["loss_proto_kl"] > 0
    out["loss"].backward()
    (means, ok), = method._pending
    method.after_optimizer_step(0, 0)
    want = before.clone()
    update_prototypes(want, means, ok, 0.5)
    assert torch.allclose(method.prototypes, want) and not torch.equal(want, before)
    assert method._pending == [] and not method.warmup.training and not method.ema.training
    assert {"warmup.head.classifier.weight", "ema.head.classifier.weight", "prototypes"} <= method.state_dict().keys()
    for view in ("strong",):  # the released step() fails with S_pseudo > 0; here it runs
        m = ProDA(ProDAConfig(pseudo_view=view, sce=False, regulariser="mean_kl"), _net().train(), _setup())
        assert torch.isfinite(m.train().forward(_batch(1))["loss"])


def test_config_and_misuse_are_refused():
    for bad in ({"stage": 3}, {"proto_temperature": 0.0}, {"teacher_run": "x"}, {"label_stride": 0}):
        with pytest.raises(ValueError, match="proda."):
            ProDAConfig(**bad).validate()
    torch.manual_seed(0)
    shared = create_segmenter("test_resnet", "v3+", 3, 4)
    same = lambda: __import__("copy").deepcopy(shared)  # (what make_model gives with model.weights)
    with pytest.raises(UserInputError, match="model.init_from"):
        ProDA(ProDAConfig(), same(), _setup(make=same, weights="backbone.safetensors"))
    with pytest.raises(UserInputError, match="teacher_run"):
        ProDA(ProDAConfig(stage=2), same(), _setup(make=same, weights="backbone.safetensors"))


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------
def _tiny(root: Path, steps: int = 4) -> list[str]:
    return [f"data.root={root}", "model.arch=test_resnet", "data.batch_size=2", f"trainer.max_steps={steps}",
            "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.progress_bar=false", "trainer.log_every=1",
            "optim.warmup_steps=1", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def export(tiny_demo, tmp_path_factory) -> Path:
    """A backbone export of test_resnet with the demo's S2 statistics (as ssl/export.py writes it)."""
    import timm

    from common.weights import ExportMeta, Normalisation, write_export

    stats = json.loads((tiny_demo / "s2" / "stats.json").read_text())
    torch.manual_seed(1)
    net = timm.create_model("test_resnet", in_chans=12, num_classes=0)
    meta = ExportMeta("test_resnet", 12, list(stats["bands"]), "S2L2A",
                      Normalisation("dn_to_reflectance", [stats["mean"][b] for b in stats["bands"]],
                                    [stats["std"][b] for b in stats["bands"]]),
                      int(net.num_features), {"method": "dino"})
    out, _ = write_export(net.state_dict(), meta, tmp_path_factory.mktemp("export") / "backbone.safetensors")
    return out


@pytest.fixture(scope="module")
def runs(tiny_demo, tmp_path_factory) -> dict[str, Path]:
    """A source-only warm-up run and a ProDA stage-1 run from it (in-process); the stage-1 run's initial
    prototypes are recorded."""
    from finetune.methods import proda
    from finetune.uda import main

    root = tiny_demo / "s2" / "source"
    base = tmp_path_factory.mktemp("proda")
    warm, stage1 = base / "warmup", base / "stage1"
    main(["--config", CONFIG, "--output-dir", str(warm), *_tiny(root, steps=2)])  # a short warm-up
    recorded = {}
    original = proda.ProDA.on_train_start

    def recording(self, ctx):
        original(self, ctx)
        recorded["prototypes"] = self.prototypes.detach().cpu().clone()

    proda.ProDA.on_train_start = recording
    try:
        main(["--config", CONFIG, "--output-dir", str(stage1), *_tiny(root), "method=proda",
              f"model.init_from={warm}", "proda.label_stride=2", "trainer.best_metric=target_entropy",
              "trainer.best_mode=min"])
    finally:
        proda.ProDA.on_train_start = original
    torch.save(recorded["prototypes"], base / "initial_prototypes.pt")
    return {"warmup": warm, "stage1": stage1, "initial": base / "initial_prototypes.pt"}


def test_stage1_from_a_source_only_run(runs):
    final = json.loads((runs["stage1"] / "metrics.json").read_text())
    assert final["method"] == "proda" and final["weights_init"].endswith("best.safetensors")
    assert final["best_metric"] == "target_entropy" and final["selection"] == "validation"
    assert 0.0 <= final["last"]["target_entropy"] <= 1.0
    for key in ("loss_sup", "loss_pl", "loss_reg", "loss_proto_kl", "pseudo_ratio"):
        assert key in final["train"], key
    state = load_file(str(runs["stage1"] / "checkpoints" / "last.safetensors"))
    warm = load_file(str(runs["warmup"] / "checkpoints" / "best.safetensors"))
    # the warm-up model is frozen: equal to the source-only run's best weights after 4 steps
    assert all(torch.equal(state["warmup." + k[len("model."):]], v) for k, v in warm.items() if k.startswith("model."))
    initial = torch.load(runs["initial"])
    width = json.loads((runs["stage1"] / "model.json").read_text())["decoder_channels"]  # the decoder feature
    assert state["prototypes"].shape == (6, width) and initial.abs().sum() > 0
    assert not torch.equal(state["prototypes"], initial)  # moved by the EMA features...
    assert torch.allclose(state["prototypes"], initial, atol=1e-2)  # ...slowly (momentum 0.9999)
    assert json.loads((runs["stage1"] / "model.json").read_text())["state_dict_prefix"] == "model."


def test_stage2_distils_the_stage1_model_into_a_student_from_the_export(runs, export, tiny_demo, tmp_path):
    from finetune.uda import main

    run = tmp_path / "stage2"
    final = main(["--config", CONFIG, "--output-dir", str(run), *_tiny(tiny_demo / "s2" / "source", steps=2),
                  "method=proda", "proda.stage=2", f"model.weights={export}", f"proda.teacher_run={runs['stage1']}",
                  "proda.teacher_checkpoint=last"])
    assert final["weights_init"].endswith("backbone.safetensors")
    for key in ("loss_sup", "loss_pl", "loss_kd", "pseudo_ratio"):
        assert key in final["train"], key
    assert final["train"]["loss_kd"] >= 0.0
    state = load_file(str(run / "checkpoints" / "last.safetensors"))
    stage1 = load_file(str(runs["stage1"] / "checkpoints" / "last.safetensors"))
    teacher = {k: v for k, v in state.items() if k.startswith("teacher.")}
    assert teacher and all(torch.equal(v, stage1["model." + k[len("teacher."):]]) for k, v in teacher.items())
    assert not any(k.startswith(("warmup.", "ema.")) or k == "prototypes" for k in state)


DUMP_SCRIPT = '''
"""finetune/uda.py, saving each process's prototypes after on_train_start and after every step."""
import sys

import torch

import finetune.methods.proda as proda

out_dir = sys.argv[1]
_start, _after = proda.ProDA.on_train_start, proda.ProDA.after_optimizer_step


def start(self, ctx):
    _start(self, ctx)
    torch.save(self.prototypes.cpu().clone(), f"{out_dir}/rank{ctx.accelerator.process_index}_init.pt")
    self._rank = ctx.accelerator.process_index


def after(self, step, epoch):
    _after(self, step, epoch)
    torch.save(self.prototypes.cpu().clone(), f"{out_dir}/rank{self._rank}_step{step}.pt")


proda.ProDA.on_train_start, proda.ProDA.after_optimizer_step = start, after
from finetune.uda import main  # noqa: E402

main(sys.argv[2:])
'''


@pytest.mark.slow
def test_two_processes_hold_the_one_process_prototypes(runs, tiny_demo, tmp_path):
    """Initial prototypes reduced over two processes equal the one-process pass; after every step both ranks hold
    the same prototypes (updates gathered in rank order)."""
    script = tmp_path / "dump.py"
    script.write_text(DUMP_SCRIPT)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    launch(str(script), [str(dumps), "--config", CONFIG, "--output-dir", str(tmp_path / "run"),
                         *_tiny(tiny_demo / "s2" / "source", steps=2), "method=proda",
                         f"model.init_from={runs['warmup']}", "proda.label_stride=2"], processes=2)
    r0, r1 = torch.load(dumps / "rank0_init.pt"), torch.load(dumps / "rank1_init.pt")
    assert torch.equal(r0, r1)
    assert torch.allclose(r0, torch.load(runs["initial"]), atol=1e-5)
    for step in range(2):
        assert torch.equal(torch.load(dumps / f"rank0_step{step}.pt"), torch.load(dumps / f"rank1_step{step}.pt"))


def test_pseudo_label_diagnostic_of_a_warm_up_run(runs):
    """bench/proda_pseudo_labels.py on the tiny warm-up run: full coverage without a threshold, coverage shrinking as
    the threshold rises, and the plain pseudo-label accuracy equal to a direct count over the target val tiles."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from proda_pseudo_labels import THRESHOLDS, measure

    from common.config import load_config
    from finetune.data import validation_sets
    from finetune.predict import load_run_model
    from finetune.training import finetune_config_class

    result = measure(str(runs["warmup"]))
    pl = result["pseudo_labels"]
    assert len(result["prototype_images_per_class"]) == 6
    assert pl["plain/threshold 0.0"]["coverage"] == 100.0 and pl["nearest prototype"]["coverage"] == 100.0
    for kind in ("plain", "rectified tau 1.0"):
        cover = [pl[f"{kind}/threshold {th}"]["coverage"] for th in THRESHOLDS]
        assert cover == sorted(cover, reverse=True), (kind, cover)
    rm = load_run_model(runs["warmup"], "last")
    cfg = load_config(finetune_config_class("uda"), runs["warmup"] / "config.yaml", [])
    right = total = 0
    with torch.no_grad():
        for sample in validation_sets(cfg.data, rm.spec)["target_val"]:
            x, mask = sample["image"][None], sample["mask"][None, None].float()
            size = (x.shape[-2] // 4, x.shape[-1] // 4)
            pred = F.interpolate(rm.net(x).logits, size=size, mode="bilinear", align_corners=False).argmax(1)
            truth = F.interpolate(mask, size=size, mode="nearest")[:, 0].long()
            cells = F.avg_pool2d(sample["valid"][None, None].float(), 4)[:, 0] == 1
            keep = cells & (truth != 255)
            right += int(((pred == truth) & keep).sum())
            total += int(keep.sum())
    assert pl["plain/threshold 0.0"]["accuracy"] == round(100 * right / total, 2)
