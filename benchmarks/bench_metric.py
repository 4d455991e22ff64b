"""Speed of the competition metric on a test-set-sized submission, against a naive reference.

Builds ~7,600 rows (3,700 studies with 4 class entries, 3,900 images with ~30 opacity boxes and a
none entry each: ~130,000 predictions) and prints the time of siimcovid.metrics.score(), the time of
the submission round trip (strings -> checked pred rows), and, when the test extra is installed,
the time of podm's pure-Python VOC evaluator on the same data, their ratio and their largest AP
difference.

    PYTHONPATH=. python benchmarks/bench_metric.py [--boxes 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from siimcovid.metrics import PRED_COLUMNS, TRUTH_COLUMNS, score
from siimcovid.submission import pred_to_submission, submission_to_pred

STUDY = ["negative", "typical", "indeterminate", "atypical"]


def build(n_studies: int, n_images: int, boxes_per_image: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sid = np.array([f"{i:012x}_study" for i in range(n_studies)], dtype=object)
    truth = [
        pd.DataFrame({"id": sid, "cls": rng.choice(STUDY, n_studies), "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0})
    ]
    pred = [
        pd.DataFrame(
            {
                "id": np.repeat(sid, 4),
                "cls": np.tile(STUDY, n_studies),
                "conf": rng.dirichlet(np.ones(4), n_studies).ravel(),
                "x_min": 0.0,
                "y_min": 0.0,
                "x_max": 1.0,
                "y_max": 1.0,
            }
        )
    ]
    iid = np.array([f"{i:012x}_image" for i in range(n_images)], dtype=object)
    n_gt = rng.choice([0, 1, 2, 3], n_images, p=[0.3, 0.15, 0.5, 0.05])
    gt_id = np.repeat(iid, n_gt)
    xy = rng.uniform(0, 2000, (len(gt_id), 2))
    gt = np.hstack([xy, xy + rng.uniform(200, 1200, (len(gt_id), 2))])
    truth.append(pd.DataFrame({"id": gt_id, "cls": "opacity", **dict(zip(["x_min", "y_min", "x_max", "y_max"], gt.T))}))
    none_ids = iid[n_gt == 0]
    truth.append(pd.DataFrame({"id": none_ids, "cls": "none", "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0}))
    p_id = np.repeat(iid, boxes_per_image)
    xy = rng.uniform(0, 2000, (len(p_id), 2))
    boxes = np.hstack([xy, xy + rng.uniform(200, 1200, (len(p_id), 2))])
    near = rng.integers(0, len(gt), len(gt) * 2)  # hits near the truth, on the right image
    boxes_near = gt[near] + rng.normal(0, 80, (len(near), 4))
    pred.append(
        pd.DataFrame(
            {
                "id": np.concatenate([p_id, gt_id[near]]),
                "cls": "opacity",
                "conf": rng.uniform(size=len(p_id) + len(near)),
                **dict(zip(["x_min", "y_min", "x_max", "y_max"], np.vstack([boxes, boxes_near]).T)),
            }
        )
    )
    pred.append(
        pd.DataFrame(
            {"id": iid, "cls": "none", "conf": rng.uniform(size=n_images), "x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0}
        )
    )
    truth = pd.concat(truth, ignore_index=True)[TRUTH_COLUMNS]
    pred = pd.concat(pred, ignore_index=True)[PRED_COLUMNS]
    pred = pred[(pred.x_max >= pred.x_min) & (pred.y_max >= pred.y_min)].reset_index(drop=True)
    return truth, pred


def timed(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=3700)
    ap.add_argument("--images", type=int, default=3900)
    ap.add_argument("--boxes", type=int, default=30, help="opacity predictions per image (plus hits near the truth)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    truth, pred = build(args.studies, args.images, args.boxes)
    n_rows = truth.id.nunique()
    print(f"{n_rows} rows, {len(truth)} truth boxes, {len(pred)} predictions")
    t_score, s = timed(lambda: score(truth, pred), args.repeat)
    print(f"score():                 {t_score:8.3f} s  (median of {args.repeat})  final={s.final:.4f}")
    sub = pred_to_submission(pred)
    t_write, _ = timed(lambda: pred_to_submission(pred), 1)
    t_read, back = timed(lambda: submission_to_pred(sub), 1)
    print(f"pred_to_submission():    {t_write:8.3f} s")
    print(f"submission_to_pred():    {t_read:8.3f} s  (parse + check every string)")
    print(f"score after round trip:  final={score(truth, back).final:.6f} (rounding to 1e-9 conf, 1e-3 px)")
    try:
        from podm.metrics import BoundingBox, get_pascal_voc_metrics
    except ImportError:
        print("podm (object-detection-metrics, the test extra) not installed: no reference timing")
        return
    bb = BoundingBox.of_bbox
    t0 = time.perf_counter()
    gold = [bb(*r[:2], *r[2:]) for r in truth.itertuples(index=False)]
    dets = [bb(r[0], r[1], *r[3:], r[2]) for r in pred.itertuples(index=False)]
    ref = get_pascal_voc_metrics(gold, dets, 0.5)
    t_ref = time.perf_counter() - t0
    diff = max(abs(s.ap[k] - m.ap) for k, m in ref.items() if m.num_groundtruth > 0)
    print(f"podm reference:          {t_ref:8.3f} s  -> score() is {t_ref / t_score:.0f}x faster; max |AP difference| {diff:.2e}")


if __name__ == "__main__":
    main()
