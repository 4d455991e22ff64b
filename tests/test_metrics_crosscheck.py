"""Cross-check against an independent public VOC implementation: object-detection-metrics (podm,
github.com/yfpeng/object_detection_metrics, a package of Rafael Padilla's VOC evaluator).

podm.metrics.get_pascal_voc_metrics implements the same rule: predictions ranked by score
(stable sort), each sent to the ground-truth box of its image with the highest IoU among all of
them, TP if unmatched, all-point interpolation, IoU on continuous coordinates. It differs in two
places where random continuous boxes never land: it uses IoU >= threshold (we use > 0.5 as the
format says "exceeds"), and it counts predictions on images with no truth at all as FPs (we
ignore ids that have no truth row), so every generated image here has a truth row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from siimcovid.metrics import PRED_COLUMNS, TRUTH_COLUMNS, score

podm_metrics = pytest.importorskip("podm.metrics", reason="install the test extra: pip install -e '.[test]'")

STUDY = ["negative", "typical", "indeterminate", "atypical"]


def random_siim_case(seed: int, n_studies: int = 40):
    """Studies with 4-class probabilities; images with opacity boxes or none, noisy predicted boxes."""
    rng = np.random.default_rng(seed)
    truth, pred = [], []
    for s in range(n_studies):
        sid = f"s{s}_study"
        label = STUDY[rng.integers(4)]
        truth.append((sid, label, 0, 0, 1, 1))
        for c, p in zip(STUDY, rng.dirichlet(np.ones(4))):
            pred.append((sid, c, p, 0, 0, 1, 1))
        for i in range(rng.integers(1, 3)):
            iid = f"s{s}i{i}_image"
            n = rng.integers(0, 4)
            xy = rng.uniform(0, 900, (n, 2))
            gt = np.hstack([xy, xy + rng.uniform(80, 400, (n, 2))])
            truth += [(iid, "opacity", *b) for b in gt] or [(iid, "none", 0, 0, 1, 1)]
            pred.append((iid, "none", rng.uniform(), 0, 0, 1, 1))
            for b in gt:  # jittered copies (some hits, some misses, some duplicates)
                for _ in range(rng.integers(0, 3)):
                    pred.append((iid, "opacity", rng.uniform(), *(b + rng.normal(0, 40, 4))))
            for _ in range(rng.integers(0, 4)):  # background boxes
                xy = rng.uniform(0, 900, 2)
                pred.append((iid, "opacity", rng.uniform(), *xy, *(xy + rng.uniform(50, 400, 2))))
    truth = pd.DataFrame(truth, columns=TRUTH_COLUMNS)
    pred = pd.DataFrame(pred, columns=PRED_COLUMNS)
    pred = pred[(pred.x_max > pred.x_min) & (pred.y_max > pred.y_min)].reset_index(drop=True)
    return truth, pred


def podm_ap(truth: pd.DataFrame, pred: pd.DataFrame) -> dict:
    bb = podm_metrics.BoundingBox.of_bbox
    gold = [bb(r.id, r.cls, r.x_min, r.y_min, r.x_max, r.y_max) for r in truth.itertuples()]
    dets = [bb(r.id, r.cls, r.x_min, r.y_min, r.x_max, r.y_max, r.conf) for r in pred.itertuples()]
    res = podm_metrics.get_pascal_voc_metrics(gold, dets, 0.5)
    return {k: m.ap for k, m in res.items() if m.num_groundtruth > 0}


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_podm_on_random_boxes(seed):
    truth, pred = random_siim_case(seed)
    ours = score(truth, pred)
    ref = podm_ap(truth, pred)
    assert set(ours.ap) == set(ref)
    for cls, ap in ref.items():
        assert ours.ap[cls] == pytest.approx(ap, abs=1e-12), cls
    assert ours.final == pytest.approx(np.mean(list(ref.values())), abs=1e-12)
    assert 0.05 < ours.ap["opacity"] < 0.95  # the case is neither trivial nor hopeless


def test_agrees_with_podm_when_rows_are_shuffled():
    truth, pred = random_siim_case(11)
    shuffled = pred.sample(frac=1.0, random_state=3).reset_index(drop=True)
    assert score(truth, shuffled).ap == pytest.approx(podm_ap(truth, shuffled), abs=1e-12)
    assert score(truth, shuffled).ap == pytest.approx(score(truth, pred).ap, abs=1e-12)


def test_agrees_with_podm_on_tied_confidences():
    # confidences rounded to 0.1: many ties, which both break by table order (stable sorts)
    truth, pred = random_siim_case(5)
    tied = pred.assign(conf=pred.conf.round(1))
    assert tied.conf.duplicated().sum() > len(tied) // 2
    assert score(truth, tied).ap == pytest.approx(podm_ap(truth, tied), abs=1e-12)
