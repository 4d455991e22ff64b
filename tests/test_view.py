"""The human outputs of `siimcovid predict` (siimcovid.predict.view) on fuse tables built by hand."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from siimcovid.data.prepared import Prepared
from siimcovid.predict.view import MIN_CONF, picture_shape, study_html, write_view
from siimcovid.tables import FUSED_BOXES, FUSED_IMAGES, FUSED_STUDIES, PREDICTED_BOXES, PREDICTED_IMAGES, PREDICTED_STUDIES

SIZE = 128  # the largest prepared size: the pictures' longer side


@pytest.fixture(scope="module")
def loose_prepared(_tiny_source, tmp_path_factory) -> Path:
    """The test DICOMs of the tiny synthetic set prepared as a loose folder (64 and 128 px), plus a text file."""
    from siimcovid import cli

    base = tmp_path_factory.mktemp("view")
    out = base / "prepared"
    src = Path(shutil.copytree(_tiny_source / "test", base / "src"))
    (src / "notes.txt").write_text("hello")
    args = ["prepare", f"data={src}", "layout=folder", "splits=test", "on_error=skip", f"out={out}", "sizes=64,128", "workers=1"]
    cli.main(args)
    return out


def fused_by_hand(prepared: Path, out: Path) -> dict:
    """fuse's three test tables: random probabilities, one confident box at a known place on the first image
    and a faint one (below the drawing threshold) on the second."""
    meta = Prepared(prepared).meta
    rng = np.random.default_rng(0)
    first, second = meta.iloc[0], meta.iloc[1]
    strong = [first.image_id, 0.2 * first.cols, 0.3 * first.rows, 0.6 * first.cols, 0.7 * first.rows, 0.9, 0.95]
    faint = [second.image_id, 0.1 * second.cols, 0.1 * second.rows, 0.5 * second.cols, 0.5 * second.rows, 0.05, 0.2]
    boxes = pd.DataFrame([strong, faint], columns=["image_id", "x_min", "y_min", "x_max", "y_max", "conf", "wbf_conf"])
    none = rng.uniform(size=len(meta))
    images = meta[["image_id", "study_id", "rows", "cols"]].assign(
        fold=-1,
        n_boxes=meta.image_id.map(boxes.image_id.value_counts()).fillna(0).astype(int),
        none_cls=none,
        none_det=none,
        none=none,
    )
    studies = pd.DataFrame({"study_id": meta.study_id.unique()})
    probs = rng.dirichlet(np.ones(4), size=len(studies))
    studies[["negative", "typical", "indeterminate", "atypical"]] = probs
    out.mkdir(parents=True, exist_ok=True)
    FUSED_IMAGES.write(images, out / "images_test.csv")
    FUSED_STUDIES.write(studies, out / "studies_test.csv")
    FUSED_BOXES.write(boxes, out / "boxes_test.csv")
    return {"meta": meta, "boxes": boxes, "studies": studies, "first": first, "second": second}


@pytest.fixture(scope="module")
def view(loose_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict")
    made = fused_by_hand(loose_prepared, out / "fuse")
    files = write_view(loose_prepared, out / "fuse", out)
    return out, files, made


def plain_picture(prepared: Path, row) -> np.ndarray:
    square = cv2.imread(str(Prepared(prepared).image_path(row.image_id, "test", SIZE)), cv2.IMREAD_GRAYSCALE)
    h, w = picture_shape(row.rows, row.cols, SIZE)
    return cv2.resize(square, (w, h), interpolation=cv2.INTER_AREA).astype(int)


def is_red(pixel) -> bool:
    b, g, r = (int(v) for v in pixel)
    return r > 150 and r - g > 80 and r - b > 80


def test_tables_follow_their_contracts_and_the_inputs(view):
    out, files, made = view
    studies, images, boxes = (
        PREDICTED_STUDIES.read(files["studies"]),
        PREDICTED_IMAGES.read(files["images"]),
        PREDICTED_BOXES.read(files["boxes"]),
    )
    assert sorted(studies.study_id) == sorted(made["studies"].study_id)
    assert list(studies.negative) == sorted(studies.negative)  # most likely abnormal first
    merged = studies.merge(made["studies"], on="study_id", suffixes=("", "_in"))
    assert np.allclose(merged.typical, merged.typical_in)
    assert (merged.predicted == merged[["negative", "typical", "indeterminate", "atypical"]].idxmax(axis=1)).all()
    assert sorted(images.image_id) == sorted(made["meta"].image_id)
    for row in images.itertuples():
        assert Path(row.file).is_file() and (out / row.picture).is_file()
    assert dict(zip(images.image_id, images.n_boxes)) == {
        i: int((made["boxes"].image_id == i).sum()) for i in made["meta"].image_id
    }
    assert dict(zip(images.image_id, images.n_shown))[made["second"].image_id] == 0  # the faint box is not drawn
    assert np.allclose(boxes.sort_values("conf")[["x_min", "y_max"]], made["boxes"].sort_values("conf")[["x_min", "y_max"]])
    assert Path(files["skipped"]).is_file()  # notes.txt


def test_a_box_is_drawn_where_its_original_pixels_map(view, loose_prepared):
    out, _, made = view
    row = made["first"]
    picture = cv2.imread(str(out / "pictures" / f"{row.image_id}.jpg"))
    plain = plain_picture(loose_prepared, row)
    h, w = plain.shape
    assert picture.shape == (h, w, 3) and (h, w) == picture_shape(row.rows, row.cols, SIZE)
    x1, x2 = round(0.2 * row.cols * w / row.cols), round(0.6 * row.cols * w / row.cols)
    y1, y2 = round(0.3 * row.rows * h / row.rows), round(0.7 * row.rows * h / row.rows)
    mid_y, mid_x = (y1 + y2) // 2, (x1 + x2) // 2
    for y, x in ((mid_y, x1), (mid_y, x2), (y2, mid_x)):  # left, right and bottom edges (the label sits at the top)
        assert is_red(picture[y, x]), (y, x, picture[y, x])
    assert not is_red(picture[mid_y, mid_x])  # inside the box: the image, not paint
    assert not is_red(picture[mid_y, x1 - 6]) and not is_red(picture[mid_y, x2 + 6])
    grey = picture.astype(int).mean(axis=2)
    assert np.abs(grey - plain).max() > 60  # the picture differs from the plain image...
    away = np.ones_like(plain, bool)
    away[max(0, y1 - 25) : y2 + 6, max(0, x1 - 6) : x2 + 40] = False
    assert np.abs(grey - plain)[away].mean() < 3  # ...where the box is, and only there


def test_pictures_without_confident_boxes_are_the_plain_image(view, loose_prepared):
    out, _, made = view
    row = made["second"]  # its one box has conf 0.05 < MIN_CONF
    assert 0.05 < MIN_CONF
    picture = cv2.imread(str(out / "pictures" / f"{row.image_id}.jpg")).astype(int)
    assert np.abs(picture.mean(axis=2) - plain_picture(loose_prepared, row)).mean() < 2


def test_the_page_lists_every_study_and_links_to_files_that_exist(view):
    out, files, made = view
    page = Path(files["html"]).read_text()
    for study in made["studies"].study_id:
        assert study in page
    links = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert len([x for x in links if x.startswith("pictures/")]) == 2 * len(made["meta"])  # a link and a thumbnail each
    for link in links:
        assert not link.startswith(("/", "http")) and (out / link).is_file(), link
    assert "notes.txt" in page and "<script" not in page


def test_text_on_the_page_is_escaped():
    study = pd.Series(
        {"study_id": "a<b&c", "negative": 0.1, "typical": 0.7, "indeterminate": 0.1, "atypical": 0.1, "predicted": "typical"}
    )
    images = pd.DataFrame(
        [{"image_id": "i<1>", "picture": "pictures/i<1>.jpg", "none": 0.5, "n_boxes": 1, "n_shown": 1, "file": "/x/<odd>.dcm"}]
    )
    text = study_html(next(pd.DataFrame([study]).itertuples(index=False)), images)
    assert "a&lt;b&amp;c" in text and "<odd>" not in text and "i<1>" not in text
    assert '<td class="top">0.700</td>' in text


def test_a_rerun_removes_the_pictures_of_images_no_longer_predicted(loose_prepared, tmp_path):
    from siimcovid.outputs import Written
    from siimcovid.predict.record import RECORD

    fused_by_hand(loose_prepared, tmp_path / "fuse")
    Written(tmp_path, RECORD, "predict").claim(tmp_path / "pictures" / "gone.jpg")  # predict.yaml: predict drew it
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "gone.jpg").write_bytes(b"an image an earlier run predicted")
    files = write_view(loose_prepared, tmp_path / "fuse", tmp_path)
    images = pd.read_csv(files["images"])
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == sorted(Path(p).name for p in images.picture)
