"""The one rule for writing into an output folder: siimcovid never deletes or overwrites a file it did not write.

A stage that writes into a folder keeps a record there (predict: predict.yaml; fuse and fuse tune: fuse_files.yaml;
prepare: prepare_files.yaml; pseudo: pseudo_files.yaml): a YAML mapping whose `files` lists, relative to the folder,
every file the stage wrote, beside the stage's own keys. A record is known by its first line, which only Written.save
writes ("# siimcovid <stage>'s record of this folder: ..."), never by its name alone: a user's file of the same name
(an Ultralytics predict.yaml) is a file of the user's like any other, never saved over and never trusted.

    check_place(out, sources=(), what="out")
        refused whatever the settings: the filesystem root, the home folder, a folder equal to or above one of
        `sources` (its outputs could land on the input), a path that is a file
    check_outside(out, folder, what="out", key="source")
        refuse an out inside a folder the stage reads whole (a folder source): a re-run would read its own outputs
    check_out(out, record, overwrite=False, sources=(), what="out", earlier=None)
        check_place, then: out may be written when it does not exist, is empty, holds the stage's record, or is a
        folder an earlier siimcovid wrote (`earlier`, below); anything else is refused ("out=<X> holds files siimcovid
        did not write (e.g. <a file>): ...") unless overwrite (None: the stage has no overwrite= to offer); a file of
        the record's name that is not a record is refused whatever overwrite says (the stage cannot keep its record)
    Written(folder, record, stage, earlier=None)   the record; `.data` holds the stage's other keys
        .owns(path)        whether the record lists it
        .check(*paths)     refuse a path that exists and is not listed (even with overwrite=true: only the stage's
                           own files are replaced): before long work, for the files it will write at the end
        .claim(*paths)     before writing them: check, then list them and save the record
        .remove(*paths)    unlink the listed ones (never another), forget them
        .remove_all(under) every listed file (under a sub-folder)
    open_out(out, record, stage, overwrite, sources, what, earlier=, check=, claim=) -> Written
        check_out, create the folder, save the record first (listing `claim`; `check` and `claim` refused first when
        one is a file the stage did not write): a stage killed at its first file leaves a folder the re-run still
        recognises as its own

A folder an earlier siimcovid wrote before its stages kept records is adopted: `earlier(folder)` is the stage's own
test, by evidence only that stage writes (predict: a predict.yaml holding bundle_sha256, settings and members; fuse:
its config records fuse_<split>.yaml, tune.yaml), and returns an Earlier: the files there whose names the stage writes
(those become its own: a re-run replaces them as that release did) and the old record's keys; else None. Its helpers:
is_record(path), read_mapping(path) (a small YAML mapping, else None), present(folder, names, patterns) (the files
found).

Listed paths are kept only when they are plain relative paths inside the folder (a hostile record cannot point a
removal anywhere else), and a removal never follows a link out of the folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import yaml

from siimcovid.utils import LOGGER, SiimError, atomic_write_text, read_input

FILES_KEY = "files"
HEADER = (
    "# siimcovid {stage}'s record of this folder: `files` lists what it wrote here; it never replaces or removes another file\n"
)
RECORD_MARK = re.compile(r"# siimcovid [\w -]+'s record of this folder: ")  # HEADER's start, for every stage (and mode)
EVIDENCE_BYTES = 1 << 20  # an earlier stage's YAML evidence is small: a larger file is not one


class Earlier(NamedTuple):
    """What a stage found of a folder an earlier siimcovid wrote before records were kept (module docstring)."""

    files: list[str]  # relative: the files there whose names the stage writes
    data: dict | None = None  # the old record's keys (predict.yaml's), kept as the record's own


def is_record(path) -> bool:
    """Whether `path` is a record siimcovid wrote: a file starting with the line only Written.save writes."""
    path = Path(path)
    if not path.is_file():  # also keeps a FIFO of that name from being opened
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return RECORD_MARK.match(head.decode("utf-8", errors="replace")) is not None


def not_a_record(path, what: str = "out") -> str:
    return (
        f"{path} is not a record siimcovid wrote (its first line is not siimcovid's): siimcovid keeps its record of the "
        f"folder in a file of that name and never replaces yours; move it away or choose another {what}="
    )


def read_mapping(path) -> dict | None:
    """The YAML mapping in a small regular file, else None (absent, too large, not YAML, not a mapping): how a stage
    reads an earlier stage's evidence, which may as well be a file of the user's."""
    try:
        data = yaml.safe_load(read_input(path, EVIDENCE_BYTES).decode("utf-8"))
    except (SiimError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def present(folder, names: Iterable[str] = (), patterns: Iterable[str] = ()) -> list[str]:
    """Those of `names` (relative paths, taken as they are) and of the files matching the glob `patterns` that are
    files in `folder`: an earlier stage's outputs found there (Earlier.files)."""
    folder = Path(folder)
    found = {n for n in names if (folder / n).is_file()}
    found |= {p.relative_to(folder).as_posix() for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


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


def check_outside(out, folder, what: str = "out", key: str = "source") -> None:
    """Refuse an `out` inside `folder`, a folder the stage reads whole (a folder source): a re-run would read its own
    outputs as input."""
    folder = Path(folder)
    if folder.is_dir() and Path(out).resolve().is_relative_to(folder.resolve()):
        raise SiimError(
            f"{what}={out} lies inside {key}={folder}: a re-run would read its own outputs; choose an {what}= outside it"
        )


def foreign_entry(out: Path) -> str | None:
    """A top-level entry of `out` (not the stage's own folder), or None when it is absent or empty."""
    if not out.is_dir():
        return None
    with os.scandir(out) as entries:
        for entry in entries:
            return entry.name + ("/" if entry.is_dir() else "")
    return None


Evidence = Callable[[Path], "Earlier | None"]


def is_own(out: Path, record: str, earlier: Evidence | None = None) -> bool:
    """Whether `out` is the stage's folder: it holds the stage's record, or is a folder an earlier siimcovid wrote."""
    return is_record(out / record) or (earlier is not None and earlier(out) is not None)


def check_out(
    out, record: str, overwrite: bool | None = False, sources: Iterable = (), what: str = "out", earlier: Evidence | None = None
) -> Path:
    """The rule before a stage writes into `out` (module docstring); returns it as a Path. Creates nothing."""
    out = check_place(out, sources, what)
    if is_own(out, record, earlier):
        return out
    if os.path.lexists(out / record):  # the user's file of that name: the stage cannot keep its record there
        raise SiimError(not_a_record(out / record, what))
    example = foreign_entry(out)
    if example is not None and not overwrite:
        offer = "" if overwrite is None else ", or give overwrite=true to write beside them"
        raise SiimError(
            f"{what}={out} holds files siimcovid did not write (e.g. {example}): choose an empty or new folder{offer}"
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
    """A stage's record in its output folder: what it wrote there (`files`) and the stage's own keys (`data`).
    earlier: the stage's test for a folder an earlier siimcovid wrote without a record (module docstring): such a
    folder's record starts from what it found (`adopted`), saved at the first claim."""

    def __init__(self, folder, record: str, stage: str, earlier: Evidence | None = None):
        self.folder, self.stage = Path(folder), stage
        self.path = self.folder / record
        self.saved = is_record(self.path)  # False: the record is written at the first claim or save
        found = earlier(self.folder) if earlier is not None and not self.saved else None
        self.adopted = found is not None
        self.data = {k: v for k, v in (found.data or {}).items() if k != FILES_KEY} if found else self._read()
        listed = found.files if found else self.data.pop(FILES_KEY, None)
        self.files = {p for p in map(_plain_relative, listed or []) if p}
        if found:
            LOGGER.info(f"{stage}: {self.folder} was written by an earlier siimcovid: its {len(self.files)} files of "
                        f"{stage}'s become its own ({self.path})")  # fmt: skip

    def _read(self) -> dict:
        if not self.saved:
            if os.path.lexists(self.path):
                raise SiimError(not_a_record(self.path))
            return {}
        try:
            data = yaml.safe_load(self.path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            data = []  # siimcovid's first line, then no YAML: damaged
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
        """Refuse a path that exists and is not the stage's (the stage would overwrite a file it did not write), and
        one whose folder is a link out of the stage's folder (it would write wherever the link points)."""
        root = self.folder.resolve()
        for folder in {Path(p).parent for p in paths}:  # thousands of images live in a few folders
            if not folder.resolve().is_relative_to(root):
                raise SiimError(
                    f"{folder} leads out of {self.folder} (a symbolic link): siimcovid {self.stage} writes only inside "
                    "its folder; remove the link or choose another out="
                )
        for path in paths:
            if (Path(path).exists() or Path(path).is_symlink()) and not self.owns(path):
                raise SiimError(
                    f"{path} is not a file siimcovid {self.stage} wrote (not listed in {self.path}): "
                    "move it away or choose another out="
                )

    def claim(self, *paths) -> None:
        """Before the stage writes `paths`: check them, list them all and save the record."""
        self.check(*paths)
        new = {self.relative(p) for p in paths} - self.files
        if new or not self.saved:
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
        body = yaml.safe_dump({**self.data, FILES_KEY: sorted(self.files)}, sort_keys=False)
        path = atomic_write_text(self.path, HEADER.format(stage=self.stage) + body)
        self.saved = True
        return path


def open_out(
    out,
    record: str,
    stage: str,
    overwrite: bool | None = False,
    sources: Iterable = (),
    what: str = "out",
    *,
    earlier: Evidence | None = None,
    check: Iterable = (),
    claim: Iterable = (),
) -> Written:
    """check_out, then create the folder and save the record before anything else is written in it.
    check: files the stage writes later (refused now when one is not its own; not listed); claim: files listed in
    that first save (refused the same way): a file of the user's in the way stops the stage before it writes anything."""
    out = check_out(out, record, overwrite, sources, what, earlier)
    written = Written(out, record, stage, earlier)
    claim = list(claim)
    written.check(*check, *claim)
    out.mkdir(parents=True, exist_ok=True)
    written.claim(*claim)  # saves the record when it is new (or adopted)
    return written
