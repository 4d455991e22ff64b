"""Extra training data (siimcovid/data/extra.py): external and pseudo-labelled prepared folders that join every fold's
TRAINING data (detect and classify `extra=`), never a validation list.

The external folders are `siimcovid synth kind=rsna|chestxray14` + `prepare layout=rsna|csv`; the pseudo folder is
written by hand in the format of CONTRACT.md section 5 (tests/test_pseudo.py runs the real `siimcovid pseudo`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from siimcovid.config import load_config
from siimcovid.data.extra import TARGETS, ExtraData, open_extra
from siimcovid.data.prepared import Prepared
from siimcovid.tables import STUDY_CLASSES
from siimcovid.utils import SiimError

torch = pytest.importorskip("torch")

SIZES = [64, 128]  # the session's SIIM folder's sizes: its detector lists point at 128 px images
NIH = {"layout": "csv", "csv": "Data_Entry_2017.csv", "path_column": "Image Index", "patient_column": "Patient ID"}
NIH |= {"label_format": "pipe"}


# ---------------------------------------------------------------- folders


def prepare_external(root: Path, out: Path, **settings) -> Path:
    from siimcovid.data.prepare import prepare

    cfg = {"data": str(root), "out": str(out), "name": out.name, "sizes": SIZES, "n_folds": 2, "workers": 1}
    return prepare(load_config("prepare", {**cfg, "data_yaml_dir": str(out.parent / "data_yaml"), **settings}))


def synth_external(base: Path, kind: str) -> Path:
    from conftest import make_synth

    return make_synth(base / kind, kind=kind, train_studies=14, rows=128, cols=160, seed=11)


@pytest.fixture(scope="session")
def rsna_prepared(tmp_path_factory) -> Path:
    """`synth kind=rsna` + `prepare layout=rsna`: label_names [opacity], boxes, masks, its own data YAMLs."""
    base = tmp_path_factory.mktemp("rsna")
    return prepare_external(synth_external(base, "rsna"), base / "rsna-tiny", layout="rsna")


@pytest.fixture(scope="session")
def csv_prepared(tmp_path_factory) -> Path:
    """`synth kind=chestxray14` + `prepare layout=csv` (ChestX-ray14's pipe-separated findings): labels.csv."""
    base = tmp_path_factory.mktemp("nih")
    return prepare_external(synth_external(base, "chestxray14"), base / "nih-tiny", **NIH)


def with_labels(folder: Path, out: Path, labels: pd.DataFrame) -> Path:
    """A copy of an external folder whose labels.csv (and prepare.yaml's label_names) are `labels`."""
    out = Path(shutil.copytree(folder, out))
    cfg = Prepared.read_cfg(out)
    (out / "prepare.yaml").write_text(yaml.safe_dump({**cfg, "label_names": list(labels.columns[1:])}, sort_keys=False))
    labels.to_csv(out / "labels.csv", index=False)
    return out


def make_pseudo(prepared: Path, out: Path, folds=(0, 1, 2), folds_id: str | None = None, sizes=(64, 128)) -> Path:
    """A pseudo-label folder (CONTRACT.md section 5) of the prepared folder's test images: per teacher fold k,
    soft labels for every image, a box (YOLO label, mask) on every other one, the confident ones in fold<k>.txt."""
    prep = Prepared(prepared)
    test = prep.split("test")
    rng = np.random.default_rng(5)
    rows, boxes = [], []
    for size in sizes:
        for k in folds:
            pseudo_fold(prep, test, out, size, k, rng, rows, boxes)
    rows = pd.DataFrame(rows).drop_duplicates(["image_id", "fold"])
    rows.to_csv(out / "labels.csv", index=False)
    pd.DataFrame(boxes).drop_duplicates(["image_id", "fold"]).to_csv(out / "boxes.csv", index=False)
    cfg = {
        "layout": "pseudo",
        "source": str(prepared),
        "teacher": "fold" if list(folds) != [-1] else "all",
        "folds_id": folds_id or prep.folds_id,
        "sizes": list(sizes),
        "ext": "png",
    }
    (out / "prepare.yaml").write_text(yaml.safe_dump(cfg))
    return out


def pseudo_fold(prep, test, out: Path, size: int, k: int, rng, rows: list, boxes: list) -> None:
    """One teacher fold's files at one size; its labels appended to rows / boxes."""
    folder = out / str(size) / f"fold{k}"
    for sub in ("images", "labels", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    listed = []
    for i, r in enumerate(test.itertuples()):
        image = folder / "images" / f"{r.image_id}.png"
        shutil.copyfile(prep.image_path(r.image_id, "test", size), image)
        probs = rng.dirichlet(np.ones(4))
        confident = i % 2 == 0
        if confident:
            (folder / "labels" / f"{r.image_id}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
            mask = np.zeros((size, size), np.uint8)
            mask[24:40, 24:40] = 255
            cv2.imwrite(str(folder / "masks" / f"{r.image_id}.png"), mask)
            listed.append(str(image.resolve()))
            boxes.append({"image_id": r.image_id, "fold": k, "x_min": 9, "y_min": 9, "x_max": 50, "y_max": 50, "conf": 0.9})
        none = 0.1 if confident else float(rng.random())
        rows.append({"image_id": r.image_id, "study_id": r.study_id, "fold": k, **dict(zip(STUDY_CLASSES, probs))})
        rows[-1].update(none=none, n_boxes=int(confident))
    (out / str(size) / f"fold{k}.txt").write_text("".join(f"{p}\n" for p in listed))


@pytest.fixture(scope="session")
def pseudo_dir(prepared, tmp_path_factory) -> Path:
    """Pseudo-labels of the session's prepared folder (3 folds) by per-fold teachers."""
    return make_pseudo(prepared, tmp_path_factory.mktemp("pseudo") / "pseudo")


# ---------------------------------------------------------------- ExtraData


def test_rsna_rows_and_images(rsna_prepared):
    extra = ExtraData(rsna_prepared)
    prep = Prepared(rsna_prepared)
    train = prep.split("train")
    images = extra.detector_images(0, 64)
    assert sorted(p.stem for p in images) == sorted(train.image_id)
    assert images == extra.detector_images(1, 64)  # an external set is not split by the SIIM folds
    boxes = train.set_index("image_id").n_boxes
    for p in images:  # the YOLO label where Ultralytics looks for it (/images/ -> /labels/, .txt)
        label = Path(str(p).replace("/images/", "/labels/")).with_suffix(".txt")
        assert (label.is_file() and label.read_text().count("\n") == boxes[p.stem]) or boxes[p.stem] == 0
    assert (boxes > 0).any() and (boxes == 0).any()
    rows = extra.classifier_rows(0, 64)
    rows.index = [Path(p).stem for p in rows.image]
    assert rows[STUDY_CLASSES].isna().all().all()  # RSNA says nothing about the SIIM study classes
    expected_none = (train.set_index("image_id").n_boxes.loc[rows.index] == 0).astype(float).values
    np.testing.assert_array_equal(rows["none"].values, expected_none)
    assert all(Path(m).is_file() for m in rows["mask"])
    table = extra.label_table().set_index("image_id")
    assert table.columns.tolist() == ["opacity"]
    np.testing.assert_array_equal(table.opacity.loc[rows.index].values, 1.0 - expected_none)
    with pytest.raises(SiimError, match="sizes=256"):
        extra.detector_images(0, 256)


def test_csv_rows(csv_prepared, tmp_path):
    extra = ExtraData(csv_prepared)
    labels = pd.read_csv(csv_prepared / "labels.csv")
    assert extra.label_names == Prepared(csv_prepared).cfg["label_names"] == list(labels.columns[1:])
    # ChestX-ray14's findings are none of the classifier's targets: pretrain on it instead
    with pytest.raises(SiimError, match="pretrain on it instead"):
        extra.classifier_rows(0, 64)
    with pytest.raises(SiimError, match="has no boxes"):
        extra.detector_images(0, 64)
    from siimcovid.detect.common import resolve_data

    with pytest.raises(SiimError, match="no boxes to train a detector"):
        resolve_data(str(csv_prepared), csv_prepared.parent / "data_yaml")
    # a set that names SIIM targets (here: none = no finding, some unknown): those columns, the rest unknown, no masks
    names = extra.label_names
    own = labels.assign(none=(labels[names].sum(axis=1) == 0).astype(float))
    own.loc[own.index % 3 == 0, "none"] = np.nan
    rows = ExtraData(with_labels(csv_prepared, tmp_path / "own", own)).classifier_rows(0, 64)
    ids = [Path(p).stem for p in rows.image]
    np.testing.assert_array_equal(rows["none"].values, own.set_index("image_id").loc[ids, "none"].values)
    assert rows[STUDY_CLASSES].isna().all().all() and rows["mask"].isna().all()
    # a bad label value names the file and line
    bad = labels.copy()
    bad.loc[3, names[0]] = 2.0
    with pytest.raises(SiimError, match=rf"labels.csv, line 5: {names[0]} must be in"):
        ExtraData(with_labels(csv_prepared, tmp_path / "bad", bad)).label_table()


def test_pseudo_two_folds(prepared, tmp_path):
    prep = Prepared(prepared)
    pseudo = make_pseudo(prepared, tmp_path / "pseudo2", folds=(0, 1))
    extra = ExtraData(pseudo)
    extra.check_student(prep.folds_id, 2)
    with pytest.raises(SiimError, match="teacher folds"):
        extra.check_student(prep.folds_id, 3)
    labels = pd.read_csv(pseudo / "labels.csv")
    for k in (0, 1):
        rows = extra.classifier_rows(k, 64)
        assert all(f"/fold{k}/images/" in str(p) for p in rows.image)
        mine = labels[labels.fold == k]
        np.testing.assert_allclose(rows[TARGETS].to_numpy(dtype=float), mine[TARGETS].to_numpy(dtype=float))
        has_mask = rows["mask"].notna().to_numpy()
        np.testing.assert_array_equal(has_mask, mine.n_boxes.to_numpy() > 0)
        images = extra.detector_images(k, 64)
        assert images and all(f"/fold{k}/images/" in str(p) for p in images)
        assert len(images) == int((mine.n_boxes > 0).sum())


def test_pseudo_of_other_folds_refused(prepared, tmp_path):
    prep = Prepared(prepared)
    pseudo = make_pseudo(prepared, tmp_path / "pseudo-other", folds_id="0123456789ab")
    with pytest.raises(SiimError, match="teachers trained on other folds"):
        open_extra([pseudo], prep.folds_id, prep.n_folds)


def test_all_folds_teacher_warns(prepared, tmp_path, caplog):
    pseudo = make_pseudo(prepared, tmp_path / "pseudo-all", folds=(-1,))
    extra = ExtraData(pseudo)
    extra.check_student(Prepared(prepared).folds_id, 3)
    with caplog.at_level(logging.WARNING, logger="siimcovid"):
        rows = extra.classifier_rows(2, 64)
    assert len(rows) and all("/fold-1/" in str(p) for p in rows.image)
    assert "optimistic" in caplog.text


def test_siim_and_unlabelled_folders_refused(prepared, tmp_path):
    with pytest.raises(SiimError, match="in the folds already"):
        ExtraData(prepared)
    folder = Path(shutil.copytree(prepared, tmp_path / "pool", ignore=shutil.ignore_patterns("128")))
    cfg = Prepared.read_cfg(folder)
    (folder / "prepare.yaml").write_text(yaml.safe_dump({**cfg, "layout": "folder"}))
    with pytest.raises(SiimError, match="siimcovid pseudo"):
        ExtraData(folder)


# ---------------------------------------------------------------- training and validation sets


class Stop(Exception):
    pass


def classify_sets(prepared, project, **kw) -> dict:
    """The fold's training set size and validation table as classify train builds them (stopped before the model)."""
    from test_classify import tiny_cfg

    from siimcovid.classify.train import main

    seen = {}

    def capture(trainer):
        seen.update(n_train=len(trainer.train_dataset), val=trainer.val_tab.copy(), n_siim=len(trainer.train_tab))
        raise Stop

    with pytest.raises(Stop):
        main(tiny_cfg(prepared, project, fold=0, epochs=1, **kw), callbacks={"on_train_data": capture})
    return seen


def test_classify_extra_grows_training_not_validation(prepared, rsna_prepared, pseudo_dir, tmp_path):
    plain = classify_sets(prepared, tmp_path, name="plain")
    extra = classify_sets(prepared, tmp_path, name="extra", extra=[str(rsna_prepared), str(pseudo_dir)], dedup="keep")
    n_rsna = len(ExtraData(rsna_prepared).classifier_rows(0, 64))
    n_pseudo = len(ExtraData(pseudo_dir).classifier_rows(0, 64))
    assert plain["n_train"] == plain["n_siim"]
    assert extra["n_train"] == plain["n_train"] + n_rsna + n_pseudo
    pd.testing.assert_frame_equal(plain["val"], extra["val"])
    assert not set(extra["val"].image_id) & set(Prepared(rsna_prepared).meta.image_id)


def test_detect_extra_yaml_keeps_validation(prepared, rsna_prepared, pseudo_dir, tmp_path):
    from siimcovid.detect.common import extra_data_yaml, list_lines, resolve_data

    source = resolve_data(str(prepared), Path(prepared).parent / "data_yaml")
    extras = open_extra([rsna_prepared, pseudo_dir], Prepared(prepared).folds_id, source.n_folds)
    for k in range(source.n_folds):
        plain = yaml.safe_load(source.yaml(k).read_text())
        path = extra_data_yaml(source, k, tmp_path / "run", extras)
        data = yaml.safe_load(path.read_text())
        assert data["val"] == plain["val"] and data["path"] == plain["path"]
        train = list_lines(data["train"])
        own = list_lines([str(Path(plain["path"]) / plain["train"])])
        added = [str(p) for e in extras for p in e.detector_images(k, source.size)]
        assert train == own + added
        val = {Path(line).stem for line in list_lines([str(Path(plain["path"]) / plain["val"])])}
        assert not val & {Path(p).stem for p in added}


@pytest.mark.slow
def test_classify_extra_is_a_recorded_setting(prepared, rsna_prepared, tmp_path):
    from test_classify import tiny_cfg

    from siimcovid.classify.train import main

    cfg = tiny_cfg(prepared, tmp_path, name="rec", fold=0, epochs=2)
    with pytest.raises(Stop):  # one epoch trained (the settings bind the name from then on), then stopped
        main(cfg, callbacks={"on_fit_epoch_end": lambda *a, **k: (_ for _ in ()).throw(Stop())})
    with pytest.raises(SiimError, match="extra"):
        main(tiny_cfg(prepared, tmp_path, name="rec", fold=0, epochs=2, extra=[str(rsna_prepared)]))
