"""The sharded tile store (common/store.py): packing round trip against the readers (generated tiles, cut scenes,
S2 + S1 stacks, segmentation tiles with and without masks, the real BigEarthNet-S2 band folders), runs from a store
equal to runs from the folders, exact resume from a store, bad-store messages, and the rank split of its samples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_same_last_weights, cut_back, random_s2, write_tif

from common.config import load_config
from common.datasets import SegmentationDataset, UnlabelledTiles
from common.sampling import EpochSampler
from common.store import (
    StoreError,
    TileStore,
    pack_dataset,
    store_segmentation,
    store_tiles,
)

PRETRAIN = str(REPO / "configs" / "pretrain" / "demo.yaml")
PRETRAIN_S2S1 = str(REPO / "configs" / "pretrain" / "demo_s2s1.yaml")
FINETUNE = str(REPO / "configs" / "finetune" / "demo.yaml")


def assert_same_samples(a, b) -> None:
    """Every sample of two datasets has the same keys and equal values (tensors: same dtype, bit-equal)."""
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys(), i
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)
            else:
                assert x[k] == y[k], (i, k, x[k], y[k])


def pack_cli(*args: str) -> None:
    from common.store import main

    assert main(["pack", *args]) == 0


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_cut_scenes_with_nodata(tmp_path):
    """Multi-band scenes (nodata pixels, a scene smaller than a tile, no band descriptions) cut into tiles."""
    rng = np.random.default_rng(0)
    for k, size in enumerate((40, 20)):
        img = random_s2(rng, size=size)
        img[:, :3, :5] = 0
        img[4, 7, 7] = 0  # no-data in one band only
        write_tif(tmp_path / "scenes" / f"s{k}.tif", img, nodata=0, origin=(404400.0 + 1000 * k, 5342400.0))
    reader = UnlabelledTiles(tmp_path / "scenes", "S2L2A", tile_size=24, overlap=4, return_georef=True)
    out = pack_dataset(UnlabelledTiles(tmp_path / "scenes", "S2L2A", tile_size=24, overlap=4), tmp_path / "st",
                       reader.spec, kind="tiles", tile_size=24, samples_per_shard=3)
    assert len(TileStore(out).meta["shards"]) == 2
    stored = store_tiles(out, reader.spec, tile_size=24, return_georef=True)
    assert_same_samples(reader, stored)
    assert not reader[len(reader) - 1]["valid"].all()  # the padded small scene: invalid pixels survive the trip
    # offset and fill are applied at read time, with the run's values
    r2 = UnlabelledTiles(tmp_path / "scenes", "S2L2A", tile_size=24, overlap=4, offset=-1000, fill_value=0.5)
    assert_same_samples(r2, store_tiles(out, reader.spec, tile_size=24, offset=-1000, fill_value=0.5))


def test_round_trip_bigearthnet_s2_band_folders(bigearthnet_s2, tmp_path):
    """The real BigEarthNet-S2 patches: 20/60 m bands resampled onto the 10 m grid exactly as the reader does."""
    reader = UnlabelledTiles(bigearthnet_s2, "S2L2A", layout="band_files", return_georef=True)
    assert reader.layout == "band_files"
    out = pack_dataset(UnlabelledTiles(bigearthnet_s2, "S2L2A", layout="band_files"), tmp_path / "ben",
                       reader.spec, kind="tiles", workers=2, samples_per_shard=3)
    stored = store_tiles(out, reader.spec, return_georef=True)
    assert_same_samples(reader, stored)
    assert stored[0]["image"].shape == (12, 120, 120) and stored[0]["id"] == reader.sources[0].name
    assert TileStore(out).meta["dtypes"] == ["float32"]  # what the reader resamples into


def test_round_trip_s2s1_stack_and_cli(tiny_demo, tmp_path):
    """A pretraining config with a stacked sensor, packed by the command: build_dataset from the store returns the
    same stacked samples as from the two folders."""
    from eo_ssl.pretrain import PretrainConfig, build_dataset, resolve_data_sensor

    over = [f"data.root={tiny_demo / 's2'}", "data.cache=false"]
    pack_cli("--config", PRETRAIN_S2S1, "--out", str(tmp_path / "s2s1"), "--workers", "2", "--samples-per-shard",
             "16", *over)
    cfg = load_config(PretrainConfig, PRETRAIN_S2S1, over)
    spec = resolve_data_sensor(cfg.data)
    folders = build_dataset(cfg, spec).base
    stored = build_dataset(replace(cfg, data=replace(cfg.data, store=str(tmp_path / "s2s1"))), spec).base
    folders.return_georef = stored.return_georef = True
    assert len(spec.bands) == 14
    assert_same_samples(folders, stored)


def test_round_trip_segmentation_with_and_without_masks(tiny_demo, tmp_path):
    """A fine-tuning root (one tile without its mask) packed by the command: each split read from the store equals
    the reader's, labelled and unlabelled, with the split files resolved inside the store."""
    from common.bands import get_sensor

    root = tmp_path / "seg"
    shutil.copytree(tiny_demo / "s2" / "source", root)
    unl = (root / "splits" / "unlabelled_1_8.txt").read_text().split()[0]
    (root / "masks" / f"{unl}.tif").unlink()
    pack_cli("--config", FINETUNE, "--out", str(tmp_path / "seg.store"), f"data.root={root}", "data.stats_file=null")
    store = TileStore(tmp_path / "seg.store")
    assert store.kind == "segmentation" and int((~store.has_mask).sum()) == 1
    spec = get_sensor("S2L2A")
    kw = {"num_classes": 6, "return_georef": True}
    for split in ("val", "labelled_1_8"):
        assert_same_samples(SegmentationDataset(root, split, sensor=spec, **kw),
                            store_segmentation(tmp_path / "seg.store", split, spec, **kw))
    assert_same_samples(SegmentationDataset(root, "unlabelled_1_8", sensor=spec, labelled=False, **kw),
                        store_segmentation(tmp_path / "seg.store", "unlabelled_1_8", spec, labelled=False, **kw))
    with pytest.raises(StoreError, match="had no mask file"):
        store_segmentation(tmp_path / "seg.store", "unlabelled_1_8", spec, num_classes=6)
    with pytest.raises(StoreError, match="outside the class list"):
        store_segmentation(tmp_path / "seg.store", "val", spec, num_classes=3)


def test_target_domain_store_gives_the_same_augmented_samples(tiny_demo, tmp_path):
    """An adaptation config's target root packed with --target: the target stream (augmented, seeded) and the
    target validation set read from data.target.store equal those read from the folders."""
    from common.config import load_config
    from finetune.data import stream_dataset, validation_sets
    from finetune.training import _resolve, finetune_config_class

    config = str(REPO / "configs" / "finetune" / "demo_uda.yaml")
    over = [f"data.root={tiny_demo / 's2' / 'source'}", f"data.target.root={tiny_demo / 's2' / 'target'}",
            f"data.stats_file={tiny_demo / 's2' / 'stats.json'}"]
    pack_cli("--config", config, "--out", str(tmp_path / "target"), "--target", *over)
    cfg = load_config(finetune_config_class("uda"), config, over)
    spec = _resolve(cfg, config).spec
    stored = replace(cfg.data, target=replace(cfg.data.target, store=str(tmp_path / "target"), root="/nonexistent"))
    a, b = (stream_dataset("target", d, spec, cfg.augment, seed=5) for d in (cfg.data, stored))
    assert_same_samples(a, b)
    assert_same_samples(validation_sets(cfg.data, spec)["target_val"], validation_sets(stored, spec)["target_val"])


# ---------------------------------------------------------------------------------------------- runs
def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


PRETRAIN_TINY = ["data.batch_size=4", "model.arch=resnet10t", "dino.out_dim=64", "dino.hidden_dim=32",
                 "dino.bottleneck_dim=16", "augment.global_size=32", "augment.local_size=16", "augment.local_number=2",
                 "trainer.epochs=null", "trainer.log_every=1", "trainer.checkpoint_every=2", "trainer.eval_every=100",
                 "trainer.progress_bar=false", "optim.warmup_epochs=0", "optim.warmup_steps=1", "data.cache=false"]


def test_pretraining_from_a_store_equals_folders_and_resumes_exactly(tiny_demo, tmp_path):
    from eo_ssl.pretrain import main

    base = [f"data.root={tiny_demo}", f"data.stats_file={tiny_demo / 's2' / 'stats.json'}",
            f"probe.root={tiny_demo / 's2' / 'source'}", *PRETRAIN_TINY]
    pack_cli("--config", PRETRAIN, "--out", str(tmp_path / "st"), *base, "trainer.max_steps=3")
    store = [*base, f"data.store={tmp_path / 'st'}", "data.root=/nonexistent"]  # the folders are not read
    main(["--config", PRETRAIN, "--output-dir", str(tmp_path / "folders"), "--cpu", *base, "trainer.max_steps=3"])
    main(["--config", PRETRAIN, "--output-dir", str(tmp_path / "store"), "--cpu", *store, "trainer.max_steps=3"])
    losses = _losses(tmp_path / "folders")
    assert len(losses) == 3 and losses == _losses(tmp_path / "store")
    assert_same_last_weights(tmp_path / "folders", tmp_path / "store")
    # 4 steps straight == 2 steps, save, resume, 2 steps (from the store)
    main(["--config", PRETRAIN, "--output-dir", str(tmp_path / "full"), "--cpu", *store, "trainer.max_steps=4"])
    cut = cut_back(tmp_path / "full", tmp_path / "cut", last_step=4, drop=("backbone.safetensors",
                                                                           "backbone.json"))
    main(["--config", PRETRAIN, "--output-dir", str(cut), "--cpu", "--resume", *store, "trainer.max_steps=4"])
    assert_same_last_weights(tmp_path / "full", cut)


def test_finetuning_from_a_store_equals_folders(tiny_demo, tmp_path):
    from finetune.semisup import main

    root = tiny_demo / "s2" / "source"
    base = [f"data.root={root}", f"data.stats_file={tiny_demo / 's2' / 'stats.json'}", "data.batch_size=2",
            "model.arch=resnet10t", "trainer.max_steps=3",
            "trainer.log_every=1", "trainer.eval_every=3", "trainer.checkpoint_every=3", "trainer.progress_bar=false",
            "optim.warmup_steps=1", "eval.batch_size=4", "model.aspp_channels=16", "model.decoder_channels=16"]
    pack_cli("--config", FINETUNE, "--out", str(tmp_path / "st"), *base)
    for name, extra in (("folders", []), ("store", [f"data.store={tmp_path / 'st'}", "data.root=/nonexistent"])):
        main(["--config", FINETUNE, "--output-dir", str(tmp_path / name), "--cpu", *base, *extra])
    losses = _losses(tmp_path / "folders")
    assert len(losses) == 3 and losses == _losses(tmp_path / "store")
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("folders", "store"))
    assert a["last"]["mIoU"] == b["last"]["mIoU"]
    assert_same_last_weights(tmp_path / "folders", tmp_path / "store")


# ---------------------------------------------------------------------------------------------- bad stores
@pytest.fixture
def demo_store(tiny_demo, tmp_path) -> Path:
    pack_cli("--config", PRETRAIN, "--out", str(tmp_path / "st"), f"data.root={tiny_demo}", "--samples-per-shard",
             "20")
    return tmp_path / "st"


def _pretrain_error(tmp_path, capsys, root: Path, *overrides: str) -> str:
    from eo_ssl.pretrain import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", PRETRAIN, "--output-dir", str(tmp_path / "run"), "--cpu", f"data.root={root}",
              *PRETRAIN_TINY, "trainer.max_steps=1", *overrides])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_missing_and_corrupt_stores_exit_2_with_the_file_and_fix(demo_store, tiny_demo, tmp_path, capsys):
    err = _pretrain_error(tmp_path, capsys, tiny_demo, f"data.store={tmp_path / 'nothing'}")
    assert "data.store" in err and "nothing does not exist" in err and "python -m common.store pack" in err
    (tmp_path / "half").mkdir()
    assert "no store.json" in _pretrain_error(tmp_path, capsys, tiny_demo, f"data.store={tmp_path / 'half'}")
    shard = demo_store / "shards" / "shard-000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    err = _pretrain_error(tmp_path, capsys, tiny_demo, f"data.store={demo_store}")
    assert str(shard) in err and "truncated" in err and "--overwrite" in err
    shard.write_bytes(data[:-100] + b"\0" * 100)  # same size, other bytes: verify finds it
    out = subprocess.run([sys.executable, "-m", "common.store", "verify", str(demo_store)], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "shard-000001.bin: SHA-256 differs" in out.stderr
    (demo_store / "store.json").write_text("{not json")
    out = subprocess.run([sys.executable, "-m", "common.store", "info", str(demo_store)], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "store.json cannot be read" in out.stderr and "Traceback" not in out.stderr


def test_store_of_other_bands_or_kind_is_refused(demo_store, tiny_demo, tmp_path, capsys):
    err = _pretrain_error(tmp_path, capsys, tiny_demo, f"data.store={demo_store}", "data.bands=[B02,B03,B04]",
                          "augment.channel_p=[0,0,0]")
    assert "holds S2L2A [B01, B02" in err and "reads S2L2A [B02, B03, B04]" in err and "data.bands" in err
    err = _pretrain_error(tmp_path, capsys, tiny_demo, f"data.store={demo_store}", "data.tile_size=16")
    assert "data.tile_size=None" in err
    pack_cli("--config", FINETUNE, "--out", str(tmp_path / "seg"), f"data.root={tiny_demo / 's2' / 'source'}")
    err = _pretrain_error(tmp_path, capsys, tiny_demo, f"data.store={tmp_path / 'seg'}")
    assert "holds segmentation" in err and "needs tiles" in err
    with pytest.raises(SystemExit) as exc:
        pack_cli("--config", PRETRAIN, "--out", str(demo_store), f"data.root={tiny_demo}")
    assert exc.value.code == 2 and "exists and is not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ranks
@pytest.mark.parametrize("n_samples", [44, 48])
def test_two_ranks_get_disjoint_equal_parts_of_an_epoch(demo_store, n_samples):
    """The store dataset goes through the engine's sampler and Accelerate's batch sharding like any map-style
    dataset: two ranks get equally many batches, disjoint when the epoch divides evenly."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from common.bands import get_sensor

    ds = store_tiles(demo_store, get_sensor("S2L2A"))
    ds.rows = ds.rows[:n_samples]
    seen = []
    for rank in range(2):
        batches = BatchSamplerShard(BatchSampler(EpochSampler(len(ds), seed=3), 4, drop_last=True), num_processes=2,
                                    process_index=rank, even_batches=True)
        seen.append([ds[i]["id"] for b in batches for i in b])
    assert len(seen[0]) == len(seen[1]) > 0
    if n_samples % 8 == 0:
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(ds[i]["id"] for i in range(len(ds)))
    else:  # drop_last: the last incomplete round of batches is left out on both ranks
        assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == n_samples // 8 * 8
