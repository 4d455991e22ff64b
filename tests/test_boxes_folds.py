"""Box conventions and cross-validation folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from siimcovid.data.boxes import boxes_from_json, boxes_to_json, clip_boxes, fill_mask, from_yolo, scale_boxes, to_yolo
from siimcovid.data.folds import connected_groups, make_folds
from siimcovid.data.prepared import Prepared, folds_fingerprint
from siimcovid.utils import DataError, SiimError


def test_box_round_trip_original_yolo_original():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = rng.integers(800, 5000, size=2)
        x1, y1 = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
        box = [[x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)]]
        yolo = to_yolo(box, w, h)
        assert ((yolo >= 0) & (yolo <= 1)).all()
        np.testing.assert_allclose(from_yolo(yolo, w, h), box, atol=1e-6)


def test_box_through_a_resized_image_and_back():
    box = np.array([[789.28836, 582.43035, 1815.94498, 2499.73327]])
    on_512 = scale_boxes(box, (3028, 2544), (512, 512))
    np.testing.assert_allclose(
        on_512[0], [789.28836 * 512 / 3028, 582.43035 * 512 / 2544, 1815.94498 * 512 / 3028, 2499.73327 * 512 / 2544]
    )
    np.testing.assert_allclose(scale_boxes(on_512, (512, 512), (3028, 2544)), box)
    assert boxes_from_json(boxes_to_json(box)) == [[789.29, 582.43, 1815.94, 2499.73]]


def test_clip_and_outside():
    np.testing.assert_allclose(clip_boxes([[-10, 5, 50, 120]], 100, 100), [[0, 5, 50, 100]])
    with pytest.raises(DataError, match="outside"):
        clip_boxes([[120, 5, 150, 50]], 100, 100)


def test_fill_mask_for_a_known_box():
    mask = fill_mask([[100, 200, 300, 400]], width=1000, height=800, size=(100, 80))
    assert mask.shape == (80, 100) and set(np.unique(mask)) == {0, 255}
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (10, 30, 20, 40)
    assert fill_mask([], 1000, 800, (100, 80)).max() == 0


def test_groups_join_patients_and_studies():
    # p1 has studies s1, s2; s2 (bad header) also shows patient p2: all one group. p3 alone.
    groups = connected_groups(["p1", "p1", "p2", "p3"], ["s1", "s2", "s2", "s3"])
    assert groups[0] == groups[1] == groups[2] != groups[3]


def _frame(n_patients=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for s in range(rng.integers(1, 4)):
            label = rng.choice(["negative", "typical", "indeterminate", "atypical"], p=[0.3, 0.45, 0.17, 0.08])
            for i in range(rng.integers(1, 3)):
                boxes = [[0, 0, 1, 1]] * (label != "negative" and i == 0)
                rows.append({"patient_id": f"p{p}", "study_id": f"p{p}s{s}", "study_label": label, "boxes": boxes})
    return pd.DataFrame(rows)


def test_folds_never_split_a_patient_or_study_and_are_balanced():
    df = _frame()
    df["fold"] = make_folds(df, n_folds=5, seed=1)
    assert df.groupby("patient_id").fold.nunique().max() == 1
    assert df.groupby("study_id").fold.nunique().max() == 1
    sizes = df.fold.value_counts()
    assert set(sizes.index) == set(range(5)) and sizes.max() <= 1.6 * sizes.min()
    typical = df[df.study_label == "typical"].fold.value_counts()
    assert typical.max() <= 2 * typical.min()
    np.testing.assert_array_equal(make_folds(df, 5, seed=1), df.fold)  # fixed seed: same folds
    assert (make_folds(df, 5, seed=2) != df.fold).any()


def test_prepared_folds_group_patients(prepared):
    meta = Prepared(prepared).split("train")
    assert meta.groupby("patient_id").fold.nunique().max() == 1
    assert meta.patient_id.duplicated().any()  # the synthetic data does have multi-study patients


def test_fold_fingerprint_follows_the_assignment(prepared):
    from siimcovid.utils import SiimError

    p = Prepared(prepared)
    meta = p.meta.copy()
    assert folds_fingerprint(meta) == p.folds_id
    p.check_folds(p.folds_id, "a run")  # same folds: fine
    moved = meta.copy()
    i = moved.index[moved.split == "train"][0]
    moved.loc[i, "fold"] = (moved.loc[i, "fold"] + 1) % p.n_folds
    assert folds_fingerprint(moved) != p.folds_id
    with pytest.raises(SiimError, match="trained on other folds"):
        p.check_folds(folds_fingerprint(moved), "a run")


def test_too_many_folds_for_the_strata_is_a_clear_error():
    # six patients, but no class|has-box stratum with three images: sklearn's ValueError, reworded
    df = pd.DataFrame(
        {
            "patient_id": [f"p{i}" for i in range(6)],
            "study_id": [f"s{i}" for i in range(6)],
            "study_label": ["negative", "typical", "indeterminate", "atypical", "negative", "typical"],
            "boxes": [[], [[1, 1, 2, 2]], [[1, 1, 2, 2]], [[1, 1, 2, 2]], [[1, 1, 2, 2]], []],
        }
    )
    with pytest.raises(SiimError, match="n_folds=3 is too many for 6 images"):
        make_folds(df, n_folds=3)
