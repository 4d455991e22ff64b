"""Submission strings: building, parsing, and the checker that rejects what Kaggle would reject or mis-score."""

from __future__ import annotations

import pandas as pd
import pytest

from siimcovid.submission import (
    check_submission,
    make_submission,
    pred_to_submission,
    read_submission,
    submission_to_pred,
    write_submission,
)
from siimcovid.utils import DataError

GOOD = [
    ("s1_study", "negative 0.71 0 0 1 1 typical 0.12 0 0 1 1 indeterminate 0.11 0 0 1 1 atypical 0.06 0 0 1 1"),
    ("i1_image", "opacity 0.83 694 1024 1320 2267 opacity 0.61 2190 902 2911 2356 none 0.09 0 0 1 1"),
    ("i2_image", "none 0.9 0 0 1 1"),
]


def sub(rows=GOOD):
    return pd.DataFrame(rows, columns=["id", "PredictionString"])


def write_sample(path, ids):
    pd.DataFrame({"id": ids, "PredictionString": "none 1 0 0 1 1"}).to_csv(path, index=False)
    return path


def test_parse_the_format_example():
    pred = submission_to_pred(sub())
    assert len(pred) == 4 + 3 + 1
    row = pred[(pred.id == "i1_image") & (pred.conf == 0.61)].iloc[0]
    assert (row.cls, row.x_min, row.y_min, row.x_max, row.y_max) == ("opacity", 2190, 902, 2911, 2356)


def test_make_submission_writes_all_four_classes_and_none_in_original_pixels():
    probs = pd.DataFrame({"study_id": ["s1"], "negative": [0.1], "typical": [0.6], "indeterminate": [0.2], "atypical": [0.1]})
    boxes = pd.DataFrame(
        [("i1", 0.5, 694.25, 1024, 1320, 2267.125), ("i1", 0.83, 2190, 902, 2911, 2356)],
        columns=["image_id", "conf", "x_min", "y_min", "x_max", "y_max"],
    )
    none = pd.DataFrame({"image_id": ["i1", "i2"], "none": [0.00001, 0.75]})
    out = make_submission(probs, boxes, none).set_index("id")["PredictionString"]
    assert out["s1_study"] == "typical 0.6 0 0 1 1 indeterminate 0.2 0 0 1 1 negative 0.1 0 0 1 1 atypical 0.1 0 0 1 1"
    assert out["i1_image"] == "opacity 0.83 2190 902 2911 2356 opacity 0.5 694.25 1024 1320 2267.125 none 0.00001 0 0 1 1"
    assert out["i2_image"] == "none 0.75 0 0 1 1"


def test_roundtrip_through_strings():
    pred = submission_to_pred(sub())
    again = submission_to_pred(pred_to_submission(pred))
    key = ["id", "cls", "conf"]
    pd.testing.assert_frame_equal(pred.sort_values(key, ignore_index=True), again.sort_values(key, ignore_index=True))


def test_tiny_confidences_keep_their_order_and_the_score(tmp_path):
    # after (1 - none)^a re-weighting confidences reach 1e-10: fixed decimals would write 0 and tie them
    from siimcovid import metrics

    cols = metrics.PRED_COLUMNS
    pred = pd.DataFrame(
        [("i1_image", "opacity", 3e-10, 0, 0, 10, 10), ("i2_image", "opacity", 4e-10, 50, 50, 60, 60)], columns=cols
    )
    truth = pd.DataFrame([("i1_image", "opacity", 0, 0, 10, 10), ("i2_image", "none", 0, 0, 1, 1)], columns=metrics.TRUTH_COLUMNS)
    write_submission(pred_to_submission(pred), tmp_path / "s.csv")
    back = submission_to_pred(read_submission(tmp_path / "s.csv"))
    assert back.set_index("id").conf.to_dict() == pytest.approx({"i1_image": 3e-10, "i2_image": 4e-10}, rel=1e-8)
    # the false positive outranks the hit: AP 0.5 (tied at 0, table order would give 1.0)
    assert metrics.score(truth, back).ap["opacity"] == metrics.score(truth, pred).ap["opacity"] == 0.5


@pytest.mark.parametrize(
    "row, message",
    [
        (("i3_image", "opacity 0.5 1 2 3"), "not groups of 6"),
        (("i3_image", "opacty 0.5 1 2 3 4"), "class 'opacty' is not allowed"),
        (("i3_image", "typical 0.5 0 0 1 1"), "not allowed on an image row"),
        (("s2_study", "opacity 0.5 0 0 1 1"), "not allowed on a study row"),
        (("i3_image", "opacity nan 1 2 3 4"), "confidence must be a finite number >= 0"),
        (("i3_image", "opacity -0.1 1 2 3 4"), "confidence must be a finite number >= 0"),
        (("i3_image", "opacity 0.5 1 2 3 x"), "not a number"),
        (("i3_image", "opacity 0.5 30 2 3 4"), "x_max < x_min"),
        (("i3_image", "opacity 0.5 1 40 3 4"), "y_max < y_min"),
        (("i3_image", "none 0.5 0 0 100 100"), "must use the box 0 0 1 1"),
        (("s2_study", "negative 0.5 0 0 1 1 negative 0.2 0 0 1 1"), "appears twice"),
        (("i3_image", ""), "empty PredictionString"),
        (("i3", "none 1 0 0 1 1"), "should be <study>_study or <image>_image"),
        (("i1_image", "none 1 0 0 1 1"), "duplicate id 'i1_image' (first on line 3)"),
    ],
)
def test_checker_rejects_with_file_and_line(row, message):
    with pytest.raises(DataError) as err:
        check_submission(sub(GOOD + [row]), file="my.csv")
    assert message in str(err.value)
    assert str(err.value).startswith("my.csv, line 5:")  # header + 3 good rows -> the bad one is line 5


def test_checker_compares_with_sample_submission(tmp_path):
    sample = write_sample(tmp_path / "sample_submission.csv", ["s1_study", "i1_image", "i2_image", "i9_image"])
    with pytest.raises(DataError, match="missing, e.g. 'i9_image'"):
        check_submission(sub(), sample)
    sample = write_sample(tmp_path / "sample2.csv", ["s1_study", "i1_image"])
    with pytest.raises(DataError, match="line 4: 1 id\\(s\\) are not in the sample submission, e.g. 'i2_image'"):
        check_submission(sub(), sample)
    check_submission(sub(), ["s1_study", "i1_image", "i2_image"])  # a list of ids works too


def test_columns_must_be_exact():
    with pytest.raises(DataError, match="columns must be exactly"):
        check_submission(sub().assign(extra=1))


def test_write_is_checked_and_atomic(tmp_path):
    path = tmp_path / "submission.csv"
    write_submission(sub(), path)
    assert read_submission(path).equals(sub())
    before = path.read_text()
    bad = sub(GOOD + [("i4_image", "opacity 0.5 9 2 3 4")])
    with pytest.raises(DataError, match=f"{path.name}, line 5"):
        write_submission(bad, path)
    assert path.read_text() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]  # no temp file left


def test_read_names_file_and_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,PredictionString\ni1_image,none 1 0 0 1 1\ni2_image,opacity 1 5 5 1 1\n")
    with pytest.raises(DataError, match=r"s\.csv, line 3: i2_image, prediction 1: box has x_max < x_min"):
        read_submission(path)


def test_lines_count_blank_lines_of_the_file_and_start_at_2_for_a_frame(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,PredictionString\ni1_image,none 1 0 0 1 1\n\ni2_image,none 1 0 0 1 1\ni1_image,none 1 0 0 1 1\n")
    with pytest.raises(DataError, match=r"s\.csv, line 5: duplicate id 'i1_image' \(first on line 2\)"):
        read_submission(path)
    named = sub(GOOD + [("i1_image", "none 1 0 0 1 1")]).set_index(pd.Index(["a", "b", "c", "d"]))  # not read from a file
    with pytest.raises(DataError, match=r"my\.csv, line 5: duplicate id 'i1_image' \(first on line 3\)"):
        check_submission(named, file="my.csv")


def test_written_file_is_the_submission_contract(tmp_path):
    from siimcovid.tables import SUBMISSION

    path = write_submission(sub(), tmp_path / "submission.csv")
    assert path.read_text() == "id,PredictionString\n" + "".join(f"{i},{s}\n" for i, s in GOOD)
    assert SUBMISSION.names == ["id", "PredictionString"]
    assert SUBMISSION.read(path).equals(sub())
