"""One config system for every stage.

Defaults live in ``siimcovid/cfg/<stage>.yaml``. A run's config is, in order of precedence:
command-line ``key=value`` pairs > an experiment file given as ``cfg=path.yaml`` > the defaults.
The resolved config is saved into every run directory, so a run can be reproduced from it.

Every key is typed once, beside its default: its comment in ``cfg/<stage>.yaml`` starts with a
type spec in braces, and ``load_config`` checks (and coerces) every value against it, whether it
came from the defaults, a ``cfg=`` file or the command line, before any stage code runs:

    epochs: 12        # {int >= 1} epochs of the first wave
    fold: all         # {all | int >= 0 | list[int >= 0]} all, one fold k, or a list
    name: null        # {shared} default <model>_<imgsz>
    project: runs     # {shared}

    spec := alt ('|' alt)* [';' tag (',' tag)*]   |   'shared' [';' tag (',' tag)*]
    alt  := int | float | bool | str | path | name | folder | map | any | null, each optionally with a range
            (int and float: '>= x', '> x', '<= x', '< x', 'x..y' inclusive);
            'T?' = 'T | null'; 'list[spec]' (a scalar given for it becomes a one-element list);
            a bare word = that literal choice; '@kind' = any name of that kind in siimcovid.registry;
            'settings[stage]' or 'settings[stage, key: spec, ...]' = a mapping of that stage's settings (run.yaml's
            sections), each key checked as that stage checks it (check_section), beside the section's own keys;
            in cfg/shared.yaml only: 'alt (stage, ...)' = an alternative only those stages take
    tag  := runtime (may differ between a run and its resume: device, workers, project, name ...)
          | predict (a predict-mode setting; may differ on resume too)
          | fusion  (a fusion parameter that `fuse tune` searches and writes to best.yaml)

Shared settings: a key several stages have (workers, device, batch, half, seed, project, name, run, engine, the Ray
resources) is declared once, in cfg/shared.yaml, with its type, tags and one meaning; a stage's file gives it its
own default and the spec `{shared}` (`{shared; tag}` adds a tag), then a note on what it does there. Its type in a
stage is stage_spec(shared type, stage); its help, the shared meaning then "; here: <note>"; `siimcovid <stage>
help` writes it out (help_text). A stage that gives such a key a spec of its own is refused at schema() time.
Renamed settings (RENAMED, per stage): an old name anywhere (command line, cfg= file, run.yaml section) is one
error that says the new one.

Coercion: int takes ints and integral floats (3.0 -> 3) that fit in 64 bits; float takes ints, floats
and numeric strings (YAML 1.1 reads '1e-3' as a string), finite only (no inf, -inf, nan, 1e400); bool
takes bools and 'true'/'false'; str takes strings and numbers (name=123 -> '123'); path takes strings
and path objects; words compare as strings. Inside a ``map`` nothing is checked (a ``settings[stage]``
mapping is: see above). Two kinds of path are checked against what they become:
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
    load_config(stage, overrides, extra_ok, extra_check, where) -> Config
    help_text(stage) -> str           the stage's commented defaults, its shared keys written out
    worker_processes(workers) -> int  the shared `workers` as a process count (null: one per core)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import reprlib
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import yaml

from siimcovid import registry
from siimcovid.utils import LOGGER, SiimError, atomic_write_text, check_name, decode_utf8, name_problem

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


_ONLY = re.compile(r"(.*?\S)\s*\(\s*([\w-]+(?:\s*,\s*[\w-]+)*)\s*\)")  # shared.yaml: `alt (stage, ...)`


def _parse_alt(part: str) -> list[Alt]:
    """One alternative's text -> its Alt, and a null Alt after it for `T?`."""
    head = part.split("[", 1)[0]
    if head in ("list", "settings") and "]" in part:
        end = part.rindex("]")
        if part[end + 1 :].strip() not in ("", "?"):
            raise ValueError(f"bad alternative '{part}'")
        body = part[len(head) + 1 : end]
        alt = Alt("list", item=Spec.parse(body)) if head == "list" else _settings_alt(body)
        return [alt, Alt("null")] if part.endswith("?") else [alt]
    # `T?`, `T >= x?` and `T? >= x` all mean "or null"
    m = re.fullmatch(r"(@?[\w.:-]+)\??\s*(.*?)", part.rstrip("?").strip())
    if not m:
        raise ValueError(f"bad alternative '{part}'")
    word, rest = m.groups()
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
    alt = Alt(kind, word.lstrip("@"), lo, hi)
    return [alt, Alt("null")] if "?" in part else [alt]


def _settings_alt(body: str) -> Alt:
    """`stage` or `stage, key: spec, ...` (the keys a section holds beside the stage's own) -> a settings Alt."""
    stage, *pairs = [p.strip() for p in _split(body, ",")]
    if not re.fullmatch(r"[\w-]+", stage):
        raise ValueError(f"bad stage '{stage}' in settings[...]")
    extra = []
    for pair in pairs:
        key, sep, spec = pair.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
            raise ValueError(f"bad section key '{pair}' (expected key: spec)")
        extra.append((key.strip(), Spec.parse(spec)))
    return Alt("settings", stage, extra=tuple(extra))


def stage_spec(text: str, stage: str) -> str:
    """A shared spec's text as `stage` takes it: alternatives qualified `(stages)` that do not name it dropped, the
    qualifiers removed, a trailing `T | null` written `T?` (as a stage's file writes it)."""
    parts = []
    for part in _split(text, "|"):
        m = _ONLY.fullmatch(part.strip())
        if m is None or stage in [s.strip() for s in m[2].split(",")]:
            parts.append(m[1] if m else part.strip())
    if len(parts) >= 2 and parts[-1] == "null" and not parts[-2].endswith("?"):
        parts[-2:] = [parts[-2] + "?"]
    return " | ".join(parts)


@dataclass(frozen=True)
class Alt:
    """One alternative of a spec: a type (with an optional range), list[spec], a literal word, @kind or
    settings[stage] (a mapping of that stage's settings: a run.yaml section, checked by Schema.check)."""

    kind: str  # a name in TYPES, "list", "word" (a literal choice), "@" (a registry kind) or "settings"
    word: str = ""  # the literal, the registry kind, or the stage of a settings alternative
    lo: tuple[float, bool] | None = None  # (bound, inclusive)
    hi: tuple[float, bool] | None = None
    item: Spec | None = None
    only: tuple[str, ...] = ()  # shared.yaml's `alt (stage, ...)`: the stages that take it (empty: every stage)
    extra: tuple[tuple[str, Spec], ...] = ()  # settings[stage, key: spec]: the section's own keys beside the stage's

    def accept(self, v: Any) -> Any:
        k = self.kind
        if k == "any":
            return v
        if k == "null":
            return None if v is None else _NO
        if v is None:
            return _NO
        if k in ("map", "settings"):  # a section's keys: check_section (Schema.check calls it)
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
            part, only = part.strip(), ()
            if m := _ONLY.fullmatch(part):
                part, only = m[1], tuple(s.strip() for s in m[2].split(","))
            alts += [dataclasses.replace(alt, only=only) for alt in _parse_alt(part)]
        return cls(text.strip(), tuple(alts))

    def describe(self, value: Any = _NO) -> str:
        """The spec for an error message, a registry kind spelt out: `@ensemble` -> `one of mean, geometric, ...`;
        with the value refused, what it broke that the text does not say (e.g. why a name is not one)."""
        text = re.sub(r"@([\w.:-]+)", lambda m: "one of " + ", ".join(registry.names(m[1])), self.text)
        text = re.sub(r"settings\[([\w-]+)[^\]]*\]", r"a mapping of \1 settings", text)
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

    def defaults(self) -> dict[str, Any]:
        return {k: s.default for k, s in self.settings.items()}

    def section(self, key: str) -> Alt | None:
        """The `settings[stage]` alternative of a key's spec (a run.yaml section: its `word` is the stage), or None."""
        return next((a for a in self.settings[key].parsed.alts if a.kind == "settings"), None)

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
        """The value coerced to the key's spec; a one-line ConfigError when it does not fit. A section (a mapping
        for a `settings[stage]` spec) is checked key by key as that stage checks its own (check_section)."""
        setting, section = self.settings[key], self.section(key)
        if section is not None and isinstance(value, Mapping):
            return check_section(section, value, f"{self.stage} section {key}" + (f" of {source}" if source else ""))
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


SHARED = "shared"  # cfg/shared.yaml: the settings several stages share, each declared there once


def _declared(stage: str) -> Iterator[tuple[str, Any, str, frozenset[str], str]]:
    """(key, default, spec text, tags, help) of every key of cfg/<stage>.yaml, from its `{spec; tags} help` comment."""
    path = default_config_path(stage)
    defaults, comments = read_yaml(path), _comments(path.read_text())
    for key, default in defaults.items():
        m = re.match(r"\{([^{}]*)\}\s*(.*)", comments.get(key, ""))
        if not m:
            raise ConfigError(f"{path}: '{key}' has no type spec ({{...}} at the start of its comment)")
        body, _, tags = m[1].partition(";")
        tags = frozenset(t.strip() for t in tags.split(",") if t.strip())
        if tags - TAGS:
            unknown = f"unknown tag(s) {sorted(tags - TAGS)}; known: {sorted(TAGS)}"
            raise ConfigError(f"{path}: '{key}': type spec {{{m[1]}}}: {unknown}")
        yield key, default, body.strip(), tags, m[2]


def _shared_setting(stage: str, key: str, tags: frozenset[str], note: str, shared: dict) -> tuple[str, frozenset, str]:
    """A `{shared}` key of a stage: (its spec as this stage takes it, shared tags and the stage's, the shared meaning
    followed by the stage's note)."""
    if key not in shared:
        raise ConfigError(f"{default_config_path(stage)}: '{key}' is marked {{shared}}, but {SHARED}.yaml does not declare it")
    s = shared[key]
    return stage_spec(s.spec, stage), s.tags | tags, s.help + (f"; here: {note}" if note else "")


@functools.lru_cache(maxsize=None)
def schema(stage: str) -> Schema:
    """The settings of a stage, read from its commented defaults file. A key whose spec is `{shared}` (or
    `{shared; tag}`: tags added) takes its type, tags and meaning from cfg/shared.yaml, as this stage takes them
    (stage_spec); a key shared.yaml declares must be marked so: a stage sets its own default, never its own meaning."""
    path = default_config_path(stage)
    shared = {} if stage == SHARED else schema(SHARED).settings
    settings = {}
    for key, default, body, tags, text in _declared(stage):
        if body == SHARED:
            body, tags, text = _shared_setting(stage, key, tags, text, shared)
        elif key in shared:
            raise ConfigError(f"{path}: '{key}' is a shared setting: its spec is {{shared}} (its meaning: {SHARED}.yaml)")
        elif stage != SHARED and any(_ONLY.fullmatch(p.strip()) for p in _split(body, "|")):
            raise ConfigError(f"{path}: '{key}': an alternative for some stages only, `(stage, ...)`, belongs in {SHARED}.yaml")
        try:
            parsed = Spec.parse(body)
        except ValueError as e:
            raise ConfigError(f"{path}: '{key}': type spec {{{body}}}: {e}") from None
        settings[key] = Setting(key, default, parsed.text, tags, text, parsed)
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


# Settings renamed so that a name has one meaning: an old name in a cfg= file, a run.yaml section or on the command
# line is one error that says the new name (never an unknown key, nor read with the new key's meaning).
RENAMED: dict[str, dict[str, str]] = {
    "detect": {
        "gpu_per_trial": "gpus_per_trial",  # plural, as gpus_per_fold
        "cpu_per_trial": "cpus_per_trial",
        "space": "ranges",  # evolve's {key: [min, max]}; `space` is fuse tune's lists of candidate values
    },
    "export": {
        "run": "pipeline",  # a `siimcovid run`'s name; run= is a run of the stage (classify and detect predict)
        "half": "fp16_weights",  # fp16 storage of the weights; half= is fp16 inference (predict)
    },
}


# Values whose meaning moved: an old value is one error giving the new one ({stage: {key: {old: new}}}). (classify's
# tta is a view name again, none | hflip | vflip | d4, its true / false of the release before read as hflip / none.)
RETIRED: dict[str, dict[str, dict[str, str]]] = {}


def _retired(stage: str, key: str, value: Any, source: str | None) -> None:
    new = RETIRED.get(stage, {}).get(key, {}).get(value) if isinstance(value, str) else None
    if new is not None:
        where = f" in {source}" if source else ""
        raise ConfigError(f"{stage} setting {key}={value}{where} is now {key}={new}: {key} is on or off, each model's own views")


# What a run of the release before recorded beside its settings, at the top level of its settings file (a run now
# writes them apart, in the file's `learned` section: siimcovid.rundir.write_run).
EARLIER_RECORD = frozenset(
    {"mode", "folds_id", "data_resolved", "prepared", "size", "n_folds", "data_yamls", "hyp_values", "label_names"}
)


def without_earlier_record(exp: dict, defaults: Mapping, path) -> dict:
    """A cfg= file a run of the release before saved (its fold fingerprint or data root at the top level): what it
    recorded beside its settings left out, with one warning; any other file as it is."""
    if not ("folds_id" in exp or "data_resolved" in exp):
        return exp
    dropped = sorted(k for k in exp if k in EARLIER_RECORD and k not in defaults)
    if dropped:
        LOGGER.warning(f"{path}: a run's settings of an earlier release; left out what it recorded beside them: {dropped}")
    return {k: v for k, v in exp.items() if k not in dropped}


def _renamed(stage: str, key: str) -> str | None:
    """The new name of an old setting (`space.mosaic` -> `ranges.mosaic`), or None."""
    head, dot, rest = key.partition(".")
    new = RENAMED.get(stage, {}).get(head)
    return new + dot + rest if new else None


def _check_keys(stage: str, given: Mapping, known: Mapping, extra_ok: set[str] | bool, source: str) -> None:
    old = [f"{stage} setting '{k}' in {source} is now called '{_renamed(stage, k)}'" for k in given if _renamed(stage, k)]
    if old:
        raise ConfigError("; ".join(old))
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
    where: str | None = None,
) -> Config:
    """Resolve the config of a stage: defaults < cfg=<file> < overrides, every value checked.

    ``extra_ok`` names keys allowed beyond the defaults (e.g. Ultralytics train arguments
    that the detect stage passes through); ``True`` allows any key. ``extra_check`` takes a dict
    of those extra keys and returns it checked (raising a one-line ConfigError). ``where`` names
    the overrides in messages (default: the command line, or the settings given).
    """
    spec = schema(stage)
    defaults = spec.defaults()
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
        exp = without_earlier_record(exp, defaults, exp_file)
        _check_keys(stage, exp, defaults, extra_ok, str(exp_file))
        cfg.update(exp)
        source.update(dict.fromkeys(exp, str(exp_file)))
    # A mapping given whole (in a file or as key={...}) replaces the default mapping;
    # `section.key=value` sets one key inside it (e.g. run's detect.epochs=3).
    for k in [k for k in given if "." in k and isinstance(cfg.get(k.split(".", 1)[0]), dict)]:
        head, sub = k.split(".", 1)
        cfg[head] = {**cfg[head], sub: given.pop(k)}
        _given_in(source, head, where)
    where_given = where or ("the settings given" if isinstance(overrides, Mapping) else "the command line")
    _check_keys(stage, given, defaults, extra_ok, where_given)
    cfg.update(given)
    for k in given:
        _given_in(source, k, where)
    for k in spec.settings:
        value = spec.as_text(k, cfg[k], raw[k]) if k in raw and k in given else cfg[k]
        _retired(stage, k, value, source.get(k))
        cfg[k] = spec.check(k, value, source.get(k))
    extra = {k: v for k, v in cfg.items() if k not in spec.settings}
    if extra and extra_check is not None:
        cfg.update(extra_check(extra))
    return cfg


def _given_in(source: dict[str, str], key: str, where: str | None) -> None:
    """Record where a key's value came from (nowhere to name: the command line)."""
    if where:
        source[key] = where
    else:
        source.pop(key, None)


def check_section(alt: Alt, value: Mapping, where: str) -> dict:
    """A run.yaml section (spec `settings[stage]`, or `settings[stage, key: spec, ...]` with keys of its own): every
    key checked as `siimcovid <stage>` checks it (its type, unknown and renamed keys, the stage's extra settings such
    as Ultralytics'), before any work; the keys given, coerced. What a section does not set keeps the stage's default:
    the stage fills it when run builds its config."""
    own = dict(alt.extra)
    for key in own.keys() & value.keys():
        if own[key].accept(value[key]) is _NO:
            raise ConfigError(f"{where}: {key}={SHOWN.repr(_plain(value[key]))}: expected {own[key].describe(value[key])}")
    given = {k: v for k, v in value.items() if k not in own}
    try:
        cfg = _section_config(alt.word, given, where)
    except ConfigError as e:
        if where in str(e):
            raise
        raise ConfigError(f"{where}: {e}") from None  # e.g. the stage's own check of its extra settings
    out: dict[str, Any] = {}
    for key, v in value.items():  # `ranges.mosaic` stands for the mapping it changes; cfg= is loaded again by run
        head = key if key in own or key in cfg or key == "cfg" else key.split(".", 1)[0]
        out[head] = own[key].accept(v) if key in own else v if key == "cfg" else cfg[head]
    return out


def _section_config(stage: str, given: dict, where: str) -> Config:
    """The config of a stage from a section's keys, as siimcovid.stages.stage_config builds it (the stage's record
    read from the registry, since siimcovid.stages imports this module)."""
    if all(k in schema(stage).settings for k in given):  # no extra settings: no need to import them (Ultralytics)
        return load_config(stage, given, where=where)
    record = registry.get("stage", stage)
    extra_ok = set(registry.resolve(record.extra_keys)()) if record.extra_keys else set()
    check = registry.resolve(record.extra_check) if record.extra_check else None
    return load_config(stage, given, extra_ok=extra_ok, extra_check=check, where=where)


def worker_processes(workers: int | None) -> int:
    """The shared `workers` setting (cfg/shared.yaml) as a number of processes beside the main one: null = one per
    core; 0 = none (the main process does the work)."""
    return (os.cpu_count() or 1) if workers is None else workers


def help_text(stage: str) -> str:
    """The defaults file of a stage, comments included (the best documentation of its keys), with each `{shared}`
    comment written out: the type, tags and meaning cfg/shared.yaml gives the key in this stage, then the stage's
    note."""
    text = default_config_path(stage).read_text()
    settings = schema(stage).settings
    lines, skipping = [], False
    for line in text.splitlines():
        m = re.match(r"(([A-Za-z_][\w-]*):.*?)#\s?\{\s*shared\s*(;[^{}]*)?\}", line)
        if skipping and re.match(r"\s+#", line):
            continue  # the note's continuation lines: written out above
        skipping = bool(m) and stage != SHARED
        if not skipping:
            lines.append(line)
            continue
        s, prefix = settings[m[2]], m[1]
        tags = ", ".join(sorted(s.tags))
        comment = "{" + s.spec + (f"; {tags}" if tags else "") + "} " + s.help
        wrapped = textwrap.wrap(comment, max(40, 118 - len(prefix)), break_long_words=False, break_on_hyphens=False)
        lines += [prefix + "# " + wrapped[0], *(" " * len(prefix) + "# " + w for w in wrapped[1:])]
    return "\n".join(lines) + "\n"
