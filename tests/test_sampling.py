"""The in-memory tile cache: one read per tile, and augmentations on cached samples equal the uncached ones and
leave the cache untouched (transforms must not write into their input)."""

from __future__ import annotations

import numpy as np
import torch

from common.method import Method

from common.bands import get_sensor
from common.datasets import SegmentationDataset, UnlabelledTiles
from common.sampling import AugmentedDataset, CachedDataset, EpochSampler
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


# ------------------------------------------------------------------------------------------------------------
# persistent DataLoader workers: the epoch travels with the index
# ------------------------------------------------------------------------------------------------------------
class _Noise:
    def __call__(self, sample, rng):
        return {"x": sample + torch.from_numpy(rng.normal(size=2).astype(np.float32))}


class _Recorder(Method):
    streams = ("main",)
    trainable = ()

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))
        self.seen: list[list[float]] = []

    def param_groups(self):
        return [{"params": [self.w]}]

    def training_step(self, batch, ctx):
        x = batch["main"]["x"]
        self.seen.append(x.sum(1).tolist())
        return {"loss": (self.w * x).sum() * 0.0 + (self.w ** 2).sum()}


def _record(tmp_path, workers: int) -> list[list[float]]:
    from common.engine import Engine, LoaderSpec, TrainerConfig
    from common.optim import OptimConfig

    data = AugmentedDataset([torch.full((2,), float(i)) for i in range(6)], _Noise(), seed=3)
    cfg = TrainerConfig(max_steps=9, num_workers=workers, log_every=100, checkpoint_every=100, progress_bar=False)
    engine = Engine(cfg, str(tmp_path / f"w{workers}"), config=cfg)
    method = _Recorder()
    engine.fit(method, {"main": LoaderSpec(data, batch_size=2)}, OptimConfig(name="sgd", lr=0.1))
    engine.finish()
    return method.seen


def test_persistent_workers_draw_each_epochs_augmentations(tmp_path):
    """Workers that live across epochs (9 steps = 3 epochs of 3 batches) see the same samples, augmented the same
    way, as loading in the main process; an epoch's augmentations differ from the previous epoch's."""
    main = _record(tmp_path, 0)
    workers = _record(tmp_path, 2)
    np.testing.assert_allclose(np.array(workers), np.array(main), rtol=1e-6)
    epochs = [sorted(v for b in main[e * 3:(e + 1) * 3] for v in b) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    base = sorted(2.0 * i for i in range(6))
    assert all(abs(a - b) > 1e-6 for a, b in zip(epochs[1], base))  # noise, not the raw values


def test_epoch_sampler_can_send_the_epoch():
    s = EpochSampler(4, seed=1, with_epoch=True)
    s.set_epoch(2)
    pairs = list(s)
    assert [e for e, _ in pairs] == [2] * 4 and sorted(i for _, i in pairs) == [0, 1, 2, 3]
    ds = AugmentedDataset([torch.zeros(2)] * 4, _Noise(), seed=0)
    ds.set_epoch(2)
    assert torch.equal(ds[(2, 1)]["x"], ds[1]["x"]) and not torch.equal(ds[(0, 1)]["x"], ds[1]["x"])
