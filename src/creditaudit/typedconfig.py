"""Typed configs from dataclasses: the one engine behind every config of creditaudit (a run's
:class:`~creditaudit.config.TrainConfig`, the exploit protocol, the profiles), in the style of
CleanRL's ``Args``. It imports nothing of creditaudit but its errors (``errors.py``, which imports
nothing), so every layer may use it.

A config is a tree of dataclasses. Each leaf field carries ``metadata={"help": ...}`` (printed by
``--help``) and, for fields that never change what a run computes (where it runs, how it is shown,
what its folder is called), ``semantic=False``. A ``key=value`` override names a field by its dotted
path (``model.d=512``), by an alias, or by its leaf name when that is unambiguous (``d=512``); the
text is parsed by the field's type. A float is a finite number: ``inf`` and ``nan`` are refused
(:func:`check_finite` also for configs built in Python), so every config round-trips through
JSON-able dicts (:func:`to_dict`, :func:`from_dict`) and a run folder's ``config.json`` holds what
the run used. No ``exec``.

A config checked where it enters is frozen (:func:`freeze`; its classes derive from
:class:`Config`): every layer inside takes it as it is, and none can change it on the way in.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from creditaudit.errors import ConfigError


# ---------------------------------------------------------------------------------------------
# Walking the dataclass tree
# ---------------------------------------------------------------------------------------------
def iter_fields(cfg_type: type, prefix: str = "") -> Iterable[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, resolved type) for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cfg_type)
    for f in dataclasses.fields(cfg_type):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(typing.cast(type, tp), path + ".")
        else:
            yield path, f, tp


def field_types(cfg_type: type) -> dict[str, Any]:
    return {p: tp for p, _, tp in iter_fields(cfg_type)}


def leaf_index(cfg_type: type) -> dict[str, list[str]]:
    """Leaf name -> every dotted path that ends with it."""
    index: dict[str, list[str]] = {}
    for path, _, _ in iter_fields(cfg_type):
        index.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return index


def non_semantic_paths(cfg_type: type) -> list[str]:
    """Dotted paths of the fields marked ``semantic=False``."""
    return [p for p, f, _ in iter_fields(cfg_type) if f.metadata.get("semantic") is False]


def get_path(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def resolve_key(
    key: str, cfg_type: type, aliases: Mapping[str, str] | None = None, *, help_hint: str = ""
) -> str:
    """The dotted path ``key`` names: a path, an alias, or an unambiguous leaf name."""
    paths = {p for p, _, _ in iter_fields(cfg_type)}
    aliases = aliases or {}
    if key in paths:
        return key
    if key in aliases:
        return aliases[key]
    matches = leaf_index(cfg_type).get(key, [])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: say one of {', '.join(matches)}")
    close = difflib.get_close_matches(
        key, sorted(paths | set(leaf_index(cfg_type)) | set(aliases)), n=3
    )
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint}" + (f" {help_hint}" if help_hint else ""))


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
def split_top_level(text: str) -> list[str]:
    """``"inner,shift(0.1),cosine"`` -> three items: commas inside parentheses do not split."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [s.strip() for s in items if s.strip()]


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``tp`` (bool, int, float, str, tuples, Optional)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in ("none", "null", "default", ""):
            return None
        return parse_value(text, inner[0], key)
    if origin is tuple:
        # "1,2,3", "[1, 2]" or "(1, 2)"; strings keep their parentheses: "inner,shift(0.1)"
        body = text.strip().strip("[]") if args[0] is str else text.strip().strip("[]()")
        return tuple(parse_value(t, args[0], key) for t in split_top_level(body))
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            try:
                return int(text)  # exact, however large (a seed)
            except ValueError:
                value = float(text)  # "1e3"
            if not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            value = float(text)
        elif tp is str:
            return text
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {getattr(tp, '__name__', tp)}") from None
    if tp is float:
        _need_finite(key, value)
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _need_finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(
            f"{key}={value}: expected a finite number (a run's config.json, which is JSON, "
            f"cannot record {value}); give a finite value"
        )


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Refuse a float field (or an item of a tuple of floats) holding inf or nan, e.g. in a config
    built in Python: every value must round-trip through JSON, as a run folder stores it. Fields
    are named ``prefix`` + their dotted path."""
    for f in dataclasses.fields(cfg):
        value, path = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_finite(value, path + ".")
            continue
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float):
                _need_finite(path, item)


# ---------------------------------------------------------------------------------------------
# Overrides, serialisation, help
# ---------------------------------------------------------------------------------------------
Unknown = Callable[
    [Any, str, str, ConfigError], None
]  # (cfg, key, text, the error) for keys no field has


def copy_with(
    cfg: Any,
    items: Iterable[str],
    *,
    aliases: Mapping[str, str] | None = None,
    unknown: Unknown | None = None,
    example: str = "",
    help_hint: str = "",
) -> Any:
    """A copy of ``cfg`` with every ``key=value`` of ``items`` set, each value parsed by its
    field's type; nothing else is checked. The engine under each config's one ``apply_overrides``
    (``config.apply_overrides`` for a run, ``exploit.protocol.apply_overrides`` for the exploit
    study), which checks what it returns.

    Keys that name no field go, after every other item is set, to ``unknown`` (e.g. options of the
    rule a config names); without it they are an error."""
    cfg = copy(cfg)
    types_ = field_types(type(cfg))
    deferred: list[tuple[str, str, ConfigError]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"expected key=value, got {item!r}" + (f" (e.g. {example})" if example else "")
            )
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            path = resolve_key(key, type(cfg), aliases, help_hint=help_hint)
        except ConfigError as exc:
            if unknown is None:
                raise
            deferred.append((key, text, exc))
            continue
        set_path(cfg, path, parse_value(text, types_[path], path))
    for key, text, error in deferred:
        assert unknown is not None  # keys are deferred only to a handler
        unknown(cfg, key, text, error)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: Mapping[str, Any], cfg_type: type, *, what: str = "") -> Any:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error, missing keys default."""
    hints = typing.get_type_hints(cfg_type)
    names = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{what or cfg_type.__name__} has unknown keys {', '.join(sorted(unknown))} "
            "(written by another version of creditaudit?)"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, typing.cast(type, tp))
        elif typing.get_origin(tp) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cfg_type(**kwargs)


def copy(cfg: Any) -> Any:
    """A deep copy through the dict form (what a run folder stores is what a copy holds)."""
    return from_dict(to_dict(cfg), type(cfg))


def semantic_dict(cfg: Any) -> dict:
    """:func:`to_dict` without the fields marked ``semantic=False``."""
    d = to_dict(cfg)
    for path in non_semantic_paths(type(cfg)):
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        node.pop(leaf, None)
    return d


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``path: old -> new`` for every leaf where two config dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def help_rows(cfg_type: type) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field; the key is the leaf name where unambiguous."""
    default = cfg_type()
    index = leaf_index(cfg_type)
    rows = []
    for path, f, tp in iter_fields(cfg_type):
        leaf = path.rsplit(".", 1)[-1]
        key = leaf if len(index[leaf]) == 1 else path
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((key, tname, json.dumps(get_path(default, path)), f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------------
# Frozen configs
# ---------------------------------------------------------------------------------------------
_FROZEN = (
    "this config is frozen (it was checked where it entered): change a copy (typedconfig.copy)"
)


class Config:
    """Base of a config dataclass whose instances :func:`freeze` can make read-only. A copy
    (:func:`copy`, ``copy.deepcopy``, pickle) is an ordinary, editable config, to be checked again
    where it goes in (``dataclasses.replace`` makes a new outer config around the frozen inner
    ones)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"cannot set {name}: {_FROZEN}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"cannot delete {name}: {_FROZEN}")
        object.__delattr__(self, name)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_frozen"}


class FrozenDict(dict):
    """A dict field of a frozen config (a rule's options): read-only; a copy is a plain dict."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(_FROZEN)

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


def freeze(cfg: Any) -> Any:
    """Make ``cfg`` — a :class:`Config` — and every config and dict field inside it read-only, in
    place; returns it."""
    if not isinstance(cfg, Config):
        raise TypeError(f"{type(cfg).__name__} is not a typedconfig.Config: it cannot be frozen")
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]  # a Config is a dataclass
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            freeze(value)
        elif isinstance(value, dict) and not isinstance(value, FrozenDict):
            object.__setattr__(cfg, f.name, FrozenDict(value))
    object.__setattr__(cfg, "_frozen", True)
    return cfg


def is_frozen(cfg: Any) -> bool:
    return bool(getattr(cfg, "__dict__", {}).get("_frozen"))
