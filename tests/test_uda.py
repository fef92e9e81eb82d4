"""finetune/uda.py: source and target streams, the target validation set as a report, checkpoint selection that
never looks at target labels unless asked (then labelled "oracle"), target tiles without masks."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO, launch

CONFIG = str(REPO / "configs" / "finetune" / "demo_uda.yaml")


def _tiny(root) -> list[str]:
    return [f"data.root={root}", "model.arch=test_resnet", "data.batch_size=4", "trainer.max_steps=4",
            "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.progress_bar=false",
            "optim.warmup_steps=1", "eval.batch_size=8"]


def test_source_only_reports_the_target_and_selects_on_the_source(tiny_demo, tmp_path):
    # the target's training tiles need no masks: remove them (its validation tiles keep theirs)
    s2 = tmp_path / "s2"
    shutil.copytree(tiny_demo / "s2", s2)
    val_ids = set((s2 / "target" / "splits" / "val.txt").read_text().split())
    for mask in (s2 / "target" / "masks").glob("*.tif"):
        if mask.stem not in val_ids:
            mask.unlink()
    from finetune.uda import main

    run = tmp_path / "run"
    launch("finetune/uda.py", ["--config", CONFIG, "--output-dir", str(run), *_tiny(s2 / "source")])
    final = json.loads((run / "metrics.json").read_text())
    assert final["method"] == "source_only" and final["best_metric"] == "mIoU" and final["selection"] == "validation"
    assert 0 <= final["last"]["target_val/mIoU"] <= 100 and "target_val/IoU/water" in final["last"]
    card = json.loads((run / "model.json").read_text())
    assert card["method"] == "source_only" and card["state_dict_prefix"] == "model."

    oracle = tmp_path / "oracle"
    main(["--config", CONFIG, "--output-dir", str(oracle), *_tiny(s2 / "source"), "trainer.best_metric=target_val/mIoU"])
    final = json.loads((oracle / "metrics.json").read_text())
    assert final["selection"] == "oracle" and final["best_metric"] == "target_val/mIoU"


def test_uda_offers_only_adaptation_methods(tmp_path, capsys):
    from finetune.uda import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "x"), "method=mean_teacher"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "source_only" in err and "'method'" in err


def test_init_from_a_previous_run(tiny_demo, tmp_path, capsys):
    """model.init_from starts from a previous run's whole segmenter (head included), checked against the card."""
    import torch
    from safetensors.torch import load_file

    from finetune.uda import main

    first = tmp_path / "first"
    main(["--config", CONFIG, "--output-dir", str(first), *_tiny(tiny_demo / "s2" / "source")])
    second = tmp_path / "second"
    final = main(["--config", CONFIG, "--output-dir", str(second), *_tiny(tiny_demo / "s2" / "source"),
                  f"model.init_from={first}", "model.init_checkpoint=last", "trainer.max_steps=1", "optim.lr=1e-12",
                  "optim.warmup_steps=0", "trainer.eval_every=1"])
    assert final["weights_init"].endswith("last.safetensors")
    a = load_file(str(first / "checkpoints" / "last.safetensors"))
    b = load_file(str(second / "checkpoints" / "last.safetensors"))
    head = [k for k in a if k.startswith("model.head.") and k.endswith("weight") and a[k].dtype.is_floating_point]
    assert head and all(torch.allclose(a[k], b[k], atol=1e-6) for k in head)
    with pytest.raises(SystemExit) as exc:
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "bad"), *_tiny(tiny_demo / "s2" / "source"),
              f"model.init_from={first}", "model.arch=resnet10t"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "model.init_from" in err and "arch" in err
    with pytest.raises(SystemExit) as exc:  # another head width: named, with the run's widths
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "wide"), *_tiny(tiny_demo / "s2" / "source"),
              f"model.init_from={first}", "model.aspp_channels=32"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "size mismatch" in err and "aspp_channels=64" in err
    assert "Traceback" not in err


def test_each_entry_script_defaults_to_its_baseline():
    from finetune.semisup import METHODS, FinetuneConfig
    from finetune.uda import METHODS as UDA_METHODS
    from finetune.uda import UDAConfig

    assert FinetuneConfig().method == "supervised" and UDAConfig().method == "source_only"
    assert "supervised" in METHODS and "source_only" not in METHODS and "source_only" in UDA_METHODS


def test_target_statistics_normalise_the_target_tiles_and_travel_to_predict(tiny_demo, tmp_path, capsys):
    """data.target.stats_file: the target stream, its plain passes and target_val are normalised with the target's
    own statistics (the source's stay as they were); the model card keeps them and predict.py --domain target
    applies them; a run without them refuses --domain target, a stats file lacking a band is refused up front."""
    import numpy as np
    import torch

    from common.bands import BandStats, get_sensor
    from common.stats import main as stats_main
    from finetune.config import SegDataConfig, SegTargetConfig
    from finetune.data import plain_dataset, role_spec, validation_sets
    from finetune.predict import load_run_model, main as predict_main
    from finetune.uda import main

    source, target = tiny_demo / "s2" / "source", tiny_demo / "s2" / "target"
    stats_file = tmp_path / "target_stats.json"
    assert stats_main(["--root", str(target / "images"), "--split", str(target / "splits" / "train_all.txt"),
                       "--sensor", "S2L2A", "--out", str(stats_file)]) == 0
    stats = BandStats.from_json(stats_file)

    # the roles: target ones take the target's statistics, the others keep the run's
    spec = get_sensor("S2L2A")
    data = SegDataConfig(root=str(source), val_split="val", labelled_split="train_all",
                         target=SegTargetConfig(root=str(target), train_split="train_all", val_split="val",
                                                stats_file=str(stats_file)))
    mean_t, std_t = stats.arrays(spec.bands)
    for role in ("target", "target_val"):
        np.testing.assert_allclose(role_spec(role, data, spec).mean_array(), mean_t, rtol=1e-6)
        np.testing.assert_allclose(role_spec(role, data, spec).std_array(), std_t, rtol=1e-6)
    assert role_spec("labelled", data, spec) is spec and role_spec("unlabelled", data, spec) is spec
    with_t = validation_sets(data, spec)["target_val"][0]["image"].numpy()
    plain = SegDataConfig(**{**data.__dict__, "target": SegTargetConfig(root=str(target), train_split="train_all",
                                                                        val_split="val")})
    with_s = validation_sets(plain, spec)["target_val"][0]["image"].numpy()
    m_s, s_s = spec.mean_array()[:, None, None], spec.std_array()[:, None, None]
    np.testing.assert_allclose(with_t * std_t[:, None, None] + mean_t[:, None, None], with_s * s_s + m_s,
                               rtol=1e-4, atol=1e-5)  # the same tile in model units, normalised two ways
    assert not np.allclose(with_t, with_s)
    first = plain_dataset("target", data, spec)[0]["image"].numpy()
    np.testing.assert_allclose(first, plain_dataset("target", plain, spec)[0]["image"].numpy() * s_s / std_t[:, None, None]
                               + (m_s - mean_t[:, None, None]) / std_t[:, None, None], rtol=1e-4, atol=1e-5)

    run = tmp_path / "run"
    main(["--config", CONFIG, "--output-dir", str(run), *_tiny(source), f"data.target.stats_file={stats_file}"])
    assert "per-domain standardisation" in capsys.readouterr().out
    card = json.loads((run / "model.json").read_text())
    np.testing.assert_allclose(card["target_normalisation"]["mean"], [stats.mean[b] for b in card["bands"]])
    np.testing.assert_allclose(card["target_normalisation"]["std"], [stats.std[b] for b in card["bands"]])
    assert 0 <= json.loads((run / "metrics.json").read_text())["last"]["target_val/mIoU"] <= 100

    # predict --domain target = the network on the tile normalised with the target's statistics
    tile = sorted((target / "images").glob("*.tif"))[0]
    out = tmp_path / "pred"
    predict_main(["--run", str(run), "--input", str(tile), "--output", str(out), "--domain", "target",
                  "--checkpoint", "last", "--cpu"])
    model = load_run_model(run, "last", domain="target")
    import rasterio

    with rasterio.open(tile) as f:
        reflectance = f.read().astype(np.float32) / 10000.0  # the demo's S2 DN, offset 0
    assert (reflectance > 0).all() and list(card["bands"]) == list(spec.bands)
    tm = np.asarray(card["target_normalisation"]["mean"], np.float32)[:, None, None]
    ts = np.asarray(card["target_normalisation"]["std"], np.float32)[:, None, None]
    x = torch.from_numpy((reflectance - tm) / ts)[None]
    with torch.no_grad():
        expected = model.net(x).logits.argmax(1)[0].numpy()
    with rasterio.open(next(out.glob("*_pred.tif"))) as f:
        np.testing.assert_array_equal(f.read(1), expected)
    np.testing.assert_allclose(model.mean_std()[0], card["target_normalisation"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(load_run_model(run, "last").mean_std()[0], card["normalisation"]["mean"], rtol=1e-6)

    # a run without target statistics refuses --domain target; a stats file without a band is refused up front
    plain_run = tmp_path / "plain"
    main(["--config", CONFIG, "--output-dir", str(plain_run), *_tiny(source), "trainer.max_steps=1",
          "trainer.eval_every=1", "trainer.checkpoint_every=1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        predict_main(["--run", str(plain_run), "--input", str(tile), "--output", str(tmp_path / "p2"),
                      "--domain", "target", "--cpu"])
    assert exc.value.code == 2 and "data.target.stats_file" in capsys.readouterr().err
    bad = tmp_path / "bad_stats.json"
    bad.write_text(json.dumps({"mean": {"B02": 0.1}, "std": {"B02": 0.05}}))
    with pytest.raises(SystemExit) as exc:
        main(["--config", CONFIG, "--output-dir", str(tmp_path / "bad"), *_tiny(source),
              f"data.target.stats_file={bad}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "data.target.stats_file" in err and "B03" in err
    assert not (tmp_path / "bad").exists()
