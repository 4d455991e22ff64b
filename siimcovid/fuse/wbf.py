"""Weighted Boxes Fusion (ensemble-boxes) of opacity boxes, per image, across models / folds / TTA.

ensemble-boxes wants boxes normalised to [0, 1]; ours are in ORIGINAL pixels, and originals are
not square (about 2,544 x 3,028 px, rows x cols). So each image's boxes are divided by its own
cols (x) and rows (y) before WBF and multiplied back after it:

    normalise_boxes(px, rows, cols) -> [0, 1]     (clipped: WBF would clip them anyway, noisily)
    denormalise_boxes(norm, rows, cols) -> px

A "box set" is what one member predicted on one image: one (file, model, fold[, tta]) on the
test split, one (file, model[, tta]) out of fold (there each image has exactly one fold's model).
A member that found nothing on an image is still a member: its empty set counts in WBF's
confidence rescaling (conf_type avg: a box found by 2 of 5 folds keeps 2/5 of its mean score).

    wbf_image(box_sets, score_sets, weights, ...)  one image -> fused boxes, scores (normalised)
    wbf_table(boxes_df, sizes, n_sets, weights, ...)  every image of a tidy table, optionally in
        several processes (WBF clusters boxes one by one in Python: it is the cost of fusion)
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion

from siimcovid.config import schema, worker_processes
from siimcovid.tables import BOX_COLUMNS, BOX_PRED_COLUMNS
from siimcovid.utils import SiimError


def _scale(n: int, rows, cols) -> np.ndarray:
    """(n, 4) multipliers [cols, rows, cols, rows]; rows / cols are scalars or one per box."""
    rows = np.broadcast_to(np.asarray(rows, dtype=np.float64), (n,))
    cols = np.broadcast_to(np.asarray(cols, dtype=np.float64), (n,))
    return np.stack([cols, rows, cols, rows], axis=1)


def normalise_boxes(boxes, rows, cols) -> np.ndarray:
    """(n, 4) x1y1x2y2 boxes in original pixels -> [0, 1] (x / cols, y / rows), clipped to the image.

    rows / cols: scalars or (n,) arrays (one image size per box)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(boxes / _scale(len(boxes), rows, cols), 0.0, 1.0)


def denormalise_boxes(boxes, rows, cols) -> np.ndarray:
    """The inverse of normalise_boxes (exact for boxes inside the image): [0, 1] -> original pixels."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes * _scale(len(boxes), rows, cols)


def check_wbf_params(iou_thr: float, skip_box_thr: float, conf_type: str) -> None:
    """ensemble-boxes prints and calls exit() on a bad conf_type: wbf_table, callable on its own,
    checks its settings first against their specs in cfg/fuse.yaml (a one-line ConfigError)."""
    settings = schema("fuse")
    for key, value in {"iou_thr": iou_thr, "skip_box_thr": skip_box_thr, "conf_type": conf_type}.items():
        settings.check(key, value)


def wbf_image(box_sets, score_sets, weights=None, iou_thr: float = 0.6, skip_box_thr: float = 0.001, conf_type: str = "avg"):
    """WBF of one image's box sets (one per member; normalised x1y1x2y2, possibly empty).

    Returns (boxes (k, 4) normalised, scores (k,)), highest score first. One label: opacity.
    Boxes of zero area (e.g. clipped away) are dropped here, silently, rather than warned about.
    """
    kept_boxes, kept_scores, labels = [], [], []
    for boxes, scores in zip(box_sets, score_sets):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        ok = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0) & (scores >= skip_box_thr)
        kept_boxes.append(boxes[ok])
        kept_scores.append(scores[ok])
        labels.append(np.zeros(int(ok.sum())))
    if not any(len(s) for s in kept_scores):
        return np.zeros((0, 4)), np.zeros(0)
    weights = None if weights is None else list(map(float, weights))
    boxes, scores, _ = weighted_boxes_fusion(
        kept_boxes, kept_scores, labels, weights=weights, iou_thr=iou_thr, skip_box_thr=skip_box_thr, conf_type=conf_type
    )
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64)


def _fuse_chunk(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse a run of images. Rows are sorted by (image, set); bounds index the images."""
    codes, sets, boxes, scores, bounds, n_sets, weights, iou_thr, skip_box_thr, conf_type = args
    out_img, out_box, out_conf = [], [], []
    for code, start, stop in zip(codes, bounds[:-1], bounds[1:]):
        img_sets = sets[start:stop]
        cuts = np.searchsorted(img_sets, np.arange(n_sets + 1)) + start
        fused_b, fused_s = wbf_image(
            [boxes[a:b] for a, b in zip(cuts[:-1], cuts[1:])],
            [scores[a:b] for a, b in zip(cuts[:-1], cuts[1:])],
            weights,
            iou_thr,
            skip_box_thr,
            conf_type,
        )
        out_img.append(np.full(len(fused_s), code))
        out_box.append(fused_b)
        out_conf.append(fused_s)
    if not out_img:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4)), np.zeros(0)
    return np.concatenate(out_img), np.concatenate(out_box), np.concatenate(out_conf)


def resolve_workers(workers: int | None) -> int:
    """fuse's workers (config.worker_processes: null = every core, 0 = none) -> the WBF jobs, at least 1 (1: here)."""
    return max(1, worker_processes(workers))


def _fuse_chunks(images, bounds, sets, norm, scores, fixed: tuple, workers: int | None) -> list[tuple]:
    """_fuse_chunk over the images split into one chunk per worker (resolve_workers), in a process pool when there
    are several; fixed: (n_sets, weights, iou_thr, skip_box_thr, conf_type)."""
    n_workers = min(resolve_workers(workers), max(1, len(images) // 200))  # small inputs: no pool
    jobs = []
    for chunk in np.array_split(np.arange(len(images)), n_workers):
        if len(chunk) == 0:
            continue
        lo, hi = bounds[chunk[0]], bounds[chunk[-1] + 1]
        jobs.append((images[chunk], sets[lo:hi], norm[lo:hi], scores[lo:hi], bounds[chunk[0] : chunk[-1] + 2] - lo, *fixed))
    if len(jobs) > 1:
        with ProcessPoolExecutor(len(jobs)) as pool:
            return list(pool.map(_fuse_chunk, jobs))
    return [_fuse_chunk(j) for j in jobs]


def wbf_table(
    boxes: pd.DataFrame,
    sizes: pd.DataFrame,
    n_sets: int,
    weights=None,
    iou_thr: float = 0.6,
    skip_box_thr: float = 0.001,
    conf_type: str = "avg",
    workers: int | None = 0,
) -> pd.DataFrame:
    """Fuse every image of a tidy box table.

    boxes: image_id, set (int 0..n_sets-1: the member that predicted it), x_min, y_min, x_max,
           y_max (original px), conf.
    sizes: image_id, rows, cols (the original size of every image in `boxes`).
    weights: one per set (None: all 1). Returns BOX_PRED_COLUMNS (image_id, conf, x_min, y_min,
    x_max, y_max in original pixels), images in the order of `sizes`, boxes by descending conf
    within an image.
    """
    check_wbf_params(iou_thr, skip_box_thr, conf_type)
    if weights is not None and len(weights) != n_sets:
        raise SiimError(f"{len(weights)} weights for {n_sets} box sets")
    sizes = sizes.reset_index(drop=True)
    index = pd.Index(sizes["image_id"].astype(str))
    if index.has_duplicates:
        raise SiimError("wbf_table: sizes lists an image twice")
    code = index.get_indexer(boxes["image_id"].astype(str))
    if (code < 0).any():
        raise SiimError(f"wbf_table: no size for image {boxes['image_id'].astype(str)[code < 0].iloc[0]}")
    sets = boxes["set"].to_numpy(dtype=np.int64)
    if len(sets) and (sets.min() < 0 or sets.max() >= n_sets):
        raise SiimError(f"wbf_table: set codes must be in 0..{n_sets - 1}")
    rows = sizes["rows"].to_numpy(dtype=np.float64)
    cols = sizes["cols"].to_numpy(dtype=np.float64)
    order = np.lexsort((sets, code))
    code, sets = code[order], sets[order]
    norm = normalise_boxes(boxes[BOX_COLUMNS].to_numpy(dtype=np.float64)[order], rows[code], cols[code])
    scores = boxes["conf"].to_numpy(dtype=np.float64)[order]
    images, starts = np.unique(code, return_index=True)
    bounds = np.append(starts, len(code))
    parts = _fuse_chunks(images, bounds, sets, norm, scores, (n_sets, weights, iou_thr, skip_box_thr, conf_type), workers)
    img = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    box = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 4))
    conf = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)
    px = denormalise_boxes(box, rows[img], cols[img])
    out = pd.DataFrame({"image_id": index[img].to_numpy(dtype=object), "conf": conf})
    out[BOX_COLUMNS] = px
    return out[BOX_PRED_COLUMNS]
