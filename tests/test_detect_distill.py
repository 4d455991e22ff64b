"""`detect train distill=`: a YOLO student's fold-k labels blend its hard boxes with teacher fold k's boxes on fold k's
training images only; teachers of other folds, prediction tables, missing folds and changed teachers are refused
(siimcovid.detect.distill)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from siimcovid.config import load_config
from siimcovid.data.prepared import Prepared
from siimcovid.detect.distill import RECORD, blend, fold_folder
from siimcovid.tables import BOX_COLUMNS, DISTILL_BOXES
from siimcovid.utils import SiimError

HARD = np.array([[0.1, 0.1, 0.4, 0.5]])


def test_a_box_both_found_blends_its_confidence_and_corners_linearly():
    teacher = np.array([[0.12, 0.1, 0.42, 0.5]])
    boxes, conf, hard = blend(HARD, [(teacher, np.array([0.8]))], weight=0.25, iou=0.55, conf=0.3)
    assert conf == pytest.approx([0.75 * 1 + 0.25 * 0.8]) and hard.tolist() == [True]
    w_hard, w_teacher = 0.75 * 1.0, 0.25 * 0.8  # ensemble-boxes weighs corners by confidence x weight
    assert boxes[0] == pytest.approx((w_hard * HARD[0] + w_teacher * teacher[0]) / (w_hard + w_teacher))


def test_a_box_of_one_side_keeps_its_share_and_is_dropped_below_distill_conf():
    apart = np.array([[0.6, 0.6, 0.9, 0.9]])
    boxes, conf, hard = blend(HARD, [(apart, np.array([0.9]))], weight=0.5, iou=0.55, conf=0.3)
    assert sorted(conf) == pytest.approx([0.45, 0.5]) and sorted(hard.tolist()) == [False, True]
    boxes, conf, hard = blend(HARD, [(apart, np.array([0.5]))], weight=0.5, iou=0.55, conf=0.3)  # 0.25: below 0.3
    assert boxes == pytest.approx(HARD) and conf == pytest.approx([0.5])
    boxes, conf, _ = blend(HARD, [(apart, np.array([0.9]))], weight=0.8, iou=0.55, conf=0.3)  # the hard box: 0.2 < 0.3
    assert boxes == pytest.approx(apart) and conf == pytest.approx([0.72])


def test_distill_weight_one_is_the_teachers_mean_alone_and_a_miss_counts_zero():
    near = np.array([[0.1, 0.1, 0.4, 0.52]])
    boxes, conf, hard = blend(HARD, [(near, np.array([0.6])), (np.zeros((0, 4)), np.zeros(0))], 1.0, 0.55, 0.2)
    assert conf == pytest.approx([0.3]) and boxes == pytest.approx(near) and hard.tolist() == [False]
    boxes, conf, _ = blend(np.zeros((0, 4)), [(np.zeros((0, 4)), np.zeros(0))], 0.5, 0.55, 0.3)
    assert boxes.shape == (0, 4) and conf.shape == (0,)


def test_a_cluster_holds_one_box_of_each_source_so_the_blend_stays_linear():
    """ensemble-boxes would put a teacher's two overlapping boxes into the hard box's cluster (and score it otherwise):
    here the second is a cluster of its own, of the teacher's share alone."""
    two = np.array([[0.1, 0.1, 0.4, 0.5], [0.11, 0.1, 0.41, 0.5]])
    boxes, conf, hard = blend(HARD, [(two, np.array([0.8, 0.6]))], weight=0.5, iou=0.55, conf=0.0)
    assert conf == pytest.approx([0.5 + 0.5 * 0.8, 0.5 * 0.6]) and hard.tolist() == [True, False]
    apart = np.array([[0.6, 0.6, 0.9, 0.9]])
    _, conf, _ = blend(HARD, [(apart, np.array([0.9])), (apart, np.array([0.9]))], weight=0.25, iou=0.55, conf=0.3)
    assert conf == pytest.approx([0.75])  # both teachers' box: 0.25 x 0.9 < distill_conf, below the weight as promised
    boxes, conf, hard = blend(HARD, [(apart, np.array([0.9]))], weight=0.0, iou=0.55, conf=0.0)
    assert boxes == pytest.approx(HARD) and conf == pytest.approx([1.0]) and np.isfinite(boxes).all()
    near = np.array([[0.1, 0.1, 0.4, 0.56]])  # IoU 0.89 with the hard box: below distill_iou=0.95, its own cluster
    _, conf, hard = blend(HARD, [(near, np.array([0.8]))], weight=0.5, iou=0.95, conf=0.0)
    assert conf == pytest.approx([0.5, 0.4]) and hard.tolist() == [True, False]


# ---------------------------------------------------------------- a tiny teacher and its student (Ultralytics)

YOLO = {"model": "yolov5n.yaml", "pretrained": False, "imgsz": 64, "batch": 8, "workers": 0, "device": "cpu"}
YOLO |= {"plots": False, "epochs": 1, "warmup_epochs": 0}


def detect_train(prepared, project, name, **kw):
    from siimcovid.detect.common import ultralytics_keys
    from siimcovid.detect.train import train

    settings = {**YOLO, "data": str(prepared), "project": str(project), "name": name, **kw}
    settings["data_yaml_dir"] = str(Path(prepared).parent / "data_yaml")
    return train(load_config("detect", settings, extra_ok=ultralytics_keys()))


@pytest.fixture(scope="module")
def teacher(prepared, tmp_path_factory):
    project = tmp_path_factory.mktemp("ddistill")
    return detect_train(prepared, project, "teacher", fold=0, seed=1)


@pytest.fixture(scope="module")
def student(prepared, teacher):
    """Fold 0 of a student of that teacher: the teachers' boxes alone, every one of them (distill_conf=0)."""
    return detect_train(prepared, teacher.parent, "student", fold=0, distill=[str(teacher)], distill_weight=1.0, distill_conf=0.0)


@pytest.mark.slow
def test_a_student_learns_from_teacher_fold_k_on_fold_k_training_images_only(student, teacher, prepared):
    from siimcovid.detect.crops import yolo_labels
    from siimcovid.detect.distill import open_teacher, teacher_boxes
    from siimcovid.fuse.wbf import normalise_boxes

    prep = Prepared(prepared)
    folder = fold_folder(student, 0)
    record = yaml.safe_load((folder / RECORD).read_text())
    listed = [Path(p).stem for p in (folder.parent / "fold0.txt").read_text().split()]
    assert sorted(listed) == sorted(prep.fold(0, "train").image_id) == sorted(p.stem for p in (folder / "labels").glob("*.txt"))
    assert not set(listed) & set(prep.fold(0, "val").image_id) and record["images"] == len(listed)
    data = yaml.safe_load((student / "data" / "fold0.yaml").read_text())
    assert data["train"] == [str((folder.parent / "fold0.txt").resolve())]  # prepare's labels are not in its training
    assert data["val"] == yaml.safe_load(Path(prep.root.parent / "data_yaml" / "tiny_fold0.yaml").read_text())["val"]
    table = DISTILL_BOXES.read(folder / "boxes.csv")
    assert (table.fold == 0).all() and set(table.image_id) <= set(listed) and len(table) == record["boxes"] > 0
    # the teacher's fold-0 model again, on a few of those images: the labels are its boxes, fused, as the blend says
    config = load_config("detect", {"batch": 8, "device": "cpu", "distill_tta": True})
    some = list(table.image_id.drop_duplicates()[:3])
    again = teacher_boxes(open_teacher(teacher, prep.folds_id, [0], teacher.parent), 0, some, config)
    meta = prep.meta.set_index("image_id")
    for image_id in some:
        rows, cols = int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"])
        mine = again[again.image_id == image_id]
        want, conf, _ = blend(np.zeros((0, 4)), [(normalise_boxes(mine[BOX_COLUMNS], rows, cols), mine.conf)], 1.0, 0.55, 0.0)
        got = table[table.image_id == image_id]
        assert np.sort(got.conf.to_numpy()) == pytest.approx(np.sort(conf), abs=1e-6)
        label = yolo_labels(folder / "labels" / f"{image_id}.txt")
        assert np.sort(label, axis=0) == pytest.approx(np.sort(want, axis=0), abs=2e-6)  # the YOLO file: the same boxes
    assert (student / "fold0" / "weights" / "best.pt").is_file()
    learned = yaml.safe_load((student / "detect.yaml").read_text())["learned"]
    assert learned["distill_teachers"][0]["run"] == str(teacher)
    from siimcovid.detect.summary import describe

    assert "distill=teacher (weight 1)" in describe(student)["settings"]  # its row in `siimcovid runs`


@pytest.mark.slow
def test_teachers_that_saw_the_validation_images_or_lack_the_fold_are_refused(student, teacher, prepared, tmp_path):
    from siimcovid.rundir import read_run, write_run

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    saved = yaml.safe_load((other / "detect.yaml").read_text())["learned"]
    learned = {**saved, "folds_id": "0123456789ab"}
    record = read_run(other / "detect.yaml")
    write_run(other / "detect.yaml", "detect", {k: v for k, v in record.items() if k not in learned}, learned)
    with pytest.raises(SiimError, match="other folds"):
        detect_train(prepared, tmp_path, "s1", fold=0, distill=[str(other)])
    with pytest.raises(SiimError, match="no finished fold 1"):  # student fold 1 needs teacher fold 1
        detect_train(prepared, tmp_path, "s2", fold=1, distill=[str(teacher)])
    pd.DataFrame({"image_id": ["a"]}).to_csv(tmp_path / "pred_oof.csv", index=False)
    for table in (tmp_path / "pred_oof.csv", teacher / "fold0" / "weights" / "best.pt"):
        with pytest.raises(SiimError, match="leaky"):  # fold j's boxes come from models that saw fold k
            detect_train(prepared, tmp_path, "s3", fold=0, distill=[str(table)])
    with pytest.raises(SiimError, match="twice"):
        detect_train(prepared, tmp_path, "s4", fold=0, distill=[str(teacher), str(teacher)])
    with pytest.raises(SiimError, match="family=torchvision: distill="):
        detect_train(prepared, tmp_path, "s5", fold=0, distill=[str(teacher)], family="torchvision")
    with pytest.raises(SiimError, match="task=lung"):
        detect_train(prepared, tmp_path, "s6", fold=0, distill=[str(teacher)], task="lung")
    assert not any((tmp_path / f"s{i}").exists() for i in range(1, 7))  # refused before anything is written


@pytest.mark.slow
def test_a_resume_with_a_retrained_teacher_is_refused_and_the_same_one_skips(student, teacher, prepared, tmp_path):
    import torch

    students = tmp_path / "students"
    shutil.copytree(student, students / "student")
    again = {"fold": 0, "distill": [str(teacher)], "distill_weight": 1.0, "distill_conf": 0.0}
    labels = fold_folder(students / "student", 0) / "boxes.csv"
    before = labels.stat().st_mtime_ns
    detect_train(prepared, students, "student", **again)  # the same teacher: the fold is skipped, its labels reused
    assert labels.stat().st_mtime_ns == before
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    best = copy / "fold0" / "weights" / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    ckpt["date"] = "retrained"  # another checkpoint in the same place: another sha256
    torch.save(ckpt, best)
    path = students / "student" / "detect.yaml"
    path.write_text(path.read_text().replace(str(teacher), str(copy)))  # as if it had learnt from the copy before
    with pytest.raises(SiimError, match="distill_teachers"):
        detect_train(prepared, students, "student", **{**again, "distill": [str(copy)]})


@pytest.mark.slow
def test_a_student_trains_fold_by_fold_as_its_teacher_finishes_them(teacher, prepared, tmp_path):
    """fold=0 then, once the teacher finished fold 1, fold=1 in another command (one fold per job): no change refused,
    and the record then holds both teacher folds."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    detect_train(prepared, tmp_path, "s", fold=0, distill=[str(copy)])
    detect_train(prepared, tmp_path, "teacher", fold=1, seed=1)
    detect_train(prepared, tmp_path, "s", fold=1, distill=[str(copy)])
    learned = yaml.safe_load((tmp_path / "s" / "detect.yaml").read_text())["learned"]
    assert sorted(learned["distill_teachers"][0]["best_sha256"]) == ["0", "1"]
    assert (fold_folder(tmp_path / "s", 1) / RECORD).is_file() and (tmp_path / "s" / "fold1" / "weights" / "best.pt").is_file()


@pytest.mark.slow
def test_a_teacher_trained_on_all_folds_pseudo_labels_is_refused(teacher, prepared, tmp_path):
    from siimcovid.rundir import read_run, write_run

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "prepare.yaml").write_text(yaml.safe_dump({"layout": "pseudo", "teacher": "all", "leaky": True}))
    other = tmp_path / "leaky"
    shutil.copytree(teacher, other)
    learned = yaml.safe_load((other / "detect.yaml").read_text())["learned"]
    record = read_run(other / "detect.yaml")
    settings = {**{k: v for k, v in record.items() if k not in learned}, "extra": [str(pool)]}
    write_run(other / "detect.yaml", "detect", settings, learned)
    with pytest.raises(SiimError, match="all-folds pseudo-labels"):
        detect_train(prepared, tmp_path, "s", fold=0, distill=[str(other)])
    from siimcovid.classify.distill import open_teacher

    (other / "classify.yaml").write_text((other / "detect.yaml").read_text())  # the same rule, the classify side
    with pytest.raises(SiimError, match="all-folds pseudo-labels"):
        open_teacher(other, Prepared(prepared), [0], tmp_path)
