"""`siimcovid pseudo`: the confidence rules, per-fold honesty, refusals, the folder format; slow: real teachers and students."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from siimcovid import cli, pseudo
from siimcovid.data.prepared import Prepared
from siimcovid.tables import CLASSIFIER_FOLDS, DETECTIONS, PSEUDO_BOXES, PSEUDO_LABELS, STUDY_CLASSES
from siimcovid.utils import SiimError

RULES = pseudo.Rules()  # the defaults: P(negative) < 0.3, best other > 0.7, at most 2 boxes, conf >= 0.3, none >= 0.8


def probs_row(image, fold, negative, typical, none, study=None):
    rest = (1.0 - negative - typical) / 2
    return {"image_id": image, "study_id": study or f"s_{image}", "fold": fold, "negative": negative,
            "typical": typical, "indeterminate": rest, "atypical": rest, "none": none}  # fmt: skip


def box(image, fold, conf, x=10.0):
    return {"image_id": image, "fold": fold, "x_min": x, "y_min": 10.0, "x_max": x + 20, "y_max": 40.0, "conf": conf}


# ----------------------------------------------------------------------------- the rules
def test_boxes_only_where_the_teacher_is_sure_at_most_two_the_most_confident():
    probs = pd.DataFrame(
        [
            probs_row("sure", 0, 0.05, 0.9, 0.1),  # P(neg) < 0.3, typical > 0.7, three boxes above 0.3
            probs_row("unsure_class", 0, 0.4, 0.55, 0.1),  # P(neg) too high: soft labels only, even with a box
            probs_row("weak_boxes", 0, 0.05, 0.9, 0.1),  # sure of the class, but no box reaches box_conf
            probs_row("empty", 0, 0.9, 0.05, 0.95),  # P(none) high, no box: a confident negative
            probs_row("empty_but_box", 0, 0.9, 0.05, 0.95),  # P(none) high but a sure box: not a negative
        ]
    )
    boxes = pd.DataFrame(
        [box("sure", 0, 0.5, 0), box("sure", 0, 0.9, 100), box("sure", 0, 0.7, 200), box("sure", 0, 0.2, 300)]
        + [box("unsure_class", 0, 0.9), box("weak_boxes", 0, 0.29), box("empty_but_box", 0, 0.6)]
    )
    labels, kept = pseudo.choose(probs, boxes, RULES)
    kind = labels.set_index("image_id").kind.to_dict()
    assert kind == {"sure": "boxes", "unsure_class": "soft", "weak_boxes": "soft", "empty": "negative", "empty_but_box": "soft"}
    assert labels.set_index("image_id").n_boxes.to_dict() == {"sure": 2, "unsure_class": 0, "weak_boxes": 0, "empty": 0,
                                                              "empty_but_box": 0}  # fmt: skip
    assert sorted(kept.conf) == [0.7, 0.9] and set(kept.image_id) == {"sure"}  # the two most confident of the sure image
    # soft labels: the teacher's own probabilities, for every image, whatever its kind
    assert np.allclose(labels[STUDY_CLASSES + ["none"]].to_numpy(), probs[STUDY_CLASSES + ["none"]].to_numpy())
    PSEUDO_LABELS.check(labels), PSEUDO_BOXES.check(kept)


def test_the_thresholds_are_settings():
    probs = pd.DataFrame([probs_row("a", 0, 0.05, 0.9, 0.1), probs_row("b", 0, 0.9, 0.05, 0.85)])
    boxes = pd.DataFrame([box("a", 0, 0.5, 0), box("a", 0, 0.6, 100)])
    labels, kept = pseudo.choose(probs, boxes, pseudo.Rules(max_boxes=1, box_conf=0.55, none_min=0.9))
    assert labels.n_boxes.tolist() == [1, 0] and kept.conf.tolist() == [0.6]
    assert labels.kind.tolist() == ["boxes", "soft"]  # none 0.85 < 0.9: not a confident negative any more


def test_study_labels_are_the_mean_over_the_study_images_of_that_fold():
    images = pd.DataFrame(
        [probs_row("i1", 0, 0.2, 0.6, 0.3, "s"), probs_row("i2", 0, 0.4, 0.4, 0.9, "s"), probs_row("i1", 1, 0.9, 0.1, 0.3, "s")]
    )
    out = pseudo.study_probabilities(images, by=["fold", "study_id"])  # fusion's study probability, per teacher fold
    assert out.fold.tolist() == [0, 1] and np.allclose(out.negative, [0.3, 0.9]) and np.allclose(out.typical, [0.5, 0.1])


# ----------------------------------------------------------------------------- honest folds, refusals, the folder
def fake_teachers(prepared: Path, base: Path, folds_id: str | None = None, folds=(0, 1, 2), seed: int = 0):
    """Teacher run folders as detect/classify write them, with hand-made per-fold test predictions in which each
    fold model says something different (a fold's own fingerprint: its P(typical) and box confidences)."""
    prep = Prepared(prepared)
    test = prep.split("test")
    rng = np.random.default_rng(seed)
    det, cls = base / "detect" / "teacher", base / "classify" / "teacher"
    for run, config, key in ((det, "detect.yaml", "prepared"), (cls, "classify.yaml", "data")):
        for k in folds:
            (run / f"fold{k}").mkdir(parents=True, exist_ok=True)
        (run / config).write_text(yaml.safe_dump({key: str(prepared), "folds_id": folds_id or prep.folds_id, "imgsz": 64}))
    rows, boxes = [], []
    for k in folds:
        for i, r in enumerate(test.itertuples()):
            sure = i % 3 == 0
            typical = 0.8 + 0.01 * k if sure else 0.3
            rows.append(probs_row(r.image_id, k, 0.1 if sure else 0.6, typical, 0.95 if i % 3 == 1 else 0.2, r.study_id))
            x = float(rng.uniform(0, r.cols / 2))
            boxes.append(box(r.image_id, k, 0.5 + 0.1 * k if sure else 0.05, x) | {"model": "teacher"})
    CLASSIFIER_FOLDS.write(pd.DataFrame(rows).assign(model="teacher"), cls / "pred_test_image_folds.csv")
    DETECTIONS.write(pd.DataFrame(boxes), det / "pred_test.csv")
    return det, cls


def run_pseudo(det, cls, out, **kw):
    return cli.call("pseudo", teacher_det=str(det), teacher_cls=str(cls), out=str(out), **kw)


def test_fold_k_labels_come_from_fold_k_teacher_only(prepared, tmp_path):
    det, cls = fake_teachers(prepared, tmp_path)
    out = run_pseudo(det, cls, tmp_path / "pseudo", sizes=[64])
    labels, boxes = PSEUDO_LABELS.read(out / "labels.csv"), PSEUDO_BOXES.read(out / "boxes.csv")
    teacher = CLASSIFIER_FOLDS.read(cls / "pred_test_image_folds.csv")
    assert sorted(labels.fold.unique()) == [0, 1, 2]
    merged = labels.merge(teacher, on=["fold", "image_id"], suffixes=("", "_t"))
    assert len(merged) == len(labels) == len(teacher)
    assert np.allclose(merged.typical, merged.groupby(["fold", "study_id"]).typical_t.transform("mean"))
    assert set(boxes.conf.round(6)) <= {0.5, 0.6, 0.7} and (boxes.conf.round(6) == 0.5 + 0.1 * boxes.fold).all()
    record = yaml.safe_load((out / "prepare.yaml").read_text())
    assert record["layout"] == "pseudo" and record["teacher"] == "fold" and record["leaky"] is False
    assert record["folds_id"] == Prepared(prepared).folds_id and record["sizes"] == [64]


def test_teachers_retrained_in_the_same_folder_make_new_labels(prepared, tmp_path):
    det, cls = fake_teachers(prepared, tmp_path)
    for k in (0, 1, 2):  # the teachers' checkpoints, as training leaves them
        (det / f"fold{k}" / "weights").mkdir()
        (det / f"fold{k}" / "weights" / "best.pt").write_bytes(b"v1")
    out = run_pseudo(det, cls, tmp_path / "pseudo", sizes=[64])
    before = PSEUDO_BOXES.read(out / "boxes.csv")
    fake_teachers(prepared, tmp_path, seed=1)  # retrained: other predictions...
    (det / "fold1" / "weights" / "best.pt").write_bytes(b"v2, retrained")  # ...and another checkpoint
    after = PSEUDO_BOXES.read(run_pseudo(det, cls, tmp_path / "pseudo", sizes=[64]) / "boxes.csv")
    assert len(after) == len(before) and not np.allclose(after.x_min, before.x_min)  # the new teachers' boxes


def test_the_folder_format(prepared, tmp_path):
    import cv2

    det, cls = fake_teachers(prepared, tmp_path)
    out = run_pseudo(det, cls, tmp_path / "pseudo", sizes=[64])
    labels = PSEUDO_LABELS.read(out / "labels.csv")
    for k in (0, 1, 2):
        fold = labels[labels.fold == k]
        listed = (out / "64" / f"fold{k}.txt").read_text().split()
        detector = fold[fold.kind != "soft"]
        assert sorted(Path(p).stem for p in listed) == sorted(detector.image_id) and all(Path(p).is_file() for p in listed)
        for r in fold.itertuples():
            image = out / "64" / f"fold{k}" / "images" / f"{r.image_id}.png"
            label = out / "64" / f"fold{k}" / "labels" / f"{r.image_id}.txt"
            mask = out / "64" / f"fold{k}" / "masks" / f"{r.image_id}.png"
            assert image.samefile(Prepared(prepared).image_path(r.image_id, "test", 64))  # a hard link, no copy
            assert label.is_file() == mask.is_file() == (r.kind != "soft")
            if r.kind != "soft":
                assert len(label.read_text().splitlines()) == r.n_boxes
                assert (cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE).max() > 0) == (r.n_boxes > 0)
    assert {"boxes", "negative", "soft"} <= set(labels.kind)
    again = run_pseudo(det, cls, tmp_path / "pseudo", sizes=[64])  # finished: nothing to do
    assert (again / "labels.csv").stat().st_mtime == (out / "labels.csv").stat().st_mtime


def test_teacher_all_is_the_fold_mean_and_flagged_leaky(prepared, tmp_path, caplog):
    from siimcovid.runs import describe

    det, cls = fake_teachers(prepared, tmp_path)
    with caplog.at_level("WARNING", logger="siimcovid"):
        out = run_pseudo(det, cls, tmp_path / "all", sizes=[64], teacher="all")
    assert "teacher=all leaks into out-of-fold scores" in caplog.text
    labels = PSEUDO_LABELS.read(out / "labels.csv")
    assert labels.fold.unique().tolist() == [-1] and (out / "64" / "fold-1.txt").is_file()
    teacher = CLASSIFIER_FOLDS.read(cls / "pred_test_image_folds.csv")
    study = teacher.groupby("study_id").typical.mean()  # the mean over folds, then over the study's images
    assert np.allclose(labels.typical, study.loc[labels.study_id])
    assert yaml.safe_load((out / "prepare.yaml").read_text())["leaky"] is True
    row = describe("pseudo", out)
    assert "LEAKY" in row["cv"] and "LEAKY" in row["folds"]
    assert "LEAKY" not in describe("pseudo", run_pseudo(det, cls, tmp_path / "fold", sizes=[64]))["cv"]


def test_refused_when_the_teachers_trained_on_other_folds(prepared, tmp_path):
    det, cls = fake_teachers(prepared, tmp_path, folds_id="0123456789ab")
    with pytest.raises(SiimError, match="trained on other folds"):
        run_pseudo(det, cls, tmp_path / "pseudo")
    assert not (tmp_path / "pseudo" / "labels.csv").exists()


def test_refused_when_the_teachers_trained_different_folds(prepared, tmp_path):
    det, cls = fake_teachers(prepared, tmp_path)
    (cls / "fold2").rmdir()
    with pytest.raises(SiimError, match="teachers trained other folds"):
        run_pseudo(det, cls, tmp_path / "pseudo")


def test_round_trip_through_extra_data(prepared, tmp_path):
    extra = pytest.importorskip("siimcovid.data.extra", reason="ExtraData is on branch pretrain")
    det, cls = fake_teachers(prepared, tmp_path)
    out = run_pseudo(det, cls, tmp_path / "pseudo", sizes=[64])
    labels = PSEUDO_LABELS.read(out / "labels.csv")
    data = extra.ExtraData(out)
    for k in (0, 1, 2):
        fold = labels[labels.fold == k]
        assert sorted(Path(p).stem for p in data.detector_images(k, 64)) == sorted(fold[fold.kind != "soft"].image_id)
        rows = data.classifier_rows(k, 64)
        assert len(rows) == len(fold)
        got = rows.assign(image_id=[Path(p).stem for p in rows.image]).set_index("image_id").loc[fold.image_id]
        assert np.allclose(got[STUDY_CLASSES + ["none"]].to_numpy(float), fold[STUDY_CLASSES + ["none"]].to_numpy(float))


# ----------------------------------------------------------------------------- slow: real teachers, students, run rounds
DETECT_TINY = {"model": "yolov5n.yaml", "pretrained": False, "epochs": 1, "imgsz": 64, "batch": 8, "workers": 0,
               "device": "cpu", "plots": False}  # fmt: skip
CLASSIFY_TINY = {"model": "resnet10t", "pretrained": False, "imgsz": 64, "epochs": 1, "fine_lr": [], "batch": 8,
                 "workers": 0, "device": "cpu"}  # fmt: skip
EASY = {"negative_max": 1.0, "positive_min": 0.0, "box_conf": 0.0, "none_min": 1.0}  # untrained teachers: label everything


@pytest.fixture(scope="module")
def teachers(prepared, tmp_path_factory):
    """A tiny detect run and classify run trained on every fold of the session's prepared folder."""
    base = tmp_path_factory.mktemp("teachers")
    cli.call("detect", "train", data=str(prepared), project=str(base / "detect"), name="t", **DETECT_TINY)
    cli.call("classify", "train", data=str(prepared), project=str(base / "classify"), name="t", **CLASSIFY_TINY)
    return base / "detect" / "t", base / "classify" / "t", base


@pytest.mark.slow
def test_real_teachers_make_a_folder_and_a_student_trains_on_it(prepared, teachers):
    det, cls, base = teachers
    out = run_pseudo(det, cls, base / "pseudo", det_tta=False, cls_tta=False, device="cpu", **EASY)
    labels = PSEUDO_LABELS.read(out / "labels.csv")
    test = Prepared(prepared).split("test")
    assert len(labels) == 3 * len(test) and sorted(labels.fold.unique()) == [0, 1, 2]
    per_fold = CLASSIFIER_FOLDS.read(out / "teachers" / cls.name / "pred_test_image_folds.csv")
    assert per_fold.groupby("image_id").typical.nunique().max() > 1  # each fold's own model, not one mean
    assert (labels.kind == "boxes").sum() == (labels.n_boxes > 0).sum() > 0
    pytest.importorskip("siimcovid.data.extra", reason="extra= is on branch pretrain")
    student = cli.call("detect", "train", data=str(prepared), project=str(base / "detect"), name="s", fold=0,
                       extra=str(out), **DETECT_TINY)  # fmt: skip
    assert student is not None and (base / "detect" / "s" / "fold0" / "weights" / "best.pt").is_file()
    cli.call("classify", "train", data=str(prepared), project=str(base / "classify"), name="s", fold=0, extra=str(out),
             **CLASSIFY_TINY)  # fmt: skip
    assert (base / "classify" / "s" / "fold0" / "done.json").is_file()


@pytest.mark.slow
def test_run_with_one_pseudo_round_adds_its_rows(tmp_path):
    pytest.importorskip("siimcovid.data.extra", reason="extra= is on branch pretrain")
    result = cli.call(
        "run",
        name="ps",
        data=str(tmp_path / "siim"),
        project=str(tmp_path / "runs"),
        synth={"train_studies": 24, "test_studies": 8, "rows": 160, "cols": 192, "workers": 1, "seed": 11},
        prepare={"sizes": [64], "n_folds": 2, "workers": 1, "data_yaml_dir": str(tmp_path / "data_yaml")},
        detect=DETECT_TINY,
        detect_predict={"tta": False, "batch": 8},
        classify=CLASSIFY_TINY,
        classify_predict={"tta": False, "workers": 0},
        tune_trials=2,
        nested_tuning=False,
        report=False,
        pseudo={"rounds": 1, **EASY},
    )
    table = result["table"]
    before = table[~table.method.str.startswith("pseudo round")]
    after = table[table.method.str.startswith("pseudo round 1: ")]
    assert {m.removeprefix("pseudo round 1: ") for m in after.method} == set(before.method) - {
        m for m in before.method if "priors" in m
    }
    assert after.final.notna().all()
    assert (tmp_path / "runs" / "pseudo" / "ps-pseudo1" / "labels.csv").is_file()
    assert (tmp_path / "runs" / "detect" / "ps-pseudo1").is_dir() and (tmp_path / "runs" / "classify" / "ps-pseudo1").is_dir()


def test_students_keep_the_runs_own_extra_data_beside_the_pseudo_labels():
    from siimcovid import stages
    from siimcovid.run import student_extra, students_config

    cfg = stages.stage_config("run", None, {"detect": {"extra": ["rsna"], "epochs": 1}})
    assert student_extra(cfg, "detect", Path("p")) == ["rsna", "p"] and student_extra(cfg, "classify", Path("p")) == ["p"]
    students = students_config(cfg)
    assert students.detect == {"epochs": 1} and cfg.detect["extra"] == ["rsna"]  # run sets extra= for the students
