"""`classify train distill=<teacher classify runs>`: one student learns from the soft targets of its teachers.

    siimcovid classify train data=runs/prepare/siim model=resnet18d name=student distill=runs/classify/b7_640,runs/classify/b5_512

The student of fold k learns, for each of fold k's training images, from the mean of the teachers' fold-k probabilities
(the four study classes and none): teacher fold k trained on every fold but k, so no model that saw fold k's
validation images shapes what the student learns, and the student's out-of-fold score stays honest. The teachers'
in-sample probabilities on those training images are what distillation wants (the teachers' view of images they
learnt). Per image, the targets are

    study   distill_weight * (the teachers' mean study probabilities) + (1 - distill_weight) * the one-hot study label
    none    distill_weight * (the teachers' mean P(none)) + (1 - distill_weight) * the hard none label

through the loss's soft path (soft cross-entropy, BCE with soft targets: both linear in the target, so this is
distill_weight * the soft-target loss + (1 - distill_weight) * the hard-label loss); the mask loss keeps the boxes'
masks. Validation, best.pt's rule and the log are the plain classifier's.

Refused, with the reason (nothing here is flagged LEAKY and let through):
- a teacher trained on other folds (its folds_id is not the student's data's), or on other data (no folds_id);
- a teacher without a finished fold k for a fold k the student trains;
- a prediction table (pred_oof_image.csv and the like) as a teacher: its rows of fold j's images come from teacher
  fold j, which trained on fold k's validation images, so a student of fold k learning from them is leaky;
- a teacher that is not a study classifier with a none head (task=none, multi-label pretraining, another family), or
  one that predicts with lung-crop views (crop=lung: not yet);
- a resume with other teachers: the run records each teacher (its folder, folds_id, the sha256 of each fold's best.pt)
  in what it learned (classify.yaml: learned.distill_teachers), which a resume must match.

fold<k>/distill_targets.csv (tables.DISTILL_TARGETS) caches fold k's soft targets: computed once by the main process
before the fold's first epoch, reused while its teachers_id (a fingerprint of the teachers and distill_tta) is the
teachers'.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import ConcatDataset

from siimcovid import rundir
from siimcovid.classify.files import DISTILL, FILES
from siimcovid.engine.distill import check_not_leaky
from siimcovid.tables import DISTILL_TARGETS, STUDY_CLASSES
from siimcovid.utils import LOGGER, SiimError, file_sha256

TARGET_COLUMNS = STUDY_CLASSES + ["none"]
LEAKY_TABLE = (
    "a prediction table is not a teacher for distillation: its rows of fold j's images come from teacher fold j, which "
    "trained on fold k's validation images, so a student of fold k learning from them would be leaky (optimistic OOF); "
    "give the teacher's run folder instead (its fold-k model then predicts fold k's training images)"
)


@dataclass(frozen=True)
class Teacher:
    """A teacher classify run, checked: its folder (absolute), folds_id, image size, TTA and its folds' best.pt."""

    run: Path
    folds_id: str
    imgsz: int
    best: dict  # {fold: best.pt}
    sha256: dict  # {fold: sha256 of best.pt}

    def record(self) -> dict:
        """What the student's classify.yaml keeps of it (learned.distill_teachers): a resume must find the same."""
        return {
            "run": str(self.run),
            "folds_id": self.folds_id,
            "best_sha256": {str(k): v for k, v in self.sha256.items()},
        }  # str: YAML keys as written


# ---------------------------------------------------------------- the teachers, checked


def teacher_dir(given, project: str | Path) -> Path:
    """A teacher as given (a classify run folder, or a run name under project=) -> its folder; a table refused."""
    path = Path(str(given))
    if path.is_file() or path.suffix in (".csv", ".pt"):  # a table (or one checkpoint): not per fold k
        raise SiimError(f"distill={given}: {LEAKY_TABLE}")
    for cand in (path, Path(project) / str(given)):
        if (cand / FILES.settings).is_file():
            return cand.resolve()
    raise SiimError(f"distill={given}: not a classify run folder (no {FILES.settings} in {path} or {Path(project) / str(given)})")


def check_kind(run: Path, cfg: dict) -> None:
    """A teacher is a study classifier of family timm with a none head, predicting whole images."""
    where = f"distill={run}"
    if cfg.get("label_names"):
        raise SiimError(f"{where} is a multi-label pretraining run: it predicts no study classes (use it as init=)")
    if (cfg.get("task") or "study") != "study":
        raise SiimError(f"{where} is a task={cfg.get('task')} model: a teacher gives study probabilities (task=study)")
    if (cfg.get("family") or "timm") != "timm":
        raise SiimError(f"{where} is a run of family={cfg.get('family')}: distillation reads timm classifiers only, for now")
    if cfg.get("none_head") is False:
        raise SiimError(f"{where} has no none head (none_head=false): the student's none target needs the teachers' P(none)")
    if (cfg.get("crop") or "none") != "none":
        raise SiimError(f"{where} predicts with lung-crop views (crop={cfg.get('crop')}): not yet a teacher; give crop=none runs")


def open_teacher(given, prep, folds: list[int], project: str | Path) -> Teacher:
    """One teacher, checked against the student's prepared folder and the folds it trains (module docstring)."""
    run = teacher_dir(given, project)
    cfg = rundir.read_run(run / FILES.settings)
    check_not_leaky(run, cfg)  # siimcovid.engine.distill
    check_kind(run, cfg)
    recorded = cfg.get("folds_id")
    if not recorded:
        raise SiimError(f"distill={run} records no fold assignment ({FILES.settings}: folds_id): its folds cannot be checked")
    if recorded != prep.folds_id:
        raise SiimError(
            f"distill={run} was trained on other folds than {prep.root} (folds_id {recorded} != {prep.folds_id}): its "
            "fold-k model saw some of the student's fold-k validation images, so the student's OOF would be leaky; "
            "train the teachers on the student's data="
        )
    done = {k: p for k, p in rundir.fold_files(run, FILES.best).items() if (p.parent / FILES.done).is_file()}
    missing = [k for k in folds if k not in done]
    if missing:
        raise SiimError(
            f"distill={run} has no finished fold {', '.join(map(str, missing))} (fold<k>/{FILES.done}): the student's fold k "
            "learns only from teacher fold k (which never saw fold k's validation images); train those folds of the teacher"
        )
    size = prep.check_size(int(cfg["imgsz"]))  # the teacher predicts the student's data at its own size
    return Teacher(run, recorded, size, done, {k: file_sha256(p) for k, p in sorted(done.items())})


def open_teachers(cfg, prep, folds: list[int]) -> list[Teacher]:
    """Every teacher of distill=, checked; the same run twice is an error (it would weigh double)."""
    teachers = [open_teacher(t, prep, folds, cfg.project) for t in cfg.distill]
    runs = [t.run for t in teachers]
    twice = sorted({str(r) for r in runs if runs.count(r) > 1})
    if twice:
        raise SiimError(f"distill= names {twice[0]} twice")
    return teachers


def teachers_id(teachers: list[Teacher], fold: int, tta) -> str:
    """The fingerprint of fold `fold`'s soft targets: the teachers, their fold's best.pt and the TTA."""
    from siimcovid.classify.tta import tta_name

    text = json.dumps([[str(t.run), t.imgsz, t.sha256[fold]] for t in teachers] + [tta_name(tta, "distill_tta")])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def prepare_run(cfg, prep, folds: list[int], data) -> list[Teacher]:
    """distill=: the teachers checked, their folders resolved in the settings and recorded in what the run learns
    (data.learned: a resume with other teachers is then a changed run, refused), and never written into."""
    if not cfg.get("distill"):
        return []
    teachers = open_teachers(cfg, prep, folds)
    cfg.distill = [str(t.run) for t in teachers]
    data.learned["distill_teachers"] = [t.record() for t in teachers]
    data.sources += [str(t.run) for t in teachers]
    LOGGER.info(
        f"classify: distillation from {len(teachers)} teacher(s) ({', '.join(t.run.name for t in teachers)}), "
        f"distill_weight={cfg.distill_weight}: fold k learns from teacher fold k's probabilities on its training images"
    )
    return teachers


# ---------------------------------------------------------------- the soft targets of a fold


def teacher_probabilities(teacher: Teacher, prep, fold: int, table: pd.DataFrame, device, amp_dtype, loader_kw, tta):
    """Teacher fold `fold`'s probabilities (N, 5: the study classes and none) on the rows of `table`, in its order."""
    from torch.utils.data import DataLoader

    from siimcovid.classify.data import StudyDataset, check_files
    from siimcovid.classify.predict import checkpoint_folds_id, infer, load_checkpoint_model

    path = teacher.best[fold]
    if file_sha256(path) != teacher.sha256[fold]:
        raise SiimError(f"{path} changed since this training started (its sha256): the teacher was retrained; start again")
    model, ckpt = load_checkpoint_model(path, device)
    prep.check_folds(checkpoint_folds_id(path, ckpt), str(path.parent))  # per fold: a fold retrained on other folds
    check_files(prep, table, teacher.imgsz, masks=False)
    loader = DataLoader(StudyDataset(prep, table, teacher.imgsz, masks=False), **loader_kw)
    idx, study, none, _ = infer(model, loader, device, amp_dtype, tta)
    if none is None:
        raise SiimError(f"{path}: the model has no none head; a teacher needs one")
    order = np.argsort(idx)
    return np.column_stack([study[order], none[order]]).astype(np.float64)


def soft_targets(teachers: list[Teacher], prep, fold: int, device, amp_dtype, loader_kw: dict, tta) -> pd.DataFrame:
    """The DISTILL_TARGETS table of student fold `fold`: per training image of the fold (never a validation image),
    the mean over the teachers of their fold-`fold` model's probabilities."""
    from siimcovid.classify.data import image_table

    table = image_table(prep, "train", fold, "train")
    probs = np.mean([teacher_probabilities(t, prep, fold, table, device, amp_dtype, loader_kw, tta) for t in teachers], axis=0)
    out = table[["image_id", "study_id"]].assign(fold=fold)
    out[TARGET_COLUMNS] = np.clip(probs, 0.0, 1.0)
    return DISTILL_TARGETS.check(out.assign(teachers_id=teachers_id(teachers, fold, tta)))


def fold_targets(trainer, teachers: list[Teacher]) -> pd.DataFrame:
    """Fold k's soft targets: its cached table when it is these teachers', else computed by the main process and
    written (atomically) before any rank reads it."""
    cfg, path, fold = trainer.cfg, trainer.dir / DISTILL, trainer.fold
    want = teachers_id(teachers, fold, cfg.distill_tta)
    if trainer.d.is_main and not cached(path, want):
        kw = {"batch_size": max(1, cfg.batch) * 2, "num_workers": cfg.workers, "pin_memory": trainer.device.type == "cuda"}
        LOGGER.info(
            f"fold {fold}: the teachers predict its {len(trainer.train_tab)} training images (distill_tta={cfg.distill_tta})"
        )
        table = soft_targets(teachers, trainer.prep, fold, trainer.device, trainer.amp_dtype, kw, cfg.distill_tta)
        DISTILL_TARGETS.write(table, path)
    trainer.d.barrier()
    table = DISTILL_TARGETS.read(path)
    if not (table.teachers_id == want).all() or not (table.fold == fold).all():
        raise SiimError(f"{path} holds the soft targets of other teachers or another fold: delete it, it is a cache")
    return table


def cached(path: Path, want: str) -> bool:
    """Whether `path` holds the soft targets of these teachers (a cache of other teachers or a damaged one: no)."""
    if not path.is_file():
        return False
    try:
        table = DISTILL_TARGETS.read(path)
    except SiimError as e:
        LOGGER.warning(f"{e}: computed again")
        return False
    return bool(len(table)) and bool((table.teachers_id == want).all())


# ---------------------------------------------------------------- the training data


def mixed_targets(table: pd.DataFrame, targets: pd.DataFrame, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a fold's training table (image_id, label, none): the study (N,4) and none (N,) targets,
    weight * the teachers' + (1 - weight) * the hard labels. Every row must have its soft target."""
    soft = targets.set_index("image_id")
    missing = sorted(set(table.image_id) - set(soft.index))
    if missing:
        raise SiimError(f"distillation: {len(missing)} training images have no soft target, e.g. {missing[0]}")
    soft = soft.loc[list(table.image_id)]
    hard = np.eye(len(STUDY_CLASSES), dtype=np.float64)[table["label"].to_numpy(dtype=int)]
    study = weight * soft[STUDY_CLASSES].to_numpy(dtype=np.float64) + (1 - weight) * hard
    none = weight * soft["none"].to_numpy(dtype=np.float64) + (1 - weight) * table["none"].to_numpy(dtype=np.float64)
    return study.astype(np.float32), none.astype(np.float32)


def distill_hook(teachers: list[Teacher]):
    """on_train_data: the fold's SIIM training images get their distillation targets (after extra=, whose
    ConcatDataset starts with them)."""
    from siimcovid.classify.data import SoftTargets

    def add_soft_targets(trainer) -> None:
        targets = fold_targets(trainer, teachers)
        ds = trainer.train_dataset
        parts = ds.datasets if isinstance(ds, ConcatDataset) else [ds]
        own = parts[0].dataset if isinstance(parts[0], SoftTargets) else parts[0]
        study, none = mixed_targets(own.table, targets, trainer.cfg.distill_weight)
        distilled = SoftTargets(own, len(STUDY_CLASSES), (study, none))  # the loss takes its soft path
        if isinstance(ds, ConcatDataset):
            trainer.train_dataset = ConcatDataset([distilled, *parts[1:]])
        else:
            trainer.train_dataset = distilled
        if trainer.d.is_main:
            LOGGER.info(f"fold {trainer.fold}: {len(own)} training images with the soft targets of {len(teachers)} teacher(s)")

    return add_soft_targets
