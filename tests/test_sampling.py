"""The in-memory tile cache: one read per tile, and augmentations on cached samples equal the uncached ones and
leave the cache untouched (transforms must not write into their input)."""

from __future__ import annotations

import numpy as np
import torch

from common.bands import get_sensor
from common.datasets import SegmentationDataset, UnlabelledTiles
from common.sampling import AugmentedDataset, CachedDataset
from eo_ssl.multicrop import MultiCropConfig, MultiCropTransform
from finetune.transforms import SegAugConfig, SegmentationTransform


class Counting(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.reads = base, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads += 1
        return self.base[i]


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return bool(np.array_equal(a, b))


def test_multicrop_on_cached_tiles(tiny_demo):
    spec = get_sensor("S2L2A")
    tiles = Counting(UnlabelledTiles(tiny_demo / "s2" / "source" / "images", sensor=spec))
    tf = MultiCropTransform(MultiCropConfig(global_size=24, local_size=12, local_number=2,
                                            jitter_p=(0.8, 0.8, 0.8), noise_p=(0.5, 0.5, 0.5)),
                            spec.mean_array(), spec.std_array())
    cached = CachedDataset(tiles)
    plain = AugmentedDataset(UnlabelledTiles(tiny_demo / "s2" / "source" / "images", sensor=spec), tf, seed=3)
    aug = AugmentedDataset(cached, tf, seed=3)
    before = {i: cached[i]["image"].clone() for i in range(3)}
    for epoch in (0, 1):
        aug.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(3):
            assert _same(aug[i], plain[i])
    assert tiles.reads == 3  # one read per tile, whatever the epochs
    assert all(torch.equal(before[i], cached[i]["image"]) for i in range(3))


def test_segmentation_transform_on_cached_tiles(tiny_demo):
    spec = get_sensor("S2L2A")
    root = tiny_demo / "s2" / "source"
    ds = SegmentationDataset(root, "train_all", sensor=spec, num_classes=6)
    tf = SegmentationTransform(spec.mean_array(), spec.std_array(),
                               SegAugConfig(crop_size=16, scale_range=(0.75, 1.25), brightness=0.1, contrast=0.1,
                                            noise_std=0.05), train=True)
    cached = CachedDataset(ds)
    before = [{k: v.clone() for k, v in cached[i].items() if isinstance(v, torch.Tensor)} for i in range(2)]
    for epoch in (0, 1):
        a, b = AugmentedDataset(cached, tf, seed=1), AugmentedDataset(ds, tf, seed=1)
        a.set_epoch(epoch), b.set_epoch(epoch)
        for i in range(2):
            assert _same(a[i], b[i])
    for i in range(2):
        assert all(torch.equal(v, cached[i][k]) for k, v in before[i].items())
