"""`prepare layout=folder`: any tree of DICOMs (any names, with or without .dcm) or one file, unlabelled.

Every regular file under the root is looked at (dot-files and dot-folders excepted: .DS_Store, a synthetic
dataset's marker); symbolic links to folders are followed, each folder scanned once. What cannot be read
as a file is never opened, and is listed in skipped.csv with the reason (a FIFO, a device, a socket, a
broken link, a folder that cannot be listed, a second way into a folder already scanned):

- a DICOM, known by its content (the DICM preamble, else a successful header read), never by its name:
  image_id = SOPInstanceUID, study_id = StudyInstanceUID, series_id = SeriesInstanceUID, read from the
  header only (no pixels; a deflated file inflated no further than its header). A file without
  SOPInstanceUID is named by its file stem, one without StudyInstanceUID joins the study of its folder's name;
  with modality_check=true (the default) a DICOM whose tags say it is no frontal chest radiograph
  (dicom.radiograph_problem: a Modality other than CR/DX, a BodyPartExamined other than the chest, a lateral
  ViewPosition) is listed in skipped.csv with the reason and left out, whatever on_error says;
- a PNG or JPEG (.png .jpg .jpeg): image_id = the file stem, study_id = its folder's name, series_id = '';
- anything else is a problem (raised, or with on_error=skip listed in skipped.csv and left out).

Image ids name files and submission rows: characters other than letters, digits, '.', '-' and '_'
become '_' (the bytes of a file name that is not UTF-8 too), and an id met twice gets a suffix (_2, _3...)
in path order, so two copies of one DICOM are two images. Every row is split 'test' (unlabelled): no boxes,
no study label, no CSV line.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from siimcovid.config import Config
from siimcovid.data.dicom import TAGS_CHECKED, header_info, radiograph_problem, read_dicom
from siimcovid.data.layouts import ROW_COLUMNS
from siimcovid.data.siim import Problems
from siimcovid.registry import register
from siimcovid.utils import FILE_KINDS, LOGGER, DataError, SiimError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")




def not_a_file(path: Path) -> str | None:
    """Why `path` (followed through symbolic links) is not a regular file prepare may open, or None. Opening a FIFO
    blocks until something writes to it, and /dev/zero reads forever: neither is ever opened."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "a broken symbolic link: not read"
    except OSError as e:
        return f"cannot look at it ({e.strerror or e}): not read"
    if stat.S_ISREG(info.st_mode):
        return None
    return f"{FILE_KINDS.get(stat.S_IFMT(info.st_mode), 'not a regular file')}, not an image file: not read"


def list_files(root: Path, problems: Problems) -> list[Path]:
    """Every regular file under root (root itself when it is one), in path order, dot-files and dot-folders left
    out. Symbolic links to folders are followed, each folder once (a link back up the tree would loop); what is no
    regular file, a folder that cannot be listed, and a second way into a folder already scanned go to problems."""
    if root.is_dir():
        files, seen, top = [], {_folder_key(root)}, root.resolve()
        for dirpath, dirnames, names in os.walk(root, followlinks=True, onerror=lambda e: _unlistable(e, problems)):
            kept = [d for d in sorted(dirnames) if not d.startswith(".")]
            dirnames[:] = [d for d in kept if _first_visit(Path(dirpath) / d, top, seen, problems)]
            files += [Path(dirpath) / n for n in names if not n.startswith(".")]
    else:
        files = [root]
    regular = []
    for path in sorted(files):
        reason = not_a_file(path)
        if reason is None:
            regular.append(path)
        else:
            problems.add(DataError(reason, path))
    return regular


def _folder_key(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _first_visit(folder: Path, top: Path, seen: set, problems: Problems) -> bool:
    """Whether to scan `folder`: not when a link leads back into a folder scanned already, nor to one holding the
    root (`top`, resolved: a link to / or to a parent would scan the whole disk); listed in problems."""
    try:
        key = _folder_key(folder)
    except OSError as e:
        problems.add(DataError(f"cannot look at the folder ({e.strerror or e}): not scanned", folder))
        return False
    if key in seen:
        problems.add(DataError(f"a link to a folder scanned already ({folder.resolve()}): not scanned twice", folder))
        return False
    if top.is_relative_to(folder.resolve()):
        problems.add(DataError(f"a link to a folder holding the source ({folder.resolve()}): not scanned", folder))
        return False
    seen.add(key)
    return True


def _unlistable(error: OSError, problems: Problems) -> None:
    """os.walk's onerror: a folder it cannot list (no permission, gone) is a problem, never skipped in silence."""
    problems.add(DataError(f"cannot list the folder ({error.strerror or error}): its files are not read", error.filename))


def has_dicom_preamble(path: Path) -> bool:
    if os.stat(path).st_size == 0:  # nothing to read (and a file of /proc that says 0 bytes, e.g. kmsg, blocks a read)
        return False
    with open(path, "rb") as f:
        head = f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def folder_study(path: Path, root: Path) -> str:
    """A study id for a file whose header names none: its folder's path under the root (two folders of one name,
    a/DICOM and b/DICOM, stay two studies); the root's own name for files lying in the root."""
    parent = path.parent.resolve()
    base = root.resolve() if root.is_dir() else root.resolve().parent
    rel = parent.relative_to(base).as_posix() if parent.is_relative_to(base) else ""
    return rel if rel and rel != "." else base.name


def dicom_ids(path: Path, root: Path) -> dict:
    """image_id, study_id, series_id of a DICOM file from its header, and the radiograph tags (dicom.TAGS_CHECKED);
    DataError when it is not a DICOM image."""
    preamble = has_dicom_preamble(path)
    try:  # without the preamble, force the read: old files (ACR-NEMA style) start straight with their elements
        with warnings.catch_warnings():  # a forced read of a foreign file warns before it fails
            warnings.simplefilter("ignore")
            ds = read_dicom(path, header_only=True, force=not preamble)
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except Exception as e:  # pydicom raises many types on foreign or damaged files
        reason = f"cannot read its DICOM header ({type(e).__name__}: {e})" if preamble else "neither a DICOM nor a PNG/JPEG"
        raise DataError(reason, path) from None
    if rows < 1 or cols < 1:
        raise DataError("DICOM without an image (no Rows/Columns)" if preamble else "neither a DICOM nor a PNG/JPEG", path)
    info = header_info(ds)
    return {
        "image_id": str(ds.get("SOPInstanceUID", "") or "").strip() or path.stem,
        "study_id": str(ds.get("StudyInstanceUID", "") or "").strip() or folder_study(path, root),
        "series_id": str(ds.get("SeriesInstanceUID", "") or "").strip(),
        **{k: info[k] for k in TAGS_CHECKED},
    }


def file_ids(path: Path, root: Path) -> dict:
    """The ids of one input file (DICOM or PNG/JPEG) under `root` (and a DICOM's radiograph tags); DataError when
    it is neither."""
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return {"image_id": path.stem, "study_id": folder_study(path, root), "series_id": ""}
    try:
        return dicom_ids(path, root)
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror or e})", path) from None


def not_a_chest_radiograph(ids: dict, path: Path) -> DataError | None:
    """The skip of a DICOM whose tags say it is no frontal chest radiograph (see dicom.radiograph_problem), or None."""
    problem = radiograph_problem(ids.get("modality", ""), ids.get("body_part", ""), ids.get("view_position", ""))
    if problem is None:
        return None
    return DataError(f"not a frontal chest radiograph: {problem} (modality_check=false keeps it)", path)


def safe_id(text: str) -> str:
    """An id usable as a file name and in a submission id: unsafe characters become '_'."""
    return _UNSAFE.sub("_", text).strip("._") or "image"


def unique_ids(ids: list[str]) -> list[str]:
    """The ids in order, each repeat suffixed _2, _3... (a suffixed id never takes an id given elsewhere)."""
    given, used, out = set(ids), set(), []
    for image_id in ids:
        new, k = image_id, 1
        while new in used or (new != image_id and new in given):
            k += 1
            new = f"{image_id}_{k}"
        used.add(new)
        out.append(new)
    return out


@register("layout", "folder")
def folder_layout(root: Path, splits: list[str], problems: Problems, cfg: Config | None = None) -> pd.DataFrame:
    """Loose DICOMs (and PNG/JPEG) under `root` (or the one file `root`) -> unlabelled test rows. cfg: the prepare
    settings (modality_check; None: the check is on, its default)."""
    root = Path(root)
    if "test" not in splits:
        raise SiimError(f"layout=folder reads unlabelled images: they are test images, give splits=test (got {splits})")
    if not root.exists():
        raise DataError("not found", root)
    check = cfg is None or cfg.modality_check
    rows, not_chest = [], 0
    for path in tqdm(list_files(root, problems), desc=f"scan {root.name}", unit="file", leave=False):
        try:
            ids = file_ids(path, root)
        except DataError as e:
            problems.add(e)  # raises unless on_error=skip
            continue
        refused = not_a_chest_radiograph(ids, path) if check else None
        if refused is not None:
            problems.exclude(refused)  # listed whatever on_error says: the file is fine, only not what the models read
            not_chest += 1
            continue
        rows.append({**ids, "image_id": safe_id(ids["image_id"]), "study_id": safe_id(ids["study_id"]), "path": str(path)})
    if problems.items:
        LOGGER.warning(
            f"WARNING: {len(problems.items)} path(s) under {root} are not images or cannot be read"
            + (f" ({not_chest} by their tags not frontal chest radiographs)" if not_chest else "")
            + ": skipped, listed in skipped.csv with the reason"
        )
    # object, not pandas' str dtype: a path that is not UTF-8 holds surrogates, which pyarrow (when installed) refuses
    table = pd.DataFrame(rows, columns=["image_id", "study_id", "series_id", "path"], dtype=object)
    table["image_id"] = unique_ids(list(table.image_id))
    table["boxes"] = [[] for _ in range(len(table))]
    table["study_label"], table["line"], table["split"] = "", None, "test"
    return table[ROW_COLUMNS]
