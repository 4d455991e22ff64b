"""The YAML files that cross a stage boundary: one declaration each, used by the writer and by the reader.

As siimcovid.tables declares the CSVs, a `Document` declares a YAML file: its name, where it lives, a paragraph
of what it is, and its keys, each with its meaning and its check. The writer calls `DOC.write(data, path)` (every
key checked, then the mapping as plain YAML: no anchors or aliases, atomically); the reader calls `DOC.read(path)`
(a regular file of at most `max_bytes`, safe YAML, every key checked) or, for bytes it read and vouched for itself
(a bundle's files, checked against their sha256 first), `DOC.parse(data, label)`. The YAML a declared file is read
with has no anchors or aliases (a few bytes of nested aliases expand into billions of values) and nests at most
MAX_DEPTH levels. An error is one line that starts with `label` (the file, or the bundle and the file) and names
the key. `print(DOC.describe())` prints a format.

| declaration | file | written by | read by |
|---|---|---|---|
| siimcovid.fuse.record.FUSION_RECORD | runs/fuse/<name>/fusion.yaml | fuse, fuse tune | export |
| siimcovid.bundle.files.MANIFEST_FILE | <bundle>/manifest.yaml | export | open_bundle |
| siimcovid.bundle.files.PREPARE_FILE | <bundle>/prepare.yaml | export | open_bundle; predict (its prepare step) |
| siimcovid.bundle.files.FUSION_FILE | <bundle>/fuse.yaml | export | open_bundle; predict (its fuse step) |
| siimcovid.bundle.members.KINDS[kind].settings | <bundle>/<kind>/<name>/settings.yaml | export | open_bundle; predict |

A key's check takes (value, label) and returns the value as the reader gets it (typed), or raises a SiimError
that starts with `label`; an absent key reaches it as None (most refuse None), unless the key is `optional`:
then an absent key is left out of what the reader gets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from siimcovid.utils import SiimError, atomic_write_text, read_input

MAX_BYTES = 1 << 20  # a declared YAML file is a few KB
MAX_DEPTH = 32  # nesting of a declared YAML (the deepest real one, a model YAML's layer arguments: 6)


class PlainDumper(yaml.SafeDumper):
    """Declared YAML is written without anchors and aliases (the reader refuses them: see parse_yaml)."""

    def ignore_aliases(self, data) -> bool:
        return True


def dump_yaml(data: dict) -> str:
    return yaml.dump(data, Dumper=PlainDumper, sort_keys=False, allow_unicode=True)


def parse_yaml(data: bytes, label: str, name: str, limit: int = MAX_BYTES) -> dict:
    """A declared file's bytes -> its mapping: safe YAML (libyaml's parser where installed), no anchors or aliases,
    at most `limit` bytes, at most MAX_DEPTH levels deep. name: the file's name, for the messages."""
    if len(data) > limit:
        raise SiimError(f"{label} is {len(data)} bytes (a {name} is at most {limit})")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        text = data.decode("utf-8")
        depth = 0
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SiimError(f"{label} is not valid YAML (an anchor or alias: a {name} has none)")
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_DEPTH:
                raise SiimError(f"{label} nests deeper than {MAX_DEPTH} levels (a {name} is flat)")
        out = yaml.load(text, Loader=loader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise SiimError(f"{label} is not valid YAML ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(out, dict):
        raise SiimError(f"{label} is not a mapping of key: value")
    return out


def check_keys(data: dict, known, label: str) -> None:
    """Every key of `data` is one of `known`; else one line naming the unknown ones."""
    unknown = sorted(map(str, set(data) - set(known)))
    if unknown:
        raise SiimError(f"{label}: unknown key(s) {unknown} (this siimcovid knows {sorted(map(str, known))})")


def anything(value, label: str):
    """The check of a key whose value is free (a record's own note, e.g. when a file was made)."""
    return value


@dataclass(frozen=True)
class Key:
    """One key of a declared file: its name, its meaning, its check (see the module docstring)."""

    name: str
    doc: str
    check: Callable[[Any, str], Any] = anything
    optional: bool = False  # absent: left out of what the reader gets (else the check gets None)


@dataclass(frozen=True)
class Document:
    """A YAML file one stage writes and another reads (see the module docstring)."""

    name: str  # the file's name, e.g. manifest.yaml
    files: str  # where it lives, e.g. <bundle>/manifest.yaml
    keys: tuple[Key, ...]
    doc: str = ""
    checks: tuple[Callable[[dict, str], None], ...] = ()  # whole-file checks, run before the keys' (e.g. a format)
    max_bytes: int = MAX_BYTES
    header: str = ""  # comment lines written first (what made the file): a reader skips them as YAML does

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def check(self, data, label: str) -> dict:
        """The mapping as its reader gets it: no unknown key, the file's checks, then every key's check."""
        if not isinstance(data, dict):
            raise SiimError(f"{label} is not a mapping of key: value")
        check_keys(data, self.names, label)
        for check in self.checks:
            check(data, label)
        return {k.name: k.check(data.get(k.name), label) for k in self.keys if not (k.optional and k.name not in data)}

    def parse(self, data: bytes, label: str) -> dict:
        """A file's bytes (read and vouched for by the caller) -> the checked mapping."""
        return self.check(parse_yaml(data, label, self.name, self.max_bytes), label)

    def read(self, path: str | os.PathLike, label: str | None = None) -> dict:
        """A file of this declaration -> the checked mapping (a regular file of at most max_bytes)."""
        label = label or str(path)
        try:
            data = read_input(path, self.max_bytes, self.name)
        except SiimError as e:
            raise SiimError(f"{label}: {getattr(e, 'reason', e)}") from None
        return self.parse(data, label)

    def write(self, data: dict, path: str | os.PathLike) -> Path:
        """Check `data` as the reader will (a bug of ours stops here, not in the reader), then write it as given."""
        self.check(data, f"{path} (not written)")
        return atomic_write_text(path, self.header + dump_yaml(data))

    def describe(self) -> str:
        """The format as text: the file, what it is, each key and its meaning."""
        width = max(map(len, self.names), default=0)
        lines = [f"{self.files}: {self.doc}"] + [f"    {k.name:<{width}}  {k.doc}" for k in self.keys]
        return "\n".join(lines)
