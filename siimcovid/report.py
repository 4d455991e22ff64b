"""Plots for people: precision-recall curves per class, the study confusion matrix, sample images
with ground-truth and predicted boxes. Pure functions of tidy tables; each writes one PNG."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from siimcovid import metrics  # noqa: E402
from siimcovid.data.boxes import scale_boxes  # noqa: E402
from siimcovid.data.prepared import Prepared  # noqa: E402
from siimcovid.data.truth import oof_images  # noqa: E402
from siimcovid.tables import BOX_COLUMNS, CLASSES, STUDY_CLASSES  # noqa: E402
from siimcovid.utils import save_png  # noqa: E402


def pr_curve(truth: pd.DataFrame, pred: pd.DataFrame, cls: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Recall, precision (at each ranked prediction) and VOC AP of one class, with the metric's matching."""
    tp, n_truth = metrics.class_matches(truth, pred, cls)
    recall, precision = metrics.precision_recall(tp, max(n_truth, 1))
    return recall, precision, metrics.ap_from_tp(tp, n_truth)


def plot_pr_curves(truth: pd.DataFrame, pred: pd.DataFrame, path: Path, title: str = "") -> Path:
    classes = [c for c in CLASSES if (truth.cls == c).any()]
    cols = 3
    rows = (len(classes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, cls in zip(axes.flat, classes):
        recall, precision, ap = pr_curve(truth, pred, cls)
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        ax.plot(recall, precision, color="0.7", lw=1, label="precision")
        ax.step(recall, envelope, where="post", color="C0", lw=2, label="interpolated (VOC)")
        ax.set(title=f"{cls}: AP {ap:.3f}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(classes) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def confusion_matrix(labels: pd.Series, probs: pd.DataFrame) -> pd.DataFrame:
    """Counts of true study class (rows) x argmax predicted class (columns)."""
    predicted = np.asarray(STUDY_CLASSES)[probs[STUDY_CLASSES].to_numpy(float).argmax(1)]
    table = pd.crosstab(pd.Categorical(labels, STUDY_CLASSES), pd.Categorical(predicted, STUDY_CLASSES), dropna=False)
    table.index.name, table.columns.name = "true", "predicted"
    return table


def plot_confusion(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    values = table.to_numpy()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(table.columns)), table.columns, rotation=30)
    ax.set_yticks(range(len(table.index)), table.index)
    ax.set(xlabel="predicted (argmax)", ylabel="true", title=title)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(
                j, i, str(values[i, j]), ha="center", va="center", color="white" if values[i, j] > values.max() / 2 else "black"
            )
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def plot_samples(
    prepared: Prepared, boxes: pd.DataFrame, images: pd.DataFrame, path: Path, n: int = 8, min_conf: float = 0.05, seed: int = 0
) -> Path:
    """A grid of prepared images: ground truth in green, predicted boxes (conf >= min_conf) in red.

    boxes: image_id, conf, x_min, y_min, x_max, y_max (original px); images: image_id, none.
    Picks images with boxes in the truth and some without. The truth is siimcovid.data.truth's
    (the competition's unclipped boxes), drawn on the prepared image.
    """
    meta = prepared.split("train").set_index("image_id")
    ids = [i for i in images.image_id if i in meta.index]
    truth = oof_images(prepared.root, ids).set_index("image_id")
    rng = np.random.default_rng(seed)
    with_box = [i for i in ids if len(truth.loc[i, "boxes"]) > 0]
    without = [i for i in ids if len(truth.loc[i, "boxes"]) == 0]
    pick = list(rng.permutation(with_box)[: n - n // 4]) + list(rng.permutation(without)[: n // 4])
    size = max(prepared.sizes)
    none = images.set_index("image_id")["none"]
    cols = 4
    rows = max(1, (len(pick) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax, image_id in zip(axes.flat, pick):
        r, truth_boxes = meta.loc[image_id], truth.loc[image_id, "boxes"]
        img = cv2.imread(str(prepared.image_path(image_id, "train", size)), cv2.IMREAD_GRAYSCALE)
        ax.imshow(img, cmap="gray")
        for x1, y1, x2, y2 in scale_boxes(truth_boxes, (r.cols, r.rows), (size, size)):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1.5))
        mine = boxes[(boxes.image_id == image_id) & (boxes.conf >= min_conf)]
        xyxy = scale_boxes(mine[BOX_COLUMNS].to_numpy(float), (r.cols, r.rows), (size, size))
        for (x1, y1, x2, y2), c in zip(xyxy, mine.conf):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
            ax.text(x1, y1, f"{c:.2f}", color="red", fontsize=6, va="bottom")
        ax.set_title(f"{truth.loc[image_id, 'study_label']} | none {none.get(image_id, np.nan):.2f}", fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(pick) :]:
        ax.axis("off")
    fig.suptitle("green: ground truth, red: predicted (conf shown)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)
