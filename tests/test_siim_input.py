"""Parsing the SIIM CSVs and every bad-input case: a clear error naming file and line, or a skip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siimcovid.config import load_config
from siimcovid.data.prepare import prepare
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import (
    IMAGE_CSV,
    STUDY_CSV,
    Problems,
    load_train,
    parse_boxes_cell,
    parse_label_string,
    read_sample_submission,
)
from siimcovid.tables import SKIPPED
from siimcovid.utils import DataError, SiimError

REAL_BOXES = (
    "[{'x': 789.28836, 'y': 582.43035, 'width': 1026.65662, 'height': 1917.30292}, "
    "{'x': 2245.91208, 'y': 591.20528, 'width': 1094.66162, 'height': 1761.54944}]"
)
REAL_LABEL = "opacity 1 789.28836 582.43035 1815.94498 2499.73327 opacity 1 2245.91208 591.20528 3340.5737 2352.75472"


def test_parse_real_format_rows():
    boxes = parse_boxes_cell(REAL_BOXES)
    label = parse_label_string(REAL_LABEL)
    assert [b[:2] for b in boxes] == [[789.28836, 582.43035], [2245.91208, 591.20528]]
    np.testing.assert_allclose([b[2] for b in boxes], [1815.94498, 3340.5737], atol=1e-4)
    assert [p[0] for p in label] == ["opacity", "opacity"] and label[0][2:] == (789.28836, 582.43035, 1815.94498, 2499.73327)
    assert parse_boxes_cell("") == [] and parse_boxes_cell("nan") == []
    assert parse_label_string("none 1 0 0 1 1") == [("none", 1.0, 0.0, 0.0, 1.0, 1.0)]


def _prep(root: Path, tmp: Path, **kw):
    cfg = load_config(
        "prepare",
        {
            "data": str(root),
            "out": str(tmp / "out"),
            "sizes": [64],
            "n_folds": 2,
            "workers": 1,
            "data_yaml_dir": str(tmp / "data_yaml"),
            **kw,
        },
    )
    return prepare(cfg)


def _edit_csv(path: Path, row: int, **values) -> int:
    """Set columns of data row `row` (0-based); returns its line number in the file."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for k, v in values.items():
        df.loc[row, k] = v
    df.to_csv(path, index=False)
    return row + 2


def _first_with_boxes(root: Path) -> int:
    df = pd.read_csv(root / IMAGE_CSV, dtype=str, keep_default_na=False)
    return int(np.flatnonzero(df.label.str.startswith("opacity"))[0])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"label": "opacity 1 10 10 50"}, "not a multiple of 6"),
        ({"label": "pneumonia 1 10 10 50 50"}, "unknown class 'pneumonia'"),
        ({"boxes": "[{'x': 10, 'y': 10, 'width': 0, 'height': 30}]", "label": "opacity 1 10 10 10 40"}, "degenerate box"),
        ({"boxes": "[{'x': 10, 'y': 10, 'width': 5"}, "not a Python list"),
        ({"boxes": "", "label": "opacity 1 10 10 50 50"}, "disagree"),
        ({"id": "abc"}, "should end with '_image'"),
    ],
)
def test_bad_image_rows_name_file_and_line(tiny_root, tmp_path, change, match):
    line = _edit_csv(tiny_root / IMAGE_CSV, _first_with_boxes(tiny_root), **change)
    with pytest.raises(DataError, match=match) as e:
        _prep(tiny_root, tmp_path)
    assert IMAGE_CSV in str(e.value) and f"line {line}" in str(e.value)
    assert not (tmp_path / "out" / "meta.csv").exists()  # nothing looks finished


def test_line_numbers_count_blank_lines(tiny_root, tmp_path):
    path = tiny_root / IMAGE_CSV
    lines = path.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rows[3] = rows[3].replace("_image", "_img", 1)  # a bad id on what becomes file line 7
    path.write_text("\n".join([header, rows[0], "", rows[1], "", rows[2], rows[3], *rows[4:]]) + "\n\n")
    with pytest.raises(DataError, match=rf"{IMAGE_CSV}, line 7: id '.*_img' should end with '_image'"):
        load_train(tiny_root, Problems("raise"))
    rows[3] = rows[3].replace("_img", "_image", 1)
    path.write_text("\n".join([header, "", *rows, "", ""]) + "\n")  # blank lines alone are fine
    assert len(load_train(tiny_root, Problems("raise"))) == len(rows)


def test_malformed_csv_row(tiny_root, tmp_path):
    with open(tiny_root / IMAGE_CSV, "a") as f:
        f.write("x_image,,none 1 0 0 1 1,study,extra,fields\n")
    with pytest.raises(DataError, match=f"{IMAGE_CSV}.*malformed CSV"):
        _prep(tiny_root, tmp_path)


def test_study_level_errors(tiny_root, tmp_path):
    path = tiny_root / STUDY_CSV
    line = _edit_csv(path, 1, **{"Typical Appearance": "1", "Negative for Pneumonia": "1"})
    with pytest.raises(DataError, match=f"{STUDY_CSV}, line {line}: exactly one class"):
        _prep(tiny_root, tmp_path)


def test_image_whose_study_is_missing_from_study_csv(tiny_root):
    images = pd.read_csv(tiny_root / IMAGE_CSV, dtype=str, keep_default_na=False)
    studies = pd.read_csv(tiny_root / STUDY_CSV, dtype=str)
    victim = images.StudyInstanceUID[0]
    studies[studies.id != f"{victim}_study"].to_csv(tiny_root / STUDY_CSV, index=False)
    with pytest.raises(DataError, match=f"{IMAGE_CSV}, line 2: .*study {victim} is not in {STUDY_CSV}"):
        load_train(tiny_root, Problems())


def test_study_without_images(tiny_root):
    studies = pd.read_csv(tiny_root / STUDY_CSV, dtype=str)
    extra = studies.iloc[[0]].assign(id="feedfeedfeed_study")
    pd.concat([studies, extra]).to_csv(tiny_root / STUDY_CSV, index=False)
    with pytest.raises(DataError, match=f"study feedfeedfeed has no image in {IMAGE_CSV}") as e:
        load_train(tiny_root, Problems())
    assert f"line {len(studies) + 2}" in str(e.value)


def test_missing_dicom(tiny_root, tmp_path):
    images = pd.read_csv(tiny_root / IMAGE_CSV, dtype=str, keep_default_na=False)
    victim = images.id[3][: -len("_image")]
    next(tiny_root.glob(f"train/*/*/{victim}.dcm")).unlink()
    with pytest.raises(DataError, match=f"{IMAGE_CSV}, line 5: missing DICOM for image {victim}"):
        _prep(tiny_root, tmp_path)


def test_corrupt_dicom(tiny_root, tmp_path):
    path = next(tiny_root.glob("train/*/*/*.dcm"))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=path.name):
        _prep(tiny_root, tmp_path)


def test_box_outside_the_image_is_an_error(tiny_root, tmp_path):
    line = _edit_csv(
        tiny_root / IMAGE_CSV,
        _first_with_boxes(tiny_root),
        boxes="[{'x': 5000, 'y': 10, 'width': 40, 'height': 30}]",
        label="opacity 1 5000 10 5040 40",
    )
    with pytest.raises(DataError, match=f"{IMAGE_CSV}, line {line}: box .* lies outside"):
        _prep(tiny_root, tmp_path)


def test_box_crossing_the_border_is_clipped(tiny_root, tmp_path):
    row = _first_with_boxes(tiny_root)
    _edit_csv(
        tiny_root / IMAGE_CSV,
        row,
        boxes="[{'x': -20, 'y': 30, 'width': 60, 'height': 40}]",
        label="opacity 1 -20 30 40 70",
    )
    image_id = pd.read_csv(tiny_root / IMAGE_CSV).id[row][: -len("_image")]
    out = _prep(tiny_root, tmp_path)
    meta = Prepared(out).meta.set_index("image_id")
    assert meta.loc[image_id, "boxes"] == [[0.0, 30.0, 40.0, 70.0]]
    label = (out / "64" / "labels" / "train" / f"{image_id}.txt").read_text().split()
    xc, yc, w, h = map(float, label[1:])
    assert xc - w / 2 == pytest.approx(0.0, abs=1e-6) and w * meta.loc[image_id, "cols"] == pytest.approx(40, abs=0.01)


def test_skip_mode_drops_bad_images_and_reports_them(tiny_root, tmp_path, caplog):
    line = _edit_csv(tiny_root / IMAGE_CSV, _first_with_boxes(tiny_root), label="pneumonia 1 10 10 50 50")
    path = next(tiny_root.glob("train/*/*/*.dcm"))
    path.write_bytes(b"garbage")
    out = _prep(tiny_root, tmp_path, on_error="skip")
    prepared = Prepared(out)
    skipped = prepared.skipped()  # skipped.csv read through its contract (tables.SKIPPED)
    assert list(skipped.columns) == SKIPPED.names and len(skipped) == 2
    assert set(skipped.line.dropna().astype(int)) == {line}
    assert any(path.name in f for f in skipped.file) or any(path.name in p for p in skipped.problem)
    meta = prepared.meta
    assert path.stem not in set(meta.image_id)
    assert prepared.was_skipped(path.stem) and not prepared.was_skipped(meta.image_id.iloc[0])
    n_images = len(pd.read_csv(tiny_root / IMAGE_CSV))
    assert (meta.split == "train").sum() == n_images - 2
    # scoring against this prepared dir skips the bad CSV row too, instead of failing on it
    from siimcovid.data.truth import load_truth

    truth = load_truth(out, "train")
    assert set(truth.image_id) == set(meta[meta.split == "train"].image_id)


def test_on_error_value_is_checked(tiny_root, tmp_path):
    with pytest.raises(SiimError, match="on_error"):
        _prep(tiny_root, tmp_path, on_error="ignore")


def test_cli_prints_one_clear_line_and_exits_2(tiny_root, tmp_path):
    line = _edit_csv(tiny_root / IMAGE_CSV, _first_with_boxes(tiny_root), label="pneumonia 1 10 10 50 50")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "siimcovid",
            "prepare",
            f"data={tiny_root}",
            f"out={tmp_path / 'o'}",
            "workers=1",
            f"data_yaml_dir={tmp_path / 'y'}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert f"{IMAGE_CSV}, line {line}: unknown class 'pneumonia'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_duplicate_id_in_sample_submission(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text("id,PredictionString\na_study,negative 1 0 0 1 1\nb_image,none 1 0 0 1 1\na_study,negative 1 0 0 1 1\n")
    with pytest.raises(DataError, match=r"sample_submission.csv, line 4: duplicate id 'a_study' \(first on line 2\)"):
        read_sample_submission(path)


def test_a_prepare_without_problems_has_no_skipped_file(tiny_root, tmp_path):
    prepared = Prepared(_prep(tiny_root, tmp_path, on_error="skip"))
    assert not prepared.skipped_path.exists() and prepared.skipped().empty
    assert not prepared.was_skipped(prepared.meta.image_id.iloc[0])


def test_the_competition_csvs_are_the_contracts_synth_writes_and_siim_reads(tiny_root):
    from siimcovid.tables import IMAGE_LEVEL, SAMPLE, STUDY_LEVEL

    for table, name in ((IMAGE_LEVEL, IMAGE_CSV), (STUDY_LEVEL, STUDY_CSV), (SAMPLE, "sample_submission.csv")):
        assert (tiny_root / name).read_text().splitlines()[0].split(",") == table.names, name
    (tiny_root / STUDY_CSV).write_text("id,Negative for Pneumonia\n")
    with pytest.raises(DataError, match=rf"{STUDY_CSV}: missing column\(s\) \['Typical Appearance'"):
        load_train(tiny_root, Problems())
    (tiny_root / "sample_submission.csv").write_text("id\na_study\n")
    with pytest.raises(DataError, match=r"sample_submission.csv: missing column\(s\) \['PredictionString'\]"):
        read_sample_submission(tiny_root / "sample_submission.csv")


def test_a_boxes_cell_spanning_two_lines_does_not_shift_the_lines_after_it(tiny_root, tmp_path):
    # a Python literal may break lines inside its quotes; the next row is then one file line further down
    k = _first_with_boxes(tiny_root)
    df = pd.read_csv(tiny_root / IMAGE_CSV, dtype=str, keep_default_na=False)
    df.loc[k, "boxes"] = df.loc[k, "boxes"].replace("[{", "[\n{", 1)
    df.loc[k + 1, "label"] = "pneumonia 1 10 10 50 50"
    df.to_csv(tiny_root / IMAGE_CSV, index=False)
    with pytest.raises(DataError, match=rf"{IMAGE_CSV}, line {k + 4}: unknown class 'pneumonia'"):
        load_train(tiny_root, Problems("raise"))
    out = _prep(tiny_root, tmp_path, on_error="skip")  # the multi-line row itself is fine and prepared
    assert (out / "skipped.csv").read_text().splitlines()[1].startswith(f"{tiny_root / IMAGE_CSV},{k + 4},\"unknown class")
    assert df.id[k].removesuffix("_image") in set(Prepared(out).meta.image_id)
