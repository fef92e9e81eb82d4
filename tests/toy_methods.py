"""Toy methods that exercise the method platform through the real engine (in-process and under `accelerate launch`).

* :class:`TwoStreamToy`: two streams with different batch sizes, an EMA teacher outside DDP, a bank of unlabelled
  feature means all-reduced every step, and an epoch-start pass over a named dataset reduced across processes.
* :class:`AdversarialToy`: manual optimisation with two optimisers (generator on SGD, discriminator on AdamW with its
  own constant schedule), alternating updates, the generator's adversarial loss through the frozen discriminator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.ema import ema_update_  # noqa: E402
from common.engine import Engine, LoaderSpec, TrainerConfig  # noqa: E402
from common.method import Method, OptimizerSpec, frozen  # noqa: E402
from common.optim import OptimConfig, param_groups_no_wd_for_norm_and_bias  # noqa: E402
from toy_train import ToyData  # noqa: E402


class TwoStreamToy(Method):
    name = "two_stream_toy"
    streams = ("labelled", "unlabelled")
    trainable = ("student",)
    eval_prefix = "student."

    def __init__(self, dim: int = 4, fail_at_step: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(dim, 1)
        self.teacher = nn.Linear(dim, 1)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("bank", torch.zeros(dim))  # momentum mean of the unlabelled features (global batch)
        self.register_buffer("proto", torch.zeros(dim))  # mean of the probe set, computed at each epoch start
        self.fail_at_step = fail_at_step
        self.history: list[dict] = []  # per step: this process's bank (for the equality test)
        self.protos: list[list[float]] = []

    def param_groups(self) -> list[dict]:
        return param_groups_no_wd_for_norm_and_bias(self.student.named_parameters())

    def on_epoch_start(self, epoch: int, ctx) -> None:
        total = torch.zeros(self.proto.shape[0] + 1)
        for batch in ctx.eval_loader("probe", batch_size=5):
            total[:-1] += batch["x"].sum(0)
            total[-1] += batch["x"].shape[0]
        total = ctx.reduce(total, "sum")
        self.proto.copy_(total[:-1] / total[-1])
        self.protos.append(self.proto.tolist())

    def training_step(self, batch: dict, ctx) -> dict:
        if self.fail_at_step is not None and ctx.step == self.fail_at_step:
            raise KeyboardInterrupt("simulated crash")
        lab, unl = batch["labelled"], batch["unlabelled"]
        student = self.wrapped("student")
        loss_sup = F.mse_loss(student(lab["x"]).squeeze(-1), lab["y"])
        with torch.no_grad():
            target = self.teacher(unl["x"])
        loss_cons = F.mse_loss(student(unl["x"]), target)
        with torch.no_grad():  # the bank: the mean over the *global* unlabelled batch, identical on every process
            stats = ctx.reduce(torch.cat([unl["x"].sum(0), torch.tensor([float(unl["x"].shape[0])])]), "sum")
            self.bank.mul_(0.9).add_(stats[:-1] / stats[-1], alpha=0.1)
        return {"loss": loss_sup + 0.5 * loss_cons, "loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                "unlabelled_batch": torch.tensor(float(unl["x"].shape[0]))}

    @torch.no_grad()
    def after_optimizer_step(self, step: int, epoch: int) -> None:
        ema_update_(self.teacher, self.student, 0.9)
        self.history.append({"step": step, "bank": self.bank.tolist()})


class AdversarialToy(Method):
    """Segmenter-like generator (2 logits) on SGD, discriminator on AdamW; source labelled 0, target 1."""

    name = "adversarial_toy"
    streams = ("source", "target")
    trainable = ("gen", "disc")
    manual_optimization = True
    eval_prefix = "gen."

    def __init__(self, dim: int = 4, fail_at_step: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Linear(dim, 2)
        self.disc = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.fail_at_step = fail_at_step
        self.disc_grad_from_generator: list[bool] = []  # per step: did any disc parameter get a gradient?

    def optimizers(self) -> dict[str, OptimizerSpec]:
        disc = OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, schedule="constant")
        return {"main": OptimizerSpec(param_groups_no_wd_for_norm_and_bias(self.gen.named_parameters())),
                "disc": OptimizerSpec(param_groups_no_wd_for_norm_and_bias(self.disc.named_parameters()), disc)}

    def training_step(self, batch: dict, ctx) -> dict:
        if self.fail_at_step is not None and ctx.step == self.fail_at_step:
            raise KeyboardInterrupt("simulated crash")
        src, tgt = batch["source"], batch["target"]
        gen = self.wrapped("gen")
        # 1. generator: supervised loss on the source, then the adversarial loss on the target through the frozen
        #    discriminator (plain module: no DDP, no parameter gradient), each backward right after its forward
        logits_s = gen(src["x"])
        loss_seg = F.cross_entropy(logits_s, (src["y"] > 10).long())
        ctx.backward(loss_seg, "main")
        logits_t = gen(tgt["x"])
        with frozen(self.disc):
            d_t = self.disc(logits_t.softmax(1))
            loss_adv = F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t))  # fool D: "source"
            ctx.backward(0.1 * loss_adv, "main")
        self.disc_grad_from_generator.append(any(p.grad is not None for p in self.disc.parameters()))
        ctx.optimizer_step("main")
        # 2. discriminator on the detached predictions of both domains, one forward through its DDP wrapper
        p = torch.cat([logits_s.detach().softmax(1), logits_t.detach().softmax(1)])
        d = self.wrapped("disc")(p)
        labels = torch.cat([torch.zeros(len(logits_s), 1), torch.ones(len(logits_t), 1)])
        loss_d = F.binary_cross_entropy_with_logits(d, labels)
        ctx.backward(loss_d, "disc")
        ctx.optimizer_step("disc")
        return {"loss_seg": loss_seg.detach(), "loss_adv": loss_adv.detach(), "loss_d": loss_d.detach()}


def run(which: str, run_dir: str, max_steps: int = 6, resume: bool = False, fail_at_step: int | None = None,
        batch: int = 4, batch2: int = 6, checkpoint_every: int = 2, grad_scaler: bool | None = None,
        grad_accum: int = 1, seed: int = 0) -> tuple[Method, dict, Engine]:
    cfg = TrainerConfig(seed=seed, max_steps=max_steps, log_every=1, checkpoint_every=checkpoint_every,
                        progress_bar=False, grad_accum_steps=grad_accum, clip_grad=1.0)
    engine = Engine(cfg, run_dir, config=cfg, resume=resume, grad_scaler=grad_scaler)
    optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="poly", warmup_steps=2)
    if which == "two_stream":
        method: Method = TwoStreamToy(fail_at_step=fail_at_step)
        loaders = {"labelled": LoaderSpec(ToyData(24), batch), "unlabelled": LoaderSpec(ToyData(48, seed=7), batch2)}
        datasets = {"probe": ToyData(13, seed=3)}
    else:
        method = AdversarialToy(fail_at_step=fail_at_step)
        loaders = {"source": LoaderSpec(ToyData(24), batch), "target": LoaderSpec(ToyData(48, seed=7), batch2)}
        datasets = {}
    engine.fit(method, loaders, optim, datasets=datasets)
    final = engine.finish()
    return method, final, engine


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["two_stream", "adversarial"])
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batch2", type=int, default=6)
    a = ap.parse_args()
    method, final, _ = run(a.which, a.output_dir, max_steps=a.max_steps, batch=a.batch, batch2=a.batch2)
    rank = int(os.environ.get("RANK", 0))
    out = {"params": {k: v.tolist() for k, v in method.state_dict().items()},
           "history": getattr(method, "history", []), "protos": getattr(method, "protos", []),
           "disc_grad_from_generator": getattr(method, "disc_grad_from_generator", [])}
    Path(a.output_dir, f"rank{rank}.json").write_text(json.dumps(out))
