"""External chest X-ray sets in their own download layouts: `prepare layout=rsna` and `prepare layout=csv`.

Each becomes a prepared folder of its own (split train, folds grouped by patient), never mixed into SIIM's:

* rsna: the RSNA Pneumonia Detection Challenge (stage_2_train_labels.csv: patientId, x, y, width, height,
  Target, one row per box; stage_2_detailed_class_info.csv: patientId, class; stage_2_train_images/<id>.dcm).
  Its boxes are lung opacities, the same kind as SIIM's `opacity`: they become meta boxes, YOLO labels and
  masks exactly like SIIM's. label_names [opacity] (labels.csv: opacity = Target).
* csv: a labelled classification set given as a CSV of image paths (DICOM, PNG or JPEG) and label columns:
  CheXpert's train.csv (`label_format=columns`: 1 / 0 / -1 uncertain / blank per finding) or NIH
  ChestX-ray14's Data_Entry_2017.csv (`label_format=pipe`: "Effusion|Infiltration", "No Finding").
  label_names = the label columns kept; labels.csv holds 1.0 / 0.0 / empty (unknown) per image.

Besides the layout columns (siimcovid/data/layouts.py), the rows carry `patient_id` (folds group by it),
`file` (the CSV a row's line refers to), `stratum` (what folds stratify on) and `labels` (one value per
label name, NaN = unknown); `attrs["label_names"]` names them. Bad rows go to `problems`, naming file and line.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.data.siim import Problems
from siimcovid.registry import register
from siimcovid.tables import file_line, read_csv
from siimcovid.utils import LOGGER, DataError, SiimError

RSNA_LABELS, RSNA_CLASSES = "stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"
RSNA_IMAGES = "stage_2_train_images"
RSNA_CLASS_NAMES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")
RSNA_BOX = ["x", "y", "width", "height"]
EXTERNAL_COLUMNS = ["image_id", "study_id", "series_id", "path", "boxes", "study_label", "line", "split"]
EXTERNAL_COLUMNS += ["patient_id", "file", "stratum", "labels"]
NO_FINDING = "No Finding"  # ChestX-ray14's label of an image without any of its findings


def _number(text: str, what: str, file, line) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{what} is not a number: {text!r}", file, line) from None
    if not math.isfinite(value):
        raise DataError(f"{what} is not finite: {text!r}", file, line)
    return value


def _rsna_box(rec: dict, target: int, file, line) -> list[float] | None:
    """The box of one stage_2_train_labels.csv row as [x_min, y_min, x_max, y_max] (None for a Target 0 row)."""
    cells = [rec[c].strip() for c in RSNA_BOX]
    if not any(cells):
        if target == 1:
            raise DataError("Target 1 without a box (x, y, width, height are empty)", file, line)
        return None
    if target == 0:
        raise DataError(f"Target 0 with a box {cells}", file, line)
    x, y, w, h = (_number(v, f"box {c}", file, line) for c, v in zip(RSNA_BOX, cells))
    if w <= 0 or h <= 0:
        raise DataError(f"degenerate box (width {w:g}, height {h:g})", file, line)
    return [x, y, x + w, y + h]


def read_rsna_labels(path: Path, problems: Problems) -> dict[str, dict]:
    """stage_2_train_labels.csv -> {patientId: {"target", "boxes", "line" (first row)}}; a patient with a bad row
    is dropped whole (a part of its boxes would be a wrong label)."""
    df = read_csv(path, ["patientId", *RSNA_BOX, "Target"])
    patients: dict[str, dict] = {}
    bad: set[str] = set()
    for k, rec in enumerate(df.to_dict("records")):
        line, pid = file_line(df, k), rec["patientId"].strip()
        try:
            if not pid:
                raise DataError("empty patientId", path, line)
            if rec["Target"].strip() not in {"0", "1"}:
                raise DataError(f"Target must be 0 or 1, got {rec['Target']!r}", path, line)
            target = int(rec["Target"])
            box = _rsna_box(rec, target, path, line)
            entry = patients.setdefault(pid, {"target": target, "boxes": [], "line": line})
            if entry["target"] != target:
                raise DataError(
                    f"patient {pid}: Target {target} disagrees with Target {entry['target']} on line {entry['line']}", path, line
                )
            if box is not None:
                entry["boxes"].append(box)
        except DataError as e:
            problems.add(e)
            bad.add(pid)
    return {p: v for p, v in patients.items() if p not in bad}


def read_rsna_classes(path: Path, problems: Problems) -> dict[str, tuple[str, int]]:
    """stage_2_detailed_class_info.csv -> {patientId: (class, line)}; a patient's rows must agree."""
    df = read_csv(path, ["patientId", "class"])
    classes: dict[str, tuple[str, int]] = {}
    for k, rec in enumerate(df.to_dict("records")):
        line, pid, name = file_line(df, k), rec["patientId"].strip(), rec["class"].strip()
        try:
            if name not in RSNA_CLASS_NAMES:
                raise DataError(f"unknown class {name!r} (expected one of {list(RSNA_CLASS_NAMES)})", path, line)
            if pid in classes and classes[pid][0] != name:
                raise DataError(
                    f"patient {pid}: class {name!r} disagrees with {classes[pid][0]!r} on line {classes[pid][1]}", path, line
                )
        except DataError as e:
            problems.add(e)
            continue
        classes.setdefault(pid, (name, line))
    return classes


@register("layout", "rsna")
def rsna_layout(root: Path, splits: list[str], problems: Problems) -> pd.DataFrame:
    """The RSNA Pneumonia Detection Challenge download (train images only: its test set has no labels)."""
    if "train" not in splits:
        return pd.DataFrame(columns=EXTERNAL_COLUMNS)
    labels_csv, classes_csv, images = root / RSNA_LABELS, root / RSNA_CLASSES, root / RSNA_IMAGES
    patients = read_rsna_labels(labels_csv, problems)
    classes = read_rsna_classes(classes_csv, problems) if classes_csv.is_file() else None
    if classes is None:
        LOGGER.warning(f"WARNING: no {RSNA_CLASSES} in {root}: the detailed classes are not cross-checked")
    rows = []
    for pid, p in patients.items():
        try:
            dicom = images / f"{pid}.dcm"
            if classes is not None:
                if pid not in classes:
                    raise DataError(f"patient {pid} has no row in {RSNA_CLASSES}", labels_csv, p["line"])
                name, class_line = classes[pid]
                if (name == "Lung Opacity") != (p["target"] == 1):
                    raise DataError(
                        f"patient {pid}: class {name!r} disagrees with Target {p['target']} ({labels_csv.name}, "
                        f"line {p['line']})",
                        classes_csv,
                        class_line,
                    )
            if not dicom.is_file():
                raise DataError(f"missing DICOM {dicom}", labels_csv, p["line"])
        except DataError as e:
            problems.add(e)
            continue
        rows.append(_external_row(pid, pid, str(dicom), p["boxes"], p["line"], labels_csv, [float(p["target"])]))
    out = pd.DataFrame(rows, columns=EXTERNAL_COLUMNS)
    out["stratum"] = [f"box|{int(len(b) > 0)}" for b in out.boxes]
    out.attrs["label_names"] = ["opacity"]
    return out


def _external_row(image_id, patient_id, path, boxes, line, file, labels) -> dict:
    return {
        "image_id": image_id,
        "study_id": image_id,  # one image per study: the labels are the image's
        "series_id": "",
        "path": path,
        "boxes": boxes,
        "study_label": "",
        "line": line,
        "split": "train",
        "patient_id": patient_id,
        "file": str(file),
        "stratum": "",
        "labels": labels,
    }


# ----------------------------------------------------------------------------- layout=csv
LABEL_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None}


def label_value(text: str, uncertain: str, blank: str, column: str, file, line) -> float:
    """One CheXpert-style cell -> 1.0, 0.0 or NaN (unknown): -1 (uncertain) and blank (not mentioned) by policy."""
    text = text.strip()
    if text not in LABEL_VALUES:
        raise DataError(f"column {column!r}: {text!r} is not 1, 0, -1 or blank", file, line)
    value = LABEL_VALUES[text]
    if value is None:
        return 0.0 if blank == "zeros" else math.nan
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0}.get(uncertain, math.nan)
    return value


def label_columns(df: pd.DataFrame, cfg, path: Path) -> list[str]:
    """The label columns of a `columns`-format CSV: `labels`, each checked to exist, or every column whose values
    are all 1 / 0 / -1 / blank (at least one not blank)."""
    if cfg.labels:
        unknown = [c for c in cfg.labels if c not in df.columns]
        if unknown:
            raise DataError(f"unknown label column(s) {unknown}; the CSV has {list(df.columns)}", path, 1)
        return list(cfg.labels)
    skip = {cfg.path_column, cfg.patient_column}
    names = [
        c for c in df.columns if c not in skip and df[c].str.strip().isin(LABEL_VALUES).all() and (df[c].str.strip() != "").any()
    ]
    if not names:
        raise DataError("no label column found (columns of 1 / 0 / -1 / blank values): name them with labels=", path, 1)
    return names


def pipe_labels(df: pd.DataFrame, cfg, path: Path) -> list[str]:
    """The label names of a `pipe`-format CSV: `labels`, each checked to occur, or every finding that occurs."""
    found = {t.strip() for cell in df[cfg.label_column] for t in cell.split("|") if t.strip()}
    if cfg.labels:
        unknown = [c for c in cfg.labels if c not in found]
        if unknown:
            raise DataError(f"unknown label(s) {unknown}: column {cfg.label_column!r} has {sorted(found)}", path, 1)
        return list(cfg.labels)
    return sorted(found - {NO_FINDING})


def row_labels(rec: dict, names: list[str], cfg, path: Path, line: int) -> list[float]:
    if cfg.label_format == "pipe":
        tokens = {t.strip() for t in rec[cfg.label_column].split("|")}
        if tokens == {""}:
            raise DataError(f"empty {cfg.label_column!r} (ChestX-ray14 writes {NO_FINDING!r})", path, line)
        return [float(n in tokens) for n in names]
    return [label_value(rec[n], cfg.uncertain, cfg.blank, n, path, line) for n in names]


class ImageFinder:
    """Resolve the CSV's image paths: absolute, relative to `base`, or (a bare file name not found there) found by
    name anywhere under `root` (ChestX-ray14's images_001/images/... as Kaggle ships it)."""

    def __init__(self, root: Path, base: Path):
        self.root, self.base, self.by_name = root, base, None

    def find(self, text: str, file, line) -> Path:
        path = Path(text) if os.path.isabs(text) else self.base / text
        if path.is_file():
            return path
        if "/" not in text and "\\" not in text:
            if self.by_name is None:
                self.by_name = {}
                for folder, _, names in os.walk(self.root):
                    for n in names:
                        self.by_name.setdefault(n, []).append(Path(folder) / n)
            found = self.by_name.get(text, [])
            if len(found) > 1:
                raise DataError(f"image {text!r} is ambiguous: {len(found)} files of that name under {self.root}", file, line)
            if found:
                return found[0]
        raise DataError(f"image file not found: {path}", file, line)


def image_ids(paths: list[str]) -> list[str]:
    """Short unique-looking ids from the CSV's paths: suffix dropped, the folders every path shares dropped, the
    rest joined by '_' (CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg -> patient00001_study1_view1_frontal)."""
    parts = [Path(p.replace("\\", "/")).with_suffix("").parts for p in paths]
    common = 0
    if len(parts) > 1:
        while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
            common += 1
    else:
        common = max(len(parts[0]) - 1, 0) if parts else 0
    return [re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(p[common:])).strip("_") for p in parts]


def patient_of(rec: dict, path_text: str, image_id: str, cfg, file, line) -> str:
    if cfg.patient_column:
        value = rec[cfg.patient_column].strip()
        if not value:
            raise DataError(f"empty {cfg.patient_column!r}", file, line)
        return value
    if cfg.patient_pattern:
        match = re.search(cfg.patient_pattern, path_text)
        if not match:
            raise DataError(f"patient_pattern {cfg.patient_pattern!r} does not match {path_text!r}", file, line)
        return match.group(1) if match.groups() else match.group(0)
    return image_id  # one patient per image


@register("layout", "csv")
def csv_layout(root: Path, splits: list[str], problems: Problems, cfg=None) -> pd.DataFrame:
    """A labelled classification set: a CSV of image paths and label columns (settings: cfg/prepare.yaml)."""
    if cfg is None or not cfg.csv:
        raise SiimError("layout=csv needs csv=<the CSV of image paths and labels, relative to data>")
    if "train" not in splits:
        return pd.DataFrame(columns=EXTERNAL_COLUMNS)
    path = root / cfg.csv
    required = [cfg.path_column] + [c for c in (cfg.patient_column,) if c]
    required += [cfg.label_column] if cfg.label_format == "pipe" else []
    df = read_csv(path, required)
    names = pipe_labels(df, cfg, path) if cfg.label_format == "pipe" else label_columns(df, cfg, path)
    finder = ImageFinder(root, root / cfg.image_dir if cfg.image_dir else root)
    ids = image_ids([str(v).strip() for v in df[cfg.path_column]])
    rows, seen = [], {}
    for k, (rec, image_id) in enumerate(zip(df.to_dict("records"), ids)):
        line, text = file_line(df, k), rec[cfg.path_column].strip()
        try:
            if not text:
                raise DataError(f"empty {cfg.path_column!r}", path, line)
            if image_id in seen:
                raise DataError(f"image {text!r} listed twice (first on line {seen[image_id]})", path, line)
            labels = row_labels(rec, names, cfg, path, line)
            patient = patient_of(rec, text, image_id, cfg, path, line)
            image = finder.find(text, path, line)
        except DataError as e:
            problems.add(e)
            continue
        seen[image_id] = line
        row = _external_row(image_id, patient, str(image), [], line, path, labels)
        row["stratum"] = f"{names[0]}|{'?' if np.isnan(labels[0]) else int(labels[0])}"
        rows.append(row)
    out = pd.DataFrame(rows, columns=EXTERNAL_COLUMNS)
    out.attrs["label_names"] = names
    return out
