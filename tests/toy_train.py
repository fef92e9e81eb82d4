"""A tiny method and training script used by the engine tests (in-process and under `accelerate launch`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from common.engine import Engine, LoaderSpec, TrainerConfig
from common.method import Method
from common.optim import OptimConfig, param_groups_no_wd_for_norm_and_bias


class ToyData(Dataset):
    """y = x @ w_true + noise, plus a per-epoch augmentation drawn from the sample's own stream."""

    def __init__(self, n: int = 24, dim: int = 4, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.arange(1.0, dim + 1) + 0.1 * torch.randn(n, generator=g)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        return {"x": self.x[i] + 0.01 * torch.randn(self.x.shape[1], generator=g), "y": self.y[i], "index": i}


class ToyMethod(Method):
    """Linear student with dropout (uses the global RNG) and an EMA teacher buffer-free copy."""

    name = "toy"
    streams = ("main",)
    trainable = ("student",)
    eval_prefix = "student."

    def __init__(self, dim: int = 4, fail_at_step: int | None = None, nan_at_step: int | None = None):
        super().__init__()
        self.student = nn.Sequential(nn.Linear(dim, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        self.teacher = nn.Sequential(nn.Linear(dim, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))
        self.fail_at_step, self.nan_at_step = fail_at_step, nan_at_step

    def param_groups(self) -> list[dict]:
        return param_groups_no_wd_for_norm_and_bias(self.student.named_parameters())

    def training_step(self, batch: dict, ctx) -> dict:
        if self.fail_at_step is not None and ctx.step == self.fail_at_step:
            raise KeyboardInterrupt("simulated crash")
        b = batch["main"]
        pred = self.wrapped("student")(b["x"]).squeeze(-1)
        loss = ((pred - b["y"]) ** 2).mean()
        if self.nan_at_step is not None and ctx.step >= self.nan_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "mse": loss.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int, epoch: int) -> None:
        from common.ema import ema_update_

        ema_update_(self.teacher, self.student, 0.9)
        self.ema_steps += 1


def run(run_dir: str, max_steps: int = 8, resume: bool = False, fail_at_step: int | None = None,
        nan_at_step: int | None = None, checkpoint_every: int = 4, grad_accum: int = 1, seed: int = 0,
        clip_mode: str = "global_norm", overwrite: bool = False) -> tuple[ToyMethod, dict]:
    cfg = TrainerConfig(seed=seed, max_steps=max_steps, log_every=2, checkpoint_every=checkpoint_every,
                        progress_bar=False, grad_accum_steps=grad_accum, clip_grad=1.0, clip_mode=clip_mode)
    engine = Engine(cfg, run_dir, config=cfg, resume=resume, overwrite=overwrite)
    method = ToyMethod(fail_at_step=fail_at_step, nan_at_step=nan_at_step)
    optim = OptimConfig(name="adamw", lr=0.05, warmup_steps=2, weight_decay=0.01, weight_decay_end=0.1)
    engine.fit(method, {"main": LoaderSpec(ToyData(), batch_size=4)}, optim,
               evaluate=lambda m, e: {"w_norm": float(m.student[0].weight.norm())})
    final = engine.finish()
    return method, final


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    method, final = run(a.output_dir, max_steps=a.max_steps, resume=a.resume)
    import os

    # The process group is gone after engine.finish(); the launcher's environment still says who we were.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    w = torch.cat([p.detach().flatten() for p in method.student.parameters()])
    Path(a.output_dir, f"rank{rank}.json").write_text(json.dumps({"world": world, "w": w.tolist()}))
    sys.exit(0)
