"""`classify train distill=`: the student's soft targets come from teacher fold k on fold k's training images only;
teachers of other folds, prediction tables, missing folds and changed teachers are refused (siimcovid.classify.distill)."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from siimcovid.classify.distill import mixed_targets
from siimcovid.classify.files import DISTILL
from siimcovid.config import load_config
from siimcovid.data.prepared import Prepared
from siimcovid.tables import DISTILL_TARGETS, STUDY_CLASSES
from siimcovid.utils import SiimError

TINY = {"model": "test_efficientnet", "pretrained": False, "imgsz": 64, "batch": 8, "workers": 0, "device": "cpu"}
TINY |= {"drop_rate": 0.0, "drop_path_rate": 0.0, "epochs": 1, "fine_lr": [], "warmup_epochs": 0, "tracking": "none"}


def settings(prepared, project, name, **kw):
    return load_config("classify", {**TINY, "data": str(prepared), "project": str(project), "name": name, **kw})


def test_the_targets_mix_the_teachers_and_the_hard_labels_by_distill_weight():
    table = pd.DataFrame({"image_id": ["a", "b"], "label": [1, 0], "none": [0.0, 1.0]})
    soft = pd.DataFrame({"image_id": ["b", "a"], "negative": [0.6, 0.1], "typical": [0.2, 0.5], "indeterminate": [0.1, 0.2]})
    soft = soft.assign(atypical=1 - soft[STUDY_CLASSES[:3]].sum(axis=1), none=[0.7, 0.2])
    study, none = mixed_targets(table, soft, 0.25)
    assert study[0] == pytest.approx(0.25 * np.array([0.1, 0.5, 0.2, 0.2]) + 0.75 * np.array([0, 1, 0, 0]))
    assert none == pytest.approx([0.25 * 0.2, 0.25 * 0.7 + 0.75])
    assert study.sum(axis=1) == pytest.approx([1.0, 1.0])
    with pytest.raises(SiimError, match="no soft target"):
        mixed_targets(table.assign(image_id=["a", "c"]), soft, 0.5)


@pytest.fixture(scope="module")
def teacher(prepared, tmp_path_factory):
    """Fold 0 of a tiny teacher (one epoch)."""
    from siimcovid.classify.train import main as train

    project = tmp_path_factory.mktemp("distill")
    train(settings(prepared, project, "teacher", fold=0, seed=1))
    return project / "teacher"


@pytest.fixture(scope="module")
def student(prepared, teacher):
    """Fold 0 of a student of that teacher, soft targets only."""
    from siimcovid.classify.train import main as train

    train(settings(prepared, teacher.parent, "student", fold=0, distill=[str(teacher)], distill_weight=1.0))
    return teacher.parent / "student"


def teacher_fold_probabilities(teacher, prepared, image_ids, fold=0):
    """Teacher fold `fold`'s own probabilities (hflip TTA, as distill_tta's default) on those training images."""
    from torch.utils.data import DataLoader

    from siimcovid.classify.data import StudyDataset, image_table
    from siimcovid.classify.predict import infer, load_checkpoint_model

    prep = Prepared(prepared)
    table = image_table(prep, "train", fold, "train").set_index("image_id").loc[image_ids].reset_index()
    model, _ = load_checkpoint_model(teacher / f"fold{fold}" / "best.pt", torch.device("cpu"))
    loader = DataLoader(StudyDataset(prep, table, 64, masks=False), batch_size=8)
    idx, study, none, _ = infer(model, loader, torch.device("cpu"), None, "hflip")
    return np.column_stack([study, none])[np.argsort(idx)]


@pytest.mark.slow
def test_a_student_learns_only_from_teacher_fold_k_on_fold_k_training_images(student, teacher, prepared):
    prep = Prepared(prepared)
    targets = DISTILL_TARGETS.read(student / "fold0" / DISTILL)
    assert (targets.fold == 0).all()
    assert sorted(targets.image_id) == sorted(prep.fold(0, "train").image_id)  # every training image of the fold
    assert not set(targets.image_id) & set(prep.fold(0, "val").image_id)  # and no validation image
    some = list(targets.image_id[:5])
    want = teacher_fold_probabilities(teacher, prepared, some)
    got = targets.set_index("image_id").loc[some, STUDY_CLASSES + ["none"]].to_numpy()
    assert got == pytest.approx(want, abs=1e-5)  # teacher fold 0's own probabilities (one teacher: the mean is its own)
    log = pd.read_csv(student / "fold0" / "results.csv")
    assert np.isfinite(log.train_loss).all() and (student / "fold0" / "done.json").is_file()
    from siimcovid.classify.summary import describe

    assert "distill=teacher" in describe(student)["settings"]


@pytest.mark.slow
def test_a_teacher_of_other_folds_or_data_or_without_the_fold_is_refused(student, teacher, prepared, tmp_path):
    from siimcovid.classify.train import main as train
    from siimcovid.rundir import read_run, write_run

    other = tmp_path / "other"
    shutil.copytree(teacher, other, ignore=shutil.ignore_patterns("*.pt"))
    shutil.copy(teacher / "fold0" / "best.pt", other / "fold0" / "best.pt")
    record = read_run(other / "classify.yaml")
    learned = {"folds_id": "0123456789ab", "mode": "train", "family": "timm"}
    write_run(other / "classify.yaml", "classify", {k: v for k, v in record.items() if k not in learned}, learned)
    with pytest.raises(SiimError, match="other folds"):
        train(settings(prepared, tmp_path, "s1", fold=0, distill=[str(other)]))
    with pytest.raises(SiimError, match="no finished fold 1"):  # student fold 1 needs teacher fold 1
        train(settings(prepared, tmp_path, "s2", fold=1, distill=[str(teacher)]))
    with pytest.raises(SiimError, match="leaky"):  # the teacher's OOF table: fold j's rows come from models that saw fold k
        train(settings(prepared, tmp_path, "s3", fold=0, distill=[str(teacher / "fold0" / "val_pred_image.csv")]))
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s3").exists()  # refused before anything is written


@pytest.mark.slow
def test_a_resume_with_a_changed_teacher_is_refused(student, teacher, prepared, tmp_path):
    from siimcovid.classify.train import main as train

    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    students = tmp_path / "students"
    shutil.copytree(student, students / "student")
    again = settings(prepared, students, "student", fold=0, distill=[str(teacher)], distill_weight=1.0)
    assert train(again)[0]["best_epoch"] >= 1  # the same teacher: the finished fold is skipped
    with pytest.raises(SiimError, match="distill"):  # another teacher run
        train(settings(prepared, students, "student", fold=0, distill=[str(copy)], distill_weight=1.0))
    ckpt = torch.load(copy / "fold0" / "best.pt", map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] + 1.0  # the teacher retrained in place: its best.pt is another
    torch.save(ckpt, copy / "fold0" / "best.pt")
    shutil.copytree(student, students / "student2")
    import yaml

    path = students / "student2" / "classify.yaml"
    path.write_text(path.read_text().replace(str(teacher), str(copy)))  # as if student2 had learnt from the copy
    with pytest.raises(SiimError, match="distill_teachers"):
        train(settings(prepared, students, "student2", fold=0, distill=[str(copy)], distill_weight=1.0))
    assert yaml.safe_load(path.read_text())["learned"]["distill_teachers"][0]["run"] == str(copy)


def test_with_extra_data_only_the_siim_images_get_the_teachers_targets(prepared, tmp_path):
    """The hook after extra=: the ConcatDataset's first part (the fold's own images) is distilled, the extra part kept;
    a cached table of these teachers is read, not computed again."""
    from types import SimpleNamespace

    from torch.utils.data import ConcatDataset

    from siimcovid.classify.data import SoftTargets, StudyDataset, TargetDataset, image_table
    from siimcovid.classify.distill import Teacher, distill_hook, teachers_id
    from siimcovid.config import Config
    from siimcovid.engine.family import World

    prep = Prepared(prepared)
    table = image_table(prep, "train", 0, "train")
    teachers = [Teacher(tmp_path / "t", prep.folds_id, 64, {0: tmp_path / "t" / "fold0" / "best.pt"}, {0: "0" * 64})]
    soft = table[["image_id", "study_id"]].assign(fold=0, negative=0.1, typical=0.6, indeterminate=0.2, atypical=0.1, none=0.3)
    DISTILL_TARGETS.write(soft.assign(teachers_id=teachers_id(teachers, 0, "hflip")), tmp_path / DISTILL)
    own = StudyDataset(prep, table, 64)
    image = prep.image_path(table.image_id[0], "train", 64)
    extra = TargetDataset([image], [None], np.full((1, 4), np.nan, dtype=np.float32), np.array([0.5], np.float32), 64)
    cfg = Config(distill_tta="hflip", distill_weight=0.5, batch=8, workers=0)
    trainer = SimpleNamespace(cfg=cfg, dir=tmp_path, fold=0, d=World(), prep=prep, device=torch.device("cpu"))
    trainer.train_dataset, trainer.train_tab = ConcatDataset([SoftTargets(own, 4), extra]), table
    distill_hook(teachers)(trainer)  # the teachers' best.pt does not exist: the cache must be what is read
    first, last = trainer.train_dataset[0], trainer.train_dataset[len(table)]
    hard = np.eye(4)[table.label[0]]
    assert first["label"].numpy() == pytest.approx(0.5 * np.array([0.1, 0.6, 0.2, 0.1]) + 0.5 * hard)
    assert float(first["none"]) == pytest.approx(0.5 * 0.3 + 0.5 * table.none[0]) and bool(first["has_mask"])
    assert np.isnan(last["label"].numpy()).all() and float(last["none"]) == 0.5  # the extra image as it was


@pytest.mark.slow
def test_a_student_is_exported_alone_and_predicts_as_its_run_does(tmp_path):
    """The point of a student is a cheaper bundle: one classify member, its test probabilities those of its run."""
    from conftest import make_synth

    from siimcovid.cli import call
    from siimcovid.tables import CLASSIFIER_IMAGES

    root = make_synth(tmp_path / "root", train_studies=30, test_studies=3, rows=160, cols=180, seed=3)
    prep = call("prepare", data=str(root), name="d", out=str(tmp_path / "prep"), sizes=[64], n_folds=3, workers=0,
                data_yaml_dir=str(tmp_path / "dy"))  # fmt: skip
    project = tmp_path / "runs" / "classify"
    common = {**TINY, "data": str(prep), "project": str(project)}
    call("classify", "train", **common, name="t")
    call("classify", "train", **common, name="s", distill=[str(project / "t")])
    bundle = call("export", project=str(tmp_path / "runs"), classify=str(project / "s"), out=str(tmp_path / "bundle"))
    assert sorted(p.name for p in (bundle / "classify").iterdir()) == ["s"]  # the teacher is not in it
    result = call("predict", bundle=str(bundle), source=str(root), out=str(tmp_path / "out"), workers=0)
    bundled = CLASSIFIER_IMAGES.read(result["out"] / "classify" / "s" / "pred_test_image.csv").set_index("image_id")
    call("classify", "predict", run=str(project / "s"), split=["test"], source=str(result["prepared"]), workers=0,
         device="cpu", project=str(project))  # fmt: skip
    own = CLASSIFIER_IMAGES.read(project / "s" / "pred_test_image.csv").set_index("image_id")
    assert sorted(own.index) == sorted(bundled.index) and len(own) == 3
    assert bundled.loc[own.index, STUDY_CLASSES].to_numpy() == pytest.approx(own[STUDY_CLASSES].to_numpy(), rel=1e-5)
