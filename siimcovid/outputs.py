"""The one rule for writing into an output folder: siimcovid never deletes or overwrites a file it did not write.

A stage that writes into a folder keeps a record there (predict: predict.yaml; fuse and fuse tune: fuse_files.yaml):
a YAML mapping whose `files` lists, relative to the folder, every file the stage wrote, beside the stage's own keys.

    check_place(out, sources=(), what="out")
        refused whatever the settings: the filesystem root, the home folder, a folder equal to or above one of
        `sources` (its outputs could land on the input), a path that is a file
    check_out(out, record, overwrite=False, sources=(), what="out")
        check_place, then: out may be written when it does not exist, is empty, or holds `record`; anything else is
        refused ("out=<X> holds files siimcovid did not write (e.g. <a file>): ...") unless overwrite
    Written(folder, record, stage)            the record; `.data` holds the stage's other keys
        .owns(path)        whether the record lists it
        .check(*paths)     refuse a path that exists and is not listed (even with overwrite=true: only the stage's
                           own files are replaced): before long work, for the files it will write at the end
        .claim(*paths)     before writing them: check, then list them and save the record
        .remove(*paths)    unlink the listed ones (never another), forget them
        .remove_all(under) every listed file (under a sub-folder)
    open_out(out, record, stage, overwrite, sources, what) -> Written
        check_out, create the folder, save the record first: a stage killed at its first file leaves a folder the
        re-run still recognises as its own

Listed paths are kept only when they are plain relative paths inside the folder (a hostile record cannot point a
removal anywhere else), and a removal never follows a link out of the folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import yaml

from siimcovid.utils import SiimError, atomic_write_text

FILES_KEY = "files"


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return None


def check_place(out, sources: Iterable = (), what: str = "out") -> Path:
    """Refuse an output folder that no setting makes safe (module docstring); returns it as a Path."""
    out = Path(out)
    here = out.resolve()
    if here == Path(here.anchor):
        raise SiimError(f"{what}={out} is the filesystem root: choose a folder for siimcovid's outputs")
    if here == _home():
        raise SiimError(f"{what}={out} is your home folder: choose a new folder inside it for siimcovid's outputs")
    for source in sources:
        if source and Path(source).resolve().is_relative_to(here):
            raise SiimError(
                f"{what}={out} holds the input {source}: outputs could overwrite it; choose another {what}= outside it"
            )
    if out.exists() and not out.is_dir():
        raise SiimError(f"{what}={out} is a file, not a folder")
    return out


def foreign_entry(out: Path, record: str) -> str | None:
    """A top-level entry of `out` that shows it holds something else than the stage's own folder, or None (absent,
    empty, or holding the record)."""
    if not out.is_dir() or (out / record).is_file():
        return None
    with os.scandir(out) as entries:
        for entry in entries:
            return entry.name + ("/" if entry.is_dir() else "")
    return None


def check_out(out, record: str, overwrite: bool = False, sources: Iterable = (), what: str = "out") -> Path:
    """The rule before a stage writes into `out` (module docstring); returns it as a Path."""
    out = check_place(out, sources, what)
    example = foreign_entry(out, record)
    if example is not None and not overwrite:
        raise SiimError(
            f"{what}={out} holds files siimcovid did not write (e.g. {example}): choose an empty or new folder, "
            "or give overwrite=true to write beside them"
        )
    return out


def _plain_relative(text) -> str | None:
    """A listed path as it may be used: relative, inside the folder, no '..'; else None (ignored)."""
    if not isinstance(text, str) or not text:
        return None
    path = Path(text)
    if path.is_absolute() or ".." in path.parts or path.as_posix() != text:
        return None
    return text


class Written:
    """A stage's record in its output folder: what it wrote there (`files`) and the stage's own keys (`data`)."""

    def __init__(self, folder, record: str, stage: str):
        self.folder, self.stage = Path(folder), stage
        self.path = self.folder / record
        self.data = self._read()
        self.files = {p for p in map(_plain_relative, self.data.pop(FILES_KEY, None) or []) if p}

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = yaml.safe_load(self.path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            data = []  # not a YAML mapping: someone else's file
        if data is not None and not isinstance(data, dict):
            raise SiimError(f"{self.path} is not a record siimcovid wrote (no YAML mapping): move it or choose another out=")
        return data or {}

    def relative(self, path) -> str:
        """`path` (absolute, or under the folder as given) as the record lists it."""
        rel = Path(os.path.relpath(Path(path).absolute(), self.folder.absolute()))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{path} is not inside {self.folder}")
        return rel.as_posix()

    def owns(self, path) -> bool:
        return self.relative(path) in self.files

    def check(self, *paths) -> None:
        """Refuse a path that exists and is not the stage's: the stage would overwrite a file it did not write."""
        for path in paths:
            if Path(path).exists() and not self.owns(path):
                raise SiimError(
                    f"{path} is not a file siimcovid {self.stage} wrote (not listed in {self.path}): "
                    "move it away or choose another out="
                )

    def claim(self, *paths) -> None:
        """Before the stage writes `paths`: check them, list them all and save the record."""
        self.check(*paths)
        new = {self.relative(p) for p in paths} - self.files
        if new or not self.path.is_file():
            self.files |= new
            self.save()

    def _unlink(self, rel: str) -> None:
        path = self.folder / rel
        inside = path.parent.resolve().is_relative_to(self.folder.resolve())  # a linked sub-folder may point anywhere
        if inside and (path.is_file() or path.is_symlink()):
            path.unlink()

    def remove(self, *paths) -> list[str]:
        """Unlink those of `paths` the record lists (never another file) and forget them; returns what was listed."""
        gone = [rel for rel in map(self.relative, paths) if rel in self.files]
        for rel in gone:
            self._unlink(rel)
        if gone:
            self.files -= set(gone)
            self.save()
        return gone

    def remove_all(self, under: str = "") -> list[str]:
        """Every listed file (under the sub-folder `under`, e.g. "detect")."""
        prefix = under.rstrip("/") + "/" if under else ""
        return self.remove(*(self.folder / rel for rel in sorted(self.files) if rel.startswith(prefix)))

    def save(self) -> Path:
        header = (
            f"# siimcovid {self.stage}'s record of this folder: `{FILES_KEY}` lists what it wrote here; "
            "it never replaces or removes another file\n"
        )
        body = yaml.safe_dump({**self.data, FILES_KEY: sorted(self.files)}, sort_keys=False)
        return atomic_write_text(self.path, header + body)


def open_out(out, record: str, stage: str, overwrite: bool = False, sources: Iterable = (), what: str = "out") -> Written:
    """check_out, then create the folder and save the record before anything else is written in it."""
    out = check_out(out, record, overwrite, sources, what)
    out.mkdir(parents=True, exist_ok=True)
    written = Written(out, record, stage)
    written.claim()  # saves the record when it is new
    return written
