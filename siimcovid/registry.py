"""Named implementations, registered where they are written: adding one touches one place.

    @register("none_det", "prod")
    def none_prod(conf, codes, n): ...

    get("none_det", "prod")   -> the function
    names("none_det")         -> ["prod", ...] in registration order

A kind's implementations are registered when the module holding them is imported; `KINDS`
names that module, so `names()` and `get()` work before anyone imported it (the config check
of `siimcovid fuse` lists the choices without importing the fusion code first).
A settings file refers to a kind as a choice list `{@none_det}` (see siimcovid/config.py).
"""

from __future__ import annotations

import importlib
from typing import Callable

from siimcovid.utils import SiimError

# kind -> the module (or modules) whose import registers its implementations
KINDS: dict[str, str | tuple[str, ...]] = {
    "none_det": "siimcovid.fuse.formulas",
    "none_blend": "siimcovid.fuse.formulas",
    "ensemble": "siimcovid.ensemble",
    "layout": ("siimcovid.data.layouts", "siimcovid.data.external", "siimcovid.data.folder"),
    "synth": "siimcovid.data.synth_external",
}

_REGISTRY: dict[str, dict[str, Callable]] = {}
_IMPORTED: set[str] = set()  # kinds whose KINDS modules were imported


def register(kind: str, name: str, *aliases: str) -> Callable[[Callable], Callable]:
    """Decorator: file `fn` under `kind` as `name` (and its aliases)."""

    def wrap(fn: Callable) -> Callable:
        table = _REGISTRY.setdefault(kind, {})
        for key in (name, *aliases):
            if key in table and table[key] is not fn:
                raise SiimError(f"{kind} '{key}' is registered twice")
            table[key] = fn
        return fn

    return wrap


def _load(kind: str) -> dict[str, Callable]:
    if kind in KINDS and kind not in _IMPORTED:  # every module of the kind, even when one registered already
        for module in (KINDS[kind],) if isinstance(KINDS[kind], str) else KINDS[kind]:
            importlib.import_module(module)
        _IMPORTED.add(kind)
    if kind not in _REGISTRY:
        raise SiimError(f"no registry '{kind}' (known: {', '.join(sorted(set(KINDS) | set(_REGISTRY)))})")
    return _REGISTRY[kind]


def names(kind: str) -> list[str]:
    """Every registered name of a kind (aliases included), in registration order."""
    return list(_load(kind))


def get(kind: str, name: str) -> Callable:
    table = _load(kind)
    if name not in table:
        raise SiimError(f"{kind}={name!r}: expected one of {', '.join(table)}")
    return table[name]
