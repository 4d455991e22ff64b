"""Fusion as one function of (inputs, parameters): WBF, then the formulas, then tidy tables.

    run_fusion(inputs, params) -> Fused
        1. WBF of every image's box sets (siimcovid.fuse.wbf), weights per set from det_weights
        2. none_det from the fused confidences: prod(1 - conf) or 1 - max(conf)
        3. classifier members combined (cls_ensemble, cls_weights); none_cls = their none
           (none_source: auto = a file's none column where it has one, else its P(negative))
        4. none = blend(none_cls, none_det, none_cls_weight, none_blend); one source alone if
           only one kind of file was given
        5. opacity conf *= (1 - none)^opacity_exponent
        6. study probabilities = mean over the study's images; negative blended with their mean
           none by negative_none_weight. Without classifier files: the train class frequencies.

The parameters are the FUSION_KEYS of siimcovid/cfg/fuse.yaml: what `fuse tune` searches and
writes to best.yaml. WBF results are cached per (iou_thr, skip_box_thr, conf_type, weights),
so a search over the cheap formula parameters costs one WBF.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from siimcovid import metrics
from siimcovid.data.siim import STUDY_CLASSES
from siimcovid.fuse import formulas
from siimcovid.fuse.inputs import FuseInputs, as_list, set_weights
from siimcovid.fuse.wbf import BOX_COLUMNS, wbf_table
from siimcovid.utils import LOGGER, SiimError

FUSION_KEYS = [
    "det_weights",
    "cls_weights",
    "cls_ensemble",
    "iou_thr",
    "skip_box_thr",
    "conf_type",
    "none_source",
    "none_det",
    "none_cls_weight",
    "none_blend",
    "opacity_exponent",
    "negative_none_weight",
]
IMAGE_TABLE = ["image_id", "study_id", "fold", "rows", "cols", "n_boxes", "none_cls", "none_det", "none"]
BOX_TABLE = ["image_id", "conf", "wbf_conf", *BOX_COLUMNS]
STUDY_TABLE = ["study_id", *STUDY_CLASSES]


def fusion_params(cfg) -> dict:
    """The fusion parameters of a config (FUSION_KEYS)."""
    missing = [k for k in FUSION_KEYS if k not in cfg]
    if missing:
        raise SiimError(f"config lacks fusion key(s) {missing}")
    return {k: cfg[k] for k in FUSION_KEYS}


def check_params(params: dict) -> None:
    """Fail fast, with the key's name, on a parameter no input would make valid."""
    from siimcovid.fuse.inputs import NONE_SOURCES
    from siimcovid.fuse.wbf import check_wbf_params

    def number(key: str, lo: float, hi: float) -> None:
        try:
            value = float(params[key])
        except (TypeError, ValueError):
            raise SiimError(f"{key}={params[key]!r}: expected a number") from None
        if not lo <= value <= hi:
            raise SiimError(f"{key}={value}: expected a number in [{lo}, {hi}]")

    for key in ("iou_thr", "skip_box_thr", "none_cls_weight", "negative_none_weight"):
        number(key, 0.0, 1.0)
    number("opacity_exponent", 0.0, float("inf"))
    check_wbf_params(params["iou_thr"], params["skip_box_thr"], str(params["conf_type"]))
    choices = {
        "none_det": formulas.NONE_DET,
        "none_blend": formulas.NONE_BLEND,
        "none_source": NONE_SOURCES,
        "cls_ensemble": tuple(formulas.ENSEMBLES),
    }
    for key, allowed in choices.items():
        if str(params[key]) not in allowed:
            raise SiimError(f"{key}={params[key]!r}: expected one of {', '.join(allowed)}")


@dataclass
class Fused:
    """The fused predictions of one split, as tidy tables (schemas: README, section Fusion)."""

    boxes: pd.DataFrame  # BOX_TABLE: final conf, the WBF conf before re-weighting, box (original px)
    images: pd.DataFrame  # IMAGE_TABLE
    studies: pd.DataFrame  # STUDY_TABLE

    def pred(self) -> pd.DataFrame:
        """The metric's tidy prediction rows: studies (4 classes each), then opacity boxes and none."""
        return pd.concat(
            [
                metrics.study_pred(self.studies),
                metrics.image_pred(self.boxes[["image_id", "conf", *BOX_COLUMNS]], self.images[["image_id", "none"]]),
            ],
            ignore_index=True,
        )

    def ids(self) -> list[str]:
        """Submission ids: studies, then images, in the inputs' order."""
        return [s + metrics.STUDY_SUFFIX for s in self.studies["study_id"]] + [
            i + metrics.IMAGE_SUFFIX for i in self.images["image_id"]
        ]


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


def fuse_boxes(inputs: FuseInputs, params: dict, workers: int = 1, cache: WbfCache | None = None) -> pd.DataFrame:
    """WBF of every image (image_id, conf, x_min, y_min, x_max, y_max in original px), cached."""
    weights = set_weights(inputs.sets, params.get("det_weights"), inputs.det_files)
    key = (float(params["iou_thr"]), float(params["skip_box_thr"]), str(params["conf_type"]), tuple(weights))
    fused = cache.get(key) if cache is not None else None
    if fused is None:
        fused = wbf_table(
            inputs.boxes,
            inputs.images[["image_id", "rows", "cols"]],
            inputs.n_sets,
            weights,
            iou_thr=key[0],
            skip_box_thr=key[1],
            conf_type=key[2],
            workers=workers,
        )
        if cache is not None:
            cache.put(key, fused)
    return fused


def none_det_by_fold(inputs: FuseInputs, params: dict, workers: int = 1) -> np.ndarray:
    """Test split: the detector's none computed fold by fold, as out of fold, then averaged.

    WBF's confidence averages over its members. Out of fold an image is seen by one fold model
    per detector; on test by every fold's model, so a box that one fold of five found keeps a
    fifth of its confidence. The fused test boxes rightly reflect that consensus, but the none
    formulas and their tuned weights were fitted on the out-of-fold scale: computing none_det on
    each fold's members alone keeps it on that scale.
    """
    weights = set_weights(inputs.sets, params.get("det_weights"), inputs.det_files)
    n = len(inputs.images)
    index = pd.Index(inputs.images["image_id"])
    per_fold = []
    for fold in sorted(set(inputs.sets["fold"])):
        members = inputs.sets.loc[inputs.sets["fold"] == fold, "set"].to_numpy()
        recode = {int(s): i for i, s in enumerate(members)}
        boxes = inputs.boxes[inputs.boxes["set"].isin(members)]
        boxes = boxes.assign(set=boxes["set"].map(recode).to_numpy(dtype=np.int64))
        fused = wbf_table(
            boxes,
            inputs.images[["image_id", "rows", "cols"]],
            len(members),
            [weights[int(s)] for s in members],
            iou_thr=float(params["iou_thr"]),
            skip_box_thr=float(params["skip_box_thr"]),
            conf_type=str(params["conf_type"]),
            workers=workers,
        )
        codes = index.get_indexer(fused["image_id"])
        per_fold.append(formulas.none_from_detector(fused["conf"].to_numpy(dtype=np.float64), codes, n, str(params["none_det"])))
    return np.mean(per_fold, axis=0)


def classifier_table(inputs: FuseInputs, params: dict) -> np.ndarray | None:
    """Combined classifier members -> (n_images, 5): negative, typical, indeterminate, atypical, none_cls."""
    if not inputs.members:
        return None
    source = str(params.get("none_source") or "auto")
    arrays = []
    for m in inputs.members:
        values = m[[*STUDY_CLASSES, "none"]].to_numpy(dtype=np.float64).copy()
        has_none = not np.isnan(values[:, 4]).any()
        if source == "none" and not has_none:
            raise SiimError("none_source=none needs a `none` column in every classifier file")
        head = values[:, 4] if has_none and source != "negative" else None
        values[:, 4] = formulas.none_from_classifier(values[:, 0], head)
        arrays.append(values)
    weights = as_list(params.get("cls_weights"))
    return formulas.combine_members(arrays, weights or None, str(params.get("cls_ensemble") or "mean"))


def run_fusion(inputs: FuseInputs, params: dict, workers: int = 1, cache: WbfCache | None = None) -> Fused:
    """Fuse one split with one parameter set (see the module docstring for the steps)."""
    check_params(params)
    images = inputs.images
    n = len(images)
    has_det, has_cls = inputs.n_sets > 0, bool(inputs.members)
    if has_det:
        boxes = fuse_boxes(inputs, params, workers, cache)
    else:
        boxes = pd.DataFrame(
            {c: pd.Series(dtype=object if c == "image_id" else np.float64) for c in ["image_id", "conf", *BOX_COLUMNS]}
        )
    codes = pd.Index(images["image_id"]).get_indexer(boxes["image_id"])
    wbf_conf = boxes["conf"].to_numpy(dtype=np.float64)

    if has_det and inputs.split == "test" and inputs.sets["fold"].nunique() > 1:
        none_det = none_det_by_fold(inputs, params, workers)
    elif has_det:
        none_det = formulas.none_from_detector(wbf_conf, codes, n, str(params["none_det"]))
    else:
        none_det = np.full(n, np.nan)
    probs = classifier_table(inputs, params)
    none_cls = probs[:, 4] if probs is not None else np.full(n, np.nan)
    if has_det and has_cls:
        none = formulas.blend_none(none_cls, none_det, float(params["none_cls_weight"]), str(params["none_blend"]))
    else:
        none = none_det if has_det else none_cls
    conf = formulas.reweight_opacity(wbf_conf, none[codes] if len(codes) else np.zeros(0), float(params["opacity_exponent"]))

    box_table = pd.DataFrame({"image_id": boxes["image_id"].to_numpy(dtype=object), "conf": conf, "wbf_conf": wbf_conf})
    box_table[BOX_COLUMNS] = boxes[BOX_COLUMNS].to_numpy(dtype=np.float64)
    image_table = images.assign(
        n_boxes=np.bincount(codes, minlength=n) if len(codes) else np.zeros(n, dtype=np.int64),
        none_cls=none_cls,
        none_det=none_det,
        none=none,
    )[IMAGE_TABLE]
    per_image = image_table[["study_id", "none"]].copy()
    if probs is not None:
        per_image[STUDY_CLASSES] = probs[:, :4]
    else:
        for c in STUDY_CLASSES:
            per_image[c] = inputs.priors[c]
    studies = formulas.study_probabilities(per_image, float(params["negative_none_weight"]))
    studies = studies.set_index("study_id").loc[inputs.study_ids].reset_index()[STUDY_TABLE]
    return Fused(boxes=box_table[BOX_TABLE], images=image_table, studies=studies)


def score_fused(inputs: FuseInputs, fused: Fused) -> metrics.Score:
    """The competition metric of out-of-fold fused predictions against the truth."""
    if inputs.truth is None:
        raise SiimError("no truth to score against (test split)")
    return metrics.score(inputs.truth, fused.pred())


def scores_by_fold(inputs: FuseInputs, fused: Fused) -> pd.DataFrame:
    """One row per fold and one for all ("all"): n_images, AP of each class, study_map, image_map, final."""
    pred = fused.pred()
    rows = []
    groups = [("all", fused.images)] + [(str(k), g) for k, g in fused.images.groupby("fold", sort=True)]
    for fold, images in groups:
        ids = set(images["image_id"] + metrics.IMAGE_SUFFIX) | set(images["study_id"] + metrics.STUDY_SUFFIX)
        result = metrics.score(inputs.truth[inputs.truth["id"].isin(ids)], pred[pred["id"].isin(ids)])
        rows.append(
            {
                "fold": fold,
                "n_images": len(images),
                **result.ap,
                "study_map": result.study_map,
                "image_map": result.image_map,
                "final": result.final,
            }
        )
    table = pd.DataFrame(rows)
    return table[["fold", "n_images", *[c for c in metrics.CLASSES if c in table.columns], "study_map", "image_map", "final"]]


def describe_inputs(inputs: FuseInputs) -> None:
    det = f"{inputs.n_sets} box set(s) from {len(inputs.det_files)} file(s)" if inputs.n_sets else "no detection file"
    cls = f"{len(inputs.members)} classifier file(s)" if inputs.members else "no classifier file (study rows: class frequencies)"
    LOGGER.info(f"fuse: {inputs.split}: {len(inputs.images)} images, {len(inputs.study_ids)} studies; {det}; {cls}")
