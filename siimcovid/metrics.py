"""The competition metric: PASCAL VOC 2010 AP at IoU > 0.5 per class, averaged over classes.

Exactly as the competition's evaluation page defines it (restated in the README's "Scoring" section; the
tables below are siimcovid/tables.py's TRUTH and PREDICTIONS). Everything works on two tidy tables whose ids
carry the submission suffix (``<study>_study``, ``<image>_image``)::

    truth  id, cls, x_min, y_min, x_max, y_max         one row per ground-truth box
    pred   id, cls, conf, x_min, y_min, x_max, y_max   one row per predicted box

Study rows have one truth row, the study's class with the box 0 0 1 1; image rows have one
truth row per opacity box (original pixels), or ``none`` with the box 0 0 1 1.

Per class (VOC devkit rule):
  * predictions of the class are ranked by confidence, descending; ties keep the order of the
    prediction table (a stable sort, as the MATLAB devkit's ``sort`` is);
  * each prediction goes to the ground-truth box of the same row and class with the highest IoU
    among ALL of them (matched or not; ties: the first in truth-table order);
  * it is a true positive when that IoU is > iou_threshold (strictly, "exceeds 0.5") and the box
    was not matched by a higher-ranked prediction; otherwise a false positive. Predictions on rows
    whose truth lacks the class are false positives; boxes no prediction matches lower recall;
  * AP = area under the precision/recall curve with VOC 2010 all-point interpolation (precision
    made monotonically non-increasing, summed over the recall steps).

IoU is computed on continuous coordinates: area = (x_max - x_min) * (y_max - y_min), with no
VOC "+1" pixel convention. Boxes here are sub-pixel floats in original pixels, and the study /
none box 0 0 1 1 would otherwise become a 2x2 box; the choice changes IoU only for tiny boxes.

Rows of the prediction whose id has no truth row at all are not part of the evaluated set and
are ignored (counted in ``Score.n_unscored``); a Kaggle submission holds exactly the truth ids,
and ``siimcovid evaluate`` restricts the truth to the ids present in an out-of-fold submission.

The score averages AP over the classes present in the truth (optionally restricted to
``classes``): with all six, final = (4 x study mAP + AP(opacity) + AP(none)) / 6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from siimcovid.tables import (
    BOX_COLUMNS,
    BOX_PRED_COLUMNS,
    CLASSES,
    IMAGE_CLASSES,
    IMAGE_SUFFIX,
    PREDICTIONS,
    SCORES,
    STUDY_CLASSES,
    STUDY_SUFFIX,
    TRUTH,
    WHOLE,
)
from siimcovid.utils import SiimError, as_list

TRUTH_COLUMNS = TRUTH.names  # id, cls, x_min, y_min, x_max, y_max (siimcovid.data.truth builds these rows)
PRED_COLUMNS = PREDICTIONS.names  # id, cls, conf, x_min, y_min, x_max, y_max
CLASS_GROUPS = {"study": STUDY_CLASSES, "image": IMAGE_CLASSES, "all": CLASSES}


# ----------------------------------------------------------------------------- the metric
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise IoU of two (n, 4) arrays of x1y1x2y2 boxes (continuous coordinates)."""
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010 all-point interpolated AP from the cumulative recall / precision of ranked predictions."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: non-increasing
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def match_predictions(t_row, t_box, p_row, p_box, p_conf, iou_threshold: float = 0.5):
    """VOC matching of one class. Rows are integer codes. Returns (tp flags in rank order, conf in rank order).

    Vectorised: the box a prediction goes to does not depend on earlier matches (the argmax is over
    all boxes of its row), so a prediction is a TP exactly when it is the highest-ranked one whose
    best box is that box and whose IoU exceeds the threshold.
    """
    order = np.argsort(-p_conf, kind="stable")
    p_row, p_box, p_conf = p_row[order], p_box[order], p_conf[order]
    t_order = np.argsort(t_row, kind="stable")  # keeps truth-table order within a row (argmax ties)
    t_row, t_box = t_row[t_order], t_box[t_order]
    n = len(p_row)
    start = np.searchsorted(t_row, p_row, "left")
    counts = np.searchsorted(t_row, p_row, "right") - start
    # all (prediction, truth box of the same row) pairs, grouped by prediction
    pair_pred = np.repeat(np.arange(n), counts)
    first_pair = np.cumsum(counts) - counts
    pair_gt = np.repeat(start - first_pair, counts) + np.arange(len(pair_pred))
    iou = box_iou(p_box[pair_pred], t_box[pair_gt])
    has = counts > 0
    best = np.full(n, -1.0)
    if has.any():
        best[has] = np.maximum.reduceat(iou, first_pair[has])
    # first truth box reaching the best IoU (devkit's max() returns the first)
    at_best = np.flatnonzero(iou == best[pair_pred])
    preds_at_best, first = np.unique(pair_pred[at_best], return_index=True)
    best_gt = np.full(n, -1)
    best_gt[preds_at_best] = pair_gt[at_best[first]]
    candidates = np.flatnonzero(has & (best > iou_threshold))
    tp = np.zeros(n, dtype=bool)
    _, first_claim = np.unique(best_gt[candidates], return_index=True)  # candidates are in rank order
    tp[candidates[first_claim]] = True
    return tp, p_conf


def precision_recall(tp: np.ndarray, n_truth: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative recall and precision at each ranked prediction (tp: TP flags in rank order)."""
    ctp = np.cumsum(tp)
    return ctp / n_truth, ctp / np.arange(1, len(tp) + 1)


def ap_from_tp(tp: np.ndarray, n_truth: int) -> float:
    """VOC 2010 AP of one class from its TP flags in rank order (nan without truth, 0 without predictions)."""
    if n_truth == 0:
        return math.nan
    if len(tp) == 0:
        return 0.0
    return voc_ap(*precision_recall(tp, n_truth))


def _check_table(df: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SiimError(f"{what} table lacks column(s) {missing}; expected {columns}")
    numeric = [c for c in columns if c not in ("id", "cls")]
    if len(df) and not np.isfinite(df[numeric].to_numpy(dtype=np.float64)).all():
        bad = df[~np.isfinite(df[numeric].to_numpy(dtype=np.float64)).all(axis=1)].iloc[0]
        raise SiimError(f"{what} table has a NaN or infinite value, e.g. id {bad['id']!r} class {bad['cls']!r}")


class _Prepared:
    """Both tables with ids coded as integers once, so each class is a cheap slice."""

    def __init__(self, truth: pd.DataFrame, pred: pd.DataFrame):
        _check_table(truth, TRUTH_COLUMNS, "truth")
        _check_table(pred, PRED_COLUMNS, "prediction")
        truth_ids = pd.Index(pd.unique(truth["id"].astype(str)))
        t_code = truth_ids.get_indexer(truth["id"].astype(str))
        p_code = truth_ids.get_indexer(pred["id"].astype(str))
        scored = p_code >= 0
        self.n_unscored = int(pd.unique(pred["id"][~scored]).size) if (~scored).any() else 0
        self.t_code, self.t_cls = t_code, truth["cls"].astype(str).to_numpy()
        self.t_box = truth[BOX_COLUMNS].to_numpy(dtype=np.float64)
        self.p_code, self.p_cls = p_code[scored], pred["cls"].astype(str).to_numpy()[scored]
        self.p_box = pred[BOX_COLUMNS].to_numpy(dtype=np.float64)[scored]
        self.p_conf = pred["conf"].to_numpy(dtype=np.float64)[scored]

    def classes(self) -> list[str]:
        present = list(pd.unique(self.t_cls))
        return [c for c in CLASSES if c in present] + sorted(c for c in present if c not in CLASSES)

    def matches(self, cls: str, iou_threshold: float) -> tuple[np.ndarray, int, int]:
        """TP flags of the class's scored predictions in rank order, its truth boxes, its predictions."""
        t, p = self.t_cls == cls, self.p_cls == cls
        tp, _ = match_predictions(self.t_code[t], self.t_box[t], self.p_code[p], self.p_box[p], self.p_conf[p], iou_threshold)
        return tp, int(t.sum()), int(p.sum())

    def ap(self, cls: str, iou_threshold: float) -> tuple[float, int, int]:
        tp, n_truth, n_pred = self.matches(cls, iou_threshold)
        return ap_from_tp(tp, n_truth), n_truth, n_pred


def class_matches(truth: pd.DataFrame, pred: pd.DataFrame, cls: str, iou_threshold: float = 0.5) -> tuple[np.ndarray, int]:
    """The metric's matching of one class: TP flags of its scored predictions in rank order, and its number of truth boxes."""
    tp, n_truth, _ = _Prepared(truth, pred).matches(cls, iou_threshold)
    return tp, n_truth


def average_precision(truth: pd.DataFrame, pred: pd.DataFrame, cls: str, iou_threshold: float = 0.5) -> float:
    """VOC 2010 AP of one class (nan when the truth has no box of that class)."""
    return _Prepared(truth, pred).ap(cls, iou_threshold)[0]


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


@dataclass
class Score:
    """AP per class and the averages the competition reports."""

    ap: dict[str, float]  # class -> AP, classes present in the truth (and asked for)
    n_truth: dict[str, int] = field(default_factory=dict)  # class -> ground-truth boxes
    n_pred: dict[str, int] = field(default_factory=dict)  # class -> scored predictions
    n_unscored: int = 0  # prediction ids with no truth row (ignored)

    @property
    def study_map(self) -> float:
        """Mean AP over the study classes present (nan if none)."""
        return _nanmean([v for k, v in self.ap.items() if k in STUDY_CLASSES])

    @property
    def image_map(self) -> float:
        """Mean AP over opacity and none, those present (nan if none)."""
        return _nanmean([v for k, v in self.ap.items() if k in IMAGE_CLASSES])

    @property
    def final(self) -> float:
        """Mean AP over all classes scored: (4 x study mAP + AP(opacity) + AP(none)) / 6 with all six."""
        return _nanmean(self.ap.values())

    def table(self) -> pd.DataFrame:
        """One row per class: class, AP, n_truth, n_pred."""
        return pd.DataFrame(
            [
                {"class": k, "AP": v, "n_truth": self.n_truth.get(k, 0), "n_pred": self.n_pred.get(k, 0)}
                for k, v in self.ap.items()
            ],
            columns=["class", "AP", "n_truth", "n_pred"],
        )

    def row(self) -> dict:
        """The score as a table row (SCORE_COLUMNS: AP per class scored, study_map, image_map, final);
        a class not scored has no key. The rows of scores_oof.csv, of run's CV table and of tune's trials."""
        return {**self.ap, "study_map": self.study_map, "image_map": self.image_map, "final": self.final}

    def to_dict(self) -> dict:
        """JSON-ready; nan becomes None."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {
            "final": clean(self.final),
            "study_map": clean(self.study_map),
            "image_map": clean(self.image_map),
            "ap": {k: clean(v) for k, v in self.ap.items()},
            "n_truth": dict(self.n_truth),
            "n_pred": dict(self.n_pred),
            "n_unscored": self.n_unscored,
        }

    def format(self) -> str:
        """A per-class table and the averages, for people."""
        lines = [f"{'class':<14} {'n_truth':>8} {'n_pred':>8} {'AP':>7}"]
        for k, v in self.ap.items():
            lines.append(f"{k:<14} {self.n_truth.get(k, 0):>8} {self.n_pred.get(k, 0):>8} {v:>7.4f}")
        lines.append("-" * 40)
        lines.append(f"{'study mAP':<31} {self.study_map:>8.4f}")
        lines.append(f"{'image mAP (opacity, none)':<31} {self.image_map:>8.4f}")
        lines.append(f"{'final (mean over classes)':<31} {self.final:>8.4f}")
        if self.n_unscored:
            lines.append(f"({self.n_unscored} predicted ids have no truth and were not scored)")
        return "\n".join(lines)


def resolve_classes(classes) -> list[str] | None:
    """None | 'study' | 'image' | 'all' | a class | a list of those -> list of class names (None = all present)."""
    if classes is None:
        return None
    out: list[str] = []
    for c in as_list(classes):
        out += CLASS_GROUPS.get(c, [c])
    return out


def score(truth: pd.DataFrame, pred: pd.DataFrame, classes=None, iou_threshold: float = 0.5) -> Score:
    """Score predictions against the truth: AP per class present in the truth (restricted to `classes`).

    classes: None (all present), a list of class names, or 'study' / 'image' / 'all'.
    Study rows only (classifier checkpoints): score(truth.study_truth(..), study_pred(..)).
    Opacity only (detectors): score(truth.image_truth(..), image_pred(..), classes=['opacity'])
    (siimcovid.data.truth builds the truth rows).
    """
    prep = _Prepared(truth, pred)
    wanted = resolve_classes(classes)
    names = [c for c in prep.classes() if wanted is None or c in wanted]
    ap, n_truth, n_pred = {}, {}, {}
    for cls in names:
        ap[cls], n_truth[cls], n_pred[cls] = prep.ap(cls, iou_threshold)
    return Score(ap=ap, n_truth=n_truth, n_pred=n_pred, n_unscored=prep.n_unscored)


# ----------------------------------------------------------------------------- tidy builders
def whole_rows(ids, classes, conf=None) -> pd.DataFrame:
    """Rows of whole-image classes (the study classes, none) with the box 0 0 1 1: truth rows
    (TRUTH_COLUMNS) without conf, prediction rows (PRED_COLUMNS) with one conf per row."""
    n = len(ids)
    out = {"id": np.asarray(ids, dtype=object), "cls": np.asarray(classes, dtype=object)}
    if conf is not None:
        out["conf"] = np.asarray(conf, dtype=np.float64)
    for c, v in zip(BOX_COLUMNS, WHOLE):
        out[c] = np.full(n, v)
    return pd.DataFrame(out, columns=TRUTH_COLUMNS if conf is None else PRED_COLUMNS)


def study_mean(images: pd.DataFrame, columns: list[str], by="study_id", sort: bool = False) -> pd.DataFrame:
    """THE study probability: the mean of `columns` over each study's rows (one per image, or
    per model and image); one row per study (per `by`: a key or a list of keys), indexed by it,
    in order of first appearance (sort=False) or of the keys (sort=True)."""
    return images.groupby(by, sort=sort)[columns].mean()


def class_priors(studies: pd.DataFrame) -> dict[str, float]:
    """The study classes' frequencies over the studies of these rows (study_id, study_label; one row
    per study, or per image): what a study gets without a classifier."""
    labels = studies.drop_duplicates("study_id")["study_label"]
    counts = labels.value_counts()
    return {c: float(counts.get(c, 0)) / max(len(labels), 1) for c in STUDY_CLASSES}


def study_pred(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with study_id and the four class probabilities -> four pred rows per study.

    Several rows of one study (e.g. one per image) are averaged: the usual study probability.
    Aggregate beforehand for anything else (geometric mean, rank average).
    """
    missing = [c for c in ["study_id", *STUDY_CLASSES] if c not in df.columns]
    if missing:
        raise SiimError(f"study prediction table lacks column(s) {missing}")
    probs = df[["study_id", *STUDY_CLASSES]].copy()
    probs["study_id"] = probs["study_id"].astype(str)
    if probs.study_id.duplicated().any():
        probs = study_mean(probs, STUDY_CLASSES).reset_index()
    values = probs[STUDY_CLASSES].to_numpy(dtype=np.float64)  # (n, 4)
    ids = np.repeat((probs.study_id + STUDY_SUFFIX).to_numpy(), len(STUDY_CLASSES))
    classes = np.tile(STUDY_CLASSES, len(probs))
    return whole_rows(ids, classes, values.reshape(-1))


def image_pred(boxes_df: pd.DataFrame | None, none_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Opacity boxes (BOX_PRED_COLUMNS: image_id, conf, x_min, y_min, x_max, y_max; original px) and
    optional none probabilities (image_id, none) -> pred rows."""
    parts = []
    if boxes_df is not None and len(boxes_df):
        missing = [c for c in BOX_PRED_COLUMNS if c not in boxes_df.columns]
        if missing:
            raise SiimError(f"box prediction table lacks column(s) {missing}")
        part = boxes_df[BOX_PRED_COLUMNS].copy()
        part.insert(0, "id", part.pop("image_id").astype(str) + IMAGE_SUFFIX)
        part.insert(1, "cls", "opacity")
        parts.append(part.astype({"conf": np.float64, **{c: np.float64 for c in BOX_COLUMNS}}))
    if none_df is not None and len(none_df):
        missing = [c for c in ["image_id", "none"] if c not in none_df.columns]
        if missing:
            raise SiimError(f"none prediction table lacks column(s) {missing}")
        parts.append(
            whole_rows(none_df.image_id.astype(str) + IMAGE_SUFFIX, np.full(len(none_df), "none", dtype=object), none_df["none"])
        )
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("id", "cls") else np.float64) for c in PRED_COLUMNS})
    return pd.concat(parts, ignore_index=True)[PRED_COLUMNS]


# ----------------------------------------------------------------------------- per-fold score tables
def fold_scores(truth: pd.DataFrame, pred: pd.DataFrame, images: pd.DataFrame, classes=None) -> pd.DataFrame:
    """The SCORES table (siimcovid.tables.SCORES) every stage writes as scores_oof.csv: one row over
    all images ("all", first), then one per fold.

    images: image_id, study_id, fold of the images scored; truth and pred rows of other ids are left
    out of each row. classes as in `score` (detectors: ['opacity']; classifiers: the study
    classes and none)."""
    rows = []
    groups = [("all", images)] + [(str(k), g) for k, g in images.groupby("fold", sort=True)]
    for fold, part in groups:
        ids = set(part["image_id"].astype(str) + IMAGE_SUFFIX) | set(part["study_id"].astype(str) + STUDY_SUFFIX)
        result = score(truth[truth["id"].isin(ids)], pred[pred["id"].isin(ids)], classes=classes)
        rows.append({"fold": fold, "n_images": len(part), "n_studies": part["study_id"].nunique(), **result.row()})
    table = pd.DataFrame(rows)
    return table[[c for c in SCORES.names if c in table.columns]]
