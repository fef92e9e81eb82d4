"""Step timing shared by the training-step benchmarks (``bench_dino_step.py``, ``bench_segmentation.py``).

Both compare the full framework step (:class:`common.engine.Engine` ``fit`` on the real data pipeline) with a bare
forward + backward on pre-made batches, timed in the same process. What they share lives here: the demo data, the
per-step timestamps taken inside the engine run (:class:`Marks`, the :class:`TimedMethod` mixin around the method's
``training_step``, the optimiser step and logging hooks of :func:`fit_timed`), the per-step figures derived from
them (:class:`StepTimes`), the bare step's interleaved or rounds timing (:func:`time_full_and_bare`) and the result
dict plus the printed report (:func:`report_steps`). What the step *is* (the method, its marks, the bare step, the
breakdown) stays in each script.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]

TARGET_RATIO = 1.10
"""Full step time / bare step time the framework aims to stay under."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_demo_tiles(out: Path, tiles: int, seed: int = 0) -> Path:
    """Generate the built-in demo data (S2 source + target domains) with ``tiles`` training tiles per domain."""
    cmd = [sys.executable, "-m", "common.demo_data", "--out", str(out), "--seed", str(seed), "--tiles", str(tiles),
           "--val-tiles", "8", "--sar-scenes", "2", "--sar-val-scenes", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def add_bare_options(ap: argparse.ArgumentParser) -> None:
    """The options of the threads and the bare-step timing, the same in both benchmarks."""
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--bare-batches", type=int, default=4, help="pre-made batches cycled by the bare step")
    ap.add_argument("--opt-steps", type=int, default=5, help="steps of the (informative) bare + AdamW timing")
    ap.add_argument("--no-interleave", action="store_true",
                    help="time the bare step in separate rounds before/after the run even with --workers 0")


def take_batches(loader: Iterable, n: int) -> tuple[list, float]:
    """The first ``n`` batches of ``loader`` and the s/batch it took to make them."""
    batches, t0 = [], time.perf_counter()
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches, (time.perf_counter() - t0) / len(batches)


class Marks:
    """Per-step timestamps taken inside the engine run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.step = -1
        self.by_step: dict[int, dict[str, float]] = {}

    def __call__(self, name: str) -> None:
        sync(self.device)
        self.by_step.setdefault(self.step, {})[name] = time.perf_counter()


class TimedMethod:
    """Mixin (put first in the bases) for a :class:`common.method.Method` in automatic mode: marks ``fwd0`` /
    ``fwd1`` around its ``training_step(batch, ctx)`` (the step's forward and loss, inside the engine's autocast)
    and runs the interleaved bare step. ``marks`` and ``bare`` (``step -> None``, one bare step; or None) are plain
    attributes, not submodules or buffers."""

    marks: Marks
    bare: Callable[[int], Any] | None

    def attach_marks(self, marks: Marks, bare: Callable[[int], Any] | None = None) -> None:
        self.__dict__["marks"] = marks
        self.__dict__["bare"] = bare

    def training_step(self, batch, ctx):
        self.marks.step = ctx.step
        self.marks("fwd0")
        out = super().training_step(batch, ctx)
        self.on_step_output(out)
        self.marks("fwd1")
        return out

    def on_step_output(self, out) -> None:
        """Called between the parent's ``training_step`` and the ``fwd1`` mark."""

    def interleaved_bare_step(self, step: int) -> None:
        """One interleaved bare step (own model, pre-made batch; not part of the step), marked ``bare1``."""
        if self.bare is not None:
            self.bare(step)
            self.marks("bare1")


class TimedDeviceTransform:
    """A stream's device transform (``LoaderSpec.device_transform``, ``augment.device: cuda | cpu``) with every call
    timed (the device synchronised before and after). The engine calls it once per micro-batch before the method's
    ``training_step``, so its time is part of the marks' data wait; :meth:`split` moves it into a breakdown entry
    of its own."""

    def __init__(self, inner: Any):
        self.inner, self.device, self.spans = inner, inner.device, []

    def run_device(self, training_device: torch.device) -> torch.device:
        return self.inner.run_device(training_device)

    def __call__(self, batch: Any, generator: torch.Generator) -> Any:
        sync(generator.device)
        t0 = time.perf_counter()
        out = self.inner(batch, generator)
        sync(generator.device)
        self.spans.append(time.perf_counter() - t0)
        return out

    def split(self, breakdown: dict[str, float], warmup: int, steps: int) -> dict[str, float]:
        """``breakdown`` with ``device_augment`` (mean s/step over the timed steps) taken out of ``data_wait``."""
        aug = statistics.fmean(self.spans[warmup:warmup + steps])
        out: dict[str, float] = {}
        for key, v in breakdown.items():
            out[key] = v - aug if key == "data_wait" else v
            if key == "data_wait":
                out["device_augment"] = aug
        return out


def device_views(transform: Any, batches: list, device: torch.device, seed: int = 0) -> list:
    """Pre-made batches of decoded tiles through a device transform (one generator per batch), on ``device``: the
    bare step's input, what the method receives in the full step."""
    from accelerate.utils import send_to_device

    run_on = transform.run_device(device)
    out = []
    for i, batch in enumerate(batches):
        g = torch.Generator(device=run_on)
        g.manual_seed(seed + i)
        with torch.no_grad():
            out.append(send_to_device(transform(send_to_device(batch, run_on), g), device))
    return out


def fit_timed(engine, marks: Marks, fit: Callable[[], None]) -> tuple[dict, dict[int, float]]:
    """Run ``fit()`` (the engine's ``fit``) then ``engine.finish()`` with global optimiser step hooks marking
    ``step0`` / ``step1`` and the engine's scalar logging timed per call; returns (final metrics, logging seconds by
    logged step)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles = [register_optimizer_step_pre_hook(lambda *_: marks("step0")),
               register_optimizer_step_post_hook(lambda *_: marks("step1"))]
    # The engine's scalar logging (finite-loss check + metrics.jsonl + TensorBoard), timed per call. It runs after a
    # step's last mark, i.e. in the gap before the next step's forward; logged step n follows 0-based step n - 1.
    log_time: dict[int, float] = {}

    def timed_call(fn):
        def wrapper(*a):
            t0 = time.perf_counter()
            fn(*a)
            step = a[-1]
            log_time[step] = log_time.get(step, 0.0) + time.perf_counter() - t0
        return wrapper

    engine._log = timed_call(engine._log)
    engine._check_finite = timed_call(engine._check_finite)
    try:
        fit()
        final = engine.finish()
    finally:
        for h in handles:
            h.remove()
    return final, log_time


@dataclass
class StepTimes:
    """Per-step figures of the timed steps ``warmup .. warmup + steps - 1`` from the marks of an engine run; a full
    step ends at mark ``last``, an interleaved bare step (if ``interleaved``) runs from ``last`` to ``bare1``."""

    marks: dict[int, dict[str, float]]
    log_time: dict[int, float]
    warmup: int
    steps: int
    last: str
    interleaved: bool
    full_steps: list[float] = field(init=False)
    bare_steps: list[float] = field(init=False)
    full_s: float = field(init=False)
    bare_s: float = field(init=False)
    data_wait: float = field(init=False)
    logging: float = field(init=False)

    def __post_init__(self) -> None:
        m, timed, last = self.marks, self.timed, self.last
        self.full_steps = [m[s][last] - self.end(s - 1) for s in timed]
        self.bare_steps = [m[s]["bare1"] - m[s][last] for s in timed] if self.interleaved else []
        self.full_s = statistics.fmean(self.full_steps)
        self.bare_s = statistics.fmean(self.bare_steps) if self.bare_steps else float("nan")
        # The gap before step s holds the log of logged step s (after 0-based step s - 1), then the next batch.
        gaps = {s: m[s]["fwd0"] - self.end(s - 1) for s in timed}
        self.logging = statistics.fmean(self.log_time.get(s, 0.0) for s in timed)
        self.data_wait = statistics.fmean(gaps.values()) - self.logging

    @property
    def timed(self) -> range:
        return range(self.warmup, self.warmup + self.steps)

    def end(self, s: int) -> float:
        """Where the framework's work after step ``s`` resumes."""
        return self.marks[s].get("bare1", self.marks[s][self.last])

    def mean(self, a: str, b: str) -> float:
        """Mean seconds from mark ``a`` to mark ``b`` over the timed steps."""
        return statistics.fmean(self.marks[s][b] - self.marks[s][a] for s in self.timed)

    def run_result(self, final: dict, spans: dict[str, float]) -> tuple[float, dict[str, float], dict, float]:
        """(full s/step, breakdown s/step, final metrics plus the per-step lists, bare s/step) of a run, the
        breakdown being the data wait, the logging, then ``spans`` (the step's parts, from :meth:`mean`)."""
        breakdown = {"data_wait": self.data_wait, "logging": self.logging, **spans}
        final = {**final, "_full_steps": self.full_steps, "_bare_steps": self.bare_steps}
        return self.full_s, breakdown, final, self.bare_s


def time_full_and_bare(run: Callable[[bool], tuple[float, dict[str, float], dict, float]],
                       bare_round: Callable[[int], float], warmup: int, steps: int,
                       interleave: bool) -> tuple[float, dict[str, float], dict, list[float], float]:
    """Warm the bare step up, then time the full run ``run(interleave)`` (returning s/step, breakdown, final metrics
    and the interleaved bare s/step) and the bare step: interleaved in the run, or ``bare_round(steps)`` (s/step)
    in rounds before and after it. Returns (full s/step, breakdown, final, bare rounds, median bare s/step)."""
    bare_round(max(warmup, 1))
    bare_rounds = [] if interleave else [bare_round(steps)]
    full_s, breakdown, final, bare_in_run = run(interleave)
    if interleave:
        bare_rounds.append(bare_in_run)
    else:
        bare_rounds.append(bare_round(steps))
    return full_s, breakdown, final, bare_rounds, statistics.median(bare_rounds)


def report_steps(*, bs: int, workers: int, steps: int, full_s: float, bare_s: float, bare_opt_s: float,
                 bare_rounds: list[float], interleave: bool, breakdown: dict[str, float], final: dict,
                 compute: float, data_s_per_batch: float, bare_label: str, bare_opt_label: str, compute_what: str,
                 breakdown_title: str) -> dict:
    """Print the full / bare comparison and return its figures (the benchmarks' JSON keys). ``compute`` is the
    network compute timed inside the full steps (``compute_what`` says which); the labels are padded to 31
    characters."""
    ratio = full_s / bare_s
    paired = [f / b for f, b in zip(final["_full_steps"], final["_bare_steps"])]
    res = {
        "workers": workers,
        "batch_size": bs,
        "steps": steps,
        "full_images_per_s": bs / full_s,
        "bare_images_per_s": bs / bare_s,
        "bare_plus_opt_images_per_s": bs / bare_opt_s,
        "full_s_per_step": full_s,
        "bare_s_per_step": bare_s,
        "bare_rounds_s_per_step": bare_rounds,
        "bare_interleaved": interleave,
        "bare_plus_opt_s_per_step": bare_opt_s,
        "ratio_full_over_bare": ratio,
        "ratio_full_over_bare_plus_opt": full_s / bare_opt_s,
        "ratio_median_paired_steps": statistics.median(paired) if paired else None,
        "ratio_full_over_in_run_compute": full_s / compute,
        "full_steps_s": final["_full_steps"],
        "bare_steps_s": final["_bare_steps"],
        "target_ratio": TARGET_RATIO,
        "breakdown_s_per_step": breakdown,
        "data_production_s_per_batch_one_process": data_s_per_batch,
        "engine_steps_per_s_last_log": final.get("train", {}).get("steps_per_s"),
    }
    print(f"full step (engine, real data)  : {bs / full_s:8.1f} images/s  ({1000 * full_s:7.1f} ms/step)")
    how = "interleaved with the full steps" if interleave else "rounds " + ", ".join(
        f"{1000 * r:.1f}" for r in bare_rounds) + " ms"
    print(f"{bare_label:31s}: {bs / bare_s:8.1f} images/s  ({1000 * bare_s:7.1f} ms/step; {how})")
    print(f"{bare_opt_label:31s}: {bs / bare_opt_s:8.1f} images/s  ({1000 * bare_opt_s:7.1f} ms/step)")
    print(f"ratio full / bare              : {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x)"
          f"{'' if ratio <= TARGET_RATIO else '  ABOVE TARGET'}")
    if paired:
        print(f"ratio, median of paired steps  : {statistics.median(paired):.3f}x (each full step / the bare step "
              f"after it)")
    print(f"ratio full / in-run compute    : {full_s / compute:.3f}x ({compute_what} timed inside the same full "
          f"steps)")
    print(f"ratio full / (bare + optimiser): {full_s / bare_opt_s:.3f}x")
    print(f"data production on one process : {1000 * data_s_per_batch:.1f} ms/batch (workers=0 pays it in the step)")
    print(f"full step breakdown (ms/step, {breakdown_title}):")
    for key, v in breakdown.items():
        print(f"  {key:22s} {1000 * v:8.2f}")
    print(f"  {'sum':22s} {1000 * sum(breakdown.values()):8.2f}  (measured step {1000 * full_s:.2f})")
    print(f"  excess over network compute: {1000 * (full_s - compute):.2f} ms/step "
          f"({100 * (full_s / compute - 1):.1f} % of the in-run compute)")
    return res
