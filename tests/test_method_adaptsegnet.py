"""AdaptSegNet (finetune/methods/adaptsegnet.py): one step on hand-made tensors (update order, which module gets which
gradient, the source 0 / target 1 convention and the released loss weights, recomputed by hand), the refusal without
an auxiliary head, and tiny end-to-end runs (metrics, discriminators and their Adam states in the checkpoint,
bit-exact resume, two processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.errors import UserInputError
from conftest import REPO, assert_same_last_weights, cut_back, launch
from finetune.deeplab import create_segmenter
from finetune.discriminator import bce_to_label, valid_fraction
from finetune.losses import build_segmentation_loss
from finetune.methods.adaptsegnet import AdaptSegNet, AdaptSegNetConfig
from finetune.methods.base import SegSetup

CONFIG = str(REPO / "configs" / "finetune" / "demo_uda.yaml")
K = 3


# ------------------------------------------------------------------------------------------------------------
# One step outside the engine, with a context that records every backward and the gradients at every step
# ------------------------------------------------------------------------------------------------------------
class RecordingCtx:
    """Manual-mode context: ``backward`` runs and records the loss; ``optimizer_step`` records which parameters of
    each trainable module hold a gradient (no parameter changes, so the step can be recomputed by hand);
    ``zero_grad`` clears the named optimiser's module."""

    step, epoch, micro, num_micro, rank, world_size = 0, 0, 0, 1, 0, 1

    def __init__(self, method):
        self.method = method
        self.backwards: list[tuple[str, float]] = []
        self.steps: list[tuple[str, dict[str, list[bool]]]] = []

    def _module(self, name: str):
        return self.method.model if name == "main" else getattr(self.method, name)

    def backward(self, loss: torch.Tensor, name: str = "main") -> None:
        self.backwards.append((name, float(loss.detach())))
        loss.backward()

    def optimizer_step(self, name: str = "main") -> bool:
        grads = {m: [p.grad is not None for p in getattr(self.method, m).parameters() if p.requires_grad]
                 for m in self.method.trainable}
        self.steps.append((name, grads))
        return True

    def zero_grad(self, name: str = "main") -> bool:
        for p in self._module(name).parameters():
            p.grad = None
        return True

    def generator(self, device="cpu", stream: int = 0) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(stream)


def segmenter(aux: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter("test_resnet", "v2", K, 4, aux=aux)


def setup() -> SegSetup:
    return SegSetup(num_classes=K, criterion=build_segmentation_loss("ce", K))


def uda_batch(seed: int = 0, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    v_s = torch.ones(2, size, size, dtype=torch.bool)
    v_s[0, :8, :] = False  # a nodata strip in a source tile
    v_t = torch.ones(2, size, size, dtype=torch.bool)
    v_t[1, :, :16] = False  # half a target tile is nodata
    y = torch.randint(0, K, (2, size, size), generator=g)
    y[~v_s] = 255
    return {"source": {"image": torch.randn(2, 4, size, size, generator=g), "mask": y, "valid": v_s},
            "target": {"image": torch.randn(2, 4, size, size, generator=g), "valid": v_t,
                       "index": torch.tensor([0, 1])}}


def check_gradient_isolation(ctx: RecordingCtx, disc_names: list[str]) -> None:
    """The segmenter's step saw no discriminator gradient; each discriminator's step saw its own gradients only."""
    names = [name for name, _ in ctx.steps]
    assert names == ["main", *disc_names]
    main = ctx.steps[0][1]
    assert any(main["model"]) and all(not any(main[d]) for d in disc_names)  # D untouched by G's adversarial loss
    for name, grads in ctx.steps[1:]:
        assert not any(grads["model"]), name  # the segmenter untouched by the discriminator loss
        assert all(grads[name]), name
        assert all(not any(grads[d]) for d in disc_names if d != name), name


def test_step_order_gradients_labels_and_weights_by_hand():
    cfg = AdaptSegNetConfig()
    method = AdaptSegNet(cfg, segmenter(), setup())
    assert method.trainable == ("model", "disc_main", "disc_aux")
    assert set(method.optimizers()) == {"main", "disc_main", "disc_aux"}
    assert method.optimizers()["disc_main"].optim == cfg.disc_optim and method.optimizers()["main"].optim is None
    batch = uda_batch()
    ctx = RecordingCtx(method)
    logs = method.training_step(batch, ctx)
    assert set(logs) == {"loss_seg", "loss_seg_aux", "loss_adv", "loss_adv_aux", "loss_disc", "loss_disc_aux"}
    assert all(torch.isfinite(v) for v in logs.values())
    check_gradient_isolation(ctx, ["disc_main", "disc_aux"])
    assert [n for n, _ in ctx.backwards] == ["main", "main", "disc_main", "disc_main", "disc_aux", "disc_aux"]

    # recompute by hand (no parameter moved; BatchNorm in training mode gives the same batch-statistics output)
    src, tgt = batch["source"], batch["target"]
    with torch.no_grad():
        out_s, out_t = method.model(src["image"]), method.model(tgt["image"])
        seg = F.cross_entropy(out_s.logits, src["mask"], ignore_index=255)
        seg_aux = F.cross_entropy(out_s.aux, src["mask"], ignore_index=255)
        assert abs(ctx.backwards[0][1] - float(seg + 0.1 * seg_aux)) < 1e-5
        adv, disc = {}, []
        for level, logits_s, logits_t in (("main", out_s.logits, out_t.logits), ("aux", out_s.aux, out_t.aux)):
            d = getattr(method, f"disc_{level}")
            p_s = logits_s.softmax(1) * src["valid"].unsqueeze(1)
            p_t = logits_t.softmax(1) * tgt["valid"].unsqueeze(1)
            d_s, d_t = d(p_s), d(p_t)
            w_s, w_t = valid_fraction(src["valid"], d_s.shape[-2:], 2), valid_fraction(tgt["valid"], d_t.shape[-2:], 2)
            # the generator wants target maps called "source" (0); D: source 0, target 1, each half
            adv[level] = float(bce_to_label(d_t, 0.0, w_t))
            disc += [0.5 * float(bce_to_label(d_s, 0.0, w_s)), 0.5 * float(bce_to_label(d_t, 1.0, w_t))]
    assert abs(ctx.backwards[1][1] - (0.001 * adv["main"] + 0.0002 * adv["aux"])) < 1e-6
    assert abs(float(logs["loss_adv"]) - adv["main"]) < 1e-6 and abs(float(logs["loss_adv_aux"]) - adv["aux"]) < 1e-6
    for (name, value), want in zip(ctx.backwards[2:], disc):
        assert abs(value - want) < 1e-6, name
    assert abs(float(logs["loss_disc"]) - (disc[0] + disc[1])) < 1e-6


def test_single_level_and_the_aux_head_requirement():
    with pytest.raises(UserInputError, match=r"model\.aux=true.*adaptsegnet\.levels=\[main\]"):
        AdaptSegNet(AdaptSegNetConfig(), segmenter(aux=False), setup())
    method = AdaptSegNet(AdaptSegNetConfig(levels=("main",)), segmenter(aux=False), setup())
    assert method.trainable == ("model", "disc_main") and not hasattr(method, "disc_aux")
    ctx = RecordingCtx(method)
    logs = method.training_step(uda_batch(), ctx)
    assert set(logs) == {"loss_seg", "loss_adv", "loss_disc"}
    check_gradient_isolation(ctx, ["disc_main"])
    # main level only on a model with an aux head: the aux head keeps its source loss, no aux discriminator
    method = AdaptSegNet(AdaptSegNetConfig(levels=("main",)), segmenter(aux=True), setup())
    ctx = RecordingCtx(method)
    assert set(method.training_step(uda_batch(), ctx)) == {"loss_seg", "loss_seg_aux", "loss_adv", "loss_disc"}
    check_gradient_isolation(ctx, ["disc_main"])
    for bad in (dict(levels=()), dict(levels=("main", "main")), dict(adv_weight=-1.0)):
        with pytest.raises(ValueError, match="adaptsegnet"):
            AdaptSegNetConfig(**bad).validate()


# ------------------------------------------------------------------------------------------------------------
# End to end (in-process finetune.uda.main; two processes through accelerate launch)
# ------------------------------------------------------------------------------------------------------------
def overrides(root: Path, steps: int = 4) -> list[str]:
    return ["method=adaptsegnet", f"data.root={root}", "model.arch=test_resnet", "model.version=v2", "model.aux=true",
            "data.batch_size=2", f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.eval_every=2",
            "trainer.checkpoint_every=2", "trainer.progress_bar=false", "optim.name=sgd", "optim.lr=0.01",
            "optim.warmup_steps=1", "eval.batch_size=8"]  # SGD segmenter + Adam discriminators, as the release


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory) -> Path:
    from finetune.uda import main

    out = tmp_path_factory.mktemp("adaptsegnet") / "run"
    main(["--config", CONFIG, "--output-dir", str(out), *overrides(tiny_demo / "s2" / "source")])
    return out


def test_run_logs_finite_losses_and_reports_the_target(run):
    final = json.loads((run / "metrics.json").read_text())
    assert final["method"] == "adaptsegnet" and final["selection"] == "validation" and final["last"]["step"] == 4
    assert 0 <= final["last"]["target_val/mIoU"] <= 100
    for key in ("loss_seg", "loss_seg_aux", "loss_adv", "loss_adv_aux", "loss_disc", "loss_disc_aux"):
        assert key in final["train"] and final["train"][key] == final["train"][key] and final["train"][key] < 1e6, key
    assert final["train"]["lr_disc_main"] > 0 and final["train"]["lr_disc_aux"] == final["train"]["lr_disc_main"]
    state = load_file(str(run / "checkpoints" / "last.safetensors"))
    assert any(k.startswith("disc_main.") for k in state) and any(k.startswith("disc_aux.") for k in state)
    # the segmenter's and both discriminators' optimiser states are in every step checkpoint (Adam moments for D)
    ckpt = run / "checkpoints" / "step_00000002"
    states = [torch.load(p, weights_only=False) for p in sorted(ckpt.glob("custom_checkpoint_*.pkl"))]
    sgd = [s for s in states if "momentum" in s["param_groups"][0]]
    adam = [s for s in states if s["param_groups"][0].get("betas") == (0.9, 0.99)]
    assert len(states) == 3 and len(sgd) == 1 and len(adam) == 2
    assert all("momentum_buffer" in v for v in sgd[0]["state"].values())
    assert all("exp_avg" in v and float(v["step"]) == 2 for s in adam for v in s["state"].values())


def test_resume_mid_run_matches_uninterrupted(run, tiny_demo, tmp_path):
    from finetune.uda import main

    cut = cut_back(run, tmp_path / "cut")
    main(["--config", CONFIG, "--output-dir", str(cut), "--resume", *overrides(tiny_demo / "s2" / "source")])
    assert_same_last_weights(run, cut)  # segmenter and both discriminators


@pytest.mark.slow
def test_two_processes(tiny_demo, tmp_path):
    out = tmp_path / "ddp"
    launch("finetune/uda.py", ["--config", CONFIG, "--output-dir", str(out),
                               *overrides(tiny_demo / "s2" / "source", steps=2)], processes=2)
    final = json.loads((out / "metrics.json").read_text())
    assert final["num_processes"] == 2 and final["global_batch_size"] == 4
    assert all(final["train"][k] == final["train"][k] for k in ("loss_adv", "loss_disc", "loss_disc_aux"))
