"""The ground truth, built in one place: the competition's unclipped boxes, whatever reads it."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest

from siimcovid.config import load_config
from siimcovid.data.prepare import prepare
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import IMAGE_CSV
from siimcovid.data.truth import load_truth, oof_images, oof_truth, truth_rows
from siimcovid.utils import SiimError


def _prepare(root: Path, tmp: Path) -> Path:
    settings = {"data": str(root), "out": str(tmp / "out"), "sizes": [64], "n_folds": 2, "workers": 1,
                "data_yaml_dir": str(tmp / "yaml")}  # fmt: skip
    return prepare(load_config("prepare", settings))


def _cross_the_border(root: Path) -> tuple[str, list[float]]:
    """Move the first box of the first image with boxes so that it crosses the left border."""
    df = pd.read_csv(root / IMAGE_CSV, dtype=str, keep_default_na=False)
    row = df.index[df.label.str.startswith("opacity")][0]
    tokens = df.at[row, "label"].split()
    x1, y1, x2, y2 = (float(t) for t in tokens[2:6])
    tokens[2:6] = [str(-20.0), str(y1), str(x2), str(y2)]
    df.at[row, "label"] = " ".join(tokens)
    boxes = ast.literal_eval(df.at[row, "boxes"])  # the CSV's python-literal cell
    boxes[0] = {"x": -20.0, "y": y1, "width": x2 + 20.0, "height": y2 - y1}
    df.at[row, "boxes"] = str(boxes)
    df.to_csv(root / IMAGE_CSV, index=False)
    return df.at[row, "id"][: -len("_image")], [-20.0, y1, x2, y2]


def test_truth_keeps_the_unclipped_box_while_meta_clips_it(tiny_root, tmp_path):
    image_id, box = _cross_the_border(tiny_root)
    out = _prepare(tiny_root, tmp_path)
    meta_boxes = Prepared(out).meta.set_index("image_id").at[image_id, "boxes"]
    truth_boxes = load_truth(out, "train").set_index("image_id").at[image_id, "boxes"]
    assert meta_boxes[0][0] == 0.0  # prepare clips to the image: what the detector trains on
    assert truth_boxes[0] == pytest.approx(box)  # the competition scores the box as labelled
    rows = oof_truth(out, [image_id])
    assert rows[rows.cls == "opacity"].x_min.min() == pytest.approx(-20.0)
    assert set(rows.id) >= {image_id + "_image"}


def test_truth_has_the_folds_of_the_prepared_dir_and_the_root_has_none(tiny_root, tmp_path):
    out = _prepare(tiny_root, tmp_path)
    truth = load_truth(out, "train")
    meta = Prepared(out).split("train")
    assert dict(zip(truth.image_id, truth.fold)) == dict(zip(meta.image_id, meta.fold))
    assert set(load_truth(tiny_root, "train").fold) == {-1}


def test_without_the_root_the_clipped_boxes_are_used_with_a_warning(tiny_root, tmp_path, caplog):
    image_id, _ = _cross_the_border(tiny_root)
    out = _prepare(tiny_root, tmp_path)
    (tiny_root / IMAGE_CSV).rename(tiny_root / "moved.csv")
    truth = load_truth(out, "train")
    assert truth.set_index("image_id").at[image_id, "boxes"][0][0] == 0.0
    assert "clipped" in caplog.text


def test_an_id_that_is_not_a_train_image_is_an_error(tiny_root, tmp_path):
    out = _prepare(tiny_root, tmp_path)
    with pytest.raises(SiimError, match="not train images"):
        oof_images(out, ["no-such-image"])


def test_truth_rows_have_one_study_row_and_a_none_or_box_rows_per_image(tiny_root, tmp_path):
    out = _prepare(tiny_root, tmp_path)
    per_image = load_truth(out, "train")
    rows = truth_rows(per_image)
    n_boxes = sum(max(len(b), 1) for b in per_image.boxes)
    assert len(rows) == per_image.study_id.nunique() + n_boxes
    assert (rows.id.str.endswith("_study") == rows.cls.isin(["negative", "typical", "indeterminate", "atypical"])).all()
