"""The ground truth, built in one place for every stage: the competition's, with unclipped boxes.

Sources, in order:
  * a prepared dir (meta.csv gives the ids and folds) whose SIIM root is still reachable: the
    boxes of the original CSVs (train_image_level.csv; split=test: <root>/test_truth/, which
    `siimcovid synth` writes). meta.csv holds boxes CLIPPED to the image, but the competition
    scores the unclipped ones, so the CSVs win whenever they can be read;
  * a prepared dir whose root is gone: meta.csv's clipped boxes, with a warning;
  * a SIIM root: its CSVs (fold -1: a root has no folds).

`load_truth` gives one row per image (TRUTH_IMAGE_COLUMNS); `truth_rows` turns such rows into
the metric's truth table (siimcovid.tables.TRUTH), studies then images; `study_truth` and
`image_truth` make either half. For the out-of-fold train images of a prepared dir,
`oof_images(prepared, image_ids)` gives their rows of `load_truth` and `oof_truth` their metric rows.

Who uses what:
  * evaluate: load_truth + truth_rows (any split, a SIIM root or a prepared dir, one fold or all);
  * detect predict: oof_images + image_truth (the detector's OOF opacity AP);
  * classify predict: oof_images + study_truth / image_truth (the checkpoint scores), and
    oof_truth (its scores_oof.csv);
  * fuse and run (the baselines and the report's scores): oof_truth;
  * report: oof_images (the truth boxes its sample grid draws).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.data.boxes import boxes_from_json
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import IMAGE_CSV, STUDY_CSV, Problems, read_image_level, read_study_level
from siimcovid.metrics import whole_rows
from siimcovid.tables import BOX_COLUMNS, IMAGE_SUFFIX, STUDY_CLASSES, STUDY_SUFFIX, TRUTH, WHOLE
from siimcovid.utils import LOGGER, DataError, SiimError

TRUTH_IMAGE_COLUMNS = ["image_id", "study_id", "boxes", "study_label", "fold"]
TEST_TRUTH = "test_truth"  # <root>/test_truth/: the hidden test labels `siimcovid synth` writes


# ----------------------------------------------------------------------------- per image
def read_truth_csvs(folder: str | os.PathLike, on_error: str = "raise") -> pd.DataFrame:
    """A folder with train_image_level.csv + train_study_level.csv -> one row per image (TRUTH_IMAGE_COLUMNS, fold -1).

    on_error="skip" passes over bad rows (a prepared dir made with on_error=skip has dropped
    them already; its images are then checked to all have a truth row)."""
    folder = Path(folder)
    problems = Problems(on_error)
    images = read_image_level(folder / IMAGE_CSV, problems)
    studies = read_study_level(folder / STUDY_CSV, problems)
    labels = dict(zip(studies.study_id, studies.study_label))
    orphans = images[~images.study_id.isin(labels)]
    if len(orphans) and on_error == "skip":
        images, orphans = images[images.study_id.isin(labels)], orphans.iloc[:0]
    if len(orphans):
        rec = orphans.iloc[0]
        raise DataError(f"image {rec.image_id}: study {rec.study_id} is not in {STUDY_CSV}", folder / IMAGE_CSV, int(rec.line))
    out = images.assign(study_label=images.study_id.map(labels), fold=-1)
    return out[TRUTH_IMAGE_COLUMNS].reset_index(drop=True)


def _csv_folder(root: Path, split: str) -> Path:
    if split == "train":
        return root
    if split == "test":
        return root / TEST_TRUTH
    raise SiimError(f"split must be train or test, got '{split}'")


def _has_csvs(folder: Path) -> bool:
    return (folder / IMAGE_CSV).is_file() and (folder / STUDY_CSV).is_file()


def load_truth(data: str | os.PathLike, split: str = "train") -> pd.DataFrame:
    """Truth per image (TRUTH_IMAGE_COLUMNS) from a prepared dir or a SIIM root (see the module docstring).

    Cached per (folder, split, file times): a classifier scores its checkpoints every epoch."""
    data = Path(data)
    meta = data / "meta.csv"
    stamp = None
    if meta.is_file():  # the prepared table and the CSVs it came from
        root = Path(str(Prepared.read_cfg(data).get("data_resolved") or ""))
        files = [meta, _csv_folder(root, split) / IMAGE_CSV, _csv_folder(root, split) / STUDY_CSV]
        stamp = tuple(f.stat().st_mtime_ns if f.is_file() else 0 for f in files)
    return _load_truth(str(data.resolve()), split, stamp).copy()


@lru_cache(maxsize=8)
def _load_truth(data: str, split: str, stamp) -> pd.DataFrame:
    data = Path(data)
    if stamp is None:
        folder = _csv_folder(data, split)
        if not _has_csvs(folder):
            raise SiimError(
                f"{data} is neither a prepared dir (meta.csv) nor a folder with the {split} truth "
                f"({folder / IMAGE_CSV} and {folder / STUDY_CSV})"
            )
        return read_truth_csvs(folder)
    prepared = Prepared(data)
    meta = prepared.split(split)
    if meta.empty:
        raise SiimError(f"{data} has no {split} images")
    csvs = _csv_folder(Path(str(prepared.cfg.get("data_resolved") or prepared.cfg.get("data", ""))), split)
    if not _has_csvs(csvs):
        if split != "train":
            raise SiimError(f"no test truth for {data}: expected {csvs / IMAGE_CSV} and {csvs / STUDY_CSV}")
        LOGGER.warning(
            f"WARNING: the CSVs of {prepared.cfg.get('data')} are not reachable; scoring with the boxes of "
            f"{data / 'meta.csv'}, which are clipped to the image (the competition scores the unclipped boxes)"
        )
        return meta[TRUTH_IMAGE_COLUMNS].reset_index(drop=True)
    truth = read_truth_csvs(csvs, on_error=str(prepared.cfg.get("on_error", "raise")))
    fold = dict(zip(meta.image_id, meta.fold))
    truth = truth[truth.image_id.isin(fold)].copy()
    truth["fold"] = truth.image_id.map(fold).astype(int)
    missing = sorted(set(meta.image_id) - set(truth.image_id))
    if missing:
        raise DataError(
            f"{len(missing)} prepared {split} image(s) are not in the truth CSVs, e.g. {missing[0]}", csvs / IMAGE_CSV
        )
    return truth.reset_index(drop=True)


# ----------------------------------------------------------------------------- the metric's rows
def study_truth(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with study_id, study_label (one per study, or one per image as in meta.csv) -> truth rows."""
    studies = df[["study_id", "study_label"]].astype(str).drop_duplicates()
    clash = studies.study_id.duplicated(keep=False)
    if clash.any():
        raise SiimError(f"study {studies.study_id[clash].iloc[0]} has more than one study_label")
    bad = ~studies.study_label.isin(STUDY_CLASSES)
    if bad.any():
        raise SiimError(f"unknown study_label {studies.study_label[bad].iloc[0]!r}; expected one of {STUDY_CLASSES}")
    return whole_rows(studies.study_id + STUDY_SUFFIX, studies.study_label)


def image_truth(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with image_id and boxes (lists of [x1, y1, x2, y2], original px, or their JSON) -> truth rows.

    An image without boxes gets the truth `none 0 0 1 1`.
    """
    if df.image_id.duplicated().any():
        raise SiimError(f"image {df.image_id[df.image_id.duplicated()].iloc[0]} appears twice in the truth")
    ids, classes, boxes = [], [], []
    for image_id, bxs in zip(df.image_id.astype(str), df.boxes):
        if isinstance(bxs, str):  # a raw meta.csv cell
            bxs = boxes_from_json(bxs)
        arr = np.asarray(bxs if bxs is not None else [], dtype=np.float64).reshape(-1, 4)
        if len(arr) == 0:
            ids.append(image_id + IMAGE_SUFFIX), classes.append("none"), boxes.append(np.array([WHOLE]))
        else:
            ids += [image_id + IMAGE_SUFFIX] * len(arr)
            classes += ["opacity"] * len(arr)
            boxes.append(arr)
    box = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    out = pd.DataFrame({"id": np.asarray(ids, dtype=object), "cls": np.asarray(classes, dtype=object)})
    out[BOX_COLUMNS] = box
    return out[TRUTH.names]


def truth_rows(images: pd.DataFrame) -> pd.DataFrame:
    """Per-image truth (load_truth) -> the metric's truth rows, studies then images."""
    return pd.concat([study_truth(images), image_truth(images)], ignore_index=True)


def oof_images(prepared: str | os.PathLike, image_ids) -> pd.DataFrame:
    """Per-image truth of these train images of a prepared dir; an id that is not a train image is an error."""
    truth = load_truth(prepared, "train")
    wanted = set(image_ids)
    unknown = wanted - set(truth.image_id)
    if unknown:
        raise SiimError(f"{len(unknown)} predicted images are not train images of {prepared} (e.g. {sorted(unknown)[0]})")
    return truth[truth.image_id.isin(wanted)].reset_index(drop=True)


def oof_truth(prepared: str | os.PathLike, image_ids) -> pd.DataFrame:
    """The metric's truth rows of these out-of-fold images and their studies."""
    return truth_rows(oof_images(prepared, image_ids))
