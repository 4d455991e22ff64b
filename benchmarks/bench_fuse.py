"""Speed of fusion on a test-set-sized input: WBF over models x folds, then the formulas.

Builds synthetic detections for --images test images (default 1,300) x --folds (5) x --models (2)
x ~--boxes (20) boxes per image and member (~260,000 boxes; boxes scatter around a few
opacities per image, so WBF really clusters), plus a classifier table, and prints seconds for:

  naive       the usual notebook loop: for each image, filter the DataFrame per member, normalise,
              weighted_boxes_fusion, map back (one process)
  wbf_table   siimcovid.fuse.wbf.wbf_table with workers=1 (sorted arrays sliced per image)
  wbf_table   with workers=all cores (WBF clusters in Python: processes are what scales it)
  run_fusion  the whole fusion of the split (WBF + none / opacity formulas + study table), all cores
  metric      one OOF-sized trial of `fuse tune` (--oof-images x 2 models, one fold each):
              WBF + formulas + the competition metric

    PYTHONPATH=. python benchmarks/bench_fuse.py [--images 1300] [--folds 5] [--models 2] [--boxes 20]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
from ensemble_boxes import weighted_boxes_fusion

from siimcovid.config import fusion_keys, load_config
from siimcovid.data.truth import image_truth, study_truth
from siimcovid.fuse.inputs import FuseInputs
from siimcovid.fuse.pipeline import run_fusion
from siimcovid.fuse.wbf import wbf_table
from siimcovid.metrics import score
from siimcovid.tables import BOX_COLUMNS, STUDY_CLASSES

# fuse's defaults of every fusion parameter (cfg/fuse.yaml), not a copy of them that goes stale
PARAMS = {k: load_config("fuse", {})[k] for k in fusion_keys()}


def build(n_images: int, n_sets: int, boxes: int, seed: int = 0, folds: np.ndarray | None = None):
    """Images (original sizes like the real data), their true boxes, and n_sets members' predictions."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"{i:012x}" for i in range(n_images)], dtype=object)
    rows, cols = rng.integers(2000, 3500, n_images), rng.integers(2400, 4200, n_images)
    images = pd.DataFrame({"image_id": ids, "study_id": ids, "fold": -1 if folds is None else folds, "rows": rows, "cols": cols})
    centres = rng.uniform(0.2, 0.8, (n_images, 3, 2))
    n = rng.poisson(boxes, (n_sets, n_images))
    parts = []
    for s in range(n_sets):
        img = np.repeat(np.arange(n_images), n[s])
        c = centres[img, rng.integers(0, 3, len(img))] + rng.normal(0, 0.04, (len(img), 2))
        wh = rng.uniform(0.08, 0.3, (len(img), 2))
        xy = np.clip(np.hstack([c - wh / 2, c + wh / 2]), 0, 1) * np.stack([cols, rows, cols, rows], 1)[img]
        parts.append(
            pd.DataFrame(
                {
                    "image_id": ids[img],
                    "set": s,
                    "fold": images.fold.to_numpy()[img],
                    **dict(zip(BOX_COLUMNS, xy.T)),
                    "conf": rng.uniform(0.001, 1, len(img)) ** 2,
                }
            )
        )
    det = pd.concat(parts, ignore_index=True)
    truth_boxes = [
        list((np.clip(np.hstack([c - 0.08, c + 0.08]), 0, 1) * [cw, rh, cw, rh]).tolist()) if k else []
        for c, cw, rh, k in zip(centres[:, :2], cols, rows, rng.random(n_images) < 0.7)
    ]
    images["boxes"] = truth_boxes
    probs = rng.dirichlet(np.ones(4), n_images)
    member = pd.DataFrame(probs, columns=STUDY_CLASSES).assign(none=rng.uniform(size=n_images))
    return images, det, member


def naive(images: pd.DataFrame, det: pd.DataFrame, n_sets: int) -> int:
    """The per-image notebook loop (boolean filtering of the whole table per image and member)."""
    total = 0
    for rec in images.itertuples():
        sub = det[det.image_id == rec.image_id]
        scale = np.array([rec.cols, rec.rows, rec.cols, rec.rows], dtype=float)
        b, s, labels = [], [], []
        for k in range(n_sets):
            part = sub[sub.set == k]
            b.append((part[BOX_COLUMNS].to_numpy() / scale).clip(0, 1).tolist())
            s.append(part.conf.tolist())
            labels.append([0] * len(part))
        fused, _, _ = weighted_boxes_fusion(b, s, labels, iou_thr=0.6, skip_box_thr=0.001)
        total += len(fused * scale)
    return total


def seconds(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1300)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--boxes", type=int, default=20)
    ap.add_argument("--oof-images", type=int, default=6334)
    ap.add_argument("--naive-images", type=int, default=300, help="the naive loop runs on this many images, scaled up")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    n_sets = args.folds * args.models
    images, det, member = build(args.images, n_sets, args.boxes)
    sizes = images[["image_id", "rows", "cols"]]
    print(
        f"test-sized input: {args.images} images x {args.folds} folds x {args.models} models, {len(det):,} boxes; {cores} cores"
    )

    k = min(args.naive_images, args.images)
    t_naive, _ = seconds(lambda: naive(images.iloc[:k], det[det.image_id.isin(set(images.image_id[:k]))], n_sets))
    t_naive *= args.images / k
    t_one, fused = seconds(lambda: wbf_table(det, sizes, n_sets, workers=1))
    t_all, fused_all = seconds(lambda: wbf_table(det, sizes, n_sets, workers=0))
    pd.testing.assert_frame_equal(fused, fused_all)
    inputs = FuseInputs(
        split="test",
        images=images[["image_id", "study_id", "fold", "rows", "cols"]],
        study_ids=list(images.study_id),
        boxes=det,
        sets=pd.DataFrame({"set": range(n_sets), "file": 0, "model": "m", "fold": -1, "tta": "", "name": "m"}),
        members=[member],
        member_files=["x.csv"],
        det_files=["d.csv"],
    )
    t_fuse, _ = seconds(lambda: run_fusion(inputs, PARAMS, workers=0))
    print(f"  naive loop (1 process, from {k} images)  {t_naive:8.2f} s")
    print(f"  wbf_table workers=1                      {t_one:8.2f} s   ({t_naive / t_one:.1f}x the naive loop)")
    print(f"  wbf_table workers={cores:<2}                     {t_all:8.2f} s   ({t_one / t_all:.1f}x workers=1)")
    print(f"  run_fusion (WBF + formulas), all cores   {t_fuse:8.2f} s   ({len(fused):,} fused boxes)")

    folds = np.arange(args.oof_images) % 5
    oof_images, oof_det, oof_member = build(args.oof_images, args.models, args.boxes, seed=1, folds=folds)
    oof = FuseInputs(
        split="oof",
        images=oof_images[["image_id", "study_id", "fold", "rows", "cols"]],
        study_ids=list(oof_images.study_id),
        boxes=oof_det,
        sets=pd.DataFrame({"set": range(args.models), "file": 0, "model": "m", "fold": -1, "tta": "", "name": "m"}),
        members=[oof_member],
        member_files=["x.csv"],
        det_files=["d.csv"],
    )
    truth = pd.concat(
        [
            study_truth(oof_images.assign(study_label=np.random.default_rng(2).choice(STUDY_CLASSES, len(oof_images)))),
            image_truth(oof_images[["image_id", "boxes"]]),
        ],
        ignore_index=True,
    )
    t_trial, result = seconds(lambda: score(truth, run_fusion(oof, PARAMS, workers=0).pred()))
    cache = _warm(oof)
    t_formulas, _ = seconds(lambda: score(truth, run_fusion(oof, {**PARAMS, "opacity_exponent": 1.0}, cache=cache).pred()))
    print(f"OOF-sized tune trial: {args.oof_images} images x {args.models} models, {len(oof_det):,} boxes")
    print(f"  new WBF + formulas + metric, all cores   {t_trial:8.2f} s   (final {result.final:.3f} on random data)")
    print(f"  cached WBF: formulas + metric            {t_formulas:8.2f} s")


def _warm(inputs: FuseInputs):
    from siimcovid.fuse.pipeline import WbfCache, fuse_boxes

    cache = WbfCache()
    fuse_boxes(inputs, PARAMS, workers=0, cache=cache)
    return cache


if __name__ == "__main__":
    main()
