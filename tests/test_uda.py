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
