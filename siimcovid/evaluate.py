"""`siimcovid evaluate`: score a submission with the competition metric against known truth.

The truth is the competition's, as siimcovid.data.truth builds it for every stage: from a SIIM
root, from the hidden test truth `siimcovid synth` writes (split=test), or from a prepared dir
(its folds, and the unclipped boxes of the CSVs it was prepared from).

Out-of-fold submissions hold only some ids: ids=present (the default) restricts the truth to
the ids in the submission, fold=k to one fold. Ids of the submission that are not in the truth
at all are an error (e.g. test predictions scored against the train truth). A split=test
submission must cover every test id, as Kaggle requires: one that misses ids is an error, unless
partial=true (a warning, and the score of the ids present) or ids=all (the missing ids count as
misses, the score Kaggle would give had it accepted the file).

Prints a per-class table (AP, truth and prediction counts), the study mAP, the image mAP and the
final score; --json prints {"final", "study_map", "image_map", "ap", "n_truth", "n_pred", ...}.

out= writes the same JSON to a file, marked as evaluate's ("written_by": "siimcovid evaluate"): an existing file is
replaced only when it is such a scores file, never the submission, a file inside data= or any other file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.config import Config
from siimcovid.data.prepared import Prepared
from siimcovid.data.truth import load_truth, truth_rows
from siimcovid.metrics import Score, score
from siimcovid.submission import submission_to_pred
from siimcovid.tables import SUBMISSION
from siimcovid.utils import LOGGER, DataError, SiimError, atomic_write_text, read_text_input

WRITTEN_BY = {"written_by": "siimcovid evaluate"}  # the mark of a scores file: the only file out= may replace
EARLIER_KEYS = {"submission", "data", "split", "fold", "n_ids", "final"}  # a scores file of a release before the mark


def is_scores_file(path: Path) -> bool:
    """Whether `path` holds a scores JSON evaluate wrote (its mark, or every key of an earlier release's)."""
    try:
        report = json.loads(read_text_input(path, max_bytes=2**20, what="scores file"))
    except (SiimError, ValueError):
        return False
    return isinstance(report, dict) and (report.get("written_by") == WRITTEN_BY["written_by"] or EARLIER_KEYS <= set(report))


def check_out(out, submission, data) -> None:
    """out= before any work: never the submission it scores, nor a file inside (or the folder of) data=, nor an
    existing file that is not a scores file of evaluate's (a user's results, a prepared folder's meta.csv)."""
    if not out:
        return
    out, here = Path(out), Path(out).resolve()
    if here == Path(submission).resolve():
        raise SiimError(f"out={out} is the submission it scores: choose another out= for the scores")
    if here.is_relative_to(Path(data).resolve()):
        raise SiimError(f"out={out} is inside data={data}: evaluate never writes into its data; choose another out=")
    if here.is_dir():
        raise SiimError(f"out={out} is a folder: give a file name for the scores, e.g. out={out / 'scores.json'}")
    if os.path.lexists(out) and not is_scores_file(out):
        raise SiimError(
            f"out={out} is a file siimcovid evaluate did not write (no scores of its): move it away or choose another out="
        )


def evaluate(cfg: Config) -> Score:
    if not cfg.submission:
        raise SiimError("evaluate needs submission=<file.csv>")
    if not cfg.data:
        raise SiimError("evaluate needs data=<SIIM root or prepared dir>")
    check_out(cfg.out, cfg.submission, cfg.data)
    sub_path = Path(cfg.submission)
    pred = submission_to_pred(SUBMISSION.read(sub_path), file=sub_path)
    images = load_truth(cfg.data, cfg.split)
    truth = truth_rows(images)
    sub_ids = pd.unique(pred["id"])
    unknown = np.setdiff1d(sub_ids, truth["id"].unique())
    if len(unknown):
        raise DataError(
            f"{len(unknown)} id(s) are not in the {cfg.split} truth of {cfg.data}, e.g. '{unknown[0]}' (wrong split or data?)",
            sub_path,
        )
    fold = one_fold(cfg.fold, images, cfg)
    if fold is not None:
        truth = truth_rows(images[images.fold == fold])
    if cfg.ids == "present":
        truth_ids = truth["id"].unique()
        n_truth = len(truth_ids)
        truth = truth[truth["id"].isin(sub_ids)]
        n_present = truth["id"].nunique()
        if cfg.split == "test" and n_present < n_truth:
            # a test submission must cover every id: Kaggle rejects a file that misses one
            missing = sorted(set(truth_ids) - set(sub_ids))
            what = f"the submission covers {n_present} of the {n_truth} test ids (missing e.g. '{missing[0]}')"
            if not cfg.partial:
                raise DataError(
                    f"{what}: Kaggle rejects such a file; partial=true scores the ids present, "
                    "ids=all scores the missing ones as misses",
                    sub_path,
                )
            LOGGER.warning(f"evaluate: {what}; partial=true: scoring only those (ids=all scores the missing ones as misses)")
    if truth.empty:
        raise SiimError("nothing to score: no truth row left after the fold / ids restriction")
    result = score(truth, pred, classes=cfg.classes, iou_threshold=cfg.iou_threshold)
    n_rows = truth["id"].nunique()
    if cfg.json or cfg.out:
        report = {
            **WRITTEN_BY,
            "submission": str(sub_path),
            "data": str(cfg.data),
            "split": cfg.split,
            "fold": fold,
            "n_ids": n_rows,
            **result.to_dict(),
        }
        text = json.dumps(report, indent=2)
        if cfg.out:
            atomic_write_text(cfg.out, text + "\n")
        if cfg.json:
            print(text)
    if not cfg.json:
        where = f", fold {fold}" if fold is not None else ""
        print(f"{sub_path.name}: {n_rows} ids scored against the {cfg.split} truth of {cfg.data}{where}")
        print(result.format())
    return result


def one_fold(fold, images: pd.DataFrame, cfg: Config) -> int | None:
    """fold=all (or null): None, every fold; fold=k: k, checked to be a fold of the prepared dir."""
    if fold is None or fold == "all":  # the convention of every stage: all folds = no restriction
        return None
    if (images.fold < 0).all():
        raise SiimError("fold=k needs a prepared dir (data=<prepared dir>): a SIIM root has no folds")
    [k] = Prepared(cfg.data).select_folds(fold)
    return k


def main(cfg: Config) -> Score:
    return evaluate(cfg)
