"""Small shared helpers: errors, logging, atomic writes."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

LOGGER = logging.getLogger("siimcovid")
if not LOGGER.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


class SiimError(Exception):
    """An error the user can fix (bad input, bad config). The CLI prints it without a traceback."""


class DataError(SiimError, ValueError):
    """Bad input data. The message names the file and, where there is one, the row."""

    def __init__(self, message: str, file: str | os.PathLike | None = None, row: int | None = None):
        where = ""
        if file is not None:
            where = str(file)
            if row is not None:
                where += f", line {row}"
            where += ": "
        super().__init__(where + message)
        self.file, self.row, self.reason = file, row, message

    def __reduce__(self):  # keep file and row when sent back from a worker process
        return (type(self), (self.reason, self.file, self.row))


def name_problem(text) -> str | None:
    """Why `text` cannot be a run or member name, or None. A name is one path component: it becomes a folder
    (<project>/<stage>/<name>) or a file stem, so it must stay where the user expects."""
    text = str(text)
    if text in ("", ".", ".."):
        return "is empty, '.' or '..'"
    if "/" in text or "\\" in text:
        return "holds a path separator ('/' or '\\')"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "holds a control character"
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > 200:
        return f"is {size} bytes long (at most 200: it is a file or folder name)"
    return None


def check_name(text, what: str = "name") -> str:
    """`text` if it is one plain path component (name_problem), else a one-line SiimError naming `what`."""
    problem = name_problem(text)
    if problem:
        raise SiimError(f"{what}={str(text)!r} {problem}: a name is one folder name, not a path")
    return str(text)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it to read it would, for a
    moment, give files other threads create, e.g. Ray's logs beside a training thread, no mask at all)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    Readers never see a half-written file: either the old file, the new one, or none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give what a plain open() would (shared prepared folders)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def temp_dir_beside(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new temporary folder beside `path` (to build a whole tree, then rename it), with the permissions of a plain
    mkdir (mkdtemp makes 0700: a bundle on a shared disk or a shared cache must be readable by the team)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def save_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it (the caller chose the backend)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def as_list(value) -> list:
    """A setting that takes one value or several (a=1 or a=1,2) -> a list; None and '' -> []."""
    if value is None or (isinstance(value, str) and value == ""):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
