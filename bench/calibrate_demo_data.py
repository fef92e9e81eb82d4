"""Calibration check of the built-in demo data (``common.demo_data``): is it hard in the intended ways?

Measures, on the S2 land-cover tiles:

1. per-pixel spectral classifiers (nearest class mean and multinomial logistic regression on standardised 12-band
   spectra, trained on source ``train_all``): pixel accuracy, mIoU, and the cropland/grassland confusion. These
   should be clearly worse than a segmentation network (texture and context matter);
2. a small segmentation network (timm ``resnet18`` ``features_only``, output stride 16, 1x1 projection of the deepest
   features plus a stride-4 skip, random init, batch 16, 64 px, a few hundred iterations) trained on
   source ``labelled_1_8`` vs source ``train_all`` (label-fraction gap) and on source vs target ``train_all``
   evaluated on target ``val`` (domain gap).

Usage (CPU, a few minutes per network run)::

    OMP_NUM_THREADS=1 python bench/calibrate_demo_data.py --data /tmp/demo --iters 300
    OMP_NUM_THREADS=1 python bench/calibrate_demo_data.py --data /tmp/demo --pixel-only

The data are generated with default settings and ``--seed`` under ``--data`` when absent. Prints a small table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import rasterio
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.bands import IGNORE_INDEX
from common.demo_data import CLASS_NAMES, CROPLAND, GRASSLAND, generate

N_CLASSES = len(CLASS_NAMES)


def load_split(root: Path, domain: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance ``(N, 12, H, W)`` float32 and masks ``(N, H, W)`` int64 of one split."""
    ids = (root / "s2" / domain / "splits" / f"{split}.txt").read_text().split()
    xs, ys = [], []
    for i in ids:
        with rasterio.open(root / "s2" / domain / "images" / f"{i}.tif") as src:
            xs.append(src.read().astype(np.float32) / 10000.0)
        with rasterio.open(root / "s2" / domain / "masks" / f"{i}.tif") as src:
            ys.append(src.read(1).astype(np.int64))
    return np.stack(xs), np.stack(ys)


def confusion(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    keep = true != IGNORE_INDEX
    return np.bincount(true[keep] * N_CLASSES + pred[keep], minlength=N_CLASSES**2).reshape(N_CLASSES, N_CLASSES)


def scores(cm: np.ndarray) -> dict[str, float]:
    """Pixel accuracy, mIoU, and the share of crop+grass pixels confused with each other."""
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = inter / np.maximum(union, 1)
    cg = cm[np.ix_([CROPLAND, GRASSLAND], [CROPLAND, GRASSLAND])]
    return {
        "acc": 100 * inter.sum() / cm.sum(),
        "miou": 100 * iou.mean(),
        "iou": 100 * iou,
        "crop_grass_acc": 100 * np.trace(cg) / max(1, cg.sum()),
    }


# ------------------------------------------------------------------------------------------------ per-pixel
def pixel_features(x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = ((x - mean[None, :, None, None]) / std[None, :, None, None]).transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    t = y.reshape(-1)
    keep = t != IGNORE_INDEX
    return f[keep], t[keep]


def nearest_class_mean(f_tr, t_tr, f_te) -> np.ndarray:
    means = np.stack([f_tr[t_tr == c].mean(0) for c in range(N_CLASSES)])
    return np.argmin(((f_te[:, None, :] - means[None]) ** 2).sum(-1), axis=1)


def logistic_regression(f_tr, t_tr, f_te, steps: int = 300) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(f_tr), generator=g)[:200_000]
    X, T = torch.from_numpy(f_tr[idx.numpy()]), torch.from_numpy(t_tr[idx.numpy()])
    # Quadratic features give the linear model curved class boundaries in spectral space.
    def expand(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, a**2 / 4], dim=1)
    lin = nn.Linear(2 * X.shape[1], N_CLASSES)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(expand(X)), T)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return lin(expand(torch.from_numpy(f_te))).argmax(1).numpy()


# ------------------------------------------------------------------------------------------------ network
class SegNet(nn.Module):
    """resnet18 (output stride 16) + 1x1 projection, stride-4 skip, 3x3 fuse, classifier."""

    def __init__(self, in_chans: int, n_classes: int):
        super().__init__()
        self.enc = timm.create_model("resnet18", pretrained=False, features_only=True, output_stride=16,
                                     out_indices=(1, 4), in_chans=in_chans)  # fmt: skip
        c_low, c_high = self.enc.feature_info.channels()
        self.proj = nn.Sequential(nn.Conv2d(c_high, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU())
        self.skip = nn.Sequential(nn.Conv2d(c_low, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.cls = nn.Conv2d(64, n_classes, 1)

    def forward(self, x):
        low, high = self.enc(x)
        high = F.interpolate(self.proj(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = self.cls(self.fuse(torch.cat([high, self.skip(low)], 1)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = int(torch.randint(4, (1,), generator=g))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    if torch.rand(1, generator=g) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x, y


def train_net(x, y, mean, std, iters: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.from_numpy((x - mean[None, :, None, None]) / std[None, :, None, None]).float()
    X[torch.from_numpy(y == IGNORE_INDEX)[:, None].expand_as(X)] = 0
    Y = torch.from_numpy(y)
    net = SegNet(x.shape[1], N_CLASSES)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=iters, pct_start=0.1)
    net.train()
    for _ in range(iters):
        idx = torch.randint(len(X), (16,), generator=g)
        xb, yb = augment(X[idx], Y[idx], g)
        loss = F.cross_entropy(net(xb), yb, ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


@torch.no_grad()
def predict(net, x, mean, std) -> np.ndarray:
    net.eval()
    X = torch.from_numpy((x - mean[None, :, None, None]) / std[None, :, None, None]).float()
    return torch.cat([net(X[i : i + 32]).argmax(1) for i in range(0, len(X), 32)]).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/eoseg_demo_calib"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=None, help="generate with this domain shift")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--pixel-only", action="store_true")
    p.add_argument("--runs", default="src_all,src_1_8,tgt_all", help="network runs to do")
    args = p.parse_args()
    sizes = {} if args.shift is None else {"shift": args.shift}
    generate(args.data, args.seed, overwrite=True, **sizes)

    data = {(d, s): load_split(args.data, d, s) for d in ("source", "target")
            for s in ("train_all", "labelled_1_8", "val")}  # fmt: skip
    xs, ys = data[("source", "train_all")]
    valid = ys != IGNORE_INDEX
    mean = np.array([xs[:, b][valid].mean() for b in range(xs.shape[1])], dtype=np.float32)
    std = np.array([xs[:, b][valid].std() for b in range(xs.shape[1])], dtype=np.float32)
    rows: list[tuple[str, str, dict[str, float], float]] = []

    f_tr, t_tr = pixel_features(xs, ys, mean, std)
    for dom in ("source", "target"):
        xv, yv = data[(dom, "val")]
        f_te, t_te = pixel_features(xv, yv, mean, std)
        t0 = time.perf_counter()
        pred = nearest_class_mean(f_tr, t_tr, f_te)
        rows.append(("pixel NCM", f"source train_all -> {dom} val", scores(confusion(pred, t_te)),
                     time.perf_counter() - t0))  # fmt: skip
        t0 = time.perf_counter()
        pred = logistic_regression(f_tr, t_tr, f_te)
        rows.append(("pixel logreg (quadratic)", f"source train_all -> {dom} val", scores(confusion(pred, t_te)),
                     time.perf_counter() - t0))  # fmt: skip

    if not args.pixel_only:
        runs = {
            "src_all": (("source", "train_all"), ("source", "target")),
            "src_1_8": (("source", "labelled_1_8"), ("source",)),
            "tgt_all": (("target", "train_all"), ("target",)),
        }
        for name in args.runs.split(","):
            (dom, split), evals = runs[name]
            t0 = time.perf_counter()
            x, y = data[(dom, split)]
            net = train_net(x, y, mean, std, args.iters)
            dt = time.perf_counter() - t0
            for ev in evals:
                xv, yv = data[(ev, "val")]
                cm = confusion(predict(net, xv, mean, std).reshape(-1), yv.reshape(-1))
                rows.append((f"resnet18 {args.iters} it", f"{dom} {split} ({len(x)}) -> {ev} val", scores(cm), dt))

    print(f"\ndemo data {args.data} seed {args.seed}")
    short = "".join(f"{c[:5]:>6}" for c in CLASS_NAMES)
    print(f"{'model':<25}{'train -> eval':<38}{'acc':>5}{'mIoU':>6}{short}{'c/g acc':>8}{'s':>5}")
    for model, what, s, dt in rows:
        per_class = "".join(f"{v:6.1f}" for v in s["iou"])
        print(f"{model:<25}{what:<38}{s['acc']:5.1f}{s['miou']:6.1f}{per_class}{s['crop_grass_acc']:8.1f}{dt:5.0f}")
    print("columns: pixel accuracy, mIoU and per-class IoU (%) on val; c/g acc: accuracy among cropland+grassland "
          "pixels on cropland vs grassland; s: seconds (network: training)")


if __name__ == "__main__":
    main()
