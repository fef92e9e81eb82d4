"""Where in the backbone does a DINO export carry per-pixel class information? A dense linear probe per stage.

For each backbone (DINO exports and randomly initialised ResNets of the same architecture) the frozen feature map of
every stage is upsampled bilinearly to the tile, and a ridge classifier (closed form, one-hot targets, features
standardised) is fitted on the labelled pixels of the training split and scored as mIoU on the validation tiles. The
raw bands (a per-pixel spectral classifier) are the floor. No training loop, no augmentation: a few seconds per
stage, so it reads the features themselves, where the fine-tuning and linear-probe rows of
``bench/pretrain_value.py`` read a whole recipe.

    python bench/dense_probe.py --data data/demo --export default=runs/tables/pretrain/backbone.safetensors \\
        nochannel=runs/tables/pretrain_nochannel/backbone.safetensors --random-seeds 0 1 2

writes ``bench/results/dense_probe.json``: ``{"raw_bands": mIoU, "backbones": {name: {"stages": [mIoU per stage],
"strides": [...], "all_stages": mIoU}}, "setup": {...}}`` (random init: ``random_s<seed>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eo_ssl.pretrain import ProbeTransform

from common.backbones import create_backbone
from common.bands import resolve_sensors
from common.datasets import stacked_segmentation_dataset
from common.weights import read_export_meta


def ridge_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float) -> tuple[torch.Tensor, ...]:
    """Ridge regression onto one-hot targets: ``W = (A^T A + lam N I)^-1 A^T T`` on standardised features ``A``
    with a bias column (``x``: (N, C) features, ``y``: (N,) labels). Returns ``(W, mean, std)``."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    a = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    t = F.one_hot(y, num_classes).to(x.dtype)
    eye = torch.eye(a.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * eye, a.T @ t)
    return w, mean, std


def ridge_predict(x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    a = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return (a @ w).argmax(1)


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean IoU over the classes present in ``target`` or ``pred`` (pixels with labels >= num_classes ignored)."""
    keep = target < num_classes
    cm = torch.bincount(target[keep] * num_classes + pred[keep], minlength=num_classes ** 2)
    cm = cm.reshape(num_classes, num_classes).double()
    union = cm.sum(0) + cm.sum(1) - cm.diag()
    return float(100 * (cm.diag()[union > 0] / union[union > 0]).mean())


def pixels(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) feature maps -> (B * H * W, C) per-pixel features at the tile's size (bilinear)."""
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False) if maps.shape[-2:] != size else maps
    return up.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def probe(train_maps, val_maps, y_train, y_val, num_classes, lam, max_pixels, seed) -> float:
    size = tuple(y_train.shape[-2:])
    x, y = pixels(train_maps, size), y_train.reshape(-1)
    keep = torch.nonzero(y < num_classes).squeeze(1)
    g = torch.Generator().manual_seed(seed)
    keep = keep[torch.randperm(len(keep), generator=g)[:max_pixels]]
    w, mean, std = ridge_fit(x[keep].double(), y[keep], num_classes, lam)
    return miou(ridge_predict(pixels(val_maps, size).double(), w, mean, std), y_val.reshape(-1), num_classes)


def load_split(root: Path, split: str, spec, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's tiles as the pretraining's k-NN probe reads them (:class:`eo_ssl.pretrain.ProbeTransform`)."""
    ds = stacked_segmentation_dataset(root, split, spec, image_dirs=["images"], mask_dir="masks",
                                      num_classes=num_classes,
                                      transform=ProbeTransform(spec.mean_array(), spec.std_array()))
    samples = [ds[i] for i in range(len(ds))]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])


@torch.no_grad()
def stage_maps(model, x: torch.Tensor, batch: int = 32) -> list[torch.Tensor]:
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    return [torch.cat([o[k] for o in outs]) for k in range(len(outs[0]))]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo")
    ap.add_argument("--domain", default="source")
    ap.add_argument("--export", nargs="*", default=[], metavar="NAME=PATH", help="DINO exports to probe")
    ap.add_argument("--random-seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--arch", default="resnet18", help="architecture of the random-init rows")
    ap.add_argument("--stem-pool", choices=["true", "false"], default="true", help="of the random-init rows")
    ap.add_argument("--train-split", default="labelled_1_8")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--lam", type=float, default=1e-3, help="ridge penalty (x pixels)")
    ap.add_argument("--max-pixels", type=int, default=60000, help="training pixels sampled for the fit")
    ap.add_argument("--num-classes", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_probe.json"))
    args = ap.parse_args(argv)
    with torch.no_grad():  # a context, not torch.set_grad_enabled(False): callers (tests) keep autograd
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    root = Path(args.data) / "s2" / args.domain
    spec = resolve_sensors([("S2L2A", None, str(Path(args.data) / "s2" / "stats.json"), None)])
    x_tr, y_tr = load_split(root, args.train_split, spec, args.num_classes)
    x_va, y_va = load_split(root, args.val_split, spec, args.num_classes)
    run = {"y_train": y_tr, "y_val": y_va, "num_classes": args.num_classes, "lam": args.lam,
           "max_pixels": args.max_pixels, "seed": 0}
    result = {"raw_bands": probe(x_tr, x_va, **run), "backbones": {},
              "setup": {"data": str(root), "train_split": args.train_split, "val_split": args.val_split,
                        "train_tiles": len(x_tr), "val_tiles": len(x_va), "lam": args.lam,
                        "max_pixels": args.max_pixels}}
    print(f"raw bands: {result['raw_bands']:.2f} mIoU ({len(x_tr)} training tiles)", flush=True)

    backbones = []
    for item in args.export:
        name, path = item.split("=", 1)
        meta = read_export_meta(path)
        backbones.append((name, meta.architecture, meta.stem_pool, path, None))
    for seed in args.random_seeds:
        backbones.append((f"random_s{seed}", args.arch, args.stem_pool == "true", None, seed))
    for name, arch, stem_pool, path, seed in backbones:
        if seed is not None:
            torch.manual_seed(seed)
        model = create_backbone(arch, x_tr.shape[1], features_only=True, pretrained_file=path,
                                stem_pool=stem_pool).eval()
        f_tr, f_va = stage_maps(model, x_tr), stage_maps(model, x_va)
        stages = [probe(a, b, **run) for a, b in zip(f_tr, f_va)]
        size = tuple(x_tr.shape[-2:])
        cat_tr = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in f_tr], 1)
        cat_va = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in f_va], 1)
        strides = [x_tr.shape[-1] // f.shape[-1] for f in f_tr]
        entry = {"stages": stages, "strides": strides, "all_stages": probe(cat_tr, cat_va, **run),
                 "export": path, "stem_pool": stem_pool}
        result["backbones"][name] = entry
        print(f"{name}: per stage (stride {strides}) {[round(s, 2) for s in stages]}, all stages "
              f"{entry['all_stages']:.2f}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}\n")
    print(markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    """The README's table: one row per backbone, one column per stage (by stride), then all stages together."""
    rows = result["backbones"]
    strides = next(iter(rows.values()))["strides"] if rows else []
    lines = ["| backbone | " + " | ".join(f"stride {s}" for s in strides) + " | all stages |",
             "|---" * (len(strides) + 2) + "|"]
    for name, entry in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in entry["stages"])
                     + f" | {entry['all_stages']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
