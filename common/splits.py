"""Split files and K-fold splits for segmentation, stratified on class pixels and objects, with tile grouping.

Split files hold one id per line (blank lines and lines starting with ``#`` are ignored).

``python -m common.splits --masks DIR --num-classes K --folds F --out OUT [--group-by SPEC]`` computes, for every
mask, the pixel count and the object count (connected components, :func:`scipy.ndimage.label`) of each class, and
assigns *groups* of tiles to folds with iterative stratification (Sechidis, Tsoumakas & Vlahavas, "On the
stratification of multi-label data", ECML PKDD 2011), generalised from binary labels to non-negative amounts:

* every group is an "example" whose "labels" are its ``2K`` amounts (pixels of class c, objects of class c), each
  column normalised to sum to 1 over the dataset so pixel and object balance weigh the same;
* each fold wants ``1/F`` of every column and ``1/F`` of the tiles;
* repeatedly take the label with the fewest unassigned groups carrying it (the rarest), and hand its groups, largest
  amount first, each to the fold that still wants most of that label (ties: the fold that wants most tiles, then
  random); groups carrying no label fill the folds that want most tiles;
* then refine by local search: move or swap groups between folds while that lowers the squared deviation of every
  fold's share of every label (and of the tiles) from ``1/F``. With dense labels (every class in most tiles) the
  greedy pass alone balances mainly the rarest label; the refinement balances all of them.

Groups keep overlapping or same-location tiles (SpaceNet-6 tiles overlap) in one fold. ``--group-by`` takes

* a JSON file mapping id -> group,
* ``overlap``: tiles whose footprints (from the mask georeferencing) overlap are joined (transitively),
* otherwise a regular expression searched in the id; the group is its named group ``group``, else group 1, else the
  whole match.

Outputs ``fold_{k}_train.txt`` / ``fold_{k}_val.txt`` (k = 0..F-1) and ``summary.json`` with per-fold class pixel
fractions, object counts and the balance achieved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from common.bands import IGNORE_INDEX
from common.raster import GEOTIFF_SUFFIXES, RasterError, raster_info, read_raster, to_crs

__all__ = [
    "read_ids",
    "write_ids",
    "mask_class_statistics",
    "tile_class_statistics",
    "groups_from_regex",
    "groups_from_mapping",
    "groups_from_overlap",
    "iterative_stratification",
    "make_folds",
    "fold_summary",
    "write_folds",
    "main",
]

SUMMARY_NAME = "summary.json"
"""Name of the summary file written next to the fold files."""

REFINE_MAX_PASSES = 50
"""Upper bound on local-search passes after the greedy stratification (each pass visits every group once)."""

SIZE_WEIGHT = 1.0
"""Weight of fold-size balance in the local search: 1.0 weighs it like all label columns together."""

GROUP_BY_OVERLAP = "overlap"
"""``--group-by`` value that groups tiles by overlapping footprints."""


# ---------------------------------------------------------------------- split files
def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids from a split file (one per line; blank lines and ``#`` comments ignored).

    Raises:
        ValueError: The file does not exist, or an id is repeated (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: split file does not exist")
    ids = [ln.strip() for ln in path.read_text().splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    seen: set[str] = set()
    dups = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"{path}: repeated id(s) {sorted(set(dups))[:10]}")
    return ids


def write_ids(path: str | os.PathLike, ids: Iterable[str]) -> Path:
    """Write ids one per line, atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(f"{i}\n" for i in ids))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------- per-tile statistics
def mask_class_statistics(
    mask: np.ndarray, num_classes: int, *, ignore_index: int = IGNORE_INDEX, connectivity: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel and object counts per class of one ``(H, W)`` mask.

    Args:
        mask: Integer class indices; ``ignore_index`` pixels are skipped.
        num_classes: Number of classes ``K``.
        ignore_index: Ignored label value.
        connectivity: 1 (4-neighbourhood) or 2 (8-neighbourhood) for connected components.

    Returns:
        ``(pixels, objects)``, two int64 arrays of shape ``(K,)``.

    Raises:
        ValueError: Labels outside ``0..K-1`` (other than ``ignore_index``).
    """
    mask = np.asarray(mask)
    values = mask[mask != ignore_index].astype(np.int64)
    bad = np.unique(values[(values < 0) | (values >= num_classes)])
    if bad.size:
        raise ValueError(f"label value(s) {bad[:10].tolist()} outside classes 0..{num_classes - 1}")
    pixels = np.bincount(values, minlength=num_classes).astype(np.int64)
    objects = np.zeros(num_classes, dtype=np.int64)
    structure = ndimage.generate_binary_structure(2, connectivity)
    for c in np.flatnonzero(pixels):
        _, n = ndimage.label(mask == c, structure=structure)
        objects[c] = n
    return pixels, objects


def tile_class_statistics(
    mask_paths: Sequence[str | os.PathLike],
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    connectivity: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel and object counts per class for every mask file.

    Returns:
        ``(pixels, objects)``, int64 arrays of shape ``(N, K)``.

    Raises:
        RasterError / ValueError: Unreadable mask or labels out of range; the message names the file.
    """
    pixels = np.zeros((len(mask_paths), num_classes), dtype=np.int64)
    objects = np.zeros_like(pixels)
    for i, p in enumerate(mask_paths):
        s = read_raster(p, bands=[1])
        mask = s.array[0].astype(np.int64)
        mask[~s.valid] = ignore_index
        try:
            pixels[i], objects[i] = mask_class_statistics(
                mask, num_classes, ignore_index=ignore_index, connectivity=connectivity
            )
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from exc
    return pixels, objects


# ---------------------------------------------------------------------- grouping
def groups_from_regex(ids: Sequence[str], pattern: str) -> list[str]:
    """Group of each id from a regex searched in it (named group ``group``, else group 1, else the match).

    Raises:
        ValueError: Invalid pattern, or ids the pattern does not match (listed).
    """
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--group-by regex {pattern!r} is invalid: {exc}") from exc
    out, unmatched = [], []
    for i in ids:
        m = rx.search(i)
        if m is None:
            unmatched.append(i)
            continue
        if "group" in rx.groupindex:
            out.append(m.group("group"))
        elif rx.groups >= 1:
            out.append(m.group(1))
        else:
            out.append(m.group(0))
    if unmatched:
        raise ValueError(f"group regex {pattern!r} does not match {len(unmatched)} id(s), e.g. {unmatched[:5]}")
    return out


def groups_from_mapping(ids: Sequence[str], mapping: Mapping[str, Any], source: str = "group mapping") -> list[str]:
    """Group of each id from a mapping id -> group.

    Raises:
        ValueError: Ids without a group (message names ``source`` and lists them).
    """
    missing = [i for i in ids if i not in mapping]
    if missing:
        raise ValueError(f"{source}: no group for {len(missing)} id(s), e.g. {missing[:5]}")
    return [str(mapping[i]) for i in ids]


def groups_from_overlap(paths: Sequence[str | os.PathLike], ids: Sequence[str], min_overlap: float = 0.0) -> list[str]:
    """Join tiles whose footprints overlap (transitively) into groups.

    Args:
        paths: Georeferenced rasters (masks or images), one per id.
        ids: Ids of the rasters.
        min_overlap: Minimum intersection area, as a fraction of the smaller footprint, to join two tiles
            (0: any positive area; tiles that only touch are not joined).

    Returns:
        Group name (the first id of the group in sorted order) per id.
    """
    from rasterio.warp import transform_bounds

    infos = [raster_info(p, check_data=False) for p in paths]
    ref_crs = to_crs(infos[0].crs) if infos else None
    boxes = []
    for info, p in zip(infos, paths):
        b = info.bounds
        crs = to_crs(info.crs)
        if ref_crs is not None and crs is not None and crs != ref_crs:
            b = transform_bounds(crs, ref_crs, *b)
        elif (crs is None) != (ref_crs is None):
            raise RasterError(f"{p}: cannot compare footprints of georeferenced and non-georeferenced rasters")
        boxes.append(b)
    bx = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    left, bottom, right, top = bx.T
    iw = np.minimum(right[:, None], right[None]) - np.maximum(left[:, None], left[None])
    ih = np.minimum(top[:, None], top[None]) - np.maximum(bottom[:, None], bottom[None])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (right - left) * (top - bottom)
    smaller = np.minimum(area[:, None], area[None])
    joined = (inter > 0) & (inter >= min_overlap * smaller)
    _, labels = _connected(joined)
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    name: dict[int, str] = {}
    for i in order:
        name.setdefault(int(labels[i]), ids[i])
    return [name[int(labels[i])] for i in range(len(ids))]


def _connected(adjacency: np.ndarray) -> tuple[int, np.ndarray]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    return connected_components(csr_matrix(adjacency), directed=False)


# ---------------------------------------------------------------------- stratification
def iterative_stratification(
    labels: np.ndarray,
    n_folds: int,
    *,
    sizes: np.ndarray | None = None,
    seed: int = 0,
    refine: bool = True,
    size_weight: float = SIZE_WEIGHT,
) -> np.ndarray:
    """Iterative stratification (Sechidis et al. 2011) generalised to non-negative label amounts, then refined.

    The greedy pass follows Sechidis et al.; with dense labels (every class in most tiles) it balances mainly the
    rarest label, so a local search then moves and swaps examples between folds while that lowers the squared
    deviation of every fold's share of every label, and of the examples' ``sizes``, from ``1/F``.

    Args:
        labels: ``(G, L)`` non-negative amounts per example (group) and label.
        n_folds: Number of folds ``F`` (equal proportions).
        sizes: ``(G,)`` weight of each example in the fold-size balance (e.g. tiles per group); default 1.
        seed: Random seed for tie-breaking.
        refine: Run the local search after the greedy pass.
        size_weight: Weight of fold-size balance in the local search (1.0: like all label columns together).

    Returns:
        ``(G,)`` int array, fold of each example.
    """
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 2 or np.any(y < 0) or not np.all(np.isfinite(y)):
        raise ValueError("labels must be a finite non-negative (G, L) array")
    g_count = y.shape[0]
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    sizes = np.ones(g_count) if sizes is None else np.asarray(sizes, dtype=np.float64)
    rng = np.random.default_rng(seed)
    totals = y.sum(0)
    y = y[:, totals > 0] / totals[totals > 0]
    want_label = np.full((n_folds, y.shape[1]), 1.0 / n_folds)
    want_size = np.full(n_folds, sizes.sum() / n_folds)
    fold = np.full(g_count, -1, dtype=np.int64)
    tie = 1e-12

    def pick(candidates: np.ndarray) -> int:
        return int(rng.choice(candidates))

    def assign(g: int, j: int) -> None:
        fold[g] = j
        want_label[j] -= y[g]
        want_size[j] -= sizes[g]

    active = y > 0
    while True:
        unassigned = fold < 0
        carriers = (active & unassigned[:, None]).sum(0)
        open_labels = np.flatnonzero(carriers > 0)
        if open_labels.size == 0:
            break
        fewest = carriers[open_labels].min()
        label = pick(open_labels[carriers[open_labels] == fewest])
        groups = np.flatnonzero(unassigned & active[:, label])
        groups = rng.permutation(groups)
        groups = groups[np.argsort(-y[groups, label], kind="stable")]
        for g in groups:
            w = want_label[:, label]
            best = np.flatnonzero(w >= w.max() - tie)
            if best.size > 1:
                s = want_size[best]
                best = best[s >= s.max() - tie]
            assign(int(g), pick(best))
    for g in rng.permutation(np.flatnonzero(fold < 0)):
        best = np.flatnonzero(want_size >= want_size.max() - tie)
        assign(int(g), pick(best))
    if refine:
        size_col = (sizes / sizes.sum())[:, None] * np.sqrt(size_weight * max(y.shape[1], 1))
        _refine(np.concatenate([y, size_col], axis=1), fold, n_folds, rng, max_passes=REFINE_MAX_PASSES)
    return fold


def _refine(y: np.ndarray, fold: np.ndarray, n_folds: int, rng: np.random.Generator, max_passes: int) -> None:
    """Local search on ``fold`` (in place): moves and swaps of examples that lower ``sum_{j,l} (S_jl - 1/F)^2``.

    ``S_jl`` is fold j's share of column l (columns of ``y`` sum to 1, or to a weight for the size column), so the
    objective is the squared deviation of every fold's share of every label (and of the tiles) from its target.
    No fold is ever emptied.
    """
    sums = np.stack([y[fold == j].sum(0) for j in range(n_folds)])
    counts = np.bincount(fold, minlength=n_folds)
    norms = (y * y).sum(1)
    eps = 1e-15
    for _ in range(max_passes):
        improved = False
        for g in rng.permutation(len(fold)):
            a = int(fold[g])
            yg = y[g]
            # best move of g to another fold b: delta = 2 y.(S_b - S_a) + 2|y|^2
            if counts[a] > 1:
                delta = 2 * (sums - sums[a]) @ yg + 2 * norms[g]
                delta[a] = np.inf
                b = int(np.argmin(delta))
                if delta[b] < -eps:
                    sums[a] -= yg
                    sums[b] += yg
                    counts[a] -= 1
                    counts[b] += 1
                    fold[g] = b
                    improved = True
                    continue
            # best swap of g with h in another fold: d = y_h - y_g, delta = 2 d.(S_a - S_b) + 2|d|^2
            d = y - yg
            delta = 2 * np.einsum("hl,hl->h", d, sums[a] - sums[fold]) + 2 * np.einsum("hl,hl->h", d, d)
            delta[fold == a] = np.inf
            h = int(np.argmin(delta))
            if delta[h] < -eps:
                b = int(fold[h])
                sums[a] += y[h] - yg
                sums[b] += yg - y[h]
                fold[g], fold[h] = b, a
                improved = True
        if not improved:
            break


def make_folds(
    ids: Sequence[str],
    pixels: np.ndarray,
    objects: np.ndarray,
    n_folds: int,
    *,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Fold (validation fold index) of every id, balancing class pixels and objects, keeping groups together.

    Args:
        ids: Tile ids.
        pixels: ``(N, K)`` pixels per class.
        objects: ``(N, K)`` objects per class.
        n_folds: Number of folds.
        groups: Group per id (default: every id its own group).
        seed: Tie-breaking seed.

    Returns:
        ``(N,)`` int array in ``0..n_folds-1``.

    Raises:
        ValueError: Fewer groups than folds, or inconsistent shapes.
    """
    n = len(ids)
    pixels, objects = np.asarray(pixels), np.asarray(objects)
    if pixels.shape[0] != n or objects.shape != pixels.shape:
        raise ValueError(f"pixels {pixels.shape} / objects {objects.shape} do not match {n} ids")
    groups = list(ids) if groups is None else [str(g) for g in groups]
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} ids")
    names, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    if len(names) < n_folds:
        raise ValueError(f"only {len(names)} group(s) for {n_folds} folds; every fold needs at least one group")
    feats = np.concatenate([pixels, objects], axis=1).astype(np.float64)
    group_feats = np.zeros((len(names), feats.shape[1]))
    np.add.at(group_feats, inverse, feats)
    sizes = np.bincount(inverse, minlength=len(names)).astype(np.float64)
    group_fold = iterative_stratification(group_feats, n_folds, sizes=sizes, seed=seed)
    return group_fold[inverse]


def fold_summary(
    ids: Sequence[str],
    folds: np.ndarray,
    pixels: np.ndarray,
    objects: np.ndarray,
    *,
    groups: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-fold class pixel fractions, object counts and balance measures (JSON-serialisable).

    ``share_of_class_pixels[c]`` is the fold's part of all pixels of class ``c`` (ideal ``1/F``);
    ``balance.max_abs_dev_*`` are the largest deviations of those shares from ``1/F`` over folds and present classes.
    """
    folds = np.asarray(folds)
    n_folds = int(folds.max()) + 1 if folds.size else 0
    pixels, objects = np.asarray(pixels, dtype=np.int64), np.asarray(objects, dtype=np.int64)
    tot_pix, tot_obj = pixels.sum(0), objects.sum(0)
    groups = list(ids) if groups is None else list(groups)
    per_fold = []
    dev_pix, dev_obj = 0.0, 0.0
    for k in range(n_folds):
        sel = folds == k
        fp, fo = pixels[sel].sum(0), objects[sel].sum(0)
        share_p = np.divide(fp, tot_pix, out=np.zeros(len(fp)), where=tot_pix > 0)
        share_o = np.divide(fo, tot_obj, out=np.zeros(len(fo)), where=tot_obj > 0)
        if (tot_pix > 0).any():
            dev_pix = max(dev_pix, float(np.abs(share_p[tot_pix > 0] - 1 / n_folds).max()))
        if (tot_obj > 0).any():
            dev_obj = max(dev_obj, float(np.abs(share_o[tot_obj > 0] - 1 / n_folds).max()))
        per_fold.append({
            "fold": k,
            "num_val": int(sel.sum()),
            "num_train": int((~sel).sum()),
            "val_groups": len({g for g, s in zip(groups, sel) if s}),
            "class_pixels": fp.tolist(),
            "class_pixel_fraction": (fp / max(int(fp.sum()), 1)).round(6).tolist(),
            "object_counts": fo.tolist(),
            "share_of_class_pixels": share_p.round(6).tolist(),
            "share_of_objects": share_o.round(6).tolist(),
        })  # fmt: skip
    group_sizes = np.unique(np.asarray(groups, dtype=str), return_counts=True)[1] if groups else np.zeros(1)
    return {
        "num_ids": len(ids),
        "num_groups": int(len(group_sizes)) if groups else 0,
        "largest_group": int(group_sizes.max()) if groups else 0,
        "folds": n_folds,
        "class_names": list(class_names) if class_names is not None else None,
        "overall": {
            "class_pixels": tot_pix.tolist(),
            "class_pixel_fraction": (tot_pix / max(int(tot_pix.sum()), 1)).round(6).tolist(),
            "object_counts": tot_obj.tolist(),
        },
        "per_fold": per_fold,
        "balance": {"max_abs_dev_pixel_share": round(dev_pix, 6), "max_abs_dev_object_share": round(dev_obj, 6)},
    }


def write_folds(
    out_dir: str | os.PathLike, ids: Sequence[str], folds: np.ndarray, summary: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write ``fold_{k}_train.txt`` / ``fold_{k}_val.txt`` (and ``summary.json``) into ``out_dir``."""
    out = Path(out_dir)
    folds = np.asarray(folds)
    written = []
    for k in range(int(folds.max()) + 1):
        written.append(write_ids(out / f"fold_{k}_train.txt", [i for i, f in zip(ids, folds) if f != k]))
        written.append(write_ids(out / f"fold_{k}_val.txt", [i for i, f in zip(ids, folds) if f == k]))
    if summary is not None:
        tmp = out / f".{SUMMARY_NAME}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, out / SUMMARY_NAME)
        written.append(out / SUMMARY_NAME)
    return written


# ---------------------------------------------------------------------- CLI
def _resolve_groups(spec: str | None, ids: list[str], paths: list[Path]) -> list[str] | None:
    if not spec:
        return None
    if spec == GROUP_BY_OVERLAP:
        return groups_from_overlap(paths, ids)
    if spec.lower().endswith(".json"):
        p = Path(spec)
        if not p.is_file():
            raise ValueError(f"{p}: group mapping JSON does not exist")
        try:
            mapping = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from exc
        if not isinstance(mapping, dict):
            raise ValueError(f"{p}: expected a JSON object mapping id -> group")
        return groups_from_mapping(ids, mapping, source=str(p))
    return groups_from_regex(ids, spec)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m common.splits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--masks", required=True, help="directory of mask GeoTIFFs (id = file stem)")
    ap.add_argument("--num-classes", type=int, required=True)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", required=True, help="output directory for fold files and summary.json")
    ap.add_argument("--group-by", default=None, help="JSON id->group file, 'overlap', or a regex on the id")
    ap.add_argument("--ids", default=None, help="optional split file restricting the ids (e.g. train_all.txt)")
    ap.add_argument("--glob", default="*", help="file name pattern inside --masks (GeoTIFF suffixes only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ignore-index", type=int, default=IGNORE_INDEX)
    ap.add_argument("--connectivity", type=int, choices=(1, 2), default=1, help="1: 4-neighbours, 2: 8-neighbours")
    args = ap.parse_args(argv)
    try:
        mask_dir = Path(args.masks)
        if not mask_dir.is_dir():
            raise ValueError(f"{mask_dir}: mask directory does not exist")
        paths = sorted(p for p in mask_dir.glob(args.glob) if p.suffix in GEOTIFF_SUFFIXES and p.is_file())
        by_id = {p.stem: p for p in paths}
        if args.ids:
            wanted = read_ids(args.ids)
            missing = [i for i in wanted if i not in by_id]
            if missing:
                raise ValueError(f"{args.ids}: {len(missing)} id(s) have no mask in {mask_dir}, e.g. {missing[:5]}")
            by_id = {i: by_id[i] for i in wanted}
        if not by_id:
            raise ValueError(f"{mask_dir}: no mask GeoTIFFs matching {args.glob!r}")
        ids = list(by_id)
        mask_paths = [by_id[i] for i in ids]
        pixels, objects = tile_class_statistics(
            mask_paths, args.num_classes, ignore_index=args.ignore_index, connectivity=args.connectivity
        )
        groups = _resolve_groups(args.group_by, ids, mask_paths)
        folds = make_folds(ids, pixels, objects, args.folds, groups=groups, seed=args.seed)
        summary = fold_summary(ids, folds, pixels, objects, groups=groups)
        summary.update(
            masks=str(mask_dir), num_classes=args.num_classes, seed=args.seed, group_by=args.group_by,
            ignore_index=args.ignore_index, connectivity=args.connectivity,
        )  # fmt: skip
        write_folds(args.out, ids, folds, summary)
    except (ValueError, RasterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bal = summary["balance"]
    print(
        f"wrote {args.folds} folds for {len(ids)} ids ({summary['num_groups']} groups) to {args.out}; "
        f"max |pixel share - 1/F| = {bal['max_abs_dev_pixel_share']:.4f}, "
        f"max |object share - 1/F| = {bal['max_abs_dev_object_share']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
