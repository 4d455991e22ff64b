"""The stages of siimcovid, each a `Stage` registered once under the registry kind "stage"
(siimcovid.registry): what `siimcovid <stage> [mode]` runs, where its runs go, and how `siimcovid runs`
describes one of them.

The CLI (`siimcovid.cli`), the pipeline (`siimcovid.run`) and the runs table (`siimcovid.runs`)
read the registry; nothing else lists the stages (`siimcovid help` prints them). Functions are named
by "module:function" and imported only when used, so reading the stages (or `siimcovid runs`) never
imports torch. `STAGES` is a read-only view {name: Stage} of the registry, in registration order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from siimcovid import registry
from siimcovid.config import Config, load_config
from siimcovid.utils import SiimError


@dataclass(frozen=True)
class Stage:
    """One stage of the command line.

    modes: mode word (None: the stage takes no mode word) -> "module:function" taking the stage's Config.
    folder: the sub-folder of the project its runs go to (<project>/<folder>/<name>); None: no run folders.
    describe: "module:function" turning one run folder into one row of `siimcovid runs` (a dict, or
        None when the folder is not a run of this stage); None: the stage has no rows.
    extra_keys: "module:function" returning the settings the stage accepts beyond its defaults file
        (e.g. Ultralytics' own train arguments); None: only the defaults file's keys.
    extra_check: "module:function" checking those extra settings ({key: value} -> the same, or a
        one-line ConfigError); None: not checked.
    """

    name: str
    modes: dict[str | None, str]
    folder: str | None = None
    describe: str | None = None
    extra_keys: str | None = None
    extra_check: str | None = None


for _stage in (
    Stage("synth", {None: "siimcovid.data.synth:main"}),
    Stage("prepare", {None: "siimcovid.data.prepare:main"}, "prepare", "siimcovid.data.summary:describe"),
    Stage(
        "detect",
        {
            "train": "siimcovid.detect.train:main",
            "predict": "siimcovid.detect.predict:main",
            "evolve": "siimcovid.detect.evolve:main",
        },
        "detect",
        "siimcovid.detect.summary:describe",
        extra_keys="siimcovid.detect.common:ultralytics_keys",
        extra_check="siimcovid.detect.common:check_ultralytics_settings",
    ),
    Stage("evaluate", {None: "siimcovid.evaluate:main"}),
    Stage(
        "classify",
        {"train": "siimcovid.classify.train:main", "predict": "siimcovid.classify.predict:main"},
        "classify",
        "siimcovid.classify.summary:describe",
    ),
    Stage(
        "fuse",
        {None: "siimcovid.fuse.stage:main", "tune": "siimcovid.fuse.tune:main"},
        "fuse",
        "siimcovid.fuse.summary:describe",
    ),
    Stage("pseudo", {None: "siimcovid.pseudo:main"}, "pseudo", "siimcovid.pseudo:describe"),
    Stage("run", {None: "siimcovid.run:main"}, "run", "siimcovid.run:describe"),
    Stage("export", {None: "siimcovid.bundle.export:main"}, "bundle"),
    Stage("predict", {None: "siimcovid.predict.stage:main"}),
    Stage("serve", {None: "siimcovid.serve.node:main", "status": "siimcovid.serve.node:main"}),
    Stage("runs", {None: "siimcovid.runs:main"}),
    Stage("keygen", {None: "siimcovid.signing:main"}),
):
    registry.add("stage", _stage.name, _stage)


STAGES: Mapping[str, Stage] = registry.view("stage")  # a live, read-only view: callers read stages here


def stage(name: str) -> Stage:
    """The registered stage of that name."""
    if name not in STAGES:
        raise SiimError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    return STAGES[name]


def modes_by_stage() -> dict[str, dict[str | None, str]]:
    """stage -> mode -> "module:function", in registry order (the CLI's table)."""
    return {name: dict(s.modes) for name, s in STAGES.items()}


def with_runs() -> list[str]:
    """The stages that have run folders and a row in `siimcovid runs`, in registry order."""
    return [name for name, s in STAGES.items() if s.folder and s.describe]


def load(target: str) -> Callable:
    """Import "module:function" and return the function."""
    return registry.resolve(target)


def extra_keys(name: str) -> set[str]:
    """The settings a stage accepts beyond its defaults file (imports the stage's module when it has some)."""
    target = stage(name).extra_keys
    return set(load(target)()) if target else set()


def stage_config(name: str, mode: str | None, overrides) -> Config:
    """A stage's resolved config (overrides: key=value strings or a dict), typed and checked, its
    extra settings checked by the stage, the mode recorded: what the CLI and `siimcovid run` run."""
    spec = stage(name)
    check = load(spec.extra_check) if spec.extra_check else None
    cfg = load_config(name, overrides, extra_ok=extra_keys(name), extra_check=check)
    if name not in ("predict", "serve") and cfg.get("precision") == "int8":  # the shared type's value that is predict's
        raise SiimError(f"{name}: precision=int8 runs a bundle's int8 engines (`export int8=`): `siimcovid predict`'s only")
    if mode is not None:
        cfg["mode"] = mode
    return cfg


SECOND = "detect2"  # run.yaml's section of a pipeline's second detector


def detector_names(cfg) -> list[str]:
    """The run names of a `siimcovid run` pipeline's opacity detectors (run.py trains them, export packs them): <name>,
    and <name>-<family> of a detect2 section."""
    second = cfg.get(SECOND)
    return [cfg["name"]] + ([f"{cfg['name']}-{second.get('family') or 'yolo'}"] if second else [])
