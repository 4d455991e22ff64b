"""Prediction tables must read back exactly: rounding ties near-equal scores, and ties move AP."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from siimcovid import metrics
from siimcovid.data import truth as truth_mod
from siimcovid.data.siim import STUDY_CLASSES
from siimcovid.tables import write_csv as write_predictions


def near_tied_studies(n=300, dtype=np.float64, spread=1e-7):
    """What an untrained classifier gives: probabilities that differ only past the 6th digit."""
    rng = np.random.default_rng(0)
    probs = (0.25 + rng.normal(0, spread, (n, 4))).astype(dtype)
    ids = [f"s{i}" for i in range(n)]
    pred = pd.DataFrame(probs, columns=STUDY_CLASSES).assign(study_id=ids)
    truth = pd.DataFrame({"study_id": ids, "study_label": rng.choice(STUDY_CLASSES, n)})
    return pred, truth_mod.study_truth(truth)


def study_map(pred, truth):
    return metrics.score(truth, metrics.study_pred(pred)).study_map


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_read_back_exactly(tmp_path, dtype):
    pred, truth = near_tied_studies(dtype=dtype)
    back = pd.read_csv(write_predictions(pred, tmp_path / "pred.csv"), dtype={"study_id": str})
    assert (back[STUDY_CLASSES].to_numpy().astype(dtype) == pred[STUDY_CLASSES].to_numpy()).all()
    assert study_map(back, truth) == study_map(pred, truth)


def test_rounded_scores_would_move_the_map(tmp_path):
    # the guard: the old 6-digit format does change the score on such tables
    pred, truth = near_tied_studies()
    pred.to_csv(tmp_path / "rounded.csv", index=False, float_format="%.6g")
    rounded = pd.read_csv(tmp_path / "rounded.csv", dtype={"study_id": str})
    assert study_map(rounded, truth) != pytest.approx(study_map(pred, truth), abs=1e-6)
