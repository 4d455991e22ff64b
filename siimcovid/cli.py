"""The one entry point: ``siimcovid <stage> [mode] key=value ...``.

    siimcovid                  the usage and the stages
    siimcovid help             the stages and every registry kind with its names (siimcovid.registry), a block each
    siimcovid <stage> help     a stage's settings, their defaults and what they do

Stages import lazily, so ``siimcovid synth`` does not pay for importing torch.
"""

from __future__ import annotations

import sys
from typing import Callable

from siimcovid import registry
from siimcovid.config import Config, ConfigError, help_text
from siimcovid.stages import load, modes_by_stage, stage_config
from siimcovid.utils import LOGGER, SiimError, os_problem

# stage -> mode -> "module:function"; mode None is the stage without a mode word.
# Each function takes the resolved Config of its stage. The one list of stages: siimcovid.stages.
STAGES: dict[str, dict[str | None, str]] = modes_by_stage()

USAGE = """usage: siimcovid <stage> [mode] [key=value ...]

stages:
{stages}

`siimcovid help` also lists every registered name; `siimcovid <stage> help` prints a stage's settings and
their defaults. Settings come from siimcovid/cfg/<stage>.yaml, an experiment file (cfg=my.yaml) and key=value.
"""


def usage() -> str:
    lines = []
    for stage, modes in STAGES.items():
        words = " | ".join(m for m in modes if m) if any(modes) else ""
        lines.append(f"  {stage:<10} {words}".rstrip())
    return USAGE.format(stages="\n".join(lines))


def kind_block(kind: str) -> str:
    """One kind of `siimcovid help`: `kind: what it chooses`, then its names (aliases included)."""
    about = registry.about(kind)
    try:
        words = ", ".join(registry.names(kind))
    except SiimError as e:  # a kind whose built-in module is missing: say so, list the others
        words = f"(not available: {e})"
    return f"{kind}: {about}\n  {words}"


def listing() -> str:
    """`siimcovid help`: the usage with the stages, then one block per registry kind but "stage"."""
    blocks = [kind_block(kind) for kind in registry.kinds() if kind != "stage"]
    return usage() + "\nregistered names, by kind (siimcovid.registry):\n\n" + "\n\n".join(blocks) + "\n"


def resolve(argv: list[str]) -> tuple[Callable[[Config], object] | None, Config | None, str | None]:
    """Split argv into the function to run and its config; (None, None, text) prints text."""
    if not argv:
        return None, None, usage()
    if argv[0] in {"help", "-h", "--help"}:
        return None, None, listing()
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'.\n{usage()}")
    modes = STAGES[stage]
    mode = None
    if rest and "=" not in rest[0] and not rest[0].startswith("--") and rest[0] != "help":
        mode, rest = rest[0], rest[1:]
    if any(a in {"help", "-h", "--help"} for a in rest):
        return None, None, help_text(stage)
    if mode not in modes:
        valid = ", ".join(m for m in modes if m) or "(none)"
        what = f"stage '{stage}' needs a mode" if mode is None else f"unknown mode '{mode}' for stage '{stage}'"
        raise ConfigError(f"{what}; valid modes: {valid}")
    return (*stage_function(stage, mode, rest), None)


def stage_function(stage: str, mode: str | None, overrides) -> tuple[Callable[[Config], object], Config]:
    """The function of a stage's mode and its resolved config (overrides: key=value list or dict)."""
    return load(STAGES[stage][mode]), stage_config(stage, mode, overrides)


def call(stage: str, mode: str | None = None, /, **overrides) -> object:
    """Run a stage from Python with settings as keywords: call("detect", "train", epochs=3)."""
    func, cfg = stage_function(stage, mode, overrides)
    return func(cfg)


def main(argv: list[str] | None = None) -> object:
    """Run a stage in-process and return its result (tests call this)."""
    func, cfg, text = resolve(list(sys.argv[1:] if argv is None else argv))
    if func is None:
        print(text, end="" if text.endswith("\n") else "\n")
        return None
    return func(cfg)


def entrypoint() -> None:
    """Console script: user errors print one clear line and exit 2, not a traceback."""
    try:
        main()
    except SiimError as e:
        LOGGER.error(f"siimcovid: error: {e}")
        sys.exit(2)
    except OSError as e:  # a full or read-only disk, no permission: one line (utils.os_problem); others are bugs
        if os_problem(e) is None:
            raise
        LOGGER.error(f"siimcovid: error: {os_problem(e)}")
        sys.exit(2)
    except KeyboardInterrupt:
        LOGGER.error("siimcovid: interrupted; re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    entrypoint()
