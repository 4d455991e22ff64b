"""The binary none model: `classify train task=none` (the 4th place's dedicated "image has no opacity" model).

It is the study classifier (family timm, its StudyNet, its files and its fold engine) with one target, "this image
has no opacity box"; what differs, and nothing else, is here:

    loss        StudyLoss with the study head's CE off (study_weight 0): the none head's BCE, the mask loss by
                mask_weight (siimcovid.classify.model.StudyLoss.from_cfg reads task)
    best.pt     by AP(none) of the fold's held-out images, the competition's (siimcovid.metrics on the `none 0 0 1 1`
                rows): val_none_ap in results.csv (none_ap_improved, NoneTrainer)
    report      the out-of-fold AP(none) of the best checkpoints after the last fold (report_oof_none)
    predict     `classify predict` writes pred_<split>_none.csv (tables.NONE_IMAGES: image_id, none, ...) instead of
                the study tables (its study head learned nothing), and scores AP(none) only in scores_oof.csv

`siimcovid fuse none_cls=<pred_<split>_none.csv>` blends it with the classifiers' none (fuse.yaml none_model_weight).
task is one of the settings a run saves, so an interrupted task=none fold resumed as task=study is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from siimcovid import metrics
from siimcovid.tables import NONE_IMAGES
from siimcovid.utils import SiimError

TASK = "none"
SCORED = ["none"]  # what scores_oof.csv of a none model scores


def is_none_task(cfg) -> bool:
    """Whether these settings (a run's record too) are a binary none model's."""
    return (cfg.get("task") or "study") == TASK


def check_task(cfg, labels: bool = False) -> None:
    """task=none learns the none head: it needs one, and a weight on its BCE; multi-label pretraining has no none."""
    if not is_none_task(cfg):
        return
    if labels:
        raise SiimError("task=none: multi-label pretraining (an external labelled set) has no none target; use task=study")
    if not cfg.none_head:
        raise SiimError("task=none trains the none head alone: give none_head=true")
    if cfg.none_weight <= 0:
        raise SiimError("task=none learns from the none head's BCE only: give none_weight > 0")


def none_ap(prep, images: pd.DataFrame) -> float:
    """AP(none) of per-image none probabilities (image_id, none), the competition's: each image's `none 0 0 1 1` row
    against the truth of the prepared folder (NaN when no image is empty)."""
    from siimcovid.data import truth

    scored = metrics.score(
        truth.oof_truth(prep.root, images["image_id"]), metrics.image_pred(None, images[["image_id", "none"]]), classes=SCORED
    )
    return float(scored.ap.get("none", math.nan))


# ---------------------------------------------------------------- predict's tables


def none_path(run_dir: Path, split: str) -> Path:
    """Where `classify predict` keeps a none model's table of a split (tables.NONE_IMAGES)."""
    return Path(run_dir) / f"pred_{split}_none.csv"


def none_table(images: pd.DataFrame) -> pd.DataFrame:
    """A none model's image table (CLASSIFIER_IMAGES, its study columns untrained) as tables.NONE_IMAGES."""
    return NONE_IMAGES.check(images, "none model")


def none_scores(prep, images: pd.DataFrame) -> pd.DataFrame:
    """The SCORES table of a none model's OOF images: AP(none) for all folds and per fold."""
    from siimcovid.data import truth

    pred = metrics.image_pred(None, images[["image_id", "none"]])
    return metrics.fold_scores(truth.oof_truth(prep.root, images["image_id"]), pred, images, classes=SCORED)


def is_none_run(run_dir: Path) -> bool:
    """Whether a classify run folder holds a none model (its saved settings say task=none)."""
    from siimcovid.classify.files import FILES
    from siimcovid.rundir import read_run

    path = Path(run_dir) / FILES.settings
    return path.is_file() and is_none_task(read_run(path))


def refuse_none_runs(runs: list[Path], per_fold: bool) -> None:
    """`classify predict` of a none model predicts it alone: its study head learned nothing, so neither a classifier
    ensemble nor per-fold teacher tables (pseudo's) may take it; fusion blends it (fuse none_cls=)."""
    nones = [str(r) for r in runs if is_none_run(r)]
    if nones and len(runs) > 1:
        raise SiimError(
            f"run={','.join(map(str, runs))}: {', '.join(nones)} is a none model (task=none), not a study classifier: "
            "predict it alone and give its pred_<split>_none.csv to `siimcovid fuse none_cls=`"
        )
    if nones and per_fold:
        raise SiimError(f"per_fold=true: {nones[0]} is a none model (task=none): it has no study probabilities to pseudo-label")
