"""Rules from outside creditaudit: a Python file, or an installed package's entry point.

A researcher's rule is a module that subclasses :class:`~creditaudit.rules.base.Rule` and registers
it with ``@RULES.register("my_rule", "one line")`` — exactly like a built-in rule. It reaches
creditaudit in one of two ways, neither of which edits creditaudit:

- a file: ``creditaudit train rule=path/to/my_rule.py`` (the file's one registered rule is used) or
  ``plugins=path/to/my_rule.py rule=my_rule``. The file's absolute path is stored in the run's
  config (``plugins``), so every process that trains or re-reads the run imports it too;
- a package: declare an entry point in the group ``creditaudit.rules`` (e.g. in pyproject.toml,
  ``[project.entry-points."creditaudit.rules"] my_rule = "my_package.my_rule"``); every such entry
  point is imported when ``creditaudit.rules`` is.

An architecture of one's own comes the same way: a file whose builder is decorated with
``@architecture("my_arch", "one line", d=…, L=…, out_ln=…, residual=…)`` (``creditaudit.models.base``),
loaded with ``plugins=path/to/my_arch.py arch=my_arch``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
import warnings
from pathlib import Path

from creditaudit.errors import ConfigError
from creditaudit.rules.base import RULES

ENTRY_POINT_GROUP = "creditaudit.rules"
_loaded_files: dict[str, list[str]] = {}  # resolved path -> rule names it registered


def load_rule_file(path: str | Path) -> list[str]:
    """Import a plugin file once; return the names of the rules it registered. A plugin file may
    register architectures too (``@architecture`` of ``creditaudit.models.base``), or only those."""
    p = Path(path).expanduser().resolve()
    key = str(p)
    if key in _loaded_files:
        return _loaded_files[key]
    if not p.is_file():
        raise ConfigError(
            f"rule file {path} does not exist (give the path of a .py file that registers a rule)"
        )
    from creditaudit.models.base import ARCHS

    before, archs_before = set(RULES.names()), set(ARCHS.names())
    module_name = f"creditaudit_plugin_{p.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, p)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(
            f"importing rule file {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    names = sorted(set(RULES.names()) - before)
    if not names and set(ARCHS.names()) == archs_before:
        raise ConfigError(
            f"{path} registered no rule and no architecture: decorate your Rule subclass with "
            f'@RULES.register("name", "summary"), or your model builder with @architecture(...)'
        )
    _loaded_files[key] = names
    return names


def load_entry_point_rules() -> None:
    """Import every module declared in the ``creditaudit.rules`` entry-point group; a broken plugin
    is reported as a warning and skipped, so it cannot take the built-in rules down with it."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a third-party import error must not break creditaudit
            warnings.warn(
                f"rule plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
