"""`prepare layout=folder`: any tree of DICOMs (any names, with or without .dcm) or one file, unlabelled.

Every file under the root is looked at (dot-files and dot-folders excepted: .DS_Store, a synthetic
dataset's marker):

- a DICOM, known by its content (the DICM preamble, else a successful header read), never by its name:
  image_id = SOPInstanceUID, study_id = StudyInstanceUID, series_id = SeriesInstanceUID, read from the
  header only (no pixels). A file without SOPInstanceUID is named by its file stem, one without
  StudyInstanceUID joins the study of its folder's name;
- a PNG or JPEG (.png .jpg .jpeg): image_id = the file stem, study_id = its folder's name, series_id = '';
- anything else is a problem (raised, or with on_error=skip listed in skipped.csv and left out).

Image ids name files and submission rows: characters other than letters, digits, '.', '-' and '_'
become '_', and an id met twice gets a suffix (_2, _3...) in path order, so two copies of one DICOM are
two images. Every row is split 'test' (unlabelled): no boxes, no study label, no CSV line.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pandas as pd
import pydicom
from tqdm import tqdm

from siimcovid.data.layouts import ROW_COLUMNS
from siimcovid.data.siim import Problems
from siimcovid.registry import register
from siimcovid.utils import LOGGER, DataError, SiimError

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_MAGIC_OFFSET, DICOM_MAGIC = 128, b"DICM"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def list_files(root: Path) -> list[Path]:
    """Every file under root (root itself when it is a file), in path order, dot-files and dot-folders left out."""
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / n for n in names if not n.startswith(".")]
    return sorted(files)


def has_dicom_preamble(path: Path) -> bool:
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
    """image_id, study_id, series_id of a DICOM file from its header; DataError when it is not a DICOM image."""
    preamble = has_dicom_preamble(path)
    try:  # without the preamble, force the read: old files (ACR-NEMA style) start straight with their elements
        with warnings.catch_warnings():  # a forced read of a foreign file warns before it fails
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=not preamble)
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except Exception as e:  # pydicom raises many types on foreign or damaged files
        reason = f"cannot read its DICOM header ({type(e).__name__}: {e})" if preamble else "neither a DICOM nor a PNG/JPEG"
        raise DataError(reason, path) from None
    if rows < 1 or cols < 1:
        raise DataError("DICOM without an image (no Rows/Columns)" if preamble else "neither a DICOM nor a PNG/JPEG", path)
    return {
        "image_id": str(ds.get("SOPInstanceUID", "") or "").strip() or path.stem,
        "study_id": str(ds.get("StudyInstanceUID", "") or "").strip() or folder_study(path, root),
        "series_id": str(ds.get("SeriesInstanceUID", "") or "").strip(),
    }


def file_ids(path: Path, root: Path) -> dict:
    """The ids of one input file (DICOM or PNG/JPEG) under `root`; DataError when it is neither."""
    if path.suffix.lower() in PICTURE_SUFFIXES:
        return {"image_id": path.stem, "study_id": folder_study(path, root), "series_id": ""}
    try:
        return dicom_ids(path, root)
    except OSError as e:
        raise DataError(f"cannot read the file ({e.strerror or e})", path) from None


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
def folder_layout(root: Path, splits: list[str], problems: Problems) -> pd.DataFrame:
    """Loose DICOMs (and PNG/JPEG) under `root` (or the one file `root`) -> unlabelled test rows."""
    root = Path(root)
    if "test" not in splits:
        raise SiimError(f"layout=folder reads unlabelled images: they are test images, give splits=test (got {splits})")
    if not root.exists():
        raise DataError("not found", root)
    rows = []
    for path in tqdm(list_files(root), desc=f"scan {root.name}", unit="file", leave=False):
        try:
            ids = file_ids(path, root)
        except DataError as e:
            problems.add(e)  # raises unless on_error=skip
            continue
        rows.append({**ids, "image_id": safe_id(ids["image_id"]), "study_id": safe_id(ids["study_id"]), "path": str(path)})
    if problems.items:
        LOGGER.warning(f"WARNING: {len(problems.items)} file(s) under {root} are not images: skipped, listed in skipped.csv")
    table = pd.DataFrame(rows, columns=["image_id", "study_id", "series_id", "path"])
    table["image_id"] = unique_ids(list(table.image_id))
    table["boxes"] = [[] for _ in range(len(table))]
    table["study_label"], table["line"], table["split"] = "", None, "test"
    return table[ROW_COLUMNS]
