"""Extra training data (siimcovid/data/extra.py): external and pseudo-labelled prepared folders that join every fold's
TRAINING data (detect and classify `extra=`), never a validation list.

The external folders are SIIM synth + prepare, turned into the rsna / csv layouts by writing the keys
`prepare layout=rsna|csv` writes (prepare.yaml `layout`, `label_names`; labels.csv; study_label ''), per
CONTRACT.md section 1; the pseudo folder is written by hand in the format of section 5.
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
from siimcovid.tables import META, STUDY_CLASSES
from siimcovid.utils import SiimError

torch = pytest.importorskip("torch")

CSV_LABELS = ["Effusion", "typical", "opacity"]  # one finding of its own, two of SIIM's names (one a study class)


# ---------------------------------------------------------------- hand-built folders


def as_external(out: Path, layout: str, label_names: list[str], labels: pd.DataFrame | None = None) -> Path:
    """A prepared folder as `prepare layout=rsna|csv` leaves it: prepare.yaml layout / label_names, no study labels."""
    cfg = yaml.safe_load((out / "prepare.yaml").read_text())
    cfg.update(layout=layout, label_names=label_names)
    (out / "prepare.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    meta = META.read(out / "meta.csv")
    META.write(meta.assign(study_label=""), out / "meta.csv")
    if labels is not None:
        labels.to_csv(out / "labels.csv", index=False)
    return out


def prepare_external(root: Path, out: Path, name: str, n_folds: int = 2) -> Path:
    from siimcovid.data.prepare import prepare

    settings = {"data": str(root), "name": name, "out": str(out), "sizes": [64, 128], "n_folds": n_folds, "workers": 1}
    return prepare(load_config("prepare", {**settings, "splits": ["train"], "data_yaml_dir": str(out.parent / "data_yaml")}))


def csv_labels(prep: Prepared, seed: int = 0) -> pd.DataFrame:
    """A labelled-CSV set's labels.csv: 1.0 / 0.0 / empty (unknown) per finding."""
    rng = np.random.default_rng(seed)
    train = prep.split("train")
    labels = pd.DataFrame({"image_id": train.image_id})
    labels["Effusion"] = rng.integers(0, 2, len(train)).astype(float)
    labels["typical"] = (train.study_label.values == "typical").astype(float)  # before as_external blanks them
    labels["opacity"] = (train.n_boxes.values > 0).astype(float)
    for c in CSV_LABELS:  # a few unknowns in every column
        labels.loc[rng.random(len(train)) < 0.2, c] = np.nan
    return labels


@pytest.fixture(scope="session")
def external_siim(tmp_path_factory) -> Path:
    """A small SIIM set prepared at 64 px, 2 folds, train split only (the source of the external fixtures)."""
    from conftest import make_synth

    base = tmp_path_factory.mktemp("external")
    root = make_synth(base / "root", train_studies=14, test_studies=2, rows=160, cols=180, seed=11)
    return prepare_external(root, base / "ext-siim", "ext-siim")


@pytest.fixture(scope="session")
def rsna_prepared(external_siim, tmp_path_factory) -> Path:
    """An rsna-layout prepared folder (label_names [opacity], boxes, masks, its own data YAMLs)."""
    out = tmp_path_factory.mktemp("rsna") / "rsna-tiny"
    shutil.copytree(external_siim, out)
    from siimcovid.data.prepare import write_data_yamls

    cfg = yaml.safe_load((out / "prepare.yaml").read_text())
    cfg.update(name="rsna-tiny", out=str(out), data_yaml_dir=str(out.parent / "data_yaml"))
    (out / "prepare.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the lists name images relative to <out>/<size>: the copy's own YAMLs point into the copy
    write_data_yamls("rsna-tiny", out, 128, 2, out.parent / "data_yaml", has_test=False)
    return as_external(out, "rsna", ["opacity"])


@pytest.fixture(scope="session")
def csv_prepared(external_siim, tmp_path_factory) -> Path:
    """A csv-layout prepared folder: labels.csv with Effusion, typical, opacity (some unknown)."""
    out = tmp_path_factory.mktemp("csv") / "cxr-tiny"
    shutil.copytree(external_siim, out)
    labels = csv_labels(Prepared(out))
    return as_external(out, "csv", CSV_LABELS, labels)


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
    for p in images:  # the YOLO label where Ultralytics looks for it (/images/ -> /labels/, .txt)
        label = Path(str(p).replace("/images/", "/labels/")).with_suffix(".txt")
        assert label.is_file() or int(train.set_index("image_id").n_boxes[p.stem]) == 0
    rows = extra.classifier_rows(0, 64).set_index(pd.Index([Path(p).stem for p in extra.classifier_rows(0, 64).image]))
    assert rows[STUDY_CLASSES].isna().all().all()  # RSNA says nothing about the SIIM study classes
    expected_none = (train.set_index("image_id").n_boxes.loc[rows.index] == 0).astype(float).values
    np.testing.assert_array_equal(rows["none"].values, expected_none)
    assert all(Path(m).is_file() for m in rows["mask"])
    assert extra.label_table().columns.tolist() == ["image_id", "opacity"]
    with pytest.raises(SiimError, match="sizes=256"):
        extra.detector_images(0, 256)


def test_csv_rows(csv_prepared, tmp_path):
    extra = ExtraData(csv_prepared)
    assert extra.label_names == CSV_LABELS
    labels = pd.read_csv(csv_prepared / "labels.csv").set_index("image_id")
    rows = extra.classifier_rows(0, 64)
    ids = [Path(p).stem for p in rows.image]
    # only the SIIM targets it names: typical; the rest unknown, no masks
    np.testing.assert_array_equal(rows["typical"].values, labels.loc[ids, "typical"].values)
    assert rows[["negative", "indeterminate", "atypical", "none"]].isna().all().all()
    assert rows["mask"].isna().all()
    with pytest.raises(SiimError, match="has no boxes"):
        extra.detector_images(0, 64)
    # a set with none of the classifier's targets: pretrain on it instead
    other = Path(shutil.copytree(csv_prepared, tmp_path / "cxr-other"))
    as_external(other, "csv", ["Effusion"], labels.reset_index()[["image_id", "Effusion"]])
    with pytest.raises(SiimError, match="pretrain on it instead"):
        ExtraData(other).classifier_rows(0, 64)
    # a bad label value names the file and line
    bad = labels.reset_index()
    bad.loc[3, "Effusion"] = 2.0
    bad.to_csv(other / "labels.csv", index=False)
    with pytest.raises(SiimError, match=r"labels.csv, line 5: column Effusion"):
        ExtraData(other).label_table()


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
    cfg = yaml.safe_load((folder / "prepare.yaml").read_text())
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
    extra = classify_sets(prepared, tmp_path, name="extra", extra=[str(rsna_prepared), str(pseudo_dir)])
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


def test_classify_extra_is_a_recorded_setting(prepared, rsna_prepared, tmp_path):
    from test_classify import tiny_cfg

    from siimcovid import rundir
    from siimcovid.classify.train import main

    run = tmp_path / "rec"
    rundir.fold_dir(run, 0).mkdir(parents=True)
    cfg = tiny_cfg(prepared, tmp_path, name="rec", fold=0, epochs=1)
    with pytest.raises(Stop):  # writes classify.yaml, stops before training
        main(cfg, callbacks={"on_train_data": lambda t: (_ for _ in ()).throw(Stop())})
    with pytest.raises(SiimError, match="extra"):
        main(tiny_cfg(prepared, tmp_path, name="rec", fold=0, epochs=1, extra=[str(rsna_prepared)]))
