"""The competition metric on small cases computed by hand (see SIIM_FORMAT.md, 'The metric')."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from siimcovid.data.truth import image_truth, study_truth
from siimcovid.metrics import (
    PRED_COLUMNS,
    TRUTH_COLUMNS,
    average_precision,
    class_priors,
    fold_scores,
    image_pred,
    score,
    study_mean,
    study_pred,
    voc_ap,
    whole_rows,
)
from siimcovid.submission import make_submission, submission_to_pred
from siimcovid.tables import SCORE_COLUMNS
from siimcovid.utils import SiimError


def T(*rows):
    """truth rows: (id, cls, x1, y1, x2, y2)"""
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS)


def P(*rows):
    """pred rows: (id, cls, conf, x1, y1, x2, y2)"""
    return pd.DataFrame(rows, columns=PRED_COLUMNS)


BOX = (10.0, 10.0, 20.0, 20.0)
NEAR = (11.0, 10.0, 21.0, 20.0)  # IoU 90/110 = 0.818 with BOX
FAR = (15.0, 10.0, 25.0, 20.0)  # IoU 50/150 = 0.333 with BOX


def test_voc_ap_all_point_interpolation_by_hand():
    # ranks TP FP TP over 2 boxes: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # envelope: 1 up to recall 1/2, then 2/3 -> 0.5 * 1 + 0.5 * 2/3
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(0.5 + 1 / 3)
    # a dip then a rise: the envelope takes the later, higher precision (not 11-point, not raw)
    assert voc_ap(np.array([0.25, 0.25, 0.5, 0.75]), np.array([1.0, 0.5, 2 / 3, 0.75])) == pytest.approx(0.25 + 0.5 * 0.75)


def test_one_class_several_rows():
    truth = T(("a", "opacity", *BOX), ("b", "opacity", *BOX))
    pred = P(("a", "opacity", 0.9, *NEAR), ("b", "opacity", 0.8, *FAR), ("b", "opacity", 0.7, *NEAR))
    # TP (a), FP (b, IoU 0.33), TP (b)
    assert average_precision(truth, pred, "opacity") == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_duplicates_on_one_box_are_false_positives():
    truth = T(("a", "opacity", *BOX), ("b", "opacity", *BOX))
    pred = P(("a", "opacity", 0.9, *NEAR), ("a", "opacity", 0.8, *BOX), ("b", "opacity", 0.7, *NEAR))
    # the second hit on a's box is a FP even with IoU 1.0: TP FP TP
    assert average_precision(truth, pred, "opacity") == pytest.approx(0.5 + 0.5 * 2 / 3)
    # alone on one image the duplicate comes after full recall and costs nothing
    assert average_precision(truth.iloc[:1], pred.iloc[:2], "opacity") == pytest.approx(1.0)


def test_voc_rule_best_box_among_all_even_if_already_matched():
    # p2 overlaps g1 best (IoU 0.82, g1 already taken by p1) and g2 with IoU 0.54:
    # VOC sends p2 to g1 -> FP (a greedy "best free box" rule would make it a TP)
    g1, g2 = (10.0, 10.0, 20.0, 20.0), (12.0, 10.0, 24.0, 20.0)
    truth = T(("a", "opacity", *g1), ("a", "opacity", *g2))
    p2 = (11.0, 10.0, 21.0, 20.0)
    pred = P(("a", "opacity", 0.9, *g1), ("a", "opacity", 0.8, *p2))
    from siimcovid.metrics import box_iou

    ious = box_iou(np.array([p2, p2]), np.array([g1, g2]))
    assert ious[0] > ious[1] > 0.5  # the premise of the case
    assert average_precision(truth, pred, "opacity") == pytest.approx(0.5)  # TP FP, g2 never found


def test_prediction_on_a_none_image_is_a_false_positive():
    truth = T(("x_image", "opacity", *BOX), ("y_image", "none", 0, 0, 1, 1))
    pred = P(("y_image", "opacity", 0.9, *BOX), ("x_image", "opacity", 0.8, *BOX))
    s = score(truth, pred)
    assert s.ap["opacity"] == pytest.approx(0.5)  # FP then TP
    assert s.ap["none"] == 0.0  # a none image nobody predicted none for
    assert s.final == pytest.approx(0.25)


def test_missed_box_lowers_recall():
    truth = T(("a", "opacity", *BOX), ("a", "opacity", 40, 40, 60, 60))
    pred = P(("a", "opacity", 0.9, *NEAR))
    assert average_precision(truth, pred, "opacity") == pytest.approx(0.5)


def test_iou_must_exceed_threshold_on_continuous_coordinates():
    truth = T(("a", "opacity", 0, 0, 2, 1))
    exactly_half = P(("a", "opacity", 0.9, 0, 0, 1, 1))  # IoU 1/2 exactly (0.667 with VOC's "+1" pixels)
    assert average_precision(truth, exactly_half, "opacity") == 0.0
    above = P(("a", "opacity", 0.9, 0, 0, 1.1, 1))  # IoU 0.55
    assert average_precision(truth, above, "opacity") == 1.0


def test_confidence_ties_keep_table_order():
    truth = T(("a", "opacity", *BOX))
    fp_first = P(("a", "opacity", 0.5, *FAR), ("a", "opacity", 0.5, *NEAR))
    assert average_precision(truth, fp_first, "opacity") == pytest.approx(0.5)
    assert average_precision(truth, fp_first.iloc[::-1], "opacity") == pytest.approx(1.0)


def test_classes_present_unscored_rows_and_subsets():
    truth = T(("s_study", "typical", 0, 0, 1, 1), ("i_image", "opacity", *BOX))
    pred = P(
        ("s_study", "typical", 0.9, 0, 0, 1, 1),
        ("s_study", "negative", 0.1, 0, 0, 1, 1),  # negative not in the truth: not averaged
        ("i_image", "opacity", 0.3, *FAR),
        ("other_image", "opacity", 0.99, *BOX),  # no truth row at all: ignored, counted
    )
    s = score(truth, pred)
    assert list(s.ap) == ["typical", "opacity"]
    assert s.ap == {"typical": 1.0, "opacity": 0.0}
    assert s.study_map == 1.0 and s.image_map == 0.0 and s.final == 0.5
    assert s.n_unscored == 1
    assert list(score(truth, pred, classes=["opacity"]).ap) == ["opacity"]
    only_study = score(truth, pred, classes="study")
    assert list(only_study.ap) == ["typical"] and math.isnan(only_study.image_map)
    assert list(s.table().columns[:2]) == ["class", "AP"]


def test_bad_tables_raise():
    truth = T(("a", "opacity", *BOX))
    with pytest.raises(SiimError, match="conf"):
        score(truth, truth)  # a truth table is not a prediction table
    with pytest.raises(SiimError, match="NaN"):
        score(truth, P(("a", "opacity", float("nan"), *BOX)))


def test_builders_make_a_perfect_score():
    meta = pd.DataFrame(
        {
            "image_id": ["i1", "i2", "i3", "i4"],
            "study_id": ["s1", "s1", "s2", "s3"],  # s1 has two images (repeated study rows)
            "study_label": ["typical", "typical", "negative", "atypical"],
            "boxes": [[[10, 10, 50, 60], [70, 10, 120, 60]], [], [], [[5, 5, 30, 30]]],
        }
    )
    truth = pd.concat([study_truth(meta), image_truth(meta)], ignore_index=True)
    assert len(truth) == 3 + 3 + 2  # 3 studies, 3 boxes, 2 none images
    as_json = meta.assign(boxes=[json.dumps(b) for b in meta.boxes])  # raw meta.csv cells
    pd.testing.assert_frame_equal(image_truth(as_json), image_truth(meta))
    onehot = pd.DataFrame(
        {
            "study_id": ["s1", "s2", "s3"],
            "negative": [0, 1, 0],
            "typical": [1, 0, 0],
            "indeterminate": [0] * 3,
            "atypical": [0, 0, 1],
        }
    )
    boxes = pd.DataFrame(
        [("i1", 0.9, 10, 10, 50, 60), ("i1", 0.8, 70, 10, 120, 60), ("i4", 0.7, 5, 5, 30, 30)],
        columns=["image_id", "conf", "x_min", "y_min", "x_max", "y_max"],
    )
    none = pd.DataFrame({"image_id": ["i1", "i2", "i3", "i4"], "none": [0.0, 1.0, 1.0, 0.0]})
    s = score(truth, pd.concat([study_pred(onehot), image_pred(boxes, none)]))
    assert s.final == 1.0 and set(s.ap) == {"typical", "negative", "atypical", "opacity", "none"}
    # and through the written submission strings as well
    sub = make_submission(onehot, boxes, none)
    assert score(truth, submission_to_pred(sub)).final == 1.0


def test_study_pred_averages_images_of_a_study():
    probs = pd.DataFrame(
        {"study_id": ["s", "s"], "negative": [0.2, 0.4], "typical": [0.8, 0.6], "indeterminate": [0, 0], "atypical": [0, 0]}
    )
    rows = study_pred(probs).set_index("cls")
    assert rows.loc["negative", "conf"] == pytest.approx(0.3) and len(rows) == 4
    assert (rows.id == "s_study").all()


def test_all_four_classes_beat_argmax_only():
    truth = T(("s1_study", "typical", 0, 0, 1, 1), ("s2_study", "negative", 0, 0, 1, 1), ("s3_study", "negative", 0, 0, 1, 1))
    probs = pd.DataFrame(
        {
            "study_id": ["s1", "s2", "s3"],
            "negative": [0.3, 0.4, 0.6],
            "typical": [0.5, 0.55, 0.2],  # s2 is wrong at the argmax, right at second place
            "indeterminate": [0.1, 0.03, 0.1],
            "atypical": [0.1, 0.02, 0.1],
        }
    )
    full = submission_to_pred(make_submission(probs, None, None))
    argmax = probs.set_index("study_id").idxmax(axis=1)
    only = P(*[(f"{s}_study", c, probs.set_index("study_id").loc[s, c], 0, 0, 1, 1) for s, c in argmax.items()])
    s_full, s_argmax = score(truth, full), score(truth, only)
    # negative: full ranks s3 TP, s2 TP, s1 FP -> 1.0; argmax has only s3 -> 0.5
    # typical: s2 FP then s1 TP in both -> 0.5
    assert s_full.study_map == pytest.approx(0.75)
    assert s_argmax.study_map == pytest.approx(0.5)
    assert s_argmax.study_map < s_full.study_map


def test_whole_rows_are_truth_rows_without_conf_and_prediction_rows_with_it():
    truth = whole_rows(["s_study", "i_image"], ["typical", "none"])
    assert list(truth.columns) == TRUTH_COLUMNS and truth[["x_min", "y_min", "x_max", "y_max"]].to_numpy().tolist() == [
        [0, 0, 1, 1]
    ] * 2
    pred = whole_rows(["s_study", "i_image"], ["typical", "none"], [0.7, 0.2])
    assert list(pred.columns) == PRED_COLUMNS and pred.conf.tolist() == [0.7, 0.2]
    assert score(truth, pred).final == 1.0
    pd.testing.assert_frame_equal(study_truth(pd.DataFrame({"study_id": ["s"], "study_label": ["typical"]})), truth.iloc[:1])


def test_study_mean_and_class_priors():
    images = pd.DataFrame({"study_id": ["b", "a", "b"], "study_label": ["typical", "negative", "typical"], "p": [0.2, 0.5, 0.4]})
    means = study_mean(images, ["p"])
    assert list(means.index) == ["b", "a"] and means.p.tolist() == pytest.approx([0.3, 0.5])  # first appearance order
    assert list(study_mean(images, ["p"], sort=True).index) == ["a", "b"]
    assert class_priors(images) == {"negative": 0.5, "typical": 0.5, "indeterminate": 0.0, "atypical": 0.0}  # per study


def test_score_row_is_a_row_of_the_scores_table():
    truth = T(("s_study", "typical", 0, 0, 1, 1), ("i_image", "opacity", *BOX))
    pred = P(("s_study", "typical", 0.9, 0, 0, 1, 1), ("i_image", "opacity", 0.3, *FAR))
    s = score(truth, pred)
    assert s.row() == {"typical": 1.0, "opacity": 0.0, "study_map": 1.0, "image_map": 0.0, "final": 0.5}
    assert SCORE_COLUMNS[-3:] == ["study_map", "image_map", "final"] and set(s.row()) <= set(SCORE_COLUMNS)
    images = pd.DataFrame({"image_id": ["i"], "study_id": ["s"], "fold": [0]})
    table = fold_scores(truth, pred, images)
    assert list(table.columns) == ["fold", "n_images", "n_studies", *s.row()]
    assert table.iloc[0][list(s.row())].tolist() == list(s.row().values())
