"""The table contracts, the one CSV reader, the shared mechanics (folds, settings, ensembles)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from siimcovid import ensemble, registry
from siimcovid.data.prepared import select_folds
from siimcovid.rundir import changed_settings, fold_files, refuse_changed
from siimcovid.tables import CLASSIFIER_IMAGES, DETECTIONS, META, SCORES, file_line, file_lines, read_csv
from siimcovid.utils import DataError, SiimError


def detections(n=3):
    return pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(n)],
            "model": "m",
            "fold": 0,
            "x_min": 1.0,
            "y_min": 2.0,
            "x_max": 3.0,
            "y_max": 4.0,
            "conf": np.linspace(0.1, 0.9, n),
        }
    )


def test_write_orders_the_contract_columns_and_reads_back_typed(tmp_path):
    df = detections()[["conf", "image_id", "fold", "model", "x_min", "y_min", "x_max", "y_max"]].assign(extra=1)
    path = DETECTIONS.write(df, tmp_path / "pred.csv")
    assert path.read_text().splitlines()[0] == ",".join(DETECTIONS.required)  # order, no extra, no absent optional
    back = DETECTIONS.read(path)
    assert back["fold"].dtype == np.int64 and back["conf"].dtype == np.float64 and pd.api.types.is_string_dtype(back["image_id"])
    pd.testing.assert_frame_equal(back.reset_index(drop=True), detections()[DETECTIONS.required])


def test_write_refuses_a_table_that_misses_a_required_column(tmp_path):
    with pytest.raises(SiimError, match=r"lacks column\(s\) \['conf'\]"):
        DETECTIONS.write(detections().drop(columns="conf"), tmp_path / "pred.csv")
    assert not (tmp_path / "pred.csv").exists()


def test_full_precision_survives_the_round_trip(tmp_path):
    df = detections().assign(conf=[0.1234567890123456, 1e-17, 0.3])
    back = DETECTIONS.read(DETECTIONS.write(df, tmp_path / "p.csv"))
    assert back["conf"].tolist() == df["conf"].tolist()


@pytest.mark.parametrize(
    "edit, message, line",
    [
        (lambda d: d.assign(conf=d.conf.astype(object).where(d.index != 1, "high")), "conf: not a finite number", 3),
        (lambda d: d.assign(conf=d.conf.where(d.index != 2, 1.5)), r"conf must be in \[0, 1\]", 4),
        (lambda d: d.assign(fold=d.fold.astype(object).where(d.index != 0, 0.5)), "fold must be an integer", 2),
        (lambda d: d.assign(x_max=d.x_max.where(d.index != 1, 0.0)), "x_max < x_min", 3),
        (lambda d: d.assign(model=d.model.where(d.index != 2, "")), "empty model", 4),
    ],
)
def test_read_names_the_file_and_line_of_the_first_bad_value(tmp_path, edit, message, line):
    path = tmp_path / "bad.csv"
    edit(detections()).to_csv(path, index=False)
    with pytest.raises(DataError, match=f"bad.csv, line {line}: .*{message}"):
        DETECTIONS.read(path)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = tmp_path / "blank.csv"
    lines = detections().to_csv(index=False).splitlines()
    path.write_text("\n".join([lines[0], lines[1], "", lines[2], lines[3].replace(",m,", ",,")]) + "\n")
    with pytest.raises(DataError, match="blank.csv, line 5: empty model"):
        DETECTIONS.read(path)


def test_optional_columns_are_read_when_present(tmp_path):
    table = pd.DataFrame({"image_id": ["a"], "study_id": ["s"], "negative": [0.1], "typical": [0.2],
                          "indeterminate": [0.3], "atypical": [0.4]})  # fmt: skip
    back = CLASSIFIER_IMAGES.read(CLASSIFIER_IMAGES.write(table, tmp_path / "c.csv"))
    assert "none" not in back and "fold" not in back
    with_none = CLASSIFIER_IMAGES.read(CLASSIFIER_IMAGES.write(table.assign(none=0.9, fold=2), tmp_path / "d.csv"))
    assert with_none["none"].tolist() == [0.9] and with_none["fold"].tolist() == [2]
    table.assign(none=1.2).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DataError, match=r"e.csv, line 2: none must be in \[0, 1\]"):
        CLASSIFIER_IMAGES.read(tmp_path / "e.csv")


def test_json_columns_round_trip_and_strings_stay_as_written(tmp_path):
    row = {c: "x" for c in META.names} | {"fold": 1, "n_boxes": 1, "rows": 10, "cols": 20, "bits_stored": 12}
    df = pd.DataFrame([row | {"boxes": "[[1.25, 2.0, 3.0, 4.0]]"}, row | {"image_id": "y", "boxes": [[5.0, 6.0, 7.0, 8.0]]}])
    path = META.write(df, tmp_path / "meta.csv")
    assert '"[[1.25, 2.0, 3.0, 4.0]]"' in path.read_text()
    assert META.read(path)["boxes"].tolist() == [[[1.25, 2.0, 3.0, 4.0]], [[5.0, 6.0, 7.0, 8.0]]]


def test_read_csv_errors(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_csv(tmp_path / "nope.csv", ["a"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: empty CSV"):
        read_csv(tmp_path / "empty.csv", ["a"])
    (tmp_path / "cols.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"cols.csv: missing column\(s\) \['c'\]"):
        read_csv(tmp_path / "cols.csv", ["a", "c"])
    assert read_csv(tmp_path / "cols.csv", ["a"])["a"].tolist() == ["1"]  # text unless told otherwise


def test_scores_contract_keeps_the_stage_columns_it_declares(tmp_path):
    table = pd.DataFrame([{"fold": "all", "n_images": 4, "n_studies": 3, "opacity": 0.5, "final": 0.5, "model": "m", "x": 1}])
    written = SCORES.write(table, tmp_path / "scores_oof.csv").read_text().splitlines()[0]
    assert written == "fold,n_images,n_studies,opacity,final,model"


@pytest.mark.parametrize(
    "fold, expected", [("all", [0, 1, 2]), (None, [0, 1, 2]), (2, [2]), ("1", [1]), ([2, 0, 2], [0, 2])]
)
def test_select_folds(fold, expected):
    assert select_folds(fold, 3) == expected


@pytest.mark.parametrize("fold, message", [(3, "fold 3 does not exist"), ("two", "fold must be all"), (True, "fold must be")])
def test_select_folds_errors(fold, message):
    with pytest.raises(SiimError, match=message):
        select_folds(fold, 3)


def test_changed_settings_compare_numbers_as_numbers():
    old = {"lr": 0.001, "epochs": 3, "model": "a", "device": "cpu"}
    new = {"lr": 1e-3, "epochs": 4, "model": "a", "device": "cuda", "other": 1}
    assert changed_settings(old, new, ignore={"device"}) == [("epochs", 3, 4)]
    with pytest.raises(SiimError, match=r"run was trained with epochs=3 \(now 4\): use another name="):
        refuse_changed("run", changed_settings(old, new, {"device"}), "use another name=")
    refuse_changed("run", [], "never raised")


def test_fold_files(tmp_path):
    for k in (0, 2, 10):
        (tmp_path / f"fold{k}" / "weights").mkdir(parents=True)
    (tmp_path / "fold0" / "weights" / "best.pt").write_text("x")
    (tmp_path / "fold10" / "weights" / "best.pt").write_text("x")
    (tmp_path / "foldx").mkdir()
    expected = {0: tmp_path / "fold0/weights/best.pt", 10: tmp_path / "fold10/weights/best.pt"}
    assert fold_files(tmp_path, "weights/best.pt") == expected


def test_ensemble_methods_are_registered_and_combine():
    a = np.array([[0.2, 0.8], [0.6, 0.4], [0.4, 0.6]])
    b = np.array([[0.4, 0.6], [0.2, 0.8], [0.9, 0.1]])
    assert set(registry.names("ensemble")) >= {"mean", "geometric", "geomean", "rank"}
    assert ensemble.combine([a, b], [3, 1], "mean") == pytest.approx(0.75 * a + 0.25 * b)
    assert ensemble.combine([a, b], None, "geomean") == pytest.approx(np.sqrt(a * b))
    assert ensemble.combine([a, b], None, "geometric") == pytest.approx(np.sqrt(a * b))
    ranks = ensemble.combine([a, b], None, "rank")
    assert ranks[:, 0] == pytest.approx([(1 / 3 + 2 / 3) / 2, (3 / 3 + 1 / 3) / 2, (2 / 3 + 3 / 3) / 2])
    with pytest.raises(SiimError, match="expected one of mean"):
        ensemble.combine([a], None, "median")
    with pytest.raises(SiimError, match="need 2 non-negative weights"):
        ensemble.combine([a, b], [1], "mean")


def test_a_name_registered_twice_is_an_error():
    registry.register("test-kind", "x")(len)
    with pytest.raises(SiimError, match="registered twice"):
        registry.register("test-kind", "x")(max)
    assert registry.get("test-kind", "x") is len


def test_nullable_columns_read_an_empty_cell_as_missing(tmp_path):
    table = pd.DataFrame([{"fold": "all", "n_images": 4, "n_studies": 3, "opacity": 0.5, "study_map": np.nan, "final": 0.5}])
    back = SCORES.read(SCORES.write(table, tmp_path / "scores_oof.csv"))
    assert np.isnan(back.at[0, "study_map"]) and back.at[0, "opacity"] == 0.5
    (tmp_path / "bad.csv").write_text("fold,n_images,n_studies,final\nall,,3,0.5\n")
    with pytest.raises(DataError, match="bad.csv, line 2: column n_images: not a finite number"):
        SCORES.read(tmp_path / "bad.csv")  # a count is never missing


def test_skipped_table_reads_what_prepare_writes(tmp_path):
    from siimcovid.data.siim import Problems
    from siimcovid.tables import SKIPPED

    problems = Problems("skip")
    problems.add(DataError("unknown class 'pneumonia'", "train_image_level.csv", 12))
    problems.add(DataError("not a DICOM", "train/s/x/abc.dcm"))  # a whole file: no line
    path = SKIPPED.write(problems.table(), tmp_path / "skipped.csv")
    rows = path.read_text().splitlines()[1:]
    assert rows == ["train_image_level.csv,12,unknown class 'pneumonia'", "train/s/x/abc.dcm,,not a DICOM"]
    back = SKIPPED.read(path)
    assert back["line"].dtype == "Int64" and back["line"].iloc[0] == 12 and pd.isna(back["line"].iloc[1])
    path.write_text("file,line,problem\na.csv,14.0,x\nb.dcm,,y\n")  # written by an earlier version: still read
    assert SKIPPED.read(path)["line"].tolist() == [14, pd.NA]
    path.write_text("file,line,problem\na.csv,14.5,x\n")
    with pytest.raises(DataError, match=r"skipped\.csv, line 2: line must be an integer"):
        SKIPPED.read(path)
    assert back["file"].tolist() == ["train_image_level.csv", "train/s/x/abc.dcm"] and back["problem"].iloc[1] == "not a DICOM"
    path.write_text("file,line,problem\na.csv,0,x\n")
    with pytest.raises(DataError, match=r"skipped\.csv, line 2: line must be in \[1, inf\]"):
        SKIPPED.read(path)


def test_a_quoted_field_spanning_lines_keeps_the_file_lines_true(tmp_path):
    # records and file lines part ways after a multi-line field: errors must still name the bad row's own line
    path = tmp_path / "multi.csv"
    path.write_text('a,b\n1,"two\nlines"\n\n2,x\n3,"three\n\nlines"\n4,x\n5,y\n')
    df = read_csv(path, ["a", "b"])
    assert df["a"].tolist() == ["1", "2", "3", "4", "5"] and file_lines(df).tolist() == [2, 5, 6, 9, 10]
    assert file_line(df, 3) == 9
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))  # Windows line ends count once
    assert file_lines(read_csv(path, ["a"])).tolist() == [2, 5, 6, 9, 10]
    rows = DETECTIONS.write(detections(), tmp_path / "d.csv").read_text().splitlines()
    bad = rows[3].replace(",m,", ",,")  # the third row, after a model name that spans two lines
    path.write_text("\n".join([rows[0], rows[1].replace(",m,", ',"m\nm",'), "", rows[2], bad]) + "\n")
    with pytest.raises(DataError, match="multi.csv, line 6: empty model"):
        DETECTIONS.read(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:5], lines[5].replace(",0.9", ",high")]) + "\n")
    with pytest.raises(DataError, match="multi.csv, line 6: column conf: not a finite number"):
        DETECTIONS.read(path)


def test_a_csv_that_is_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "latin.csv").write_bytes("a,b\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv: not UTF-8 text"):
        read_csv(tmp_path / "latin.csv", ["a"])
