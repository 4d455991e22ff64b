"""Multi-label pretraining on an external labelled set (prepare layout rsna or csv): the family `timm-labels`.

`classify train data=<such a prepared folder>` picks it by itself: one BCE head over the folder's label_names
(unknown labels masked), the mask loss only where the folder has boxes, best.pt by the mean validation ROC AUC over
the labels (val_auc), fold<k>/val_pred_labels.csv the best epoch's validation probabilities. Then fine-tune on SIIM
with `classify train data=<SIIM prepared> init=<this run>`. The family (siimcovid.classify.family.TimmLabelsFamily) and the
trainer here subclass the study classifier's: only what differs is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from siimcovid.classify import predict as P
from siimcovid.classify.data import TargetDataset
from siimcovid.classify.files import VAL_LABELS
from siimcovid.classify.model import LabelLoss
from siimcovid.classify.train import LOSS_PARTS, FoldTrainer
from siimcovid.data.extra import ExtraData
from siimcovid.rundir import fold_dir
from siimcovid.tables import write_csv
from siimcovid.utils import LOGGER


def auc_improved(trainer: "FoldTrainer", stats: dict, best: dict) -> bool:
    """The checkpoint rule of multi-label pretraining: the mean validation ROC AUC over labels beats the best so far."""
    score = stats["val_auc"]
    return not math.isnan(score) and score > best["score"]


def mean_auc(truth: np.ndarray, probs: np.ndarray) -> float:
    """Mean ROC AUC over the label columns that have both classes among the known (non-NaN) targets; NaN if none."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(truth.shape[1]):
        known = ~np.isnan(truth[:, j])
        t = truth[known, j] >= 0.5
        if t.any() and not t.all():
            aucs.append(roc_auc_score(t, probs[known, j]))
    return float(np.mean(aucs)) if aucs else float("nan")



class LabelTrainer(FoldTrainer):
    """A FoldTrainer over an external set's labels (module docstring)."""

    metric, metric_name = "val_auc", "mean AUC"

    def fold_tables(self) -> None:
        """train_tab / val_tab: image_id, study_id, fold, then the label columns."""
        self.label_names = self.classes = list(self.cfg.label_names)
        labels = ExtraData(self.prep.root).label_table().set_index("image_id")
        self.has_boxes = bool((self.prep.meta.n_boxes > 0).any())
        tabs = [self.prep.fold(self.fold, part)[["image_id", "study_id", "fold"]] for part in ("train", "val")]
        self.train_tab, self.val_tab = (t.join(labels, on="image_id").reset_index(drop=True) for t in tabs)

    def fold_datasets(self, augment) -> tuple[Dataset, Dataset]:
        ds = []
        for tab, aug in ((self.train_tab, augment), (self.val_tab, None)):
            images = [self.prep.image_path(i, "train", self.size) for i in tab.image_id]
            masks = [self.prep.mask_path(i, self.size) if self.has_boxes else None for i in tab.image_id]
            ds.append(TargetDataset(images, masks, tab[self.label_names].to_numpy(), np.full(len(tab), np.nan), self.size, aug))
        return ds[0], ds[1]

    def new_loss(self):
        """The mask loss trains where the external set has boxes (rsna), else it is off."""
        cfg = self.cfg
        return LabelLoss(cfg.mask_weight if self.has_boxes else 0.0, cfg.mask_bce, cfg.mask_dice)

    def write_best_images(self, images: pd.DataFrame) -> None:
        write_csv(images, self.dir / VAL_LABELS)

    def validate(self) -> tuple[dict, pd.DataFrame]:
        """The losses and the mean ROC AUC over labels (val_auc) of every rank's shard."""
        if self.d.active:  # each rank's batch-norm statistics drifted apart; rank 0's are saved
            from timm.utils import distribute_bn

            distribute_bn(self.eval_model(), self.d.world, reduce=False)
        sigmoid = lambda out: (torch.sigmoid(out["labels"].float()), None)  # noqa: E731
        model, loss_fn = self.eval_model(), self.loss_fn
        idx, probs, _, sums = P.infer(model, self.val_loader, self.device, self.amp_dtype, loss_fn=loss_fn, outputs=sigmoid)
        if idx is None:  # this rank's shard is empty
            idx, probs = np.zeros(0, int), np.zeros((0, len(self.label_names)))
        parts = self.d.gather((idx, probs, sums))
        rows = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts])
        n = sum(p[2]["n"] for p in parts)
        loss = {f"val_{k}": sum(p[2].get(k, 0.0) for p in parts) / max(n, 1) for k in LOSS_PARTS}
        tab = self.val_tab.iloc[rows]
        images = pd.DataFrame({"image_id": tab.image_id.values, "study_id": tab.study_id.values, "fold": self.fold})
        images[self.label_names] = probs
        auc = mean_auc(tab[self.label_names].to_numpy(dtype=np.float64), probs)
        stats = dict(loss, val_map=float("nan"), val_none_auc=float("nan"), val_auc=auc)
        return stats, images.sort_values("image_id").reset_index(drop=True)


def report_oof_labels(prep, run_dir: Path) -> None:
    """Multi-label pretraining: when every fold is finished, the OOF mean ROC AUC over labels of the best checkpoints."""
    files = [fold_dir(run_dir, k) / VAL_LABELS for k in range(prep.n_folds)]
    if not all(P.fold_done(f.parent) and f.is_file() for f in files):
        return
    probs = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    labels = ExtraData(prep.root).label_table().set_index("image_id").loc[probs.image_id]
    names = list(labels.columns)
    auc = mean_auc(labels.to_numpy(dtype=np.float64), probs[names].to_numpy(dtype=np.float64))
    LOGGER.info(
        f"{run_dir.name}: OOF mean ROC AUC over {len(names)} labels ({', '.join(names)}), {prep.n_folds} folds: {auc:.4f}; "
        f"fine-tune with `siimcovid classify train data=<SIIM prepared> init={run_dir}`"
    )

