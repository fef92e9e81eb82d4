"""``model.stem_pool: false`` end to end: a ResNet stem without its max-pool through pretraining, the export
sidecar, fine-tuning (null follows the export, a contradiction is refused), the model card, prediction and
``model.init_from``. The backbone-level strides and weights are tested in test_backbones.py, DeepLab v3+ in
test_deeplab.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from common.weights import ExportMismatchError, read_export_meta
from conftest import REPO, S2L2A_BANDS, write_s2_export
from finetune.config import SegDataConfig, SegModelConfig
from finetune.inputs import build_model, resolve_inputs

torch.set_num_threads(1)

PRETRAIN = str(REPO / "configs" / "pretrain" / "demo.yaml")
FINETUNE = str(REPO / "configs" / "finetune" / "demo.yaml")
ARCH = "test_resnet"


def _export(out: Path, stem_pool: bool) -> Path:
    """A 12-band S2L2A export of the tiny ResNet as ssl/export.py writes it (random weights)."""
    return write_s2_export(out, ARCH, stem_pool=stem_pool)


def _no_pool(net: torch.nn.Module) -> bool:
    return isinstance(net.backbone.model.maxpool, torch.nn.Identity)


def test_sidecar_records_stem_pool_and_old_sidecars_read_true(tmp_path):
    path = _export(tmp_path / "backbone.safetensors", stem_pool=False)
    sidecar = path.with_suffix(".json")
    raw = json.loads(sidecar.read_text())
    assert raw["stem_pool"] is False
    assert raw["load_with"] == (f"model = timm.create_model('{ARCH}', in_chans=12, num_classes=0, checkpoint_path="
                                f"'backbone.safetensors'); model.maxpool = torch.nn.Identity()  # pretrained without "
                                f"the stem max-pool")
    assert read_export_meta(path).stem_pool is False
    del raw["stem_pool"]  # a sidecar written before the key (the checksum covers the weights only)
    sidecar.write_text(json.dumps(raw))
    meta = read_export_meta(path)
    assert meta.stem_pool is True and "maxpool" not in meta.load_snippet("backbone.safetensors")


def test_finetuning_follows_the_export_and_refuses_a_contradiction(tiny_demo, tmp_path):
    export = _export(tmp_path / "backbone.safetensors", stem_pool=False)
    data = SegDataConfig(root=str(tiny_demo / "s2" / "source"))
    inputs = resolve_inputs(data, SegModelConfig(arch=ARCH, weights=str(export)))
    assert inputs.stem_pool is False
    net = build_model(SegModelConfig(arch=ARCH, weights=str(export)), 6, inputs, 12)
    assert _no_pool(net) and net.backbone.reductions == [2, 2, 4, 8, 16] and net.low_index == 2
    assert resolve_inputs(data, SegModelConfig(arch=ARCH, weights=str(export), stem_pool=False)).stem_pool is False
    with pytest.raises(ExportMismatchError) as exc:
        resolve_inputs(data, SegModelConfig(arch=ARCH, weights=str(export), stem_pool=True), source="my.yaml")
    message = str(exc.value)
    for part in ("my.yaml sets model.stem_pool=true", str(export.with_suffix(".json")), "stem_pool=false",
                 "leave model.stem_pool unset (null) to follow the export, or set it to false"):
        assert part in message, (part, message)
    # a plain timm state_dict (no sidecar) and random init: the timm stem unless model.stem_pool says otherwise
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(ARCH, in_chans=12, num_classes=0).state_dict().items()},
              str(plain))
    assert resolve_inputs(data, SegModelConfig(arch=ARCH, weights=str(plain))).stem_pool is True
    assert resolve_inputs(data, SegModelConfig(arch=ARCH, weights=str(plain), stem_pool=False)).stem_pool is False
    assert resolve_inputs(data, SegModelConfig(arch=ARCH)).stem_pool is True
    assert _no_pool(build_model(SegModelConfig(arch=ARCH, stem_pool=False), 6, None, 12))
    assert not _no_pool(build_model(SegModelConfig(arch=ARCH), 6, None, 12))


def _fails(main, argv, capsys, *expect: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    for e in expect:
        assert e in err, (e, err)
    return err


def test_pretrain_export_finetune_predict_init_from(tiny_demo, tmp_path, capsys):
    """model.stem_pool=false in pretraining reaches the export, the fine-tuned network (model.stem_pool null), its
    model.json, prediction and a later model.init_from run; a contradicting model.stem_pool is refused."""
    from eo_ssl.pretrain import main as pretrain
    from finetune.predict import load_run_model
    from finetune.semisup import main as finetune
    from finetune.training import load_init_from

    tiny = ["model.stem_pool=false", f"data.root={tiny_demo}", f"model.arch={ARCH}", "data.batch_size=4",
            "trainer.epochs=null", "trainer.max_steps=2", "trainer.progress_bar=false", "dino.out_dim=32",
            "dino.hidden_dim=16", "dino.bottleneck_dim=8", "augment.global_size=32", "augment.local_size=16",
            "augment.local_number=2", "optim.warmup_epochs=0", "probe.root=null"]
    pre = tmp_path / "pretrain"
    pretrain(["--config", PRETRAIN, "--output-dir", str(pre), *tiny])
    meta = json.loads((pre / "backbone.json").read_text())
    assert meta["stem_pool"] is False and "model.maxpool = torch.nn.Identity()" in meta["load_with"]
    export = pre / "backbone.safetensors"
    timm.create_model(ARCH, in_chans=12, num_classes=0, checkpoint_path=str(export))  # strict, as without the flag
    _fails(pretrain, ["--config", PRETRAIN, "--output-dir", str(tmp_path / "vit"), *tiny, "model.arch=test_vit"],
           capsys, "model.stem_pool=false", "test_vit", "set model.stem_pool=true")

    ft = [f"data.root={tiny_demo / 's2' / 'source'}", f"model.arch={ARCH}", "data.batch_size=2", "trainer.max_steps=2",
          "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.progress_bar=false", "optim.warmup_steps=1",
          "eval.batch_size=4", "data.stats_file=null"]
    run = tmp_path / "ft"
    finetune(["--config", FINETUNE, "--output-dir", str(run), *ft, f"model.weights={export}"])
    card = json.loads((run / "model.json").read_text())
    assert card["stem_pool"] is False
    loaded = load_run_model(run, "last")
    assert loaded.card.stem_pool is False and _no_pool(loaded.net)
    with torch.no_grad():
        assert loaded.net(torch.randn(1, 12, 32, 32)).logits.shape == (1, 6, 32, 32)

    _fails(finetune, ["--config", FINETUNE, "--output-dir", str(tmp_path / "contradicts"), *ft,
                      f"model.weights={export}", "model.stem_pool=true"],
           capsys, "model.stem_pool=true", str(pre / "backbone.json"))
    _fails(finetune, ["--config", FINETUNE, "--output-dir", str(tmp_path / "init_true"), *ft,
                      f"model.init_from={run}", "model.stem_pool=true"],
           capsys, f"model.init_from: the run {run} was built with stem_pool=false", "set model.stem_pool=false")
    assert not (tmp_path / "contradicts").exists() and not (tmp_path / "init_true").exists()  # refused before work
    # model.stem_pool null follows the model.init_from run
    again = tmp_path / "again"
    finetune(["--config", FINETUNE, "--output-dir", str(again), *ft, f"model.init_from={run}"])
    assert json.loads((again / "model.json").read_text())["stem_pool"] is False

    # a card written before the key describes a network with the pool: one without it is refused by name (the
    # keys are the same; only v3+'s low-level feature, layer1 vs layer2, would also differ in shape)
    del card["stem_pool"]
    (run / "model.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="built with stem_pool=true .* this run's network has stem_pool=false"):
        load_init_from(loaded.net, str(run), "last", ARCH, "v3+", 6, list(S2L2A_BANDS), stem_pool=False)
