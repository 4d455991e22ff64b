"""`siimcovid evaluate`: score a submission with the competition metric against known truth.

The truth comes from a SIIM root (train_image_level.csv + train_study_level.csv, parsed and
validated by siimcovid.data.siim), from the hidden test truth `siimcovid synth` writes
(<root>/test_truth/, split=test), or from a prepared dir (meta.csv gives ids and folds; the boxes
are read from the original CSVs of the root it was prepared from, because meta.csv holds boxes
clipped to the image while the competition scores the unclipped ones; without those CSVs the
clipped boxes are used, with a warning).

Out-of-fold submissions hold only some ids: ids=present (the default) restricts the truth to
the ids in the submission, fold=k to one fold. Ids of the submission that are not in the truth
at all are an error (e.g. test predictions scored against the train truth).

Prints a per-class table (AP, truth and prediction counts), the study mAP, the image mAP and the
final score; --json prints {"final", "study_map", "image_map", "ap", "n_truth", "n_pred", ...}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.config import Config
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import IMAGE_CSV, STUDY_CSV, Problems, read_csv_checked, read_image_level, read_study_level
from siimcovid.fuse.submission import SUBMISSION_COLUMNS, submission_to_pred
from siimcovid.metrics import CLASSES, Score, image_truth, resolve_classes, score, study_truth
from siimcovid.utils import LOGGER, DataError, SiimError, atomic_write_text

TRUTH_TABLE_COLUMNS = ["image_id", "study_id", "boxes", "study_label", "fold"]
TEST_TRUTH = "test_truth"


def read_truth_csvs(folder: str | Path, on_error: str = "raise") -> pd.DataFrame:
    """A folder with train_image_level.csv + train_study_level.csv -> one row per image:
    image_id, study_id, boxes (original px), study_label, fold (-1: unknown).

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
    return out[TRUTH_TABLE_COLUMNS].reset_index(drop=True)


def _csv_folder(root: Path, split: str) -> Path:
    if split == "train":
        return root
    if split == "test":
        return root / TEST_TRUTH
    raise SiimError(f"split must be train or test, got '{split}'")


def _has_csvs(folder: Path) -> bool:
    return (folder / IMAGE_CSV).is_file() and (folder / STUDY_CSV).is_file()


def load_truth(data: str | Path, split: str = "train") -> pd.DataFrame:
    """Truth per image from a SIIM root or a prepared dir (see the module docstring)."""
    data = Path(data)
    if (data / "meta.csv").is_file():
        prepared = Prepared(data)
        meta = prepared.split(split)
        if meta.empty:
            raise SiimError(f"{data} has no {split} images")
        csvs = _csv_folder(Path(str(prepared.cfg.get("data_resolved") or prepared.cfg.get("data", ""))), split)
        if _has_csvs(csvs):
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
        if split != "train":
            raise SiimError(f"no test truth for {data}: expected {csvs / IMAGE_CSV} and {csvs / STUDY_CSV}")
        LOGGER.warning(
            f"WARNING: the CSVs of {prepared.cfg.get('data')} are not reachable; scoring with the boxes of "
            f"{data / 'meta.csv'}, which are clipped to the image (the competition scores the unclipped boxes)"
        )
        return meta[TRUTH_TABLE_COLUMNS].reset_index(drop=True)
    folder = _csv_folder(data, split)
    if not _has_csvs(folder):
        raise SiimError(
            f"{data} is neither a prepared dir (meta.csv) nor a folder with the {split} truth "
            f"({folder / IMAGE_CSV} and {folder / STUDY_CSV})"
        )
    return read_truth_csvs(folder)


def truth_rows(images: pd.DataFrame) -> pd.DataFrame:
    """Per-image truth (load_truth) -> the metric's truth rows, studies then images."""
    return pd.concat([study_truth(images), image_truth(images)], ignore_index=True)


def evaluate(cfg: Config) -> Score:
    if not cfg.submission:
        raise SiimError("evaluate needs submission=<file.csv>")
    if not cfg.data:
        raise SiimError("evaluate needs data=<SIIM root or prepared dir>")
    if cfg.ids not in {"present", "all"}:
        raise SiimError(f"ids must be present or all, got '{cfg.ids}'")
    unknown_classes = [c for c in (resolve_classes(cfg.classes) or []) if c not in CLASSES]
    if unknown_classes:
        raise SiimError(f"unknown class(es) {unknown_classes}: use study, image, or some of {CLASSES}")
    sub_path = Path(cfg.submission)
    pred = submission_to_pred(read_csv_checked(sub_path, SUBMISSION_COLUMNS), file=sub_path)
    images = load_truth(cfg.data, cfg.split)
    truth = truth_rows(images)
    sub_ids = pd.unique(pred["id"])
    unknown = np.setdiff1d(sub_ids, truth["id"].unique())
    if len(unknown):
        raise DataError(
            f"{len(unknown)} id(s) are not in the {cfg.split} truth of {cfg.data}, e.g. '{unknown[0]}' (wrong split or data?)",
            sub_path,
        )
    if cfg.fold == "all":  # the convention of every stage: all folds = no restriction
        cfg.fold = None
    if cfg.fold is not None and not isinstance(cfg.fold, int):
        raise SiimError(f"fold must be an integer or all, got '{cfg.fold}'")
    if cfg.fold is not None:
        if (images.fold < 0).all():
            raise SiimError("fold=k needs a prepared dir (data=<prepared dir>): a SIIM root has no folds")
        folds = sorted(images.fold.unique())
        if int(cfg.fold) not in folds:
            raise SiimError(f"fold {cfg.fold} does not exist: the {cfg.split} truth has folds {folds}")
        truth = truth_rows(images[images.fold == int(cfg.fold)])
    if cfg.ids == "present":
        n_truth = truth["id"].nunique()
        truth = truth[truth["id"].isin(sub_ids)]
        if cfg.split == "test" and truth["id"].nunique() < n_truth:
            # a test submission must cover every id: the missing ones would be misses on Kaggle
            LOGGER.warning(
                f"evaluate: the submission covers {truth['id'].nunique()} of the {n_truth} test ids; "
                "ids=all scores the missing ones as misses, as Kaggle would"
            )
    if truth.empty:
        raise SiimError("nothing to score: no truth row left after the fold / ids restriction")
    result = score(truth, pred, classes=cfg.classes, iou_threshold=float(cfg.iou_threshold))
    n_rows = truth["id"].nunique()
    if cfg.json or cfg.out:
        report = {
            "submission": str(sub_path),
            "data": str(cfg.data),
            "split": cfg.split,
            "fold": cfg.fold,
            "n_ids": n_rows,
            **result.to_dict(),
        }
        text = json.dumps(report, indent=2)
        if cfg.out:
            atomic_write_text(cfg.out, text + "\n")
        if cfg.json:
            print(text)
    if not cfg.json:
        fold = f", fold {cfg.fold}" if cfg.fold is not None else ""
        print(f"{sub_path.name}: {n_rows} ids scored against the {cfg.split} truth of {cfg.data}{fold}")
        print(result.format())
    return result


def main(cfg: Config) -> Score:
    return evaluate(cfg)
