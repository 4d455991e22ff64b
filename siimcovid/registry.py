"""The one registry of siimcovid: everything chosen by name, registered where it is written (as timm's models are).

    @register("none_det", "prod")             # a function
    def none_prod(conf, codes, n): ...

    @register("detect_family", "yolo")        # a class
    class YoloFamily(Family): ...

    add("ensemble", "mean", Method(...))      # any other object (the same as register("ensemble", "mean")(obj))

    get("none_det", "prod")    -> what was registered
    names("none_det")          -> ["prod", "max"]: every name, aliases included, the built-ins first, each group in
                                  registration order
    kinds()                    -> every kind: the built-in ones below, then any other that has a registration
    view("stage")              -> a live, read-only {name: object} (siimcovid.stages.STAGES is one)
    resolve("pkg.mod:function") -> the function, imported now (the Stage records keep such strings)

`siimcovid help` lists every kind and its names. A name taken twice (by another object) is an error;
a kind's first registration creates it. The kinds of siimcovid and the modules that register their
built-ins (BUILTINS, the one list of siimcovid's registering modules):

    stage       siimcovid.stages: each command's modes ("module:function", imported only when run), its run folder
    detect_family    detect.family, detect.torchvision_family: the model families of `detect train family=` (yolo, torchvision)
    classify_family  classify.family: the model families of `classify train family=` (timm, timm-labels)
    layout      data.layouts, data.external, data.folder: the input layouts of `prepare layout=`
    none_det    fuse.formulas: the detector's none from its boxes (`fuse none_det=`)
    none_blend  fuse.formulas: how the classifier's and the detector's none blend (`fuse none_blend=`)
    ensemble    siimcovid.ensemble: how members combine (`classify predict ensemble=`, `fuse cls_ensemble=`)
    synth       data.synth_external: the external sets `siimcovid synth kind=` writes
    callback    engine.tracking: training callbacks (experiment tracking)

get() and names() of a kind first import its built-in modules, so a settings check lists the choices of
`{@none_det}` (siimcovid/config.py) without anyone importing the fusion code first. A built-in module that
is missing is an error only when its kind is looked up.

Your own module needs no edit here: one that calls register() when it is imported is all there is. Import it
before the look-up, or, for the command line, name it in your package's entry points; siimcovid imports them
at the first look-up of any kind but "stage" (a stage needs its defaults file in siimcovid/cfg/):

    [project.entry-points."siimcovid.plugins"]
    my_layouts = "my_package.layouts"
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from types import MappingProxyType
from typing import Any, Callable, Mapping

from siimcovid.utils import SiimError

PLUGINS = "siimcovid.plugins"  # the entry point group of modules outside siimcovid that register names


@dataclass(frozen=True)
class Kind:
    """A built-in kind: the modules whose import registers its names, and what the names choose (for help)."""

    modules: tuple[str, ...]
    about: str


BUILTINS: dict[str, Kind] = {
    "stage": Kind(("siimcovid.stages",), "siimcovid <stage> [mode]"),
    "detect_family": Kind(
        ("siimcovid.detect.family", "siimcovid.detect.torchvision_family"), "detect train family= (model families of boxes)"
    ),
    "classify_family": Kind(("siimcovid.classify.family",), "classify train family= (model families of study probabilities)"),
    "layout": Kind(
        ("siimcovid.data.layouts", "siimcovid.data.external", "siimcovid.data.folder"),
        "prepare layout= (input layouts)",
    ),
    "none_det": Kind(("siimcovid.fuse.formulas",), "fuse none_det= (the detector's none from its boxes)"),
    "none_blend": Kind(("siimcovid.fuse.formulas",), "fuse none_blend= (the classifier's and detector's none)"),
    "ensemble": Kind(("siimcovid.ensemble",), "classify predict ensemble=, fuse cls_ensemble="),
    "synth": Kind(("siimcovid.data.synth_external",), "synth kind= (external sets beside siim)"),
    "callback": Kind(("siimcovid.engine.tracking",), "training callbacks (experiment tracking)"),
}

_REGISTRY: dict[str, dict[str, Any]] = {}  # kind -> name or alias -> object
_LOADED: set[str] = set()  # kinds whose built-in modules were imported
_PLUGINS_LOADED = False


def add(kind: str, name: str, obj: Any, aliases: tuple[str, ...] = ()) -> Any:
    """File `obj` (a function, a class, any object) under `kind` as `name` and its aliases; returns `obj`."""
    table = _REGISTRY.setdefault(kind, {})
    for key in (name, *aliases):
        if not isinstance(key, str) or not key:
            raise SiimError(f"{kind}: a registered name is a non-empty string, not {key!r}")
        if key in table and table[key] is not obj:
            raise SiimError(f"{kind} '{key}' is registered twice")
    for key in (name, *aliases):
        table[key] = obj
    return obj


def register(kind: str, name: str, *aliases: str) -> Callable[[Any], Any]:
    """Decorator (of a function or a class): `add(kind, name, it, aliases)`; the decorated thing is unchanged."""
    return lambda obj: add(kind, name, obj, aliases)


def _import_builtin(kind: str, module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:  # only the module itself missing; a missing dependency of it is its own error
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise SiimError(f"registry kind '{kind}': its built-in module {module} is missing") from None
        raise


def _import_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True  # before the imports: a plugin that looks names up while imported does not recurse
    for entry in metadata.entry_points(group=PLUGINS):
        try:
            entry.load()
        except Exception as e:  # any failure of a third-party import: one line naming it, again at the next look-up
            _PLUGINS_LOADED = False
            raise SiimError(f"siimcovid plugin '{entry.name}' ({entry.value}): import failed: {e}") from e


def _builtins_first(kind: str) -> None:
    """Reorder a kind's table in place: what its built-in modules define first, whatever was imported before."""
    table, modules = _REGISTRY.get(kind, {}), list(BUILTINS[kind].modules)
    rank = {m: i for i, m in enumerate(modules)}  # in BUILTINS' order of modules, whatever order they were imported in
    own = [k for k, v in table.items() if getattr(v, "__module__", None) in rank]
    first = {k: table[k] for k in sorted(own, key=lambda k: rank[table[k].__module__])}
    rest = {k: v for k, v in table.items() if k not in first}
    table.clear()
    table.update(first | rest)


def _load(kind: str) -> dict[str, Any]:
    if kind != "stage":
        _import_plugins()
    if kind in BUILTINS and kind not in _LOADED:  # every module of the kind, even when one registered already
        for module in BUILTINS[kind].modules:
            _import_builtin(kind, module)
        _builtins_first(kind)
        _LOADED.add(kind)
    if kind not in _REGISTRY:
        raise SiimError(f"no registry '{kind}' (known: {', '.join(kinds())})")
    return _REGISTRY[kind]


def kinds() -> list[str]:
    """The built-in kinds, then the kinds only registered elsewhere, in registration order."""
    return list(BUILTINS) + [k for k in _REGISTRY if k not in BUILTINS]


def about(kind: str) -> str:
    """What a kind chooses (its built-in declaration), for `siimcovid help` and the site's registries page."""
    return BUILTINS[kind].about if kind in BUILTINS else "registered outside siimcovid"


def names(kind: str) -> list[str]:
    """Every registered name of a kind (aliases included): the built-ins, then the others, in registration order."""
    return list(_load(kind))


def view(kind: str) -> Mapping[str, Any]:
    """A live, read-only {name: object} of a kind (aliases included), its built-ins imported as names() does."""
    return MappingProxyType(_load(kind))


def resolve(target: str) -> Any:
    """Import "module:function" (a stage's lazy target) and return the function."""
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def get(kind: str, name: str) -> Any:
    """What is registered under `name`; a name not registered is one line listing those that are."""
    table = _load(kind)
    if name not in table:
        raise SiimError(f"{kind}={name!r}: expected one of {', '.join(table)}")
    return table[name]
