"""The binary none model's trainer (`classify train task=none`, siimcovid.classify.none): the study classifier's
FoldTrainer scored on AP(none), its checkpoint rule and its report after the last fold."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from siimcovid.classify.files import FILES, VAL_IMAGES
from siimcovid.classify.none import none_ap
from siimcovid.classify.train import FoldTrainer
from siimcovid.rundir import fold_dir
from siimcovid.tables import CLASSIFIER_IMAGES
from siimcovid.utils import LOGGER


def none_ap_improved(trainer, stats: dict, best: dict) -> bool:
    """The checkpoint rule of a none model: the validation AP(none) beats the best so far (NaN never does)."""
    score = stats["val_none_ap"]
    return not math.isnan(score) and score > best["score"]


class NoneTrainer(FoldTrainer):
    """A FoldTrainer whose score is AP(none) (module docstring); the loss comes from the settings (task=none)."""

    metric, metric_name = "val_none_ap", "AP(none)"

    def validate(self) -> tuple[dict, pd.DataFrame]:
        stats, images = super().validate()
        stats["val_none_ap"] = none_ap(self.prep, images)
        return stats, images


def report_oof_none(prep, run_dir: Path) -> None:
    """When every fold is finished, print the OOF AP(none) of the best checkpoints (no TTA)."""
    files = [fold_dir(run_dir, k) / VAL_IMAGES for k in range(prep.n_folds)]
    if not all((f.parent / FILES.done).is_file() and f.is_file() for f in files):
        return
    images = pd.concat([CLASSIFIER_IMAGES.read(f) for f in files], ignore_index=True)
    LOGGER.info(
        f"{run_dir.name}: OOF AP(none) over {prep.n_folds} folds (no TTA): {none_ap(prep, images):.4f}; "
        f"`siimcovid classify predict run={run_dir}` writes pred_oof_none.csv and pred_test_none.csv for fuse none_cls="
    )
