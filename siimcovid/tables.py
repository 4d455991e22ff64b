"""The tables that cross a stage boundary: one declared contract each, used by writer and reader.

A contract (`Table`) names its columns in the order they are written, each with a dtype, an
optional range and a one-line meaning. The stage that writes a table calls `TABLE.write(df, path)`
(checks the columns, orders them, full float precision, atomic); the stage that reads it calls
`TABLE.read(path)` (types every column; the first bad value is a `DataError` naming the file and
line). Required columns are what a reader needs; a writer from elsewhere (another detector
family, a notebook) only has to provide those. Extra columns are kept by `read` and dropped by
`write`.

A contract with a `key` (the columns that identify a row, e.g. CLASSIFIER_IMAGES: image_id, fold,
model) has one row per key: `read` refuses a file with two, naming both lines (two probabilities of
one image would otherwise be averaged, or one would win, in silence), and `write` refuses to write
one (a bug of ours). An optional key column counts where a file has it. Tables of many rows per id
have no key: DETECTIONS, PREDICTIONS and the *_BOXES tables (boxes), SKIPPED (several problems of
one file). Every file is read whole, a regular file only (a FIFO or /dev/zero is refused, not read),
UTF-8, and no larger than the contract's `max_bytes` where the format has a natural size (the
competition's CSVs).

A small module of our own rather than pandera: the errors must name the CSV file and line the way
every other input error of siimcovid does, and the contracts are a dozen lines of data.

| table | written by | file(s) | read by |
|---|---|---|---|
| META | prepare | runs/prepare/<name>/meta.csv | every stage (siimcovid.data.prepared.Prepared) |
| DETECTIONS | detect predict (or any detector) | runs/detect/<name>/pred_{oof,test}.csv | fuse |
| CLASSIFIER_IMAGES | classify predict | runs/classify/<name>/pred_{oof,test}_image.csv | fuse, classify ensembles |
| CLASSIFIER_STUDIES | classify predict | runs/classify/<name>/pred_{oof,test}_study.csv | classify ensembles |
| NONE_IMAGES | classify predict of a task=none run | runs/classify/<name>/pred_{oof,test}_none.csv | fuse (none_cls=) |
| PREDICTIONS | fuse | runs/fuse/<name>/pred_{oof,test}.csv | report, evaluate (as the metric's rows) |
| FUSED_IMAGES / FUSED_STUDIES / FUSED_BOXES | fuse | runs/fuse/<name>/{images,studies,boxes}_<split>.csv | people, report |
| SUBMISSION | fuse, predict | submission.csv, oof_submission.csv | evaluate, Kaggle |
| SCORES | detect/classify predict, fuse | scores_oof.csv of each stage | runs, people |
| SKIPPED | prepare (on_error=skip) | runs/prepare/<name>/skipped.csv | fuse (Prepared.was_skipped), people |
| EXTERNAL_LABELS | prepare layout=rsna, csv | runs/prepare/<name>/labels.csv | extra training data (pretraining) |
| LUNG_BOXES | prepare lung_boxes= | runs/prepare/<name>/lungs.csv | the lung detector's data and score, lung crops |
| TRUTH | siimcovid.data.truth (in memory, not a file) | - | the metric (siimcovid.metrics): every score |
| CLASSIFIER_FOLDS | classify predict per_fold=true | runs/classify/<name>/pred_test_image_folds.csv | pseudo |
| PSEUDO_LABELS | pseudo | runs/pseudo/<name>/labels.csv | extra training data (siimcovid.data.extra.ExtraData) |
| PSEUDO_BOXES | pseudo | runs/pseudo/<name>/boxes.csv | people (the boxes are also the folder's YOLO labels) |
| COPIES | pseudo (dedup=drop) | runs/pseudo/<name>/copies.csv | people (the pool images left out as SIIM's own) |
| DISTILL_TARGETS | classify train distill= | runs/classify/<student>/fold<k>/distill_targets.csv | its fold k (a cache) |
| DISTILL_BOXES | detect train distill= | runs/detect/<student>/distill/fold<k>/boxes.csv | people (also the fold's YOLO labels) |
| PREDICTED_STUDIES / PREDICTED_IMAGES / PREDICTED_BOXES | predict | <out>/{studies,images,boxes}.csv | people |
| DICOM_RESULTS | predict dicom= | <out>/dicom.csv | people, a DICOM node (the objects under <out>/dicom/) |

The competition's own CSVs, as Kaggle ships them (and `siimcovid synth` writes them), are
contracts too: IMAGE_LEVEL (train_image_level.csv), STUDY_LEVEL (train_study_level.csv) and
SAMPLE (sample_submission.csv), read by siimcovid.data.siim. Their cells are text: the parsers
of siimcovid.data.siim check them row by row (boxes literals, label strings, 0/1 class columns,
an id listed twice) and can skip a bad row (on_error=skip) instead of stopping at it; so these
three declare no key (a key would stop at a duplicate that on_error=skip drops and lists).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from siimcovid.utils import DataError, SiimError, atomic_path, decode_utf8, read_input

STUDY_CLASSES = ["negative", "typical", "indeterminate", "atypical"]  # column order of every probability table
IMAGE_CLASSES = ["opacity", "none"]
CLASSES = STUDY_CLASSES + IMAGE_CLASSES  # the six classes the metric scores, in the order tables print them
BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]  # a box in ORIGINAL DICOM pixels unless a table says otherwise
STUDY_SUFFIX, IMAGE_SUFFIX = "_study", "_image"  # submission and metric ids: <study>_study, <image>_image
WHOLE = (0.0, 0.0, 1.0, 1.0)  # the box of study classes and of `none`
IMAGE_CSV, STUDY_CSV = "train_image_level.csv", "train_study_level.csv"  # the competition's files, in the SIIM root
SAMPLE_SUBMISSION = "sample_submission.csv"
STUDY_COLUMNS = {  # the column of train_study_level.csv for each study class
    "negative": "Negative for Pneumonia",
    "typical": "Typical Appearance",
    "indeterminate": "Indeterminate Appearance",
    "atypical": "Atypical Appearance",
}
TEXT, INT, FLOAT, JSON = "str", "int", "float", "json"
MAX_COLUMNS = 1000  # the widest table read here (an external set's labels) has a few dozen
# The competition's CSVs have a natural size: one row per test study and image (2,477 rows, ~0.5 MB with a few boxes
# an image), or per train image (6,334). An out-of-fold submission of every train image with 100 boxes each is ~40 MB:
# 256 MiB leaves room for more members' boxes and still refuses, before reading it, a file that is no such CSV.
COMPETITION_CSV_MAX_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------- reading CSVs
def file_lines(df: pd.DataFrame) -> np.ndarray:
    """The file line where each row of a frame read by `read_csv` starts (header = line 1; blank lines and the
    extra lines of quoted fields that span lines count): its index + 2."""
    return df.index.to_numpy() + 2


def file_line(df: pd.DataFrame, position: int) -> int:
    """The file line of one row (by position) of a frame read by `read_csv`."""
    return int(file_lines(df)[position])


def _count_lines(data: bytes) -> int:
    """Lines of a file's bytes as a text editor counts them (\\n, \\r\\n or \\r ends a line)."""
    ends = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return ends + (1 if data and not data.endswith((b"\n", b"\r")) else 0)


def _record_lines(data: bytes) -> np.ndarray:
    """The file line on which each CSV record (header included, blank lines as empty records) starts."""
    reader = csv.reader(io.StringIO(data.decode("utf-8", errors="replace"), newline=""))
    starts, end = [], 0
    try:
        for _ in reader:
            starts.append(end + 1)
            end = reader.line_num
    except csv.Error:  # pandas read it: keep what was counted, the caller checks the count
        pass
    return np.array(starts, dtype=np.int64)


def csv_bytes(path: str | os.PathLike, max_bytes: int | None = None, what: str = "CSV") -> bytes:
    """The bytes of an input CSV: a regular file of at most max_bytes (utils.read_input), checked to be UTF-8
    (utils.decode_utf8: the error names the line)."""
    data = read_input(path, max_bytes, what)
    decode_utf8(data, path)
    return data


def read_csv(
    path: str | os.PathLike, required: list[str], text: list[str] | None = None, data: bytes | None = None
) -> pd.DataFrame:
    """Read a CSV, check its columns; the one CSV reader for inputs whose errors name file and line.

    text: columns read as strings (None: every column, nothing inferred). Blank lines are
    dropped but counted: a row's file line is `file_line(df, i)`, i.e. its index + 2, where the
    index counts file lines (a quoted field spanning lines moves the rows after it down).
    data: the file's bytes when the caller read them already (csv_bytes).
    """
    path = Path(path)
    dtype = str if text is None else {c: str for c in text}
    data = csv_bytes(path) if data is None else data
    columns = data.split(b"\n", 1)[0].count(b",") + 1
    if columns > MAX_COLUMNS:  # pandas would spend minutes and gigabytes on such a header before any check
        raise DataError(f"{columns} columns on its first line (the tables read here have at most {MAX_COLUMNS})", path)
    try:
        df = pd.read_csv(io.BytesIO(data), dtype=dtype, keep_default_na=False, skip_blank_lines=False, low_memory=False)
    except pd.errors.ParserError as e:
        raise DataError(f"malformed CSV: {e}", path) from None
    except pd.errors.EmptyDataError:
        raise DataError("empty CSV (not even a header)", path) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        found = list(df.columns[:20]) + ([f"... {len(df.columns) - 20} more"] if len(df.columns) > 20 else [])
        raise DataError(f"missing column(s) {missing[:20]}; expected {required} (found {found})", path)
    if len(df) and _count_lines(data) > len(df) + 1:  # a quoted field spans lines: find the line each record starts on
        starts = _record_lines(data)
        if len(starts) == len(df) + 1 and (starts[1:] - 2 != df.index.to_numpy()).any():
            df.index = pd.Index(starts[1:] - 2)
    blank = df.replace("", np.nan).isna().all(axis=1) if len(df.columns) else pd.Series(False, index=df.index)
    return df[~blank.to_numpy()]


def first_bad(mask, path, message: str, df: pd.DataFrame | None = None) -> None:
    """Raise DataError(message, path, line of the first True in mask); mask is a Series on df's index or an array."""
    index = mask.index if isinstance(mask, pd.Series) else (df.index if df is not None else None)
    values = np.asarray(mask, dtype=bool)
    if values.any():
        i = int(np.flatnonzero(values)[0])
        raise DataError(message, path, (int(index[i]) if index is not None else i) + 2)


def to_numbers(df: pd.DataFrame, columns: list[str], path, nullable=()) -> None:
    """Columns -> float64 in place; the first non-number or non-finite value is an error (file, line).

    nullable: columns where an empty cell is a missing value (NaN), e.g. the AP of a class not scored."""
    for c in columns:
        empty = df[c].astype(str).to_numpy() == ""
        values = pd.to_numeric(df[c].replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if c in nullable:
            bad &= ~empty
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"column {c}: not a finite number: {df[c].iloc[i]!r}", path, file_line(df, i))
        df[c] = values


# ----------------------------------------------------------------------------- contracts
@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # str | int | float | json (a JSON list in a text cell)
    doc: str
    required: bool = True  # a reader needs it; optional columns are written when the writer has them
    nullable: bool = False  # an empty cell is a missing value (NaN) rather than an error
    lo: float | None = None  # inclusive range of a number column
    hi: float | None = None


@dataclass(frozen=True)
class Table:
    """A CSV that one stage writes and another reads (see the module docstring)."""

    name: str
    files: str
    columns: tuple[Column, ...]
    doc: str = ""
    checks: tuple[Callable[[pd.DataFrame, Path], None], ...] = field(default=())
    extra: Column | None = None  # a table with free columns (one per label): each column not declared is of this kind
    key: tuple[str, ...] = ()  # the columns that identify a row (an optional one counts where a file has it)
    max_bytes: int | None = None  # the largest file of a format with a natural size (read refuses a larger one)

    @property
    def names(self) -> list[str]:
        """Every declared column, in the order written."""
        return [c.name for c in self.columns]

    def with_extra(self, names) -> list[Column]:
        """The declared columns, then (for a table with `extra`) those of `names` not declared, typed like `extra`."""
        if self.extra is None:
            return list(self.columns)
        return list(self.columns) + [replace(self.extra, name=n, required=False) for n in names if n not in self.names]

    @property
    def required(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    def empty(self) -> pd.DataFrame:
        """A frame with no rows and every column of its dtype."""
        kinds = {TEXT: object, JSON: object, INT: np.int64, FLOAT: np.float64}
        return pd.DataFrame({c.name: pd.Series(dtype=kinds[c.dtype]) for c in self.columns})

    def read(self, path: str | os.PathLike) -> pd.DataFrame:
        """Read and check a file of this table: typed columns, ranges, the table's checks, its key (errors name file
        and line)."""
        path = Path(path)
        data = csv_bytes(path, self.max_bytes, f"{self.name} file")
        header = _header(data)
        present = [c for c in self.with_extra(header) if c.required or c.name in header]
        df = read_csv(path, self.required, text=[c.name for c in present if c.dtype in (TEXT, JSON)], data=data)
        numeric = [c.name for c in present if c.dtype in (INT, FLOAT)]
        to_numbers(df, numeric, path, nullable=[c.name for c in present if c.nullable])
        for c in present:
            if c.dtype == INT:
                whole = (df[c.name] == np.round(df[c.name])) | df[c.name].isna()  # NaN: an empty cell of a nullable column
                first_bad(~whole, path, f"{c.name} must be an integer")
                df[c.name] = df[c.name].astype("Int64" if c.nullable else np.int64)
            elif c.dtype == JSON:
                df[c.name] = [_json_cell(v, c.name, path, file_line(df, i)) for i, v in enumerate(df[c.name])]
            if c.lo is not None or c.hi is not None:
                lo = -np.inf if c.lo is None else c.lo
                hi = np.inf if c.hi is None else c.hi
                values = df[c.name].astype(np.float64)  # a nullable int's missing value -> NaN, which passes
                first_bad((values < lo) | (values > hi), path, f"{c.name} must be in [{lo:g}, {hi:g}]")
        for check in self.checks:
            check(df, path)
        repeated = self.repeated(df)
        if repeated:
            first, again = repeated
            raise DataError(
                f"duplicate {self._key_text(df, again)} (first on line {file_line(df, first)}): "
                f"a {self.name} file has one row per {', '.join(self.key_in(df.columns))}",
                path,
                file_line(df, again),
            )
        return df

    def key_in(self, columns) -> list[str]:
        """The key columns a frame has (an optional one, e.g. the model of a classifier file, may be absent)."""
        return [c for c in self.key if c in columns]

    def repeated(self, df: pd.DataFrame) -> tuple[int, int] | None:
        """Positions (first, again) of the first row whose key an earlier row already has; None if every key is unique.
        Two rows of one key would be merged, or one would win, in silence (e.g. two probabilities of one image)."""
        key = self.key_in(df.columns)
        if not key or len(df) < 2:
            return None
        codes = df.groupby(key, sort=False, dropna=False).ngroup().to_numpy()
        again = np.flatnonzero(pd.Series(codes).duplicated().to_numpy())
        if not len(again):
            return None
        return int(np.flatnonzero(codes == codes[again[0]])[0]), int(again[0])

    def _key_text(self, df: pd.DataFrame, position: int) -> str:
        values = df.iloc[position]
        return ", ".join(f"{c} {v!r}" if isinstance(v := values[c], str) else f"{c} {v}" for c in self.key_in(df.columns))

    def check(self, df: pd.DataFrame, where: str = "") -> pd.DataFrame:
        """The columns a writer owes (required ones, and optional ones it has), in the written order."""
        missing = [c for c in self.required if c not in df.columns]
        if missing:
            raise SiimError(f"{where or self.name}: table lacks column(s) {missing} of the {self.name} contract ({self.files})")
        return df[[c.name for c in self.with_extra(df.columns) if c.name in df.columns]]

    def write(self, df: pd.DataFrame, path: str | os.PathLike, float_format: str | None = None) -> Path:
        """Write atomically at full float precision (rounding would tie scores and move AP), columns in contract order."""
        out = self.check(df, str(path))
        repeated = self.repeated(out)
        if repeated:  # the readers refuse such a file: a bug upstream, not the user's
            raise SiimError(
                f"{path}: not written: its rows {repeated[0] + 1} and {repeated[1] + 1} share {self._key_text(out, repeated[1])} "
                f"(a {self.name} table has one row per {', '.join(self.key_in(out.columns))}); "
                "a bug of siimcovid: please report it"
            )
        dump = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
        columns = self.with_extra(out.columns)
        out = out.assign(**{c.name: [dump(v) for v in out[c.name]] for c in columns if c.dtype == JSON and c.name in out})
        nullable_ints = [c.name for c in columns if c.dtype == INT and c.nullable and c.name in out]
        out = out.astype(dict.fromkeys(nullable_ints, "Int64"))  # 14, not 14.0, beside the empty cells
        return write_csv(out, path, float_format=float_format)


def write_csv(df: pd.DataFrame, path: str | os.PathLike, **kwargs) -> Path:
    """Write a DataFrame as CSV atomically (no index)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)
    return Path(path)


def _header(data: bytes) -> list[str]:
    """The column names of a CSV's first line (read_csv checks the rest)."""
    first = data.split(b"\n", 1)[0].split(b"\r", 1)[0]
    return [h.strip() for h in first.decode("utf-8-sig").split(",")]


def _json_cell(text, column: str, path, line: int):
    if text in ("", None):
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"column {column}: not JSON: {str(text)[:60]!r}", path, line) from None


def _boxes_ordered(df: pd.DataFrame, path) -> None:
    first_bad((df["x_max"] < df["x_min"]) | (df["y_max"] < df["y_min"]), path, "box has x_max < x_min or y_max < y_min")


def _one_study_per_image(df: pd.DataFrame, path) -> None:
    """An image belongs to one study: a second study_id for it is an error (before the key: it says more)."""
    studies = df.groupby("image_id")["study_id"].transform("nunique").to_numpy()
    clash = (studies > 1) & df["image_id"].duplicated().to_numpy()
    if clash.any():
        first_bad(clash, path, f"image {df['image_id'].iloc[int(np.flatnonzero(clash)[0])]} has two study_ids", df)


def _not_empty(*columns: str):
    def check(df: pd.DataFrame, path) -> None:
        for c in columns:
            first_bad(df[c] == "", path, f"empty {c}")

    return check


def _file_names(*columns: str):
    """Ids that name files (prepare's images, a student's labels): one file name each, never a path that leaves its
    folder (a hostile meta.csv would otherwise write outside the run)."""

    def check(df: pd.DataFrame, path) -> None:
        for c in columns:
            text = df[c].astype(str)
            bad = text.str.contains(r"[/\\\x00]", regex=True) | text.isin([".", ".."])
            first_bad(bad, path, f"{c} is not a file name (a path separator, NUL, '.' or '..')")

    return check


_BOX = [Column(c, FLOAT, f"box {c[0]} {c[2:]} in ORIGINAL DICOM pixels") for c in BOX_COLUMNS]

META = Table(
    "meta",
    "runs/prepare/<name>/meta.csv",
    (
        Column("image_id", TEXT, "SOP instance UID, without _image"),
        Column("study_id", TEXT, "StudyInstanceUID (the study folder name)"),
        Column("series_id", TEXT, "series folder name"),
        Column("patient_id", TEXT, "DICOM PatientID (or the external CSV's patient column); folds group by it"),
        Column("split", TEXT, "train | test"),
        Column("fold", INT, "0..n_folds-1 for train, -1 for test", lo=-1),
        Column("study_label", TEXT, "negative | typical | indeterminate | atypical ('' for test and external data)"),
        Column("boxes", JSON, "[[x_min, y_min, x_max, y_max], ...] in original pixels, clipped to the image"),
        Column("n_boxes", INT, "number of boxes", lo=0),
        Column("rows", INT, "original height in pixels", lo=1),
        Column("cols", INT, "original width in pixels", lo=1),
        Column("photometric", TEXT, "MONOCHROME1 | MONOCHROME2 ('' for a PNG/JPEG input, as the other DICOM-only facts)"),
        Column("bits_stored", INT, "DICOM BitsStored (a PNG/JPEG input: its bit depth, 8 or 16)"),
        Column("transfer_syntax", TEXT, "DICOM transfer syntax UID"),
        Column("voi", TEXT, "lut | window | '' (what the conversion applied)"),
        Column("modality", TEXT, "DICOM Modality"),
        Column("body_part", TEXT, "DICOM BodyPartExamined ('' where the file has none)", required=False),
        Column("view_position", TEXT, "DICOM ViewPosition: AP, PA, LL... ('' where the file has none)", required=False),
        Column("dicom", TEXT, "path of the input file (DICOM, PNG or JPEG) relative to the data root"),
    ),
    "One row per prepared image, train and test; written last by prepare (its presence marks a finished prepare).",
    checks=(_file_names("image_id"),),
    key=("image_id",),
)

DETECTIONS = Table(
    "detections",
    "runs/detect/<name>/pred_{oof,test}.csv",
    (
        Column("image_id", TEXT, "SOP instance UID, without _image"),
        Column("model", TEXT, "the detector's name (the run name): fusion weights and groups by it"),
        Column("fold", INT, "the fold whose model predicted the box (out of fold: the image's own fold)"),
        *_BOX,
        Column("conf", FLOAT, "the detector's confidence", lo=0.0, hi=1.0),
        Column("tta", TEXT, "optional: a TTA variant (orig, hflip...); each variant is its own fusion member", required=False),
    ),
    "One row per predicted opacity box. Out of fold: each train image by its own fold's model; test: every fold's "
    "model on every test image. An image with no box has no row. Any detector family that writes this table can be fused.",
    checks=(_not_empty("image_id", "model"), _boxes_ordered),
)

_PROBS = [Column(c, FLOAT, f"P({c}) of the study, softmax of the study head", lo=0.0, hi=1.0) for c in STUDY_CLASSES]
_NONE = Column("none", FLOAT, "P(image has no opacity) from the none head; P(negative) without one", lo=0.0, hi=1.0)

CLASSIFIER_IMAGES = Table(
    "classifier images",
    "runs/classify/<name>/pred_{oof,test}_image.csv",
    (
        Column("model", TEXT, "run name (an ensemble: names joined by '+')", required=False),
        Column("image_id", TEXT, "SOP instance UID, without _image"),
        Column("study_id", TEXT, "StudyInstanceUID"),
        Column("fold", INT, "oof: the fold the image was held out in; test: -1", required=False),
        *_PROBS,
        Column(_NONE.name, FLOAT, _NONE.doc, required=False, lo=0.0, hi=1.0),
    ),
    "One row per image and fold model (rows of one image from several folds or models are averaged by fusion; two "
    "rows of one image, fold and model are an error).",
    checks=(_not_empty("image_id"), _one_study_per_image),
    key=("image_id", "fold", "model"),
)

CLASSIFIER_STUDIES = Table(
    "classifier studies",
    "runs/classify/<name>/pred_{oof,test}_study.csv",
    (
        Column("model", TEXT, "run name"),
        Column("study_id", TEXT, "StudyInstanceUID"),
        Column("fold", INT, "oof: the study's fold; test: -1"),
        Column("n_images", INT, "images averaged", lo=1),
        *_PROBS,
        _NONE,
    ),
    "One row per study: the mean over the study's images.",
    key=("study_id", "fold", "model"),
)

NONE_IMAGES = Table(
    "none images",
    "runs/classify/<name>/pred_{oof,test}_none.csv",
    (
        Column("model", TEXT, "run name of the none model (fusion weights and bundle members key on it)", required=False),
        Column("image_id", TEXT, "SOP instance UID, without _image"),
        Column("study_id", TEXT, "StudyInstanceUID (checked against the prepared data when present)", required=False),
        Column("fold", INT, "oof: the fold the image was held out in; test: -1", required=False),
        Column("none", FLOAT, "P(image has no opacity box) of a binary none model (classify task=none)", lo=0.0, hi=1.0),
    ),
    "One row per image and fold model of a binary none model (`classify train task=none`): what `siimcovid fuse "
    "none_cls=` blends with the classifiers' none (none_model_weight). Rows of one image from several folds are "
    "averaged by fusion; two rows of one image, fold and model are an error.",
    checks=(_not_empty("image_id"),),
    key=("image_id", "fold", "model"),
)

PREDICTIONS = Table(
    "predictions",
    "runs/fuse/<name>/pred_{oof,test}.csv",
    (
        Column("id", TEXT, "<study>_study or <image>_image"),
        Column("cls", TEXT, "negative | typical | indeterminate | atypical | opacity | none"),
        Column("conf", FLOAT, "confidence"),
        *_BOX,
    ),
    "The metric's tidy predictions, one row per predicted box or class (0 0 1 1 for study classes and none).",
)

TRUTH = Table(
    "truth",
    "(in memory: siimcovid.data.truth)",
    (
        Column("id", TEXT, "<study>_study or <image>_image"),
        Column("cls", TEXT, "a study class, opacity or none"),
        *_BOX,
    ),
    "The metric's ground truth, one row per true box or class (0 0 1 1 for study classes and none).",
)

FUSED_IMAGES = Table(
    "fused images",
    "runs/fuse/<name>/images_<split>.csv",
    (
        Column("image_id", TEXT, "SOP instance UID"),
        Column("study_id", TEXT, "StudyInstanceUID"),
        Column("fold", INT, "the image's fold (test: -1)"),
        Column("rows", INT, "original height"),
        Column("cols", INT, "original width"),
        Column("n_boxes", INT, "fused boxes"),
        Column("none_cls", FLOAT, "the classifiers' none, the none models' blended in (empty without either)", nullable=True),
        Column("none_det", FLOAT, "the detectors' none (empty without detection files)", nullable=True),
        Column("none_model", FLOAT, "the none models' none (fuse none_cls=; empty without)", required=False, nullable=True),
        Column("none", FLOAT, "the none written"),
    ),
    key=("image_id",),
)

FUSED_STUDIES = Table(
    "fused studies",
    "runs/fuse/<name>/studies_<split>.csv",
    (Column("study_id", TEXT, "StudyInstanceUID"), *[Column(c, FLOAT, f"P({c})") for c in STUDY_CLASSES]),
    key=("study_id",),
)

FUSED_BOXES = Table(
    "fused boxes",
    "runs/fuse/<name>/boxes_<split>.csv",
    (
        Column("image_id", TEXT, "SOP instance UID"),
        Column("conf", FLOAT, "the confidence written"),
        Column("wbf_conf", FLOAT, "WBF's confidence before the (1 - none)^a re-weighting"),
        *_BOX,
    ),
)

SUBMISSION = Table(
    "submission",
    "submission.csv",
    (
        Column("id", TEXT, "<study>_study or <image>_image"),
        Column("PredictionString", TEXT, "groups of `class conf x_min y_min x_max y_max` (see siimcovid.submission)"),
    ),
    key=("id",),
    max_bytes=COMPETITION_CSV_MAX_BYTES,
)

SAMPLE = Table(
    "sample submission",
    f"<SIIM root>/{SAMPLE_SUBMISSION}",
    SUBMISSION.columns,
    "The competition's list of test ids (<study>_study, <image>_image), in the submission's format.",
    max_bytes=COMPETITION_CSV_MAX_BYTES,
    key=("id",),  # one row per id: a sample listing one twice would make a submission with it twice
)

IMAGE_LEVEL = Table(
    "train image level",
    f"<SIIM root>/{IMAGE_CSV} (and <root>/test_truth/ of synthetic data)",
    (
        Column("id", TEXT, "<image>_image"),
        Column("boxes", TEXT, "Python literal list of {'x', 'y', 'width', 'height'} dicts, original pixels; empty: none"),
        Column("label", TEXT, "groups of `opacity 1 x_min y_min x_max y_max`, or `none 1 0 0 1 1`"),
        Column("StudyInstanceUID", TEXT, "the image's study"),
    ),
    "The competition's image labels, one row per train image (checked by siimcovid.data.siim.read_image_level).",
    max_bytes=COMPETITION_CSV_MAX_BYTES,
)

STUDY_LEVEL = Table(
    "train study level",
    f"<SIIM root>/{STUDY_CSV} (and <root>/test_truth/ of synthetic data)",
    (
        Column("id", TEXT, "<study>_study"),
        *[Column(STUDY_COLUMNS[c], TEXT, f"1 if the study is {c}, else 0") for c in STUDY_CLASSES],
    ),
    "The competition's study labels, one row per train study, exactly one class 1 "
    "(checked by siimcovid.data.siim.read_study_level).",
    max_bytes=COMPETITION_CSV_MAX_BYTES,
)

SKIPPED = Table(
    "skipped",
    "runs/prepare/<name>/skipped.csv",
    (
        Column("file", TEXT, "the input file of the problem (a CSV or a DICOM)"),
        Column("line", INT, "its line in that file; empty when the problem concerns the whole file", nullable=True, lo=1),
        Column("problem", TEXT, "what is wrong"),
    ),
    "The inputs prepare dropped with on_error=skip (and, whatever on_error, the images modality_check refuses), one row "
    "per problem; absent when it dropped none.",
)

DICOM_RESULTS = Table(
    "dicom results",
    "<predict out>/dicom.csv",
    (
        Column("study_id", TEXT, "the study (studies.csv)"),
        Column("kind", TEXT, "sr (Comprehensive 3D SR, TID 1500) | gsps (presentation state) | sc (secondary capture)"),
        Column("file", TEXT, "the DICOM file, relative to the output folder"),
        Column("sop_instance_uid", TEXT, "its SOP Instance UID (the same for the same prediction: siimcovid.predict.dicom)"),
        Column("series_instance_uid", TEXT, "its series (one per kind and study)"),
        Column("study_instance_uid", TEXT, "the source's StudyInstanceUID, which it joins"),
        Column("references", TEXT, "the SOP Instance UIDs of the source images it references, space-separated"),
    ),
    "One row per DICOM object `siimcovid predict dicom=` wrote (siimcovid.predict.dicom).",
    checks=(_not_empty("study_id", "kind", "file", "sop_instance_uid"),),
    key=("sop_instance_uid",),
)

EXTERNAL_LABELS = Table(
    "external labels",
    "runs/prepare/<name>/labels.csv",
    (Column("image_id", TEXT, "the prepared image (meta.csv's image_id)"),),
    "The labels of an external set (prepare layout=rsna|csv), one row per prepared image; its columns after image_id "
    "are prepare.yaml's `label_names`, in that order (rsna: opacity).",
    checks=(_not_empty("image_id"),),
    extra=Column("<label>", FLOAT, "1.0 = present, 0.0 = absent, empty = unknown", nullable=True, lo=0.0, hi=1.0),
    key=("image_id",),
)

LUNG_BOXES = Table(
    "lung boxes",
    "runs/prepare/<name>/lungs.csv",
    (Column("image_id", TEXT, "the train image (meta.csv's image_id)"), *_BOX),
    "One box around both lungs per train image (prepare lung_boxes=: the 1st-place team's Pascal VOC .xml or YOLO .txt "
    "per image, read by siimcovid.data.lungs), in ORIGINAL pixels; what the lung detector (detect train task=lung) learns.",
    checks=(_not_empty("image_id"), _boxes_ordered),
    key=("image_id",),
)

SCORES = Table(
    "scores",
    "runs/<stage>/<name>/scores_oof.csv",
    (
        Column("fold", TEXT, "all (first row), then each fold"),
        Column("n_images", INT, "images scored"),
        Column("n_studies", INT, "studies scored"),
        *[Column(c, FLOAT, f"AP({c}); absent when not scored, empty when a fold lacks it", required=False, nullable=True)
          for c in CLASSES],
        Column("lung", FLOAT, "AP(lung) of a lung detector (detect task=lung) against lungs.csv", required=False, nullable=True),
        Column("study_map", FLOAT, "mean AP of the study classes scored", required=False, nullable=True),
        Column("image_map", FLOAT, "mean AP of opacity and none, those scored", required=False, nullable=True),
        Column("final", FLOAT, "mean AP over every class scored", nullable=True),
        Column("model", TEXT, "the run scored", required=False),
        Column("tta", TEXT, "test-time augmentation of the predictions", required=False),
        Column("weights", TEXT, "best | last checkpoints", required=False),
    ),
    "Out-of-fold scores with the competition metric, one row for all folds and one per fold, alike in every stage.",
    key=("fold", "model"),
)


# Column lists derived from the contracts, for the code that builds these tables
BOX_PRED_COLUMNS = [c for c in FUSED_BOXES.names if c != "wbf_conf"]  # image_id, conf, x_min, y_min, x_max, y_max
# AP per class, study_map, image_map, final (the competition's: a lung detector's AP is its own scores_oof.csv's only)
SCORE_COLUMNS = [c.name for c in SCORES.columns if c.dtype == FLOAT and c.name != "lung"]


# ----------------------------------------------------------------------------- per-fold teachers and pseudo-labels
CLASSIFIER_FOLDS = Table(
    "classifier folds",
    "runs/classify/<name>/pred_test_image_folds.csv (classify predict per_fold=true)",
    (
        Column("model", TEXT, "run name"),
        Column("image_id", TEXT, "SOP instance UID, without _image"),
        Column("study_id", TEXT, "StudyInstanceUID"),
        Column("fold", INT, "the fold whose model predicted the row (it never saw that fold's validation images)", lo=0),
        *_PROBS,
        Column(_NONE.name, FLOAT, _NONE.doc, lo=0.0, hi=1.0),
    ),
    "One row per (fold model, test image): each fold model's own probabilities, not their mean "
    "(pred_test_image.csv holds the mean). Read by `siimcovid pseudo` (teacher=fold).",
    checks=(_not_empty("image_id", "study_id"), _one_study_per_image),
    key=("image_id", "fold", "model"),
)

PSEUDO_LABELS = Table(
    "pseudo labels",
    "runs/pseudo/<name>/labels.csv",
    (
        Column("image_id", TEXT, "the unlabelled image (its id in the source's prepared folder)"),
        Column("study_id", TEXT, "its study"),
        Column("fold", INT, "the teacher fold k (its labels are for fold k's students only); -1 = the all-folds teacher", lo=-1),
        *[Column(c, FLOAT, f"soft target P({c}): the teacher's study probability", lo=0.0, hi=1.0) for c in STUDY_CLASSES],
        Column("none", FLOAT, "soft target P(image has no opacity): the teacher's none", lo=0.0, hi=1.0),
        Column("n_boxes", INT, "confident boxes kept (labels and masks written); 0: none (kind says why)", lo=0),
        Column(
            "kind",
            TEXT,
            "boxes | negative | soft: in the detector list with boxes, in it with an empty label file, study labels only "
            "(no label file, no mask)",
            required=False,
        ),
    ),
    "One row per (teacher fold, unlabelled image), written last by `siimcovid pseudo` (its presence marks a finished folder).",
    checks=(_not_empty("image_id", "study_id"),),
    key=("image_id", "fold"),
)

PSEUDO_BOXES = Table(
    "pseudo boxes",
    "runs/pseudo/<name>/boxes.csv",
    (
        Column("image_id", TEXT, "the unlabelled image"),
        Column("fold", INT, "the teacher fold (-1: all folds)", lo=-1),
        *_BOX,
        Column("conf", FLOAT, "the teacher detector's confidence", lo=0.0, hi=1.0),
    ),
    "The confident teacher boxes written as pseudo-labels, one row per box.",
    checks=(_not_empty("image_id"), _boxes_ordered),
)

COPIES = Table(
    "copies",
    "runs/pseudo/<name>/copies.csv",
    (
        Column("image_id", TEXT, "the pool image (its id in the source's prepared folder) that is a SIIM image's copy"),
        Column("siim_image_id", TEXT, "the SIIM image it matches (the nearest perceptual hash)"),
        Column("siim_split", TEXT, "train | test: the SIIM split of that image"),
        Column("distance", INT, "the Hamming distance of their 64-bit perceptual hashes (<= dedup_distance)", lo=0, hi=64),
    ),
    "The pool images `siimcovid pseudo` left out (dedup=drop) as SIIM's own under another id (siimcovid.data.dedup), "
    "one row per image; written even when empty.",
    checks=(_not_empty("image_id", "siim_image_id"),),
    key=("image_id",),
)

DISTILL_TARGETS = Table(
    "distillation targets",
    "runs/classify/<student>/fold<k>/distill_targets.csv (classify train distill=)",
    (
        Column("image_id", TEXT, "a training image of the student's fold k (never one of fold k's validation images)"),
        Column("study_id", TEXT, "its study"),
        Column("fold", INT, "k: the student fold that learns from the row, and the teacher fold whose models predicted it", lo=0),
        *[Column(c, FLOAT, f"soft target P({c}): the teachers' mean fold-k probability", lo=0.0, hi=1.0) for c in STUDY_CLASSES],
        Column("none", FLOAT, "soft target P(image has no opacity): the mean of the teachers' fold-k none", lo=0.0, hi=1.0),
        Column("teachers_id", TEXT, "a fingerprint of the teachers (runs, sha256 of their fold-k best.pt) and their TTA"),
    ),
    "The soft targets of one student fold (siimcovid.classify.distill), one row per training image: its cache, reused "
    "while teachers_id is that of the teachers given.",
    checks=(_not_empty("image_id", "study_id", "teachers_id"), _one_study_per_image),
    key=("image_id",),
)

DISTILL_BOXES = Table(
    "distilled boxes",
    "runs/detect/<student>/distill/fold<k>/boxes.csv (detect train distill=)",
    (
        Column("image_id", TEXT, "a training image of the student's fold k (never one of fold k's validation images)"),
        Column("fold", INT, "k: the student fold that learns the box, and the teacher fold whose models predicted it", lo=0),
        *_BOX,
        Column("conf", FLOAT, "(1 - w) [a hard box] + w x the teachers' mean, w = distill_weight", lo=0, hi=1),
        Column("hard", INT, "1: the box holds one of the image's hard boxes (IoU >= 0.5); 0: the teachers' alone", lo=0, hi=1),
        Column("teachers_id", TEXT, "a fingerprint of the teachers (runs, sha256 of their fold-k checkpoint) and the blend"),
    ),
    "The labels of one student fold (siimcovid.detect.distill), one row per box (an image without one has no row; its "
    "label file is empty): what the fold's YOLO label files say, in original pixels.",
    checks=(_not_empty("image_id", "teachers_id"),),
)


# ----------------------------------------------------------------------------- predict's tables for people
PREDICTED_STUDIES = Table(
    "predicted studies",
    "<predict out>/studies.csv",
    (
        Column("study_id", TEXT, "StudyInstanceUID"),
        *[Column(c, FLOAT, f"P({c}) of the study (fused)", lo=0.0, hi=1.0) for c in STUDY_CLASSES],
        Column("predicted", TEXT, "the most probable class", required=False),
        Column("n_images", INT, "images of the study", required=False, lo=1),
    ),
    "One row per study of `siimcovid predict` (siimcovid.predict.view), the four class probabilities.",
    checks=(_not_empty("study_id"),),
    key=("study_id",),
)

TAG_MISSING = "missing"  # images.csv's value of a tag the image lacks
_NO_TAG = f"{TAG_MISSING!r}: the file has no such tag or an empty one (a PNG/JPEG has none), the check passed it on the others"

PREDICTED_IMAGES = Table(
    "predicted images",
    "<predict out>/images.csv",
    (
        Column("image_id", TEXT, "image id (DICOM SOPInstanceUID, made unique)"),
        Column("study_id", TEXT, "StudyInstanceUID"),
        Column("file", TEXT, "the source image file"),
        Column("rows", INT, "original height in pixels", lo=1),
        Column("cols", INT, "original width in pixels", lo=1),
        Column("modality", TEXT, f"DICOM Modality (modality_check: CR or DX); {_NO_TAG}", required=False),
        Column("body_part", TEXT, f"DICOM BodyPartExamined (modality_check: the chest); {_NO_TAG}", required=False),
        Column("view_position", TEXT, f"DICOM ViewPosition (modality_check: not lateral); {_NO_TAG}", required=False),
        Column("none", FLOAT, "P(no opacity in the image)", lo=0.0, hi=1.0),
        Column("n_boxes", INT, "predicted opacity boxes (rows of boxes.csv)", lo=0),
        Column("n_shown", INT, "of which drawn on the picture (confident enough)", required=False, lo=0),
        Column("picture", TEXT, "the drawn picture, relative to the output folder", required=False),
    ),
    "One row per image of `siimcovid predict` (siimcovid.predict.view).",
    checks=(_not_empty("image_id", "study_id"),),
    key=("image_id",),
)

PREDICTED_BOXES = Table(
    "predicted boxes",
    "<predict out>/boxes.csv",
    (
        Column("image_id", TEXT, "image id"),
        *_BOX,
        Column("conf", FLOAT, "confidence of the opacity box (fused: WBF with unequal model weights can pass 1)", lo=0.0),
    ),
    "One row per predicted opacity box of `siimcovid predict`, in original pixels, most confident first per image.",
    checks=(_not_empty("image_id"), _boxes_ordered),
)
