"""Fusion as one function of (inputs, parameters): WBF, then the formulas, then tidy tables.

    run_fusion(inputs, params) -> Fused    (params built in Python: checked first by check_params)
    fuse_split(inputs, params) -> Fused    (params of a loaded config: checked at load)
        1. WBF of every image's box sets (siimcovid.fuse.wbf), weights per set from det_weights, each box's conf
           first multiplied by its member's det_scale (clipped to 1: a calibration of an over- or under-confident
           member, as the 1st place's 0.78 for Faster R-CNN)
        2. none_det from the fused confidences, by the registered `none_det` kind
           (prod: prod(1 - conf); max: 1 - max(conf))
        3. classifier members combined by siimcovid.ensemble.combine (cls_ensemble, cls_weights);
           none_cls = their none (none_source: auto = a file's none column where it has one,
           else its P(negative)); with none model files (none_cls=): none_model = their weighted mean
           (none_model_weights), and none_cls = (1 - none_model_weight) * none_cls + none_model_weight * none_model
           (formulas.none_with_model; without classifier files, none_model alone)
        4. none = the registered `none_blend` of (none_cls, none_det) with weight none_cls_weight;
           one source alone if only one kind of file was given
        5. opacity conf *= (1 - none)^opacity_exponent
        6. study probabilities = mean over the study's images; negative blended with their mean
           none by negative_none_weight. Without classifier files: the train class frequencies.

The parameters are FUSION_KEYS (siimcovid.config.fusion_keys(): the keys of cfg/fuse.yaml that
`fuse tune` searches and writes to best.yaml). WBF results are cached per (iou_thr,
skip_box_thr, conf_type, weights, scales), so a search over the cheap formula parameters costs one WBF.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from numbers import Real

import numpy as np
import pandas as pd

from siimcovid import ensemble, metrics
from siimcovid.config import fusion_keys, schema
from siimcovid.fuse import formulas
from siimcovid.fuse.inputs import FuseInputs
from siimcovid.fuse.wbf import wbf_table
from siimcovid.tables import (
    BOX_COLUMNS,
    BOX_PRED_COLUMNS,
    FUSED_BOXES,
    FUSED_IMAGES,
    FUSED_STUDIES,
    IMAGE_SUFFIX,
    STUDY_CLASSES,
    STUDY_SUFFIX,
)
from siimcovid.utils import LOGGER, SiimError, as_list

FUSION_KEYS = fusion_keys()


def fusion_params(cfg) -> dict:
    """The fusion parameters of a config (FUSION_KEYS)."""
    missing = [k for k in FUSION_KEYS if k not in cfg]
    if missing:
        raise SiimError(f"config lacks fusion key(s) {missing}")
    return {k: cfg[k] for k in FUSION_KEYS}


def check_param(key: str, value) -> None:
    """One fusion parameter against its spec in cfg/fuse.yaml (the one place of the parameters'
    types, ranges and choices); a one-line ConfigError naming the key."""
    schema("fuse").check(key, value)


def check_params(params: dict) -> None:
    """Fail fast, with the key's name, on a parameter no input would make valid (check_param).

    A loaded config is checked already; this is for parameter dicts built in Python (run_fusion
    called directly; `fuse tune` checks its candidate values the same way)."""
    missing = [k for k in FUSION_KEYS if k not in params]
    if missing:
        raise SiimError(f"fusion parameters lack {missing}")
    for key in FUSION_KEYS:
        check_param(key, params[key])


def not_factors(values) -> list:
    """The values that are no fusion factor (a finite number > 0, not a bool): what a per-member setting refuses."""
    return [v for v in values if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v <= 0]


def per_set(sets: pd.DataFrame, value, det_files: list[str], key: str = "det_weights") -> list[float]:
    """One factor per box set from a per-member setting (det_weights, det_scale): [] (all 1), a list (one per det
    file), or a mapping {model name: factor} (models not named get 1). A mapping's values are checked here (fuse.yaml's
    spec checks a list's, not a map's: a bundle's or a cfg file's mapping is hostile)."""
    if value is None or (isinstance(value, (list, tuple, dict)) and len(value) == 0):
        return [1.0] * len(sets)
    if isinstance(value, dict):
        unknown = sorted(set(map(str, value)) - set(sets["model"]))
        if unknown:
            raise SiimError(f"{key} names model(s) {unknown} not in the detection files (models: {sorted(set(sets['model']))})")
        if not_factors(value.values()):
            raise SiimError(f"{key} must be numbers > 0 (leave a model out rather than give it 0), got {value}")
        return [float(value.get(m, 1.0)) for m in sets["model"]]
    per_file = as_list(value)
    if len(per_file) != len(det_files):
        raise SiimError(f"{key} has {len(per_file)} value(s) for {len(det_files)} det file(s): give one per file, e.g. {key}=2,1")
    return [float(per_file[f]) for f in sets["file"]]


def set_weights(sets: pd.DataFrame, det_weights, det_files: list[str]) -> list[float]:
    """One WBF weight per box set, from det_weights (per_set)."""
    return per_set(sets, det_weights, det_files, "det_weights")


def set_scales(inputs: FuseInputs, det_scale) -> list[float]:
    """One confidence factor per box set, from det_scale (per_set)."""
    return per_set(inputs.sets, det_scale, inputs.det_files, "det_scale")


def scaled_boxes(inputs: FuseInputs, scales: list[float]) -> pd.DataFrame:
    """inputs.boxes with each box's conf times its set's factor (set_scales), clipped to [0, 1] (all 1: as they are).

    A calibration of a member's confidences: applied before WBF, so the fused boxes, the skip_box_thr cut and the
    detector's none (computed from the fused boxes) all see the calibrated confidences, on OOF (where tune fits the
    none formulas) as on test."""
    scale = np.asarray(scales, dtype=np.float64)
    if not len(inputs.boxes) or (scale == 1.0).all():
        return inputs.boxes
    factor = scale[inputs.boxes["set"].to_numpy(dtype=np.int64)]
    return inputs.boxes.assign(conf=np.clip(inputs.boxes["conf"].to_numpy(dtype=np.float64) * factor, 0.0, 1.0))


@dataclass
class Fused:
    """The fused predictions of one split, as tidy tables (columns: siimcovid.tables FUSED_*)."""

    boxes: pd.DataFrame  # FUSED_BOXES: final conf, the WBF conf before re-weighting, box (original px)
    images: pd.DataFrame  # FUSED_IMAGES
    studies: pd.DataFrame  # FUSED_STUDIES

    def pred(self) -> pd.DataFrame:
        """The metric's tidy prediction rows (tables.PREDICTIONS): studies (4 classes each), then opacity boxes and none."""
        return pd.concat(
            [
                metrics.study_pred(self.studies),
                metrics.image_pred(self.boxes[BOX_PRED_COLUMNS], self.images[["image_id", "none"]]),
            ],
            ignore_index=True,
        )

    def ids(self) -> list[str]:
        """Submission ids: studies, then images, in the inputs' order."""
        return [s + STUDY_SUFFIX for s in self.studies["study_id"]] + [i + IMAGE_SUFFIX for i in self.images["image_id"]]


class WbfCache:
    """The last few WBF results by (iou_thr, skip_box_thr, conf_type, weights): a search that varies
    only the formulas reuses one WBF; `runs` counts the WBF runs actually done."""

    def __init__(self, size: int = 4):
        self.size, self.runs, self.items = size, 0, OrderedDict()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key, value) -> None:
        self.runs += 1
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)


def fuse_boxes(inputs: FuseInputs, params: dict, workers: int | None = 0, cache: WbfCache | None = None) -> pd.DataFrame:
    """WBF of every image (BOX_PRED_COLUMNS: image_id, conf, box in original px), cached."""
    weights = set_weights(inputs.sets, params["det_weights"], inputs.det_files)
    scales = set_scales(inputs, params["det_scale"])
    key = (params["iou_thr"], params["skip_box_thr"], params["conf_type"], tuple(weights), tuple(scales))
    fused = cache.get(key) if cache is not None else None
    if fused is None:
        fused = wbf_table(
            scaled_boxes(inputs, scales),
            inputs.images[["image_id", "rows", "cols"]],
            inputs.n_sets,
            weights,
            iou_thr=params["iou_thr"],
            skip_box_thr=params["skip_box_thr"],
            conf_type=params["conf_type"],
            workers=workers,
        )
        if cache is not None:
            cache.put(key, fused)
    return fused


def none_det_by_fold(inputs: FuseInputs, params: dict, workers: int | None = 0) -> np.ndarray:
    """Test split: the detector's none computed fold by fold, as out of fold, then averaged.

    WBF's confidence averages over its members. Out of fold an image is seen by one fold model
    per detector; on test by every fold's model, so a box that one fold of five found keeps a
    fifth of its confidence. The fused test boxes rightly reflect that consensus, but the none
    formulas and their tuned weights were fitted on the out-of-fold scale: computing none_det on
    each fold's members alone keeps it on that scale.
    """
    weights = set_weights(inputs.sets, params["det_weights"], inputs.det_files)
    n = len(inputs.images)
    index = pd.Index(inputs.images["image_id"])
    scaled = scaled_boxes(inputs, set_scales(inputs, params["det_scale"]))
    per_fold = []
    for fold in sorted(set(inputs.sets["fold"])):
        members = inputs.sets.loc[inputs.sets["fold"] == fold, "set"].to_numpy()
        recode = {int(s): i for i, s in enumerate(members)}
        boxes = scaled[scaled["set"].isin(members)]
        boxes = boxes.assign(set=boxes["set"].map(recode).to_numpy(dtype=np.int64))
        fused = wbf_table(
            boxes,
            inputs.images[["image_id", "rows", "cols"]],
            len(members),
            [weights[int(s)] for s in members],
            iou_thr=params["iou_thr"],
            skip_box_thr=params["skip_box_thr"],
            conf_type=params["conf_type"],
            workers=workers,
        )
        codes = index.get_indexer(fused["image_id"])
        per_fold.append(formulas.none_from_detector(fused["conf"].to_numpy(dtype=np.float64), codes, n, params["none_det"]))
    return np.mean(per_fold, axis=0)


def detector_none(inputs: FuseInputs, params: dict, wbf_conf: np.ndarray, codes: np.ndarray, workers: int | None) -> np.ndarray:
    """none_det per image (NaN without detection files); on test with several folds, fold by fold."""
    n = len(inputs.images)
    if inputs.n_sets == 0:
        return np.full(n, np.nan)
    if inputs.split == "test" and inputs.sets["fold"].nunique() > 1:
        return none_det_by_fold(inputs, params, workers)
    return formulas.none_from_detector(wbf_conf, codes, n, params["none_det"])


def classifier_table(inputs: FuseInputs, params: dict) -> np.ndarray | None:
    """Combined classifier members -> (n_images, 5): negative, typical, indeterminate, atypical, none_cls."""
    if not inputs.members:
        return None
    source = params["none_source"]
    arrays = []
    for i, m in enumerate(inputs.members):
        values = m[[*STUDY_CLASSES, "none"]].to_numpy(dtype=np.float64).copy()
        has_none = not np.isnan(values[:, 4]).any()
        if source == "none" and not has_none:
            name = inputs.member_files[i] if i < len(inputs.member_files) else f"classifier member {i}"
            raise SiimError(f"none_source=none but {name} has no `none` column (use none_source=auto or negative)")
        head = values[:, 4] if has_none and source != "negative" else None
        values[:, 4] = formulas.none_from_classifier(values[:, 0], head)
        arrays.append(values)
    weights = as_list(params["cls_weights"])
    try:
        return ensemble.combine(arrays, weights or None, params["cls_ensemble"])
    except SiimError as e:
        raise SiimError(f"cls_weights / cls_ensemble: {e}") from None


def model_none(inputs: FuseInputs, params: dict) -> np.ndarray | None:
    """The none models' none per image (none_cls= files): their mean weighted by none_model_weights; None without."""
    if not inputs.none_members:
        return None
    weights = [float(w) for w in as_list(params["none_model_weights"])] or [1.0] * len(inputs.none_members)
    if len(weights) != len(inputs.none_members):
        raise SiimError(
            f"none_model_weights has {len(weights)} value(s) for {len(inputs.none_members)} none_cls file(s): give one per file"
        )
    return np.average(np.stack(inputs.none_members), axis=0, weights=weights)


def classifier_none(inputs: FuseInputs, params: dict, probs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(none_cls, none_model): the classifier side's none (the classifiers' none with the none models' blended in by
    none_model_weight) and the none models' alone (NaN without none_cls files; none_cls NaN without either)."""
    n = len(inputs.images)
    none_cls = probs[:, 4] if probs is not None else np.full(n, np.nan)
    none_model = model_none(inputs, params)
    if none_model is None:
        return none_cls, np.full(n, np.nan)
    if probs is None:
        return none_model, none_model
    return formulas.none_with_model(none_cls, none_model, params["none_model_weight"]), none_model


def study_table(inputs: FuseInputs, params: dict, images: pd.DataFrame, probs: np.ndarray | None) -> pd.DataFrame:
    """One FUSED_STUDIES row per study of inputs.study_ids: the mean of its images' classifier
    probabilities (the train class frequencies without classifier files), negative blended with none."""
    per_image = images[["study_id", "none"]].copy()
    if probs is not None:
        per_image[STUDY_CLASSES] = probs[:, :4]
    else:
        for c in STUDY_CLASSES:
            per_image[c] = inputs.priors[c]
    studies = formulas.study_probabilities(per_image, params["negative_none_weight"])
    return studies.set_index("study_id").loc[inputs.study_ids].reset_index()[FUSED_STUDIES.names]


def run_fusion(inputs: FuseInputs, params: dict, workers: int | None = 0, cache: WbfCache | None = None) -> Fused:
    """Fuse one split with a parameter dict built in Python: checked (check_params), then fuse_split."""
    check_params(params)
    return fuse_split(inputs, params, workers, cache)


def fuse_split(inputs: FuseInputs, params: dict, workers: int | None = 0, cache: WbfCache | None = None) -> Fused:
    """Fuse one split with checked parameters (a loaded config's, or checked by check_params); the
    steps of the module docstring."""
    images = inputs.images
    n = len(images)
    has_det, has_cls = inputs.n_sets > 0, bool(inputs.members) or bool(inputs.none_members)
    boxes = fuse_boxes(inputs, params, workers, cache) if has_det else FUSED_BOXES.empty()[BOX_PRED_COLUMNS]
    codes = pd.Index(images["image_id"]).get_indexer(boxes["image_id"])
    wbf_conf = boxes["conf"].to_numpy(dtype=np.float64)

    none_det = detector_none(inputs, params, wbf_conf, codes, workers)
    probs = classifier_table(inputs, params)
    none_cls, none_model = classifier_none(inputs, params, probs)
    if has_det and has_cls:
        none = formulas.blend_none(none_cls, none_det, params["none_cls_weight"], params["none_blend"])
    else:
        none = none_det if has_det else none_cls
    conf = formulas.reweight_opacity(wbf_conf, none[codes] if len(codes) else np.zeros(0), params["opacity_exponent"])

    box_table = pd.DataFrame({"image_id": boxes["image_id"].to_numpy(dtype=object), "conf": conf, "wbf_conf": wbf_conf})
    box_table[BOX_COLUMNS] = boxes[BOX_COLUMNS].to_numpy(dtype=np.float64)
    image_table = images.assign(
        n_boxes=np.bincount(codes, minlength=n) if len(codes) else np.zeros(n, dtype=np.int64),
        none_cls=none_cls,
        none_det=none_det,
        none_model=none_model,
        none=none,
    )[FUSED_IMAGES.names]
    studies = study_table(inputs, params, image_table, probs)
    return Fused(boxes=box_table[FUSED_BOXES.names], images=image_table, studies=studies)


def score_fused(inputs: FuseInputs, fused: Fused) -> metrics.Score:
    """The competition metric of out-of-fold fused predictions against the truth."""
    if inputs.truth is None:
        raise SiimError("no truth to score against (test split)")
    return metrics.score(inputs.truth, fused.pred())


def fold_scores(inputs: FuseInputs, fused: Fused) -> pd.DataFrame:
    """The SCORES table of out-of-fold fused predictions: "all", then one row per fold."""
    if inputs.truth is None:
        raise SiimError("no truth to score against (test split)")
    return metrics.fold_scores(inputs.truth, fused.pred(), fused.images)


def describe_inputs(inputs: FuseInputs) -> None:
    det = f"{inputs.n_sets} box set(s) from {len(inputs.det_files)} file(s)" if inputs.n_sets else "no detection file"
    cls = f"{len(inputs.members)} classifier file(s)" if inputs.members else "no classifier file (study rows: class frequencies)"
    cls += f"; {len(inputs.none_files)} none model file(s)" if inputs.none_files else ""
    LOGGER.info(f"fuse: {inputs.split}: {len(inputs.images)} images, {len(inputs.study_ids)} studies; {det}; {cls}")
