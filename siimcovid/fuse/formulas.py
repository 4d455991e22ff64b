"""The fusion formulas: where "none" comes from, how it re-weights opacity, how studies are formed.

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
* A binary none model (`classify train task=none`, fuse none_cls=) learns that one label alone; its none joins the
  classifiers' on the classifier side (none_with_model) before the blend with the detector's.
  4th place: none = p_neg^0.8 x (1 - p_opacity)^0.2 = none_model_weight=1 none_blend=geometric none_det=max none_cls_weight=0.8.

The choices of `none_det` and `none_blend` are functions registered here under those kinds
(`siimcovid.registry`): adding one is one registered function, and the settings' checks list
the registered names. The classifier members are combined by `siimcovid.ensemble.combine`.
The parameters' types, ranges and choices are declared once, in cfg/fuse.yaml: a loaded config is
checked against it, and so are parameters built in Python (`siimcovid.fuse.pipeline.check_params`);
these functions do not check them again.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from siimcovid import registry
from siimcovid.metrics import study_mean
from siimcovid.tables import STUDY_CLASSES


# ----------------------------------------------------------------------------- none_det: the detector's none
@registry.register("none_det", "prod")
def none_det_prod(conf: np.ndarray, codes: np.ndarray, n_images: int) -> np.ndarray:
    """prod(1 - conf) per image: P(no box is real) if boxes were independent; many weak boxes add up."""
    with np.errstate(divide="ignore"):
        logs = np.log1p(-conf)  # conf = 1 gives -inf: exp(-inf) = 0, P(none) = 0
    return np.exp(np.bincount(codes, weights=logs, minlength=n_images)) if len(codes) else np.ones(n_images)


@registry.register("none_det", "max")
def none_det_max(conf: np.ndarray, codes: np.ndarray, n_images: int) -> np.ndarray:
    """1 - max(conf) per image: only the most confident box counts."""
    best = np.zeros(n_images)
    np.maximum.at(best, codes, conf)
    return 1.0 - best


def none_from_detector(conf, image_codes, n_images: int, kind: str = "prod") -> np.ndarray:
    """The detector's none per image from its (fused) box confidences, by the registered `none_det` kind.

    An image without boxes gets 1. conf: (n,) box confidences; image_codes: (n,) ints in 0..n_images-1.
    """
    formula = registry.get("none_det", kind)
    conf = np.clip(np.asarray(conf, dtype=np.float64), 0.0, 1.0)
    return formula(conf, np.asarray(image_codes, dtype=np.int64), n_images)


def none_from_classifier(negative, none=None):
    """The classifier's none: its none head when it has one, else P(negative).

    P(negative) is a fair stand-in (negative studies have no boxes) but not the same thing:
    images of positive studies can be empty too (often a study's second, duplicate image)."""
    return np.asarray(negative if none is None else none, dtype=np.float64)


def none_with_model(none_cls, none_model, w: float) -> np.ndarray:
    """The classifier side's none with a binary none model's: (1 - w) * none_cls + w * none_model. w = 1: the none
    model alone (what the 4th place blended with the detector); w = 0: the classifiers alone."""
    return (1.0 - w) * np.asarray(none_cls, dtype=np.float64) + w * np.asarray(none_model, dtype=np.float64)


# ----------------------------------------------------------------------------- none_blend: classifier + detector
@registry.register("none_blend", "linear")
def blend_linear(none_cls: np.ndarray, none_det: np.ndarray, w: float) -> np.ndarray:
    """w * none_cls + (1 - w) * none_det."""
    return w * none_cls + (1.0 - w) * none_det


@registry.register("none_blend", "geometric")
def blend_geometric(none_cls: np.ndarray, none_det: np.ndarray, w: float) -> np.ndarray:
    """none_cls^w * none_det^(1 - w): a weighted geometric mean. An image both sources call fairly
    empty stays high; one source saying "boxes" pulls it down harder than the linear blend does."""
    return np.power(none_cls, w) * np.power(none_det, 1.0 - w)  # 0 ** 0 == 1: w = 1 is exactly none_cls


def blend_none(none_cls, none_det, w: float, kind: str = "linear"):
    """The none written: the registered `none_blend` kind of the two sources with weight w in [0, 1].

    w = 1: the classifier alone; w = 0: the detector alone."""
    formula = registry.get("none_blend", kind)
    return formula(np.asarray(none_cls, dtype=np.float64), np.asarray(none_det, dtype=np.float64), w)


# ----------------------------------------------------------------------------- opacity and studies
def reweight_opacity(conf, none, a: float):
    """conf * (1 - none)^a: opacity boxes on images that look empty sink in the ranking. a = 0: unchanged."""
    return np.asarray(conf, dtype=np.float64) * np.power(1.0 - np.asarray(none, dtype=np.float64), a)


def negative_from_none(negative, mean_none, v: float):
    """Study negative = (1 - v) * P(negative) + v * (mean none of the study's images). v = 0: unchanged."""
    return (1.0 - v) * np.asarray(negative, dtype=np.float64) + v * np.asarray(mean_none, dtype=np.float64)


def study_probabilities(images: pd.DataFrame, negative_none_weight: float = 0.0, by="study_id") -> pd.DataFrame:
    """Per-image rows (study_id, the four class columns, none) -> one row per study: the mean over
    its images (siimcovid.metrics.study_mean), with negative blended with the mean none (negative_from_none).
    by: the study's key, or keys (e.g. ["fold", "study_id"]: one row per fold model and study, as pseudo-labels
    take each teacher fold's own), its columns first. THE study probability of fusion and of pseudo-labels."""
    keys = [by] if isinstance(by, str) else list(by)
    borrow = "none" in images.columns and negative_none_weight > 0
    out = study_mean(images, [*STUDY_CLASSES, "none"] if borrow else STUDY_CLASSES, by=by)
    if borrow:
        out["negative"] = negative_from_none(out["negative"], out["none"], negative_none_weight)
    return out.reset_index()[[*keys, *STUDY_CLASSES]]
