"""Submission writing, reading and checking (format: the SUBMISSION table of siimcovid/tables.py).

A submission file is the SUBMISSION table of siimcovid.tables (id, PredictionString), read and
written through that contract. The metric's tidy prediction rows (siimcovid.tables.PREDICTIONS:
id, cls, conf, x_min, y_min, x_max, y_max) are the one form everything converts to and from:

    pred_to_submission(pred)       tidy rows -> DataFrame id, PredictionString (one row per id)
    submission_to_pred(sub)        the inverse, checking every string
    make_submission(study, boxes, none)   classifier / detector tables -> submission DataFrame
    check_submission(sub, sample)  raise DataError (file, line) on anything Kaggle would reject or mis-score
    write_submission(sub, path, sample)   check, then write atomically (SUBMISSION.write)
    read_submission(path, sample)  read (SUBMISSION.read), check, return the DataFrame

Study rows are written `<class> <conf> 0 0 1 1` for all four classes (mAP rewards the full
ranking far more than the argmax alone); image rows hold every `opacity <conf> x1 y1 x2 y2`
in original pixels plus `none <conf> 0 0 1 1`.

Numbers are written positionally (never 1e-05): confidences with 9 significant digits,
coordinates with 3 decimals, trailing zeros trimmed.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.data.siim import read_sample_submission
from siimcovid.metrics import PRED_COLUMNS, image_pred, study_pred
from siimcovid.tables import BOX_COLUMNS, IMAGE_CLASSES, IMAGE_SUFFIX, STUDY_CLASSES, STUDY_SUFFIX, SUBMISSION, WHOLE, file_line
from siimcovid.utils import DataError, SiimError

SUBMISSION_COLUMNS = SUBMISSION.names  # id, PredictionString: an alias of the contract's columns
CONF_DIGITS, BOX_DECIMALS = 9, 3  # confidences: significant digits (a tiny one must not round to 0 and tie)


def format_numbers(values, decimals: int) -> pd.Series:
    """Floats -> positional strings with `decimals` places, trailing zeros trimmed ('0.5', '1', '2190.125')."""
    fmt = f"{{:.{decimals}f}}".format
    text = pd.Series([fmt(v) for v in np.asarray(values, dtype=np.float64)], dtype=object)
    text = text.str.rstrip("0").str.rstrip(".")
    return text.mask(text.isin(["", "-0"]), "0")


def format_confidences(values, digits: int = CONF_DIGITS) -> pd.Series:
    """Floats -> positional strings with `digits` significant digits ('0.5', '1', '0.000000025').

    Significant, not fixed decimals: after re-weighting by (1 - none)^a confidences reach 1e-8
    and below, and fixed decimals would write them all as 0, a tie the OOF score never saw.
    """
    fmt = partial(np.format_float_positional, precision=digits, unique=False, fractional=False, trim="-")
    return pd.Series([fmt(v) for v in np.asarray(values, dtype=np.float64)], dtype=object)


def pred_to_submission(pred: pd.DataFrame, ids: list[str] | None = None) -> pd.DataFrame:
    """Tidy pred rows -> id, PredictionString. Within a row, predictions are written by confidence,
    descending. `ids` (with suffixes) fixes the rows and their order; an id without predictions
    gets an empty string (which check_submission rejects: every row needs at least one entry)."""
    missing = [c for c in PRED_COLUMNS if c not in pred.columns]
    if missing:
        raise SiimError(f"prediction table lacks column(s) {missing}")
    df = pred[PRED_COLUMNS].sort_values(["id", "conf"], ascending=[True, False], kind="stable")
    parts = df["cls"].astype(str).reset_index(drop=True) + " " + format_confidences(df["conf"])
    for c in BOX_COLUMNS:
        parts = parts + " " + format_numbers(df[c], BOX_DECIMALS)
    strings = parts.groupby(df["id"].astype(str).to_numpy(), sort=False).agg(" ".join)
    if ids is None:
        ids = list(strings.index)
    return pd.DataFrame(
        {"id": list(ids), "PredictionString": strings.reindex(list(ids)).fillna("").to_numpy()}, columns=SUBMISSION_COLUMNS
    )


def make_submission(
    study_probs: pd.DataFrame | None,
    boxes: pd.DataFrame | None,
    none: pd.DataFrame | None,
    ids: list[str] | None = None,
) -> pd.DataFrame:
    """Study probabilities (study_id + 4 class columns), opacity boxes (image_id, conf, x_min..y_max,
    original px) and none probabilities (image_id, none) -> submission DataFrame.

    ids: the submission ids in order (e.g. from sample_submission.csv); default: studies, then images.
    """
    parts = [image_pred(boxes, none)]
    if study_probs is not None and len(study_probs):
        parts.insert(0, study_pred(study_probs))
    pred = pd.concat(parts, ignore_index=True)
    if ids is None:
        studies = sorted({i for i in pred["id"] if i.endswith(STUDY_SUFFIX)})
        images = sorted({i for i in pred["id"] if i.endswith(IMAGE_SUFFIX)})
        ids = studies + images
    return pred_to_submission(pred, ids)


def sample_ids(sample: str | os.PathLike) -> list[str]:
    """The ids of a sample_submission.csv, with suffixes, in file order (studies, then images)."""
    studies, images = read_sample_submission(sample)
    return [s + STUDY_SUFFIX for s in studies] + [i + IMAGE_SUFFIX for i in images]


def _parse_row(text: str, row_id: str, file, line) -> list[tuple]:
    """One PredictionString -> [(cls, conf, x1, y1, x2, y2)], with every check Kaggle needs."""
    is_study = row_id.endswith(STUDY_SUFFIX)
    allowed = STUDY_CLASSES if is_study else IMAGE_CLASSES
    tokens = text.split()
    if not tokens:
        hint = "all four classes `negative <p> 0 0 1 1 ...`" if is_study else "at least `none <p> 0 0 1 1`"
        raise DataError(f"{row_id}: empty PredictionString (write {hint})", file, line)
    if len(tokens) % 6:
        raise DataError(f"{row_id}: {len(tokens)} tokens, not groups of 6 (class conf x_min y_min x_max y_max)", file, line)
    out, seen = [], set()
    for k in range(0, len(tokens), 6):
        name, values = tokens[k], tokens[k + 1 : k + 6]
        where = f"{row_id}, prediction {k // 6 + 1}"
        if name not in allowed:
            kind = "a study" if is_study else "an image"
            raise DataError(f"{where}: class '{name}' is not allowed on {kind} row (allowed: {', '.join(allowed)})", file, line)
        try:
            conf, x1, y1, x2, y2 = (float(v) for v in values)
        except ValueError:
            raise DataError(f"{where}: not a number in {' '.join(values)!r}", file, line) from None
        if math.isnan(conf) or conf < 0 or math.isinf(conf):
            raise DataError(f"{where}: confidence must be a finite number >= 0, got {values[0]}", file, line)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise DataError(f"{where}: box has a non-finite coordinate: {' '.join(values[1:])}", file, line)
        if x2 < x1 or y2 < y1:
            raise DataError(f"{where}: box has x_max < x_min or y_max < y_min: {' '.join(values[1:])}", file, line)
        if name != "opacity":
            if (x1, y1, x2, y2) != WHOLE:
                raise DataError(
                    f"{where}: '{name}' must use the box 0 0 1 1 (it is scored by IoU with 0 0 1 1), got {' '.join(values[1:])}",
                    file,
                    line,
                )
            if name in seen:
                raise DataError(f"{where}: '{name}' appears twice (the second would count as a false positive)", file, line)
            seen.add(name)
        out.append((name, conf, x1, y1, x2, y2))
    return out


def submission_to_pred(sub: pd.DataFrame, sample=None, file: str | os.PathLike | None = None) -> pd.DataFrame:
    """Check a submission DataFrame (see check_submission) and return its tidy pred rows."""
    where = file or "submission"
    if list(sub.columns) != SUBMISSION_COLUMNS:
        raise DataError(f"columns must be exactly {SUBMISSION_COLUMNS}, got {list(sub.columns)}", where)
    if not pd.api.types.is_integer_dtype(sub.index):  # not read from a file: its rows are lines 2, 3, ...
        sub = sub.reset_index(drop=True)
    ids = sub["id"].astype(str).to_numpy()
    strings = sub["PredictionString"].fillna("").astype(str).to_numpy()
    first_line: dict[str, int] = {}
    rows = []
    for k, (row_id, text) in enumerate(zip(ids, strings)):
        line = file_line(sub, k)  # a frame read by SUBMISSION.read keeps counting blank lines in its index
        if not (row_id.endswith(STUDY_SUFFIX) or row_id.endswith(IMAGE_SUFFIX)) or row_id in (STUDY_SUFFIX, IMAGE_SUFFIX):
            raise DataError(f"id '{row_id}' should be <study>_study or <image>_image", where, line)
        if row_id in first_line:
            raise DataError(f"duplicate id '{row_id}' (first on line {first_line[row_id]})", where, line)
        first_line[row_id] = line
        rows += [(row_id, *p) for p in _parse_row(text, row_id, where, line)]
    if sample is not None:
        expected = sample_ids(sample) if isinstance(sample, (str, os.PathLike)) else list(sample)
        expected_set = set(expected)
        extra = [i for i in ids if i not in expected_set]
        if extra:
            raise DataError(
                f"{len(extra)} id(s) are not in the sample submission, e.g. '{extra[0]}'", where, first_line[extra[0]]
            )
        missing = [i for i in expected if i not in first_line]
        if missing:
            raise DataError(f"{len(missing)} id(s) of the sample submission are missing, e.g. '{missing[0]}'", where)
    pred = pd.DataFrame(rows, columns=PRED_COLUMNS)
    return pred.astype({c: np.float64 for c in ["conf", *BOX_COLUMNS]})


def check_submission(sub: pd.DataFrame, sample=None, file: str | os.PathLike | None = None) -> None:
    """Raise DataError (naming file and line) on anything Kaggle would reject or mis-score:
    wrong columns, bad or duplicate ids, ids missing from / not in `sample` (a sample_submission.csv
    path or a list of ids), malformed strings, classes not allowed on the row, NaN / negative /
    infinite confidences, boxes with x_max < x_min or y_max < y_min, study / none entries whose
    box is not 0 0 1 1 or that repeat a class, and empty strings."""
    submission_to_pred(sub, sample, file)


def read_submission(path: str | os.PathLike, sample=None) -> pd.DataFrame:
    """Read and check a submission CSV; returns the DataFrame (id, PredictionString)."""
    sub = SUBMISSION.read(path)
    check_submission(sub, sample, path)
    return sub


def write_submission(sub: pd.DataFrame, path: str | os.PathLike, sample=None) -> Path:
    """Check, then write atomically (a failed check leaves no file)."""
    check_submission(sub, sample, path)
    return SUBMISSION.write(sub, path)
