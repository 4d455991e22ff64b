"""One config system for every stage.

Defaults live in ``siimcovid/cfg/<stage>.yaml``. A run's config is, in order of precedence:
command-line ``key=value`` pairs > an experiment file given as ``cfg=path.yaml`` > the defaults.
The resolved config is saved into every run directory, so a run can be reproduced from it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from siimcovid.utils import SiimError, atomic_write_text

CFG_DIR = Path(__file__).parent / "cfg"


class ConfigError(SiimError):
    pass


class Config(dict):
    """A dict whose keys can also be read as attributes (``cfg.epochs``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(dict(self)), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_yaml())


def _plain(value: Any) -> Any:
    """Make a value safe for yaml.safe_dump (paths -> str, tuples -> lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def default_config_path(stage: str) -> Path:
    return CFG_DIR / f"{stage}.yaml"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """Parse a command-line value: YAML scalars and lists; 'a,b,c' becomes a list."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and "," in value and not value.startswith(("[", "{")):
        return [parse_value(part) for part in value.split(",") if part != ""]
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads '1e-3' as a string
        except ValueError:
            pass
    return value


def parse_args(args: Iterable[str]) -> dict:
    """Turn ['epochs=3', '--json', 'sizes=256,512'] into a dict."""
    out: dict[str, Any] = {}
    for arg in args:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            out[key.replace("-", "_")] = parse_value(text) if sep else True
            continue
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{arg}'")
        out[key] = parse_value(text)
    return out


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Match a value to the type of its default where that is unambiguous."""
    if isinstance(default, list) and not isinstance(value, list) and value is not None:
        return [value]
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in {"true", "false"}:
        return value.lower() == "true"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# Facts a run records beside its settings (the mode, where its data came from, the fold
# fingerprint): skipped when a saved run config is read back with cfg=, so that the file a run
# saved can seed the next one. A key that is a setting of the stage is never skipped.
RECORDED_KEYS = frozenset({"mode", "folds_id", "data_resolved", "prepared", "size", "n_folds", "data_yamls", "hyp_values"})


def _check_keys(stage: str, given: Mapping, known: Mapping, extra_ok: set[str] | bool, source: str) -> None:
    if extra_ok is True:
        return
    allowed = set(known) | set(extra_ok or ())
    bad = [k for k in given if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown {stage} setting {', '.join(hints)} in {source}. "
            f"Valid keys: {', '.join(sorted(known))}. See `siimcovid {stage} help`."
        )


def load_config(
    stage: str,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    extra_ok: set[str] | bool = (),
) -> Config:
    """Resolve the config of a stage: defaults < cfg=<file> < overrides.

    ``extra_ok`` names keys allowed beyond the defaults (e.g. Ultralytics train arguments
    that the detect stage passes through); ``True`` allows any key.
    """
    defaults = read_yaml(default_config_path(stage))
    given = dict(overrides) if isinstance(overrides, Mapping) else parse_args(overrides or [])
    cfg = Config(defaults)
    exp_file = given.pop("cfg", None)
    if exp_file:
        exp = read_yaml(exp_file)
        # An experiment file may hold one section per stage, or plain keys for this stage.
        if isinstance(exp.get(stage), dict):
            exp = exp[stage]
        exp = {k: v for k, v in exp.items() if k in defaults or k not in RECORDED_KEYS}
        _check_keys(stage, exp, defaults, extra_ok, str(exp_file))
        for k, v in exp.items():
            cfg[k] = _coerce(k, v, defaults.get(k))
    # A mapping given whole (in a file or as key={...}) replaces the default mapping;
    # `section.key=value` sets one key inside it (e.g. run's detect.epochs=3).
    for k in [k for k in given if "." in k and isinstance(cfg.get(k.split(".", 1)[0]), dict)]:
        head, sub = k.split(".", 1)
        cfg[head] = {**cfg[head], sub: given.pop(k)}
    _check_keys(stage, given, defaults, extra_ok, "the command line")
    for k, v in given.items():
        cfg[k] = _coerce(k, v, defaults.get(k))
    return cfg


def help_text(stage: str) -> str:
    """The defaults file of a stage, comments included: the best documentation of its keys."""
    return default_config_path(stage).read_text()


# Placeholders until the typed schema lands (branch `config`): the same facts, one place.
def runtime_keys(stage: str) -> set[str]:
    """Settings that may differ between a run and its resume (where and how it runs, predict settings)."""
    common = {"device", "workers", "project", "name", "resume", "fold", "mode", "plots"}
    predict = {"run", "split", "tta", "weights", "ensemble", "out", "source", "allow_unfinished", "reuse"}
    return common | predict | ({"amp", "channels_last"} if stage == "classify" else set())


def fusion_keys() -> list[str]:
    """The fusion parameters of fuse.yaml: what `fuse tune` searches and writes to best.yaml."""
    return [
        "det_weights", "cls_weights", "cls_ensemble", "iou_thr", "skip_box_thr", "conf_type", "none_source",
        "none_det", "none_cls_weight", "none_blend", "opacity_exponent", "negative_none_weight",
    ]  # fmt: skip
