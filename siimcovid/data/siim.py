"""The SIIM-FISABIO-RSNA download: its CSVs and folder tree (contracts in siimcovid/tables.py: IMAGE_LEVEL, ...).

The CSVs are read through their contracts (siimcovid.tables: IMAGE_LEVEL, STUDY_LEVEL, SAMPLE),
the ones `siimcovid synth` writes them with. Every parser here checks its input and names the file and line of anything wrong.
``on_error="raise"`` stops at the first problem; ``on_error="skip"`` drops the image (or
study) concerned, collects the problem in a `Problems` list and carries on.
"""

from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.tables import (
    IMAGE_CLASSES,
    IMAGE_CSV,
    IMAGE_LEVEL,
    IMAGE_SUFFIX,
    SAMPLE,
    SAMPLE_SUBMISSION,
    SKIPPED,
    STUDY_CLASSES,
    STUDY_COLUMNS,
    STUDY_CSV,
    STUDY_LEVEL,
    STUDY_SUFFIX,
    file_line,
)
from siimcovid.utils import LOGGER, DataError, SiimError, printable

BOX_TOL = 0.01  # pixels: boxes column and label string must agree this closely


@dataclass
class Problems:
    """Collects input problems: raises at once, or (on_error='skip') records and counts them."""

    on_error: str = "raise"
    items: list[DataError] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in {"raise", "skip"}:
            raise SiimError(f"on_error must be 'raise' or 'skip', got '{self.on_error}'")

    def add(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.items.append(error)

    def exclude(self, error: DataError) -> None:
        """Record an input left out on purpose (not a broken one: an image the models do not read), whatever on_error."""
        self.items.append(error)

    def table(self) -> pd.DataFrame:
        """The problems as the SKIPPED table (file, line, problem) that prepare writes to skipped.csv."""
        return pd.DataFrame(
            [{"file": printable(e.file or ""), "line": e.row, "problem": printable(e.reason)} for e in self.items],
            columns=SKIPPED.names,
        )

    def report(self, what: str = "problems") -> None:
        if self.items:
            LOGGER.warning(f"WARNING: skipped {len(self.items)} {what}; first: {self.items[0]}")


def _strip_suffix(value: str, suffix: str, file, line) -> str:
    if not isinstance(value, str) or not value.endswith(suffix) or len(value) == len(suffix):
        raise DataError(f"id '{value}' should end with '{suffix}'", file, line)
    return value[: -len(suffix)]


def _number(value, what: str, file, line) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{what} is not a number: {value!r}", file, line) from None
    if not math.isfinite(x):
        raise DataError(f"{what} is not finite: {value!r}", file, line)
    return x


def parse_boxes_cell(text: str, file=None, line=None) -> list[list[float]]:
    """Parse the `boxes` column: a Python-literal list of {'x','y','width','height'} dicts.

    Returns [[x_min, y_min, x_max, y_max], ...]; empty or NaN means no boxes.
    """
    text = (text or "").strip()
    if text in {"", "nan", "NaN", "[]"}:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise DataError(f"boxes is not a Python list of dicts: {text[:80]!r}", file, line) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"boxes is not a list: {text[:80]!r}", file, line)
    boxes = []
    for item in value:
        if not isinstance(item, dict) or not {"x", "y", "width", "height"} <= set(item):
            raise DataError(f"each box needs keys x, y, width, height: {item!r}", file, line)
        x, y, w, h = (_number(item[k], f"box {k}", file, line) for k in ("x", "y", "width", "height"))
        if w <= 0 or h <= 0:
            raise DataError(f"degenerate box (width {w:g}, height {h:g})", file, line)
        boxes.append([x, y, x + w, y + h])
    return boxes


def parse_label_string(text: str, file=None, line=None, classes=IMAGE_CLASSES) -> list[tuple]:
    """Parse a label / PredictionString: groups of `class conf x_min y_min x_max y_max`."""
    tokens = (text or "").split()
    if len(tokens) % 6:
        raise DataError(f"label has {len(tokens)} tokens, not a multiple of 6: {text[:80]!r}", file, line)
    out = []
    for i in range(0, len(tokens), 6):
        name = tokens[i]
        if name not in classes:
            raise DataError(f"unknown class '{name}' (expected one of {list(classes)})", file, line)
        conf, x1, y1, x2, y2 = (_number(t, "label value", file, line) for t in tokens[i + 1 : i + 6])
        out.append((name, conf, x1, y1, x2, y2))
    return out


def label_boxes(parsed: list[tuple], file=None, line=None) -> list[list[float]]:
    """Opacity boxes of a parsed training label; checks none/opacity are not mixed."""
    names = {p[0] for p in parsed}
    if not parsed:
        raise DataError("empty label (an image without opacity is labelled 'none 1 0 0 1 1')", file, line)
    if names == {"none"}:
        if len(parsed) > 1:
            raise DataError("label repeats 'none'", file, line)
        return []
    if "none" in names:
        raise DataError("label mixes 'none' with opacity boxes", file, line)
    boxes = []
    for _, _, x1, y1, x2, y2 in parsed:
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"degenerate box in label ({x1:g} {y1:g} {x2:g} {y2:g})", file, line)
        boxes.append([x1, y1, x2, y2])
    return boxes


def boxes_agree(a: list[list[float]], b: list[list[float]], tol: float = BOX_TOL) -> bool:
    """Same boxes in any order, within `tol` pixels."""
    if len(a) != len(b):
        return False
    if not a:
        return True
    a_sorted, b_sorted = np.array(sorted(a)), np.array(sorted(b))
    return bool(np.all(np.abs(a_sorted - b_sorted) <= tol + 1e-6 * np.abs(a_sorted)))


def read_image_level(path: str | os.PathLike, problems: Problems) -> pd.DataFrame:
    """train_image_level.csv -> image_id, study_id, boxes (original pixels), line.

    ``.attrs["listed_images"]`` / ``["listed_studies"]`` hold every id the file names, rows
    skipped for errors included, so that a skipped row is not reported twice.
    """
    df = IMAGE_LEVEL.read(path)
    rows, seen = [], {}
    for k, rec in enumerate(df.itertuples(index=False)):
        line = file_line(df, k)
        try:
            image_id = _strip_suffix(rec.id, IMAGE_SUFFIX, path, line)
            if image_id in seen:
                raise DataError(f"duplicate image id '{rec.id}' (first on line {seen[image_id]})", path, line)
            if not rec.StudyInstanceUID.strip():
                raise DataError("empty StudyInstanceUID", path, line)
            from_boxes = parse_boxes_cell(rec.boxes, path, line)
            from_label = label_boxes(parse_label_string(rec.label, path, line), path, line)
            if not boxes_agree(from_boxes, from_label):
                raise DataError(
                    f"boxes column ({len(from_boxes)} boxes) and label ({len(from_label)} boxes) disagree", path, line
                )
        except DataError as e:
            problems.add(e)
            continue
        seen[image_id] = line
        rows.append({"image_id": image_id, "study_id": rec.StudyInstanceUID.strip(), "boxes": from_label, "line": line})
    out = pd.DataFrame(rows, columns=["image_id", "study_id", "boxes", "line"])
    out.attrs["listed_images"] = {i[: -len(IMAGE_SUFFIX)] if i.endswith(IMAGE_SUFFIX) else i for i in df.id}
    out.attrs["listed_studies"] = {s.strip() for s in df.StudyInstanceUID}
    return out


def read_study_level(path: str | os.PathLike, problems: Problems) -> pd.DataFrame:
    """train_study_level.csv -> study_id, study_label (one of STUDY_CLASSES), line."""
    cols = [STUDY_COLUMNS[c] for c in STUDY_CLASSES]
    df = STUDY_LEVEL.read(path)
    rows, seen = [], {}
    for k, rec in enumerate(df.to_dict("records")):
        line = file_line(df, k)
        try:
            study_id = _strip_suffix(rec["id"], STUDY_SUFFIX, path, line)
            if study_id in seen:
                raise DataError(f"duplicate study id '{rec['id']}' (first on line {seen[study_id]})", path, line)
            values = [rec[c].strip() for c in cols]
            if any(v not in {"0", "1", "0.0", "1.0"} for v in values):
                raise DataError(f"class columns must be 0 or 1, got {values}", path, line)
            ones = [c for c, v in zip(STUDY_CLASSES, values) if float(v) == 1]
            if len(ones) != 1:
                raise DataError(f"exactly one class must be 1, got {len(ones)}", path, line)
        except DataError as e:
            problems.add(e)
            continue
        seen[study_id] = line
        rows.append({"study_id": study_id, "study_label": ones[0], "line": line})
    return pd.DataFrame(rows, columns=["study_id", "study_label", "line"])


def find_dicoms(split_dir: str | os.PathLike) -> pd.DataFrame:
    """Walk <split>/<study>/<series>/<image>.dcm -> image_id, study_id, series_id, path."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError("folder not found", split_dir)
    rows, seen = [], {}
    for dirpath, _, files in os.walk(split_dir):
        for name in files:
            if not name.endswith(".dcm"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(split_dir).parts
            if len(rel) != 3:
                raise DataError("expected <split>/<study>/<series>/<image>.dcm", path)
            image_id = path.stem
            if image_id in seen:
                raise DataError(f"image id '{image_id}' appears twice (also {seen[image_id]})", path)
            seen[image_id] = path
            rows.append({"image_id": image_id, "study_id": rel[0], "series_id": rel[1], "path": str(path)})
    df = pd.DataFrame(rows, columns=["image_id", "study_id", "series_id", "path"])
    return df.sort_values("image_id", ignore_index=True)


def read_sample_submission(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """sample_submission.csv -> (study ids, image ids), suffixes stripped (an id twice: SAMPLE's key refuses it)."""
    df = SAMPLE.read(path)
    studies, images = [], []
    for k, value in enumerate(df["id"]):
        line = file_line(df, k)
        if value.endswith(STUDY_SUFFIX):
            studies.append(value[: -len(STUDY_SUFFIX)])
        elif value.endswith(IMAGE_SUFFIX):
            images.append(value[: -len(IMAGE_SUFFIX)])
        else:
            raise DataError(f"id '{value}' ends in neither _study nor _image", path, line)
    return studies, images


def load_train(root: str | os.PathLike, problems: Problems) -> pd.DataFrame:
    """Join the two train CSVs and the DICOM tree into one row per image, checking all three agree.

    Columns: image_id, study_id, series_id, path, boxes, study_label, line.
    """
    root = Path(root)
    image_csv, study_csv = root / IMAGE_CSV, root / STUDY_CSV
    images = read_image_level(image_csv, problems)
    studies = read_study_level(study_csv, problems)
    dicoms = find_dicoms(root / "train").set_index("image_id")
    labels = dict(zip(studies.study_id, studies.study_label))
    rows = []
    for rec in images.itertuples(index=False):
        if rec.study_id not in labels:
            problems.add(DataError(f"image {rec.image_id}: study {rec.study_id} is not in {STUDY_CSV}", image_csv, rec.line))
            continue
        if rec.image_id not in dicoms.index:
            problems.add(DataError(f"missing DICOM for image {rec.image_id} under {root / 'train'}", image_csv, rec.line))
            continue
        d = dicoms.loc[rec.image_id]
        if d.study_id != rec.study_id:
            problems.add(
                DataError(
                    f"image {rec.image_id} lies under study folder {d.study_id}, CSV says {rec.study_id}", image_csv, rec.line
                )
            )
            continue
        rows.append(
            {
                "image_id": rec.image_id,
                "study_id": rec.study_id,
                "series_id": d.series_id,
                "path": d.path,
                "boxes": rec.boxes,
                "study_label": labels[rec.study_id],
                "line": rec.line,
            }
        )
    for rec in studies.itertuples(index=False):
        if rec.study_id not in images.attrs["listed_studies"]:
            problems.add(DataError(f"study {rec.study_id} has no image in {IMAGE_CSV}", study_csv, rec.line))
    extra = [i for i in dicoms.index if i not in images.attrs["listed_images"]]
    if extra:
        LOGGER.warning(
            f"WARNING: {len(extra)} DICOM files under {root / 'train'} are not in {IMAGE_CSV}, ignored (e.g. {extra[0]})"
        )
    return pd.DataFrame(rows, columns=["image_id", "study_id", "series_id", "path", "boxes", "study_label", "line"])


def load_test(root: str | os.PathLike, problems: Problems) -> pd.DataFrame:
    """The test DICOM tree, cross-checked with sample_submission.csv when it exists."""
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        return pd.DataFrame(columns=["image_id", "study_id", "series_id", "path"])
    dicoms = find_dicoms(test_dir)
    sample = root / SAMPLE_SUBMISSION
    if sample.is_file():
        studies, images = read_sample_submission(sample)
        missing = sorted(set(images) - set(dicoms.image_id))
        if missing:
            problems.add(DataError(f"{len(missing)} image ids have no DICOM under {test_dir}, e.g. {missing[0]}", sample))
        extra_studies = sorted(set(dicoms.study_id) - set(studies))
        if extra_studies:
            problems.add(DataError(f"{len(extra_studies)} test studies are not listed, e.g. {extra_studies[0]}", sample))
        dicoms = dicoms[dicoms.image_id.isin(images) & dicoms.study_id.isin(studies)].reset_index(drop=True)
    return dicoms
