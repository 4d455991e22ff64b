"""Lung boxes in, lung detector out: both published formats read (and bad or hostile files refused, naming the file,
or skipped and counted), synth's lung boxes, prepare's lungs.csv and one-class YOLO lung dataset, and (slow) a lung
detector trained per fold whose out-of-fold AP is its own class `lung`, which fuse refuses as an opacity member."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_prepared

from siimcovid import cli
from siimcovid.config import load_config
from siimcovid.data.lungs import MAX_BYTES, lung_box, read_lung_boxes, read_voc, read_yolo, write_lung_files, yolo_line
from siimcovid.data.prepare import prepare
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import Problems
from siimcovid.tables import BOX_COLUMNS, DETECTIONS, SCORES
from siimcovid.utils import DataError, SiimError

ROWS, COLS = 3000, 4000  # an image of the real data's size (width x height 4000 x 3000)
BOX = [500.0, 400.0, 3500.0, 2600.0]


def voc(box=BOX, size=(COLS, ROWS), name="lunga", objects=1) -> str:
    """A Pascal VOC file as labelImg writes it (the 1st place's: their object name is "lunga")."""
    x1, y1, x2, y2 = box
    obj = (
        f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    )
    head = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>1</depth></size>" if size else ""
    return f"<annotation><folder>train</folder><filename>a.png</filename>{head}{obj * objects}</annotation>\n"


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- one file ----------------------------------------------------------------------------------------------


def test_both_formats_read_to_one_box_in_original_pixels(tmp_path):
    xml = write(tmp_path, "abc.xml", voc())
    txt = write(tmp_path, "abc.txt", yolo_line(BOX, ROWS, COLS))
    assert read_voc(xml, ROWS, COLS) == BOX
    assert read_yolo(txt, ROWS, COLS) == pytest.approx(BOX, abs=0.01)
    assert lung_box(tmp_path, "abc", ROWS, COLS) == BOX  # both there and agreeing: the .xml's whole pixels
    (tmp_path / "abc.xml").rename(tmp_path / "abc_image.xml")  # named with the SIIM suffix: found too
    assert lung_box(tmp_path, "abc", ROWS, COLS) == BOX
    xml.with_name("abc_image.xml").unlink()
    assert lung_box(tmp_path, "abc", ROWS, COLS) == pytest.approx(BOX, abs=0.01)  # the .txt alone


def test_write_lung_files_writes_both_formats_that_agree(tmp_path):
    xml, txt = write_lung_files(tmp_path, "img1", [10.4, 20.6, 300.2, 250.9], 280, 320)
    assert read_voc(xml, 280, 320) == [10, 21, 300, 251]  # whole pixels, as labelImg's
    assert read_yolo(txt, 280, 320) == pytest.approx([10, 21, 300, 251], abs=1e-3)


def test_a_box_passing_the_border_by_a_pixel_is_clipped(tmp_path):
    path = write(tmp_path, "a.xml", voc([-1, 0, COLS + 1, ROWS]))  # VOC counts pixels from 1: an edge of 1 px
    assert read_voc(path, ROWS, COLS) == [0, 0, COLS, ROWS]


BAD_FILES = {
    "not_xml.xml": ("<annotation><object>", "not a Pascal VOC XML file"),
    "no_object.xml": (voc(objects=0), "no <object> box"),
    "two_objects.xml": (voc(objects=2), "2 <object> boxes"),
    "outside.xml": (voc([500, 400, COLS + 50, 2600]), "outside its image"),
    "zero_area.xml": (voc([500, 400, 500, 2600]), "no area"),
    "other_size.xml": (voc(size=(2000, 1500)), r"its <size> is 2000 x 1500, the image is 4000 x 3000"),
    "not_a_number.xml": (voc(["a", 400, 3500, 2600]), "<xmin> is not a number"),
    "not_finite.txt": ("0 nan 0.5 0.5 0.5\n", "xc is not finite"),
    "class_one.txt": ("1 0.5 0.5 0.5 0.5\n", "class 1: a lung box is class 0"),
    "two_lines.txt": ("0 0.5 0.5 0.5 0.5\n0 0.4 0.4 0.2 0.2\n", "2 lines"),
    "four_values.txt": ("0 0.5 0.5 0.5\n", r"5 numbers\), got 4"),
    "empty.txt": ("\n", "empty"),
    "outside.txt": ("0 0.9 0.5 0.5 0.5\n", "outside its image"),
    "latin1.txt": (b"0 0.5 0.5 0.5 0.5 \xe9\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_refused_naming_the_file(tmp_path, name):
    text, reason = BAD_FILES[name]
    path = write(tmp_path, name, text)
    read = read_voc if name.endswith(".xml") else read_yolo
    with pytest.raises(DataError, match=reason) as error:
        read(path, ROWS, COLS)
    assert str(path) in str(error.value)


def test_the_two_formats_of_an_image_must_agree(tmp_path):
    write(tmp_path, "abc.xml", voc())
    write(tmp_path, "abc.txt", yolo_line([600, 400, 3500, 2600], ROWS, COLS))  # x_min 100 px apart
    with pytest.raises(DataError, match=r"abc.xml: its box .* and the box .* of abc.txt disagree"):
        lung_box(tmp_path, "abc", ROWS, COLS)


HOSTILE = {
    "billion_laughs.xml": (
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">\n'
        '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>\n<annotation><size>&lol3;</size></annotation>\n',
        "DOCTYPE or ENTITY",
    ),
    "external.xml": ('<!doctype a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>', "DOCTYPE or ENTITY"),
    "utf16.xml": ('<?xml version="1.0" encoding="UTF-16"?><annotation/>'.encode("utf-16-le"), "NUL byte"),
    "huge.xml": ("<annotation>" + " " * MAX_BYTES + "</annotation>", "larger than"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_xml_is_refused_before_it_is_parsed(tmp_path, name, monkeypatch):
    import xml.etree.ElementTree as ET

    text, reason = HOSTILE[name]
    path = write(tmp_path, name, text)
    monkeypatch.setattr(ET, "fromstring", lambda *a, **k: pytest.fail("a hostile file reached the XML parser"))
    with pytest.raises(DataError, match=reason) as error:
        read_voc(path, ROWS, COLS)
    assert str(path) in str(error.value)


def test_bad_and_missing_files_are_skipped_and_counted_with_on_error_skip(tmp_path):
    write(tmp_path, "good.xml", voc())
    write(tmp_path, "bad.txt", "0 0.5 0.5\n")
    images = pd.DataFrame({"image_id": ["good", "bad", "missing"], "rows": ROWS, "cols": COLS})
    with pytest.raises(DataError, match=r"bad.txt: expected `0 xc yc w h`"):
        read_lung_boxes(tmp_path, images, Problems("raise"))
    problems = Problems("skip")
    table = read_lung_boxes(tmp_path, images, problems)
    assert list(table.image_id) == ["good"] and table[BOX_COLUMNS].iloc[0].tolist() == BOX
    skipped = problems.table()
    assert [Path(f).name for f in skipped.file] == ["bad.txt", "missing.xml"]
    assert "no lung box file for train image missing" in skipped.problem.iloc[1]


# --- synth and prepare -------------------------------------------------------------------------------------


def test_synth_writes_both_files_of_each_train_image_at_the_generators_lung_fields(synth_root):
    from siimcovid.data.synth import LUNG_BOXES_DIR, plan_dataset
    from siimcovid.data.synth import lung_box as generator_box

    cfg = load_config("synth", {"train_studies": 48, "test_studies": 8, "rows": 256, "cols": 300, "seed": 7})
    specs = plan_dataset(cfg)  # the conftest's synth_root: the same seed, the same plan
    folder = synth_root / LUNG_BOXES_DIR
    train = [im for st in specs if st.split == "train" for im in st.images]
    test = [im for st in specs if st.split == "test" for im in st.images]
    assert {p.name for p in folder.iterdir()} == {f"{im.image_id}{ext}" for im in train for ext in (".xml", ".txt")}
    for im in train:
        expected = generator_box(im)
        assert read_voc(folder / f"{im.image_id}.xml", im.rows, im.cols) == pytest.approx(expected, abs=0.5)
        assert read_yolo(folder / f"{im.image_id}.txt", im.rows, im.cols) == pytest.approx(expected, abs=0.51)
        left, right = im.geo["left"][0] * im.cols, im.geo["right"][0] * im.cols  # the lungs' centres inside the box
        assert expected[0] < left < right < expected[2]
    assert test and not any((folder / f"{im.image_id}.xml").exists() for im in test)


@pytest.fixture(scope="module")
def lung_prepared(_tiny_source, tmp_path_factory) -> Path:
    """The 10-study synthetic root prepared at 64 and 96 px, 2 folds, with its lung boxes."""
    base, lungs = tmp_path_factory.mktemp("lung_prepared"), str(_tiny_source / "lung_boxes")
    return make_prepared(_tiny_source, base, "lungy", lung_boxes=lungs, sizes=[64, 96], n_folds=2)


def test_prepare_writes_lungs_csv_and_a_yolo_lung_dataset_of_links(lung_prepared, _tiny_source):
    from ultralytics.data.utils import img2label_paths

    prep = Prepared(lung_prepared)
    lungs, train = prep.lungs(), prep.split("train")
    assert sorted(lungs.image_id) == sorted(train.image_id)  # every train image boxed
    meta = train.set_index("image_id")
    for r in lungs.itertuples():
        rows, cols = int(meta.at[r.image_id, "rows"]), int(meta.at[r.image_id, "cols"])
        assert [r.x_min, r.y_min, r.x_max, r.y_max] == lung_box(_tiny_source / "lung_boxes", r.image_id, rows, cols)
    record = yaml.safe_load((lung_prepared / "prepare_files.yaml").read_text())["files"]
    for size in (64, 96):
        lung = lung_prepared / str(size) / "lung"
        for r in lungs.itertuples():
            image = lung / "images" / "train" / f"{r.image_id}.png"
            assert image.is_symlink() and not os.path.isabs(os.readlink(image))  # relative: the folder may move
            assert os.path.samefile(image, prep.image_path(r.image_id, "train", size))
            label = Path(img2label_paths([str(image)])[0])  # where Ultralytics looks for its label
            rows, cols = int(meta.at[r.image_id, "rows"]), int(meta.at[r.image_id, "cols"])
            assert label == lung / "labels" / "train" / f"{r.image_id}.txt"
            assert label.read_text() == yolo_line([r.x_min, r.y_min, r.x_max, r.y_max], rows, cols)
            assert {f"{size}/lung/images/train/{r.image_id}.png", f"{size}/lung/labels/train/{r.image_id}.txt"} <= set(record)
        for k in range(2):  # the opacity data's patient-grouped folds
            val = [Path(line).stem for line in (lung / f"fold{k}_val.txt").read_text().split()]
            fit = [Path(line).stem for line in (lung / f"fold{k}_train.txt").read_text().split()]
            assert sorted(val) == sorted(train.image_id[train.fold == k])
            assert sorted(fit) == sorted(train.image_id[train.fold != k])
        tests = [lung / line for line in (lung / "test.txt").read_text().split()]
        assert tests and all(os.path.samefile(t, prep.image_path(t.stem, "test", size)) for t in tests)
    data = yaml.safe_load((lung_prepared.parent / "data_yaml" / "lungy_lung_fold1.yaml").read_text())
    assert data["names"] == {0: "lung"} and data["nc"] == 1 and Path(data["path"]) == (lung_prepared / "96").resolve()
    assert (Path(data["path"]) / data["val"]).read_text() == (lung_prepared / "96" / "lung" / "fold1_val.txt").read_text()
    assert "lungs.csv" in record


def test_prepare_skips_and_counts_bad_lung_files_and_runs_again_without_them(tiny_root, tmp_path, caplog):
    boxes = tiny_root / "lung_boxes"
    ids = sorted(p.stem for p in boxes.glob("*.xml"))
    (boxes / f"{ids[0]}.xml").unlink()
    (boxes / f"{ids[0]}.txt").unlink()  # missing
    (boxes / f"{ids[1]}.txt").write_text("0 0.5 0.5 0 0.5\n")  # zero area (its .xml is fine: the .txt is read too)
    settings = {"data": str(tiny_root), "lung_boxes": str(boxes), "out": str(tmp_path / "p"), "sizes": [64], "n_folds": 2}
    settings |= {"workers": 1, "data_yaml_dir": str(tmp_path / "dy")}
    with pytest.raises(DataError, match=rf"{ids[0]}.xml: no lung box file for train image {ids[0]}"):
        prepare(load_config("prepare", settings))
    assert not list((tmp_path / "p").rglob("*.png"))  # a missing file stops it before the first decode
    out = prepare(load_config("prepare", {**settings, "on_error": "skip"}))
    prep = Prepared(out)
    assert sorted(prep.lungs().image_id) == ids[2:]
    skipped = prep.skipped()
    assert sorted(Path(f).name for f in skipped.file) == [f"{ids[0]}.xml", f"{ids[1]}.txt"]
    assert skipped.problem.str.contains("no area").sum() == 1
    assert "2 skipped" in caplog.text
    assert not (out / "64" / "lung" / "labels" / "train" / f"{ids[0]}.txt").exists()
    assert ids[0] not in "".join((out / "64" / "lung" / f"fold0_{part}.txt").read_text() for part in ("train", "val"))
    assert set(prep.meta.image_id) >= set(ids)  # left out of the lung data only
    prepare(load_config("prepare", {**settings, "lung_boxes": None}))  # again, without lung boxes: its lung files go
    assert Prepared(out).lungs() is None and not [p for p in (out / "64" / "lung").rglob("*") if not p.is_dir()]


# --- the lung detector -------------------------------------------------------------------------------------


def test_task_lung_on_a_prepared_folder_without_lung_boxes_says_prepare_lung_boxes(prepared, tmp_path):
    with pytest.raises(SiimError, match=r"has no lung boxes .*`siimcovid prepare \.\.\. lung_boxes=<folder"):
        cli.main(["detect", "train", f"data={prepared}", "task=lung", f"project={tmp_path}", "model=yolov5n.yaml"])
    assert not list(tmp_path.iterdir())


def test_lung_settings_are_checked_before_anything_is_read(tiny_root, lung_prepared, tmp_path):
    settings = {"data": str(tiny_root), "out": str(tmp_path / "p"), "workers": 1, "data_yaml_dir": str(tmp_path / "dy")}
    with pytest.raises(SiimError, match=r"lung_boxes=.*nowhere: no such folder"):
        prepare(load_config("prepare", {**settings, "lung_boxes": str(tmp_path / "nowhere")}))
    with pytest.raises(SiimError, match="boxes the train images: give splits= with train"):
        prepare(load_config("prepare", {**settings, "lung_boxes": str(tiny_root / "lung_boxes"), "splits": ["test"]}))
    assert not (tmp_path / "p").exists()
    yamls = lung_prepared.parent / "data_yaml"
    train = ["detect", "train", "model=yolov5n.yaml", f"project={tmp_path / 'runs'}"]
    wrong = r"lungy_fold0.yaml holds opacity boxes: task=lung trains on a data YAML <name>_lung_fold"
    with pytest.raises(SiimError, match=wrong):
        cli.main([*train, f"data={yamls / 'lungy_fold0.yaml'}", "task=lung"])
    with pytest.raises(SiimError, match=r"lungy_lung_fold0.yaml holds lung boxes: task=opacity trains on a data YAML"):
        cli.main([*train, f"data={yamls / 'lungy_lung_fold0.yaml'}"])
    with pytest.raises(SiimError, match="task=lung trains on the lung boxes of data= only: extra="):
        cli.main([*train, f"data={lung_prepared}", "task=lung", f"extra={lung_prepared}"])
    assert not (tmp_path / "runs").exists()


def test_fuse_refuses_the_boxes_of_a_lung_run(lung_prepared, tmp_path):
    run = tmp_path / "lungy-lung-yolov5n"
    run.mkdir()
    (run / "detect.yaml").write_text(yaml.safe_dump({"detect": {"task": "lung"}, "learned": {"folds_id": "x"}}))
    train = Prepared(lung_prepared).split("train")
    boxes = pd.DataFrame({"image_id": train.image_id, "model": run.name, "fold": train.fold, "x_min": 1.0, "y_min": 1.0})
    path = DETECTIONS.write(boxes.assign(x_max=50.0, y_max=50.0, conf=0.9), run / "pred_oof.csv")
    with pytest.raises(SiimError, match=r"holds the boxes of a lung detector .*task=lung"):
        cli.main(["fuse", "split=oof", f"data={lung_prepared}", f"det={path}", f"project={tmp_path / 'fuse'}", "workers=1"])


TINY = ["model=yolov5n.yaml", "pretrained=false", "epochs=2", "imgsz=64", "batch=8", "workers=0", "device=cpu", "plots=false"]


@pytest.mark.slow
def test_a_lung_detector_trains_per_fold_and_scores_its_oof_lung_ap(lung_prepared, tmp_path):
    project = tmp_path / "detect"
    run = cli.main(["detect", "train", f"data={lung_prepared}", "task=lung", "fold=0", *TINY, f"project={project}"])
    assert run.name == "lungy-lung-yolov5n"
    saved = yaml.safe_load((run / "detect.yaml").read_text())
    assert saved["detect"]["task"] == "lung"  # a setting: in the settings section
    assert all(Path(p).name.startswith("lungy_lung_fold") for p in saved["learned"]["data_yamls"].values())
    args = yaml.safe_load((run / "fold0" / "args.yaml").read_text())
    assert Path(args["data"]).name == "lungy_lung_fold0.yaml"
    cli.main(["detect", "predict", f"run={run}", "split=oof", "device=cpu", "tta=false", "predict_imgsz=64"])
    pred = DETECTIONS.read(run / "pred_oof.csv")
    val = Prepared(lung_prepared).fold(0, "val")
    assert set(pred.image_id) <= set(val.image_id) and (pred.fold == 0).all()
    scores = SCORES.read(run / "scores_oof.csv")
    assert list(scores.fold) == ["all", "0"] and "lung" in scores.columns and "opacity" not in scores.columns
    assert scores.lung.between(0, 1).all() and scores.at[0, "n_images"] == len(val)
    assert scores.final.tolist() == scores.lung.tolist()
    with pytest.raises(SiimError, match="holds the boxes of a lung detector"):
        cli.main(["fuse", "split=oof", f"data={lung_prepared}", f"det={run / 'pred_oof.csv'}", f"project={tmp_path / 'f'}"])
