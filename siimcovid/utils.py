"""Small shared helpers: errors, logging, reading input files, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import stat
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


# ----------------------------------------------------------------------------- reading inputs
FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}  # what a path is when it is no regular file  # fmt: skip


def read_input(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file", links: bool = True) -> bytes:
    """The bytes of an input file, which must be a regular file (a FIFO blocks forever, /dev/zero never ends) of at
    most `max_bytes` (a format with a natural size, e.g. a submission: a wrong file is refused before it is read);
    links=False: a symbolic link is refused too (inside a bundle, a link could point anywhere)."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if links else getattr(os, "O_NOFOLLOW", 0))
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; a regular file ignores it
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except OSError as e:
        if e.errno == errno.ELOOP and not links:
            raise DataError(f"a symbolic link, not a {what}", path) from None
        raise DataError(f"cannot read it: {_reason(e)}", path) from None
    too_big = f"larger than {(max_bytes or 0) / 2**20:g} MiB, the most a {what} can be: is it the right file?"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise DataError(f"{kind}, not a {what}: give a file", path)
        if max_bytes is not None and info.st_size > max_bytes:
            raise DataError(too_big, path)
        if info.st_size == 0:  # nothing to read; and a file of /proc that says 0 bytes (kmsg) would block the read
            return b""
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)  # bounded also if it grows meanwhile
        if data is None:  # a non-blocking read that would have blocked: no file a user means
            raise DataError(f"a file whose reading blocks, not a {what}", path)
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(too_big, path)
    return data


def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """An input file's bytes as text; not UTF-8 (a CSV saved by Excel is often Windows-1252) is a DataError naming
    the file and the line of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise DataError(f"not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}): save it as UTF-8", path) from None


def read_text_input(path: str | os.PathLike, max_bytes: int | None = None, what: str = "file") -> str:
    """An input text file (a YAML, a CSV): read_input, then decode_utf8."""
    return decode_utf8(read_input(path, max_bytes, what), path)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read by blocks: weights files are hundreds of MB)."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def stream_sha256(f) -> str:
    """The sha256 of what is left to read in a binary file object."""
    digest = hashlib.sha256()
    while block := f.read(1 << 20):
        digest.update(block)
    return digest.hexdigest()


def safetensors_state(data: bytes, where: str) -> dict:
    """A safetensors file's bytes -> its state dict (tensors on the CPU); anything else is a SiimError naming `where`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise SiimError(f"{where}: not a readable safetensors file ({e})") from None


def printable(path: str | os.PathLike) -> str:
    """A path as text that can be written anywhere: the bytes of a name that is not UTF-8 (which Python holds as
    surrogate escapes, and a UTF-8 CSV or YAML cannot encode) become \\xNN."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


# ----------------------------------------------------------------------------- writing outputs
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the disk (or the user's quota, or ulimit -f) is full
_REFUSED = {errno.EROFS, errno.EACCES, errno.EPERM}  # the folder or the filesystem does not let us in
_NOT_THERE = {errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}  # writing `path`: a folder, or a file above it


def _reason(error: OSError) -> str:
    return (error.strerror or os.strerror(error.errno or 0) or str(error)).lower()


def os_problem(error: OSError, path: str | os.PathLike | None = None) -> str | None:
    """One line for an OSError the user fixes (a full or read-only disk, no permission: free space, another out=;
    writing `path`: a folder in its place or a file above it), naming `path` (what was being written) or else the
    error's own file; None for any other OSError (a bug of ours, which keeps its traceback)."""
    if error.errno not in _FULL | _REFUSED | (_NOT_THERE if path is not None else set()):
        return None
    where = path if path is not None else error.filename
    if where is None:
        return f"cannot write: {_reason(error)}"
    if path is None and error.errno in (errno.EACCES, errno.EPERM):  # a read or a write: say only whose permission
        return f"{where}: {_reason(error)}"
    if error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename is not None:  # mkdir met a file on the way
        met = Path(os.fsdecode(error.filename))
        blocker = next((p for p in (met, *met.parents) if p.exists() and not p.is_dir()), met)
        return f"cannot write {where}: {blocker} is a file, not a folder"
    return f"cannot write {where}: {_reason(error)}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    Readers never see a half-written file: either the old file, the new one, or none. A full or read-only disk is
    one SiimError naming `path` (os_problem), and the temporary file is removed whatever failed.
    """
    path = Path(path)
    tmp, in_block = None, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give what a plain open() would (shared folders)
        finally:
            os.close(fd)
        in_block = True
        yield Path(tmp)
        in_block = False
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        # an error of the block about another file (e.g. reading an input) is not about writing `path`
        ours = isinstance(e, OSError) and not (in_block and e.filename is not None and os.fspath(e.filename) != tmp)
        problem = os_problem(e, path) if ours else None
        if problem:
            raise SiimError(problem) from e
        raise


def atomic_temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files atomic_path leaves beside `path` when a kill interrupts its write (its own naming:
    .<stem>.<random>.tmp<suffix>), never read again."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"))


def temp_dir_beside(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new temporary folder beside `path` (to build a whole tree, then rename it), with the permissions of a plain
    mkdir (mkdtemp makes 0700: a bundle on a shared disk or a shared cache must be readable by the team)."""
    path = Path(path)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.rmdir()
        problem = os_problem(e, path)
        if problem:
            raise SiimError(problem) from e
        raise
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
