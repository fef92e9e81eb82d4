"""Strict typed configuration: dataclass defaults in code, one YAML file on top, dotted CLI overrides on top.

    cfg = load_config(PretrainConfig, "configs/pretrain/demo.yaml", ["optim.lr=0.01", "data.batch_size=8"])

Rules (every violation raises :class:`ConfigError` naming the dotted key and the file, before any work starts):

* unknown or misspelled keys (with the valid choices and a close match),
* duplicate keys in a YAML mapping (PyYAML silently keeps the last one; we refuse),
* wrong types (``int`` where a ``float`` is expected is accepted; ``bool`` is never taken for a number),
* values outside a ``Literal[...]`` list, and impossible values reported by a dataclass's ``validate()``.

Overrides: ``key.sub=value``, the value parsed as YAML (``data.bands=[B02,B03]``, ``trainer.epochs=null``). A value
that is not valid YAML, or that starts with ``*``, ``&`` or ``!`` (a YAML alias, anchor or tag: ``data.glob=*.tif``),
is taken as the plain string it is written as where the target field takes a string (elsewhere it is refused with
the YAML problem).

Interpolation: ``${dotted.key}`` inside a string value of the file or of an override is replaced by the value of that key of the *final*
configuration (file + overrides + defaults), after the overrides are merged: ``probe.root: ${data.root}/s2/source``
follows ``data.root=/elsewhere`` given on the command line. A value that is exactly ``${key}`` takes the key's value
with its type; inside a longer string the value is inserted as text. The key may be left at its dataclass default;
defaults themselves are never interpolated. Keys may address list items
(``${data.stack[0].root}``) and may themselves hold interpolations; an unknown key, a null, a mapping or list, or a
cycle raise :class:`ConfigError` naming the key. The loaded (and saved) config holds the resolved values.

Configs are frozen after loading: derived values are computed where they are used, never written back.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types

from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from common.errors import UserInputError

__all__ = ["ConfigError", "load_config", "build_config", "config_to_dict", "save_config", "parse_overrides",
           "resolve_interpolations"]

T = TypeVar("T")


class ConfigError(UserInputError):
    """A configuration problem, with the dotted key and the file it came from."""


class _RawOverride(str):
    """An override value kept as written because YAML cannot take it (``problem`` says why); :func:`_convert` accepts
    it where the target takes a string and refuses it, with the YAML problem, elsewhere."""

    problem: str

    def __new__(cls, text: str, problem: str) -> "_RawOverride":
        obj = super().__new__(cls, text)
        obj.problem = problem
        return obj


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in a mapping."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                f"(first at line {seen[key].start_mark.line + 1}) in {loader.name}"
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads yes/no/on/off as booleans, so `mixed_precision: no` would become False. Keep YAML 1.2 booleans
# only (true/false, any case).
_StrictLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


# YAML 1.1 reads `1e-3` (no dot) as a string; accept the scientific notation every Python user writes.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    loader = _StrictLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}: {exc}") from exc
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


_INDEXED = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<index>\d+)\]$")


def _key_path(key: str, item: str) -> list[str | int]:
    """``"data.stack[0].root"`` -> ``["data", "stack", 0, "root"]``."""
    path: list[str | int] = []
    for part in key.split("."):
        m = _INDEXED.match(part)
        if m:
            path += [m["name"], int(m["index"])]
        elif "[" in part or "]" in part:
            raise ConfigError(f"override {item!r}: {part!r} is not name[index]")
        else:
            path.append(part)
    return path


_YAML_INDICATORS = ("*", "&", "!")
"""First characters that make YAML read an alias, an anchor or a tag instead of a plain string."""


def _parse_override_value(item: str, raw: str) -> Any:
    if not raw.strip():
        return ""
    if raw.lstrip().startswith(_YAML_INDICATORS):
        return _RawOverride(raw, f"a YAML alias, anchor or tag (it starts with {raw.lstrip()[0]!r})")
    try:
        return yaml.load(raw, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        return _RawOverride(raw, "not valid YAML (" + " ".join(str(exc).split()) + ")")


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ``["optim.lr=0.01", "data.bands=[B02,B03]", "data.stack[0].root=/x"]`` into a nested dict (values parsed
    as YAML scalars; an item of a list is addressed as ``name[index]`` and becomes an integer key).

    A value that YAML cannot parse, or that starts with ``*``/``&``/``!`` (``data.glob=*.tif``), is kept as the
    string written: the config accepts it for string fields only (see the module docstring)."""
    nested: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part")
        value = _parse_override_value(item, raw)
        node = nested
        parts = _key_path(key, item)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and value and all(isinstance(k, int) for k in value):  # list items by index
            items = list(out.get(key) or [])
            for i, v in value.items():
                if i >= len(items):
                    raise ConfigError(f"override of {key}[{i}]: {key!r} has {len(items)} item(s)")
                items[i] = _merge(items[i], v) if isinstance(v, dict) and isinstance(items[i], dict) else v
            out[key] = items
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise ConfigError on mismatch."""
    where = f"{key!r} in {source}"
    origin = get_origin(tp)
    if isinstance(value, _RawOverride):
        if _takes_string(tp, value):
            return str(value)
        raise ConfigError(f"{where}: the override value {str(value)!r} is {value.problem}, and {key!r} expects "
                          f"{_type_name(tp)}; write a value YAML reads as that")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices if c == value):
            raise ConfigError(f"{where}: {value!r} is not valid; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        errors: dict[Any, ConfigError] = {}
        for arg in get_args(tp):
            try:
                return _convert(value, arg, key, source)
            except ConfigError as exc:
                errors[arg] = exc
        # A mapping meant for the union's one dataclass (e.g. a data.sensor definition): its own, precise error.
        mapped = [arg for arg in get_args(tp) if dataclasses.is_dataclass(arg)]
        if isinstance(value, dict) and len(mapped) == 1:
            raise errors[mapped[0]]
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, f"{key}.{k}", source): _convert(v, v_tp, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _takes_string(tp: Any, value: str) -> bool:
    """Whether a field annotated ``tp`` accepts the string ``value`` as it is."""
    origin = get_origin(tp)
    if tp is str or tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_takes_string(a, value) for a in get_args(tp))
    return False


def _build(cls: type[T], data: dict, prefix: str, source: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        dotted = f"{prefix}.{k}" if prefix else str(k)
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown key {dotted!r} in {source}{hint}; valid keys{' of ' + repr(prefix) if prefix else ''}: "
            f"{', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        f = fields[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]):
            # A partial section starts from the field's own default (which may differ from the class defaults).
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                value = _merge(config_to_dict(default), value)
        kwargs[name] = _convert(value, hints[name], dotted, source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        dotted = ", ".join(f"{prefix}.{m}" if prefix else m for m in missing)
        raise ConfigError(f"missing required key(s) {dotted} in {source}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {source}{', section ' + repr(prefix) if prefix else ''})") from None
        except ValueError as exc:
            raise ConfigError(f"{prefix or 'config'}: {exc} (in {source})") from None
    return obj


def build_config(cls: type[T], data: dict, source: str = "<dict>") -> T:
    """Build a (nested) dataclass config from plain data, strictly (``${key}`` interpolations resolved)."""
    return _build(cls, resolve_interpolations(cls, data, source), "", source)


# ---------------------------------------------------------------------------------------------- interpolation
_INTERPOLATION = re.compile(r"\$\{([^{}]*)\}")


def _defaults_dict(cls: type) -> dict:
    """Plain data of every field default of ``cls`` (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.init and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING):
            out[f.name] = config_to_dict(_field_default(f))
    return out


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass of an annotation (``X``, ``X | None``), else ``None``."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for a in get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def resolve_interpolations(cls: type, data: dict, source: str = "<dict>") -> dict:
    """Return a copy of the plain config ``data`` with every ``${dotted.key}`` in its strings resolved against
    ``data`` completed with the field defaults of ``cls`` (see the module docstring).

    Raises:
        ConfigError: an unknown key (with the valid keys of its section), a null / mapping / list inserted into a
            string, or a cycle; the message names the key holding the interpolation and ``source``.
    """
    missing = object()

    def lookup(ref: str, where: str) -> Any:
        """The value of ``ref``: from ``data`` where it is set there, else the default ``_build`` would use."""
        try:
            path = _key_path(ref.strip(), "${" + ref + "}")
        except ConfigError as exc:
            raise ConfigError(f"{where!r} in {source}: interpolation ${{{ref}}}: {exc}") from None
        node, dflt, tp, done = data, _defaults_dict(cls), cls, ""
        for part in path:
            if isinstance(part, int):  # a list is replaced as a whole: index the list that is in force
                items = node if node is not missing else dflt
                if not isinstance(items, (list, tuple)) or part >= len(items):
                    size = len(items) if isinstance(items, (list, tuple)) else "no"
                    raise ConfigError(f"{where!r} in {source}: unknown interpolation key ${{{ref}}}: {done!r} has "
                                      f"{size} item(s)")
                node, dflt = items[part], missing
                args = get_args(tp) if get_origin(tp) in (list, tuple) else ()
                tp, done = (args[0] if args else Any), f"{done}[{part}]"
                continue
            sub = _dataclass_in(tp)
            fields = {f.name: f for f in dataclasses.fields(sub) if f.init} if sub is not None else {}
            user = node.get(part, missing) if isinstance(node, dict) else missing
            default = dflt.get(part, missing) if isinstance(dflt, dict) else missing
            if default is missing and part in fields:  # a list item leaves this field at its class default
                default = config_to_dict(_field_default(fields[part]))
            if user is missing and default is missing:
                valid = list(fields) or [str(k) for k in (node if isinstance(node, dict) else {})]
                close = difflib.get_close_matches(str(part), valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                section = f"section {done!r}" if done else "the top level"
                raise ConfigError(f"{where!r} in {source}: unknown interpolation key ${{{ref.strip()}}}: no {part!r} "
                                  f"in {section}{hint}; valid keys: {', '.join(valid) or 'none'}")
            node, dflt = user, default
            tp = get_type_hints(sub)[part] if sub is not None else Any
            done = f"{done}.{part}" if done else part
        return node if node is not missing else dflt

    def resolve_value(value: Any, where: str, stack: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve_value(v, f"{where}.{k}" if where else str(k), stack) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve_value(v, f"{where}[{i}]", stack) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value

        def target(ref: str) -> Any:
            key = ref.strip()
            if key in stack:
                raise ConfigError(f"{where!r} in {source}: interpolation cycle "
                                  f"{' -> '.join('${' + k + '}' for k in (*stack, key))}")
            return resolve_value(lookup(ref, where), key, (*stack, key))

        whole = _INTERPOLATION.fullmatch(value)
        if whole:  # exactly ${key}: the value with its type
            return target(whole[1])

        def text(m: re.Match) -> str:
            v = target(m[1])
            if v is None or isinstance(v, (dict, list, tuple)):
                raise ConfigError(f"{where!r} in {source}: ${{{m[1].strip()}}} is {v!r}, which cannot be inserted "
                                  f"into the string {value!r}; set {m[1].strip()!r} to a value")
            return str(v)

        out = _INTERPOLATION.sub(text, value)
        if "${" in out:
            raise ConfigError(f"{where!r} in {source}: unterminated interpolation in {value!r} (write ${{key}})")
        return out

    return resolve_value(data, "", ())


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (YAML) into ``cls``, then apply dotted ``overrides``; validate everything.

    Args:
        cls: the top-level config dataclass.
        path: YAML file (``None``: defaults only).
        overrides: ``key.sub=value`` strings (values parsed as YAML).

    Raises:
        ConfigError: naming the key, the file (or "command-line override") and what is wrong.
    """
    data = _load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    over = parse_overrides(overrides)
    if over:
        # Check overrides on their own first so that an error names the command line, not the file.
        _check_keys(cls, over, "", "command-line override")
        _fill_indexed_defaults(cls, data, over)
        source = f"{source} + command-line overrides"
    return _build(cls, resolve_interpolations(cls, _merge(data, over), source), "", source)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _fill_indexed_defaults(cls: type, data: dict, over: dict) -> None:
    """Copy into ``data`` the default of every list that ``name[index]`` overrides address but the file leaves out."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k, v in over.items():
        if not isinstance(v, dict) or k not in fields:
            continue
        if v and all(isinstance(i, int) for i in v):
            if k not in data:
                default = config_to_dict(_field_default(fields[k]))
                data[k] = list(default) if isinstance(default, (list, tuple)) else []
        elif dataclasses.is_dataclass(hints[k]):
            sub = data.get(k)
            if isinstance(sub, dict):
                _fill_indexed_defaults(hints[k], sub, v)
            elif sub is None:
                sub = {}
                default = _field_default(fields[k])
                _fill_indexed_defaults(hints[k], sub, v)
                if sub and dataclasses.is_dataclass(default):
                    data[k] = {**config_to_dict(default), **sub}


def _check_keys(cls: type, data: dict, prefix: str, source: str) -> None:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else k
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {dotted!r} in {source}{hint}; valid keys: {', '.join(names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _check_keys(tp, v, dotted, source)
        elif isinstance(v, dict) and get_origin(tp) in (list, tuple):  # name[index] overrides of list items
            item_tp = (get_args(tp) or (Any,))[0]
            for i, sub in v.items():
                if dataclasses.is_dataclass(item_tp) and isinstance(sub, dict):
                    _check_keys(item_tp, sub, f"{dotted}[{i}]", source)


def config_to_dict(cfg: Any) -> Any:
    """Plain-data view of a config (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


