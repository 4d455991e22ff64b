"""Where export writes: out= checked (new, or a bundle it may replace), a work folder beside it, the final rename.

The bundle is built in a work folder beside `out` and renamed at the end (a zip: built there too, renamed): an `out`
that exists is complete. The work folders of exports killed before their end are removed by the next export.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import zipfile
from pathlib import Path

from siimcovid import outputs
from siimcovid.bundle.archive import zip_entries
from siimcovid.bundle.files import MANIFEST
from siimcovid.bundle.header import check_files, read_header
from siimcovid.utils import SiimError, temp_dir_beside


def move_into_place(tmp: Path, out: Path, work: Path) -> None:
    """Rename the finished tree (or zip) tmp to out; an existing out (overwrite=true) is moved aside into the work
    folder first, and goes with it."""
    if out.exists():
        os.replace(out, work / "old")
    os.replace(tmp, out)


WORK_MARK = ".siimcovid-export"  # in an export's work folder: the host and process building it


def work_folder(out: Path) -> Path:
    """A new work folder beside out (the bundle is built in it, then renamed to out), marked as this export's; the
    work folders of exports killed before their end (their process is gone) are removed first."""
    host = socket.gethostname()
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        mark = folder / WORK_MARK
        if folder.is_dir() and not folder.is_symlink() and mark.is_file():
            made_by, _, pid = mark.read_text().partition(" ")
            if made_by == host and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
    work = temp_dir_beside(out)
    (work / WORK_MARK).write_text(f"{host} {os.getpid()}")
    return work


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def is_bundle(path: Path) -> bool:
    """Whether an existing path is a bundle as export leaves one (a folder holding nothing but a manifest's files,
    all whole; or a zip whose entries its manifest lists): the only thing export replaces. A folder that merely
    holds a file named manifest.yaml, or a bundle a user added notes to, is not."""
    try:
        if path.is_dir():
            header = read_header(path, path)
            check_files(path, header.manifest, path)
        else:
            with zipfile.ZipFile(path) as zf:
                zip_entries(zf, path)
    except (SiimError, zipfile.BadZipFile, OSError):
        return False
    return True


def check_out(out: Path, overwrite: bool, sources: list) -> None:
    """out= is new, or (overwrite=true) a bundle of the same kind; never the root, the home folder or a folder that
    holds the runs being exported (replacing it would delete them)."""
    if out.suffix == ".zip" and not out.is_dir():
        if any(Path(s).resolve() == out.resolve() for s in sources if s):
            raise SiimError(f"out={out} is one of the files being exported")
    else:
        outputs.check_place(out, sources)
    if not out.exists():
        return
    if not overwrite:
        raise SiimError(f"export: {out} exists: choose another out= or give overwrite=true")
    if (out.suffix == ".zip") != out.is_file():
        raise SiimError(f"export: {out} exists and is a {'file' if out.is_file() else 'folder'}: not replacing it")
    if not is_bundle(out):
        raise SiimError(
            f"export: {out} exists and is not a bundle as export writes one (a {MANIFEST} and only the files it lists): "
            "overwrite=true replaces only a bundle"
        )
