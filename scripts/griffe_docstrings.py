"""Griffe extension (mkdocs.yml): how the API reference reads creditaudit's docstrings.

Two conventions of the code that griffe does not know:

- Sphinx roles. Docstrings cite one another as ``:class:`Rule```, ``:func:`load``` or
  ``:class:`~creditaudit.errors.UserError``` (``~``: show the last name only). Each becomes the name
  in code, linked to its entry when the reference documents it and plain code when it does not (an
  optional cross-reference: never a broken link).
- Config fields. A config dataclass documents each field in ``field(metadata={"help": ...})``
  (what ``creditaudit train --help`` prints); that help becomes the field's docstring, and its
  default the value shown.
"""

from __future__ import annotations

import ast
import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|data|attr|mod|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")


def full_path(obj: griffe.Object, target: str) -> str | None:
    """``target`` as written in ``obj``'s docstring -> its dotted path, or None when unknown."""
    if target.startswith("creditaudit."):
        return target
    head, _, rest = target.partition(".")
    try:
        found = obj.resolve(head)
    except griffe.NameResolutionError:
        return None
    return f"{found}.{rest}" if rest else found


def link_roles(obj: griffe.Object, text: str) -> str:
    def one(m: re.Match) -> str:
        target = m["target"]
        shown = target.rpartition(".")[2] if m["tilde"] else target
        path = full_path(obj, target)
        if path is None:
            return f"`{shown}`"
        return f'<autoref identifier="{html.escape(path)}" optional><code>{html.escape(shown)}</code></autoref>'

    return ROLE.sub(one, text)


def field_help(value: str) -> tuple[str, str] | None:
    """``field(default=…, metadata={"help": …})`` source -> (help, default as source), else None."""
    try:
        call = ast.parse(value, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "field"):
        return None
    kw = {k.arg: k.value for k in call.keywords}
    meta = kw.get("metadata")
    if not isinstance(meta, ast.Dict):
        return None
    helps = [
        v.value
        for k, v in zip(meta.keys, meta.values, strict=True)
        if isinstance(k, ast.Constant) and k.value == "help" and isinstance(v, ast.Constant)
    ]
    if not helps:
        return None
    if "default" in kw:
        default = ast.unparse(kw["default"])
    elif "default_factory" in kw:
        default = f"{ast.unparse(kw['default_factory'])}()"
    else:
        default = ""
    return helps[0], default


class CreditauditDocstrings(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if (
            obj.is_attribute
            and obj.parent is not None
            and obj.parent.is_class
            and obj.value is not None
        ):
            found = field_help(str(obj.value))
            if found:
                text, default = found
                obj.docstring = griffe.Docstring(text, parent=obj)
                obj.value = default or None
        if obj.docstring is not None:
            obj.docstring.value = link_roles(obj, obj.docstring.value)
