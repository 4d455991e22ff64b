"""One config system for every stage.

Defaults live in ``siimcovid/cfg/<stage>.yaml``. A run's config is, in order of precedence:
command-line ``key=value`` pairs > an experiment file given as ``cfg=path.yaml`` > the defaults.
The resolved config is saved into every run directory, so a run can be reproduced from it.

Every key is typed once, beside its default: its comment in ``cfg/<stage>.yaml`` starts with a
type spec in braces, and ``load_config`` checks (and coerces) every value against it, whether it
came from the defaults, a ``cfg=`` file or the command line, before any stage code runs:

    epochs: 12        # {int >= 1} epochs of the first wave
    fold: all         # {all | int >= 0 | list[int >= 0]} all, one fold k, or a list
    name: null        # {name?; runtime} run name
    project: runs     # {folder; runtime} where the runs go

    spec := alt ('|' alt)* [';' tag (',' tag)*]
    alt  := int | float | bool | str | path | name | folder | map | any | null, each optionally with a range
            (int and float: '>= x', '> x', '<= x', '< x', 'x..y' inclusive);
            'T?' = 'T | null'; 'list[spec]' (a scalar given for it becomes a one-element list);
            a bare word = that literal choice; '@kind' = any name of that kind in siimcovid.registry
    tag  := runtime (may differ between a run and its resume: device, workers, project, name ...)
          | predict (a predict-mode setting; may differ on resume too)
          | fusion  (a fusion parameter that `fuse tune` searches and writes to best.yaml)

Coercion: int takes ints and integral floats (3.0 -> 3) that fit in 64 bits; float takes ints, floats
and numeric strings (YAML 1.1 reads '1e-3' as a string), finite only (no inf, -inf, nan, 1e400); bool
takes bools and 'true'/'false'; str takes strings and numbers (name=123 -> '123'); path takes strings
and path objects; words compare as strings. Inside a ``map`` nothing is checked (run.yaml's sections
are checked by their own stage). Two kinds of path are checked against what they become:
    name    a run name, read as a str: ONE path component (siimcovid.utils.name_problem: not empty, '.' or
            '..', no '/' or '\\', no control characters, at most 200 bytes), because it becomes a folder
            <project>/<stage>/<name> or a file stem; names the code makes (e.g. from a folder) pass check_name
    folder  a folder a stage writes in (project=, out=): a path that is a folder or can become one,
            i.e. neither it nor a folder above it is an existing file (folder_problem)
An error names the stage, the key and the value, and says what was expected (and why a name or a
folder was refused): one line, e.g. `prepare setting name='../x': expected name? (a name is one
folder name, not a path; this one holds a path separator ('/' or '\\'))`.

API:
    schema(stage) -> Schema           cached; .settings {key: Setting(key, default, spec, tags, help)},
                                      .keys(tag) -> set[str], .check(key, value) -> coerced value
    runtime_keys(stage) -> set[str]   keys tagged runtime or predict
    fusion_keys() -> list[str]        fuse.yaml's keys tagged fusion, in file order
    default_name(stage, name, made_from) -> name   a run name made in code, checked as name= is
    load_config(stage, overrides, extra_ok, extra_check) -> Config
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from siimcovid import registry
from siimcovid.utils import SiimError, atomic_write_text, check_name, decode_utf8, name_problem

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


MAX_NODES = 1_000_000  # values a settings file may hold once its aliases are expanded (a real one: a few hundred)


def read_yaml(path: str | Path) -> dict:
    """A settings file (cfg=, a run's saved settings) as a mapping. Anchors and aliases are allowed, but not a few
    bytes of nested aliases that expand into billions of values (every later check and message walks them)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(decode_utf8(path.read_bytes(), path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep to be a settings file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    if expanded_size(data, {}) > MAX_NODES:
        raise ConfigError(f"{path}: its aliases expand into more than {MAX_NODES:,} values: not a settings file")
    return data


def expanded_size(value: Any, seen: dict) -> int:
    """How many values `value` holds with every alias expanded, counted once per distinct object (so in linear time)."""
    if not isinstance(value, (list, dict)):
        return 1
    if id(value) not in seen:
        seen[id(value)] = MAX_NODES + 1  # an object inside itself (a recursive alias) is too big
        items = value.values() if isinstance(value, dict) else value
        seen[id(value)] = 1 + sum(expanded_size(v, seen) for v in items)
    return seen[id(value)]


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


def parse_args(args: Iterable[str], raw: dict | None = None) -> dict:
    """Turn ['epochs=3', '--json', 'sizes=256,512'] into a dict; `raw` (when given) receives each value as typed."""
    out: dict[str, Any] = {}
    for arg in args:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            out[key] = parse_value(text) if sep else True
        else:
            key, sep, text = arg.partition("=")
            if not sep or not key:
                raise ConfigError(f"expected key=value, got '{arg}'")
            out[key] = parse_value(text)
        if raw is not None and sep:
            raw[key] = text
    return out


# --- the schema: each key's type spec, in braces at the start of its comment in cfg/<stage>.yaml

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"(>=|>|<=|<)\s*({_NUM})|({_NUM})\s*\.\.\s*({_NUM})")
TYPES = frozenset({"int", "float", "bool", "str", "path", "name", "folder", "map", "any", "null"})
TEXT_KINDS = frozenset({"str", "path", "name", "folder"})  # settings whose value is text as typed
SHOWN = reprlib.Repr()  # a value in a message, bounded (a list of a million items is not printed whole)
SHOWN.maxstring, SHOWN.maxother, SHOWN.maxlist, SHOWN.maxdict, SHOWN.maxlevel = 400, 400, 20, 20, 4
TAGS = frozenset({"runtime", "predict", "fusion"})
_NO = object()  # "this alternative does not accept the value"
INT_LIMIT = 2**63  # an int setting fits in 64 bits (numpy, torch and the file formats hold no bigger one)


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why a stage cannot make or write in a folder at `path` (it, or a folder above it, is a file), or None.
    Checked at load, so that `project=<a file>` is one line, not a traceback from the first mkdir."""
    path = Path(path)
    try:
        for above in (path, *path.parents):
            if above.is_dir():
                return None
            if above.exists() or above.is_symlink():  # a file, or a device, a broken link, a link loop
                if above == path:
                    return "is an existing file, not a folder" if above.is_file() else "exists and is not a folder"
                return f"lies under {str(above)!r}, " + ("a file" if above.is_file() else "which is not a folder")
    except OSError:  # e.g. a folder we may not look into: the stage itself says what is wrong
        return None
    return None


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def _notes(spec: Spec, value: Any) -> list[str]:
    """What the spec's text does not say but `value` broke: what a name and a folder are, finite floats, 64-bit ints."""
    notes = []
    for alt in spec.alts:
        if alt.kind == "list":
            for item in value if isinstance(value, (list, tuple)) else [value]:
                notes += _notes(alt.item, item)
        elif alt.kind == "name":
            problem = name_problem(value) if _scalar(value) else None
            notes.append("a name is one folder name, not a path" + (f"; this one {problem}" if problem else ""))
        elif alt.kind in ("path", "folder") and isinstance(value, str) and _as_path(value) is _NO:
            notes.append("a path that is valid UTF-8 text: rename the file or folder")
        elif alt.kind == "folder" and isinstance(value, (str, os.PathLike)) and (problem := folder_problem(value)):
            notes.append(f"a folder to write in; this one {problem}")
        elif alt.kind == "float" and _scalar(value) and _float(value) is not None and not math.isfinite(_float(value)):
            notes.append("a finite number")
        elif alt.kind == "int" and not alt.hi and _scalar(value) and not isinstance(value, str) and abs(value) >= INT_LIMIT:
            notes.append("a 64-bit integer, below 2**63")
    return list(dict.fromkeys(notes))


def _as_path(v: Any) -> Any:
    """A path setting's value: text that is valid UTF-8 (a name of another encoding breaks OpenCV and the CSVs every
    stage writes: rename it), `~` expanded as a shell would (a cfg file's `out: ~/x` means the home folder's x)."""
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str):
        return _NO
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return _NO
    return os.path.expanduser(v) if v.startswith("~") else v


def _float(v: Any) -> float | None:
    """v as a float setting reads it (ints, floats, numeric strings; 1e400 is inf), else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return float(v)
        except OverflowError:  # an int too big for a float
            return math.inf if v > 0 else -math.inf
    if isinstance(v, str) and re.fullmatch(_NUM, v):
        return float(v)
    return None


def _split(text: str, sep: str) -> list[str]:
    """Split at `sep` outside list[...] brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


@dataclass(frozen=True)
class Alt:
    """One alternative of a spec: a type (with an optional range), list[spec], a literal word or @kind."""

    kind: str  # a name in TYPES, "list", "word" (a literal choice) or "@" (a registry kind)
    word: str = ""
    lo: tuple[float, bool] | None = None  # (bound, inclusive)
    hi: tuple[float, bool] | None = None
    item: Spec | None = None

    def accept(self, v: Any) -> Any:
        k = self.kind
        if k == "any":
            return v
        if k == "null":
            return None if v is None else _NO
        if v is None:
            return _NO
        if k == "map":
            return dict(v) if isinstance(v, Mapping) else _NO
        if k == "list":
            if not isinstance(v, (list, tuple)):
                return _NO
            out = [self.item.accept(x) for x in v]
            return _NO if any(x is _NO for x in out) else out
        if k == "bool":
            if isinstance(v, str) and v.lower() in {"true", "false"}:
                return v.lower() == "true"
            return v if isinstance(v, bool) else _NO
        if k in ("str", "path"):
            if isinstance(v, bool):
                return _NO
            if isinstance(v, (int, float)) and k == "str":
                return str(v)  # name=123 is read as a number
            if k == "path":
                return _as_path(v)
            return v if isinstance(v, (str, os.PathLike)) else _NO
        if k == "name":  # one path component (utils.name_problem): it becomes a folder or a file stem
            return str(v) if _scalar(v) and name_problem(v) is None else _NO
        if k == "folder":
            v = _as_path(v)
            return v if v is not _NO and folder_problem(v) is None else _NO
        if k in ("word", "@"):
            text = str(v).lower() if isinstance(v, bool) else str(v)
            words = [self.word] if k == "word" else registry.names(self.word)
            return v if not isinstance(v, (Mapping, list)) and text in words else _NO
        if isinstance(v, bool):
            return _NO
        if k == "int":
            v = int(v) if isinstance(v, float) and v.is_integer() else v
            ok = isinstance(v, int) and abs(v) < INT_LIMIT
        else:  # float; a cfg file's `1e-3` is a string to YAML 1.1; inf, nan and 1e400 (inf) are refused
            v = _float(v)
            ok = v is not None and math.isfinite(v)
        if not ok or (self.lo and not (v >= self.lo[0] if self.lo[1] else v > self.lo[0])):
            return _NO
        return v if not self.hi or (v <= self.hi[0] if self.hi[1] else v < self.hi[0]) else _NO


@dataclass(frozen=True)
class Spec:
    """`alt | alt ...`: the first alternative that accepts a value coerces it."""

    text: str
    alts: tuple[Alt, ...]

    @classmethod
    def parse(cls, text: str) -> Spec:
        alts: list[Alt] = []
        for part in _split(text, "|"):
            part = part.strip()
            if part.startswith("list[") and "]" in part:
                end = part.rindex("]")
                alts.append(Alt("list", item=cls.parse(part[5:end])))
                rest = part[end + 1 :].strip()
            else:  # `T?`, `T >= x?` and `T? >= x` all mean "or null"
                m = re.fullmatch(r"(@?[\w.:-]+)\??\s*(.*?)", part.rstrip("?").strip())
                if not m:
                    raise ValueError(f"bad alternative '{part}'")
                (word, rest), q = m.groups(), "?" if "?" in part else ""
                kind = word if word in TYPES else "@" if word.startswith("@") else "word"
                lo = hi = None
                if rest:
                    r = _RANGE.fullmatch(rest)
                    if not r or kind not in ("int", "float"):
                        raise ValueError(f"bad range '{rest}' (a range follows int or float)")
                    op, x, a, b = r.groups()
                    if op:
                        bound = (float(x), "=" in op)
                        lo, hi = (bound, None) if op[0] == ">" else (None, bound)
                    else:
                        lo, hi = (float(a), True), (float(b), True)
                alts.append(Alt(kind, word.lstrip("@"), lo, hi))
                rest = q or ""
            if rest not in ("", "?"):
                raise ValueError(f"bad alternative '{part}'")
            if rest == "?":
                alts.append(Alt("null"))
        return cls(text.strip(), tuple(alts))

    def describe(self, value: Any = _NO) -> str:
        """The spec for an error message, a registry kind spelt out: `@ensemble` -> `one of mean, geometric, ...`;
        with the value refused, what it broke that the text does not say (e.g. why a name is not one)."""
        text = re.sub(r"@([\w.:-]+)", lambda m: "one of " + ", ".join(registry.names(m[1])), self.text)
        notes = _notes(self, value) if value is not _NO else []
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def accept(self, value: Any) -> Any:
        """The coerced value, or _NO; a scalar given where a list is expected becomes a one-element list."""
        for alt in self.alts:
            out = alt.accept(value)
            if out is not _NO:
                return out
        if value is not None and not isinstance(value, (list, tuple, Mapping)):
            for alt in self.alts:
                if alt.kind == "list" and (out := alt.accept([value])) is not _NO:
                    return out
        return _NO


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    spec: str  # the type spec's text, e.g. "int >= 1"
    tags: frozenset[str]
    help: str
    parsed: Spec | None = field(repr=False, compare=False, default=None)


@dataclass(frozen=True)
class Schema:
    stage: str
    settings: dict[str, Setting]

    def keys(self, tag: str) -> set[str]:
        return {k for k, s in self.settings.items() if tag in s.tags}

    def as_text(self, key: str, value: Any, text: str) -> Any:
        """A command-line value that YAML read as a number or a date (0123 -> 83, 1e3 -> 1000.0, 2024-01-01 -> a
        date), given to a setting that takes it as text first (a name, a path): the text as typed."""
        if value is None or isinstance(value, (str, bool, list, dict)):
            return value
        alts = self.settings[key].parsed.alts
        first = next((a for a in alts if a.accept(value) is not _NO), None)
        if first is None or first.kind in TEXT_KINDS:
            if any(a.kind in TEXT_KINDS and a.accept(text) is not _NO for a in alts):
                return text
        return value

    def check(self, key: str, value: Any, source: str | None = None) -> Any:
        """The value coerced to the key's spec; a one-line ConfigError when it does not fit."""
        setting = self.settings[key]
        out = setting.parsed.accept(value)
        if out is _NO:
            where = f" in {source}" if source else ""
            expected = setting.parsed.describe(value)
            raise ConfigError(f"{self.stage} setting {key}={SHOWN.repr(_plain(value))}{where}: expected {expected}")
        return out


def _comments(text: str) -> dict[str, str]:
    """Top-level key -> its comment (continuation comment lines below it included)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        m = re.match(r"([A-Za-z_][\w-]*):(.*)$", line)
        if m:
            key = m[1]
            c = re.search(r"(?:^|\s)#\s?(.*)$", m[2])
            out[key] = c[1].strip() if c else ""
        elif key and re.match(r"\s+#", line):
            out[key] += " " + line.strip()[1:].strip()
        elif line.strip():
            key = None  # a nested line ends the comment
    return out


@functools.lru_cache(maxsize=None)
def schema(stage: str) -> Schema:
    """The settings of a stage, read from its commented defaults file."""
    path = default_config_path(stage)
    defaults, comments = read_yaml(path), _comments(path.read_text())
    settings = {}
    for key, default in defaults.items():
        m = re.match(r"\{([^{}]*)\}\s*(.*)", comments.get(key, ""))
        if not m:
            raise ConfigError(f"{path}: '{key}' has no type spec ({{...}} at the start of its comment)")
        body, _, tags = m[1].partition(";")
        tags = frozenset(t.strip() for t in tags.split(",") if t.strip())
        try:
            if tags - TAGS:
                raise ValueError(f"unknown tag(s) {sorted(tags - TAGS)}; known: {sorted(TAGS)}")
            parsed = Spec.parse(body)
        except ValueError as e:
            raise ConfigError(f"{path}: '{key}': type spec {{{m[1]}}}: {e}") from None
        settings[key] = Setting(key, default, parsed.text, tags, m[2], parsed)
    return Schema(stage, settings)


def default_name(stage: str, name: str, made_from: str) -> str:
    """A run name a stage made itself (from a folder or a model name), held to the rule of a name= setting
    (utils.check_name), so that an odd folder name cannot take the run out of <project>/."""
    return check_name(name, f"{stage}: the default name, made from {made_from} (give name= instead): name")


def runtime_keys(stage: str) -> set[str]:
    """Keys that may differ between a run and its resume (tagged runtime or predict)."""
    s = schema(stage)
    return s.keys("runtime") | s.keys("predict")


def fusion_keys() -> list[str]:
    """The fusion parameters (`fuse tune` searches them), in the order of fuse.yaml."""
    return [k for k, s in schema("fuse").settings.items() if "fusion" in s.tags]


# Facts a run records beside its settings (the mode, where its data came from, the fold
# fingerprint): skipped when a saved run config is read back with cfg=, so that the file a run
# saved can seed the next one. A key that is a setting of the stage is never skipped.
RECORDED_KEYS = frozenset(
    {"mode", "folds_id", "data_resolved", "prepared", "size", "n_folds", "data_yamls", "hyp_values", "label_names"}
)


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
    extra_check: Callable[[dict], dict] | None = None,
) -> Config:
    """Resolve the config of a stage: defaults < cfg=<file> < overrides, every value checked.

    ``extra_ok`` names keys allowed beyond the defaults (e.g. Ultralytics train arguments
    that the detect stage passes through); ``True`` allows any key. ``extra_check`` takes a dict
    of those extra keys and returns it checked (raising a one-line ConfigError).
    """
    spec = schema(stage)
    defaults = {k: s.default for k, s in spec.settings.items()}
    raw: dict[str, str] = {}  # the command line's values as typed: name=0123 is the name '0123', not YAML's 83
    given = dict(overrides) if isinstance(overrides, Mapping) else parse_args(overrides or [], raw)
    cfg = Config(copy.deepcopy(defaults))
    source: dict[str, str] = {}
    exp_file = given.pop("cfg", None)
    if exp_file:
        exp = read_yaml(exp_file)
        # An experiment file may hold one section per stage, or plain keys for this stage.
        if isinstance(exp.get(stage), dict):
            exp = exp[stage]
        exp = {k: v for k, v in exp.items() if k in defaults or k not in RECORDED_KEYS}
        _check_keys(stage, exp, defaults, extra_ok, str(exp_file))
        cfg.update(exp)
        source.update(dict.fromkeys(exp, str(exp_file)))
    # A mapping given whole (in a file or as key={...}) replaces the default mapping;
    # `section.key=value` sets one key inside it (e.g. run's detect.epochs=3).
    for k in [k for k in given if "." in k and isinstance(cfg.get(k.split(".", 1)[0]), dict)]:
        head, sub = k.split(".", 1)
        cfg[head] = {**cfg[head], sub: given.pop(k)}
        source.pop(head, None)
    _check_keys(stage, given, defaults, extra_ok, "the settings given" if isinstance(overrides, Mapping) else "the command line")
    cfg.update(given)
    for k in given:
        source.pop(k, None)
    for k in spec.settings:
        value = spec.as_text(k, cfg[k], raw[k]) if k in raw and k in given else cfg[k]
        cfg[k] = spec.check(k, value, source.get(k))
    extra = {k: v for k, v in cfg.items() if k not in spec.settings}
    if extra and extra_check is not None:
        cfg.update(extra_check(extra))
    return cfg


def help_text(stage: str) -> str:
    """The defaults file of a stage, comments included: the best documentation of its keys."""
    return default_config_path(stage).read_text()

