"""The fusion formulas: where "none" comes from, how it re-weights opacity, how members combine.

Each is a tiny vectorised function, so the whole formula set can be read, tested by hand and
tuned on out-of-fold predictions. Why each exists:

* The metric scores `none 0 0 1 1` on every image row as a class of its own (AP(none) is 1/6 of
  the final score), so every image needs a good P(image has no opacity).
* The classifier sees the whole image: its P(negative) (or a dedicated none head) is the usual
  none. The detector has its own evidence: an image where it finds nothing confident is likely
  empty. prod(1 - conf) is the probability that none of the (fused) boxes is real if they were
  independent; 1 - max(conf) trusts only the best box. Blending the two sources (linearly or
  geometrically) averages out errors that are not shared.
* Opacity boxes are ranked across ALL images for AP(opacity). A box on an image the classifier
  calls empty is probably a false positive, so conf * (1 - none)^a pushes it down the ranking;
  a = 0 leaves the detector's confidences alone, larger a trusts the image-level none more.
* Study "negative" and image "none" are nearly the same label (a negative study has no boxes),
  so the study's negative can borrow from the mean none of its images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from siimcovid.data.siim import STUDY_CLASSES
from siimcovid.utils import SiimError

NONE_DET = ("prod", "max")
NONE_BLEND = ("linear", "geometric")
ENSEMBLES = {"mean": "mean", "geometric": "geometric", "geomean": "geometric", "rank": "rank"}
EPS = 1e-7


def none_from_classifier(negative, none=None):
    """The classifier's none: its none head when it has one, else P(negative).

    P(negative) is a fair stand-in (negative studies have no boxes) but not the same thing:
    images of positive studies can be empty too (often a study's second, duplicate image)."""
    return np.asarray(negative if none is None else none, dtype=np.float64)


def none_from_detector(conf, image_codes, n_images: int, kind: str = "prod") -> np.ndarray:
    """The detector's none per image from its (fused) box confidences.

    prod: prod(1 - conf), P(no box is real) if boxes were independent; many weak boxes add up.
    max:  1 - max(conf), only the most confident box counts.
    An image without boxes gets 1. conf: (n,) box confidences; image_codes: (n,) ints in 0..n_images-1.
    """
    if kind not in NONE_DET:
        raise SiimError(f"none_det={kind!r}: expected one of {', '.join(NONE_DET)}")
    conf = np.clip(np.asarray(conf, dtype=np.float64), 0.0, 1.0)
    codes = np.asarray(image_codes, dtype=np.int64)
    if kind == "prod":
        with np.errstate(divide="ignore"):
            logs = np.log1p(-conf)  # conf = 1 gives -inf: exp(-inf) = 0, P(none) = 0
        return np.exp(np.bincount(codes, weights=logs, minlength=n_images)) if len(codes) else np.ones(n_images)
    best = np.zeros(n_images)
    np.maximum.at(best, codes, conf)
    return 1.0 - best


def blend_none(none_cls, none_det, w: float, kind: str = "linear"):
    """none = w * none_cls + (1 - w) * none_det (linear), or none_cls^w * none_det^(1 - w) (geometric).

    w = 1: the classifier alone; w = 0: the detector alone. The geometric blend is a weighted
    geometric mean: an image both sources call fairly empty stays high, one source saying "boxes"
    pulls it down harder than the linear blend does."""
    if kind not in NONE_BLEND:
        raise SiimError(f"none_blend={kind!r}: expected one of {', '.join(NONE_BLEND)}")
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise SiimError(f"none_cls_weight={w}: expected a number in [0, 1]")
    a, b = np.asarray(none_cls, dtype=np.float64), np.asarray(none_det, dtype=np.float64)
    if kind == "linear":
        return w * a + (1.0 - w) * b
    return np.power(a, w) * np.power(b, 1.0 - w)  # 0 ** 0 == 1: w = 1 is exactly none_cls


def reweight_opacity(conf, none, a: float):
    """conf * (1 - none)^a: opacity boxes on images that look empty sink in the ranking. a = 0: unchanged."""
    if float(a) < 0:
        raise SiimError(f"opacity_exponent={a}: expected a number >= 0")
    return np.asarray(conf, dtype=np.float64) * np.power(1.0 - np.asarray(none, dtype=np.float64), float(a))


def negative_from_none(negative, mean_none, v: float):
    """Study negative = (1 - v) * P(negative) + v * (mean none of the study's images). v = 0: unchanged."""
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise SiimError(f"negative_none_weight={v}: expected a number in [0, 1]")
    return (1.0 - v) * np.asarray(negative, dtype=np.float64) + v * np.asarray(mean_none, dtype=np.float64)


def combine_members(members: list[np.ndarray], weights=None, method: str = "mean") -> np.ndarray:
    """Combine several members' probability arrays (same rows, same columns) into one.

    mean: weighted mean. geometric: weighted geometric mean (exp of the weighted mean log; a
    member that is sure a class is absent vetoes it, the product of members up to a power).
    rank: weighted mean of each column's percentile rank in (0, 1] (members on different
    scales count alike; AP reads only the ranking within a class)."""
    if method not in ENSEMBLES:
        raise SiimError(f"cls_ensemble={method!r}: expected one of mean, geometric (or geomean), rank")
    method = ENSEMBLES[method]
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in members])
    w = np.ones(len(members)) if weights is None or len(weights) == 0 else np.asarray(weights, dtype=np.float64)
    if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
        raise SiimError(f"cls_weights: need {len(members)} non-negative weights, not all 0; got {list(w)}")
    w = w / w.sum()
    if method == "rank":
        stack = np.stack([pd.DataFrame(m).rank(pct=True).to_numpy() for m in stack])
    elif method == "geometric":
        stack = np.log(np.clip(stack, EPS, 1.0))
    mixed = np.tensordot(w, stack, axes=1)
    return np.exp(mixed) if method == "geometric" else mixed


def study_probabilities(images: pd.DataFrame, negative_none_weight: float = 0.0) -> pd.DataFrame:
    """Per-image rows (study_id, the four class columns, none) -> one row per study: the mean over
    its images, with negative blended with the mean none (negative_from_none)."""
    grouped = images.groupby("study_id", sort=False)
    out = grouped[STUDY_CLASSES].mean()
    if "none" in images.columns and float(negative_none_weight) > 0:
        out["negative"] = negative_from_none(out["negative"], grouped["none"].mean(), negative_none_weight)
    return out.reset_index()[["study_id", *STUDY_CLASSES]]
