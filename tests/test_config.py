"""Strict config loading: unknown/duplicate keys, wrong types, impossible values, overrides, every shipped file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common.config import ConfigError, build_config, load_config, parse_overrides, save_config
from common.engine import TrainerConfig
from common.optim import OptimConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Data:
    root: str = "data/demo"
    batch_size: int = 8
    bands: tuple[str, ...] = ("B02", "B03")
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Top:
    data: Data = field(default_factory=Data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=10))
    note: str | None = None


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_load_and_override(tmp_path):
    p = _write(tmp_path, "data:\n  batch_size: 4\n  bands: [B04, B08]\noptim:\n  lr: 1\n")
    cfg = load_config(Top, p, ["data.batch_size=16", "optim.name=sgd", "note=hello"])
    assert cfg.data.batch_size == 16 and cfg.data.bands == ("B04", "B08")
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.name == "sgd"
    assert cfg.note == "hello"
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(Top, tmp_path / "out.yaml")
    assert again == cfg


def test_unknown_key_names_path_file_and_choices(tmp_path):
    p = _write(tmp_path, "data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(Top, p)
    msg = str(e.value)
    assert "data.batch_sise" in msg and str(p) in msg and "batch_size" in msg and "did you mean" in msg


@dataclass(frozen=True)
class Source:
    root: str
    sensor: str = "S1"


@dataclass(frozen=True)
class WithList:
    sources: tuple[Source, ...] = ()
    sizes: tuple[int, ...] = (1, 2, 3)


def test_overrides_address_list_items_by_index(tmp_path):
    p = _write(tmp_path, "sources:\n  - {root: a}\n  - {root: b, sensor: S2L2A}\n")
    cfg = load_config(WithList, p, ["sources[1].root=c", "sizes[2]=30"])
    assert cfg.sources == (Source("a"), Source("c", "S2L2A")) and cfg.sizes == (1, 2, 30)
    assert parse_overrides(["a.b[0].c=1"]) == {"a": {"b": {0: {"c": 1}}}}
    with pytest.raises(ConfigError, match=r"sources\[0\]\.rot.*command-line.*did you mean 'root'"):
        load_config(WithList, p, ["sources[0].rot=x"])
    with pytest.raises(ConfigError, match=r"sources\[2\]: 'sources' has 2 item"):
        load_config(WithList, p, ["sources[2].root=x"])
    with pytest.raises(ConfigError, match=r"not name\[index\]"):
        parse_overrides(["sources[x].root=1"])


def test_unknown_override_names_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*command-line"):
        load_config(Top, None, ["optim.lrr=3"])


def test_duplicate_key_rejected(tmp_path):
    p = _write(tmp_path, "data:\n  batch_size: 4\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match="duplicate key 'batch_size'.*line 3"):
        load_config(Top, p)


@pytest.mark.parametrize(
    "text, match",
    [
        ("data:\n  batch_size: 4.5\n", r"data\.batch_size.*integer"),
        ("data:\n  batch_size: true\n", r"data\.batch_size.*integer"),
        ("data:\n  mode: c\n", r"data\.mode.*'a', 'b'"),
        ("optim:\n  lr: fast\n", r"optim\.lr.*number"),
        ("data: 3\n", r"data.*mapping"),
        ("data:\n  bands: B02\n", r"data\.bands.*list"),
    ],
)
def test_wrong_types(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Top, _write(tmp_path, text))


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=-1", r"optim\.lr must be > 0"),
        ("trainer.epochs=3", "exactly one of trainer.epochs and trainer.max_steps"),
        ("trainer.max_steps=null", "exactly one of trainer.epochs and trainer.max_steps"),
        ("trainer.clip_grad=0", "trainer.clip_grad must be > 0"),
    ],
)
def test_impossible_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Top, None, [override])


def test_parse_overrides_yaml_values():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=null", "e=1e-3"]) == {
        "a": {"b": 1, "c": ["x", "y"]}, "d": None, "e": 1e-3
    }
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["nonsense"])


def test_yaml_yes_no_are_strings_and_floats_without_dot(tmp_path):
    """`mixed_precision: no` must reach the Literal as "no" (YAML 1.1 would make it False); 1e-3 is a float."""
    from common.config import _StrictLoader
    import yaml

    assert yaml.load("a: no\nb: on\nc: true\nd: 1e-3\ne: False", Loader=_StrictLoader) == {
        "a": "no", "b": "on", "c": True, "d": 1e-3, "e": False}
    from common.config import load_config
    from common.engine import TrainerConfig

    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text("epochs: 1\nmixed_precision: no\n")
    assert load_config(TrainerConfig, cfg_file, ["mixed_precision=no"]).mixed_precision == "no"


# ---------------------------------------------------------------------------------------------- errors, raw values
def test_config_error_is_a_user_input_error():
    from common.errors import UserInputError

    assert issubclass(ConfigError, UserInputError) and issubclass(ConfigError, ValueError)


@dataclass(frozen=True)
class Globbed:
    glob: str = "*.tif"
    maybe: str | None = None
    size: int = 3
    bands: tuple[str, ...] = ()


@pytest.mark.parametrize("value", ["*.tif", "*/images/*.tif", "&x", "!not-a-tag", "a: b: c", "[x", "*"])
def test_override_values_yaml_cannot_take_are_plain_strings_for_string_fields(value):
    """``data.glob=*.tif`` was parsed as YAML and failed as an alias; taken as written for string fields."""
    cfg = load_config(Globbed, None, [f"glob={value}", f"maybe={value}"])
    assert cfg.glob == value and cfg.maybe == value and type(cfg.glob) is str


def test_override_values_yaml_cannot_take_are_refused_for_other_fields():
    with pytest.raises(ConfigError, match=r"'size'.*'\*3'.*alias.*expects int"):
        load_config(Globbed, None, ["size=*3"])
    with pytest.raises(ConfigError, match=r"'bands'.*'\[B02,'.*not valid YAML"):
        load_config(Globbed, None, ["bands=[B02,"])
    # valid YAML keeps its meaning: a quoted glob, a list, a number
    cfg = load_config(Globbed, None, ["glob='*.jp2'", "bands=[B02, B03]", "size=4"])
    assert cfg.glob == "*.jp2" and cfg.bands == ("B02", "B03") and cfg.size == 4


# ---------------------------------------------------------------------------------------------- interpolation
@dataclass(frozen=True)
class Probe:
    root: str | None = None
    k: int = 20


@dataclass(frozen=True)
class Interp:
    data: Data = field(default_factory=Data)
    probe: Probe = field(default_factory=Probe)
    sources: tuple[Source, ...] = ()
    extra: tuple[str, ...] = ()
    note: str | None = None


def test_interpolation_follows_the_final_value_after_overrides(tmp_path):
    p = _write(tmp_path, "data:\n  root: /data/a\nprobe:\n  root: ${data.root}/s2/source\n"
                         "extra: ['${data.root}/x.txt', '${ data.root }/y.txt']\n"
                         "sources:\n  - {root: '${data.root}/../s1'}\n")
    cfg = load_config(Interp, p)
    assert cfg.probe.root == "/data/a/s2/source" and cfg.extra == ("/data/a/x.txt", "/data/a/y.txt")
    assert cfg.sources[0].root == "/data/a/../s1"
    cfg = load_config(Interp, p, ["data.root=/elsewhere"])  # one override moves every path under the root
    assert cfg.probe.root == "/elsewhere/s2/source" and cfg.extra[0] == "/elsewhere/x.txt"
    assert cfg.sources[0].root == "/elsewhere/../s1"
    # an explicit override of the dependent key still wins; the saved config holds resolved values
    cfg = load_config(Interp, p, ["data.root=/elsewhere", "probe.root=/p"])
    assert cfg.probe.root == "/p"
    save_config(cfg, tmp_path / "saved.yaml")
    assert "${" not in (tmp_path / "saved.yaml").read_text()


def test_interpolation_of_defaults_types_chains_and_list_items(tmp_path):
    # the interpolated key left at its dataclass default
    assert load_config(Interp, None, ["probe.root=${data.root}/probe"]).probe.root == "data/demo/probe"
    # exactly ${key} keeps the type; inside a string it becomes text; chains resolve; list items are addressable
    p = _write(tmp_path, "data:\n  batch_size: 6\nprobe:\n  k: ${data.batch_size}\n  root: ${note}\n"
                         "note: ${sources[1].root}/n${data.batch_size}\n"
                         "sources:\n  - {root: a}\n  - {root: b}\n")
    cfg = load_config(Interp, p)
    assert cfg.probe.k == 6 and cfg.note == "b/n6" and cfg.probe.root == "b/n6"
    # a list item's field left at its class default
    cfg = load_config(Interp, p, ["note=${sources[0].sensor}"])
    assert cfg.note == "S1"


@pytest.mark.parametrize("override, match", [
    ("probe.root=${data.rot}/x", r"'probe\.root'.*unknown interpolation key \$\{data\.rot\}.*did you mean 'root'"),
    ("probe.root=${nope}", r"unknown interpolation key \$\{nope\}.*valid keys: data, probe"),
    ("note=${sources[2].root}", r"unknown interpolation key \$\{sources\[2\]\.root\}.*'sources' has 0 item"),
    ("probe.root=${note}/x", r"'probe\.root'.*\$\{note\} is None.*set 'note'"),
    ("note=${probe.root}", r"interpolation cycle"),
    ("note=${data.root", r"unterminated interpolation"),
])
def test_interpolation_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Interp, None, [override, "probe.root=${note}"] if "cycle" in match else [override])



@dataclass(frozen=True)
class _Inner:
    name: str
    size: int = 1

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError("size must be >= 1")


@dataclass(frozen=True)
class _Outer:
    thing: str | _Inner = "x"


def test_a_mapping_for_a_union_reports_the_dataclass_error():
    """``sensor: str | SensorDef`` given a bad mapping names what is wrong in the mapping (was: 'is not str or a
    mapping')."""
    with pytest.raises(ConfigError, match="size must be >= 1"):
        build_config(_Outer, {"thing": {"name": "a", "size": 0}})
    with pytest.raises(ConfigError, match="unknown key 'thing.sise'"):
        build_config(_Outer, {"thing": {"name": "a", "sise": 2}})
    assert build_config(_Outer, {"thing": {"name": "a"}}).thing == _Inner("a", 1)
    assert build_config(_Outer, {"thing": "S2L2A"}).thing == "S2L2A"
