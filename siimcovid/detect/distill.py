"""`detect train distill=<teacher detect runs>`: one YOLO student learns from its teachers' boxes.

    siimcovid detect train data=runs/prepare/siim model=yolov5su.pt name=student distill=runs/detect/x640,runs/detect/frcnn

The student of fold k trains on fold k's training images with labels that blend their hard boxes with the teachers'
soft ones. Teacher fold k of every teacher (trained on every fold but k, so no model that saw fold k's validation images)
predicts each of fold k's training images; per image, Weighted Boxes Fusion's clustering (at IoU distill_iou, at most
one box of each source in a cluster: blend) fuses the hard boxes (confidence 1, weight 1 - distill_weight) with each of
the T teachers' boxes (their confidence, weight distill_weight / T). A fused box's confidence is then

    (1 - distill_weight) * [a hard box is in it] + distill_weight * (the teachers' mean confidence in it, 0 for a miss)

the linear blend of classify's distillation, and its corners the confidence-weighted mean of its boxes'. The fused boxes
of confidence at least distill_conf are the student's labels. distill_weight=1: the teachers' boxes above distill_conf
alone (pseudo's rule); distill_weight below distill_conf: the hard boxes, moved toward the teachers', and no box of
theirs alone. YOLO's loss takes hard labels (one class, no weight per box): this is how soft boxes reach it.
Validation (each fold's val list, its hard boxes) is prepare's, so the student's out-of-fold score stays honest.

Refused, with the reason (nothing is flagged LEAKY and let through):
- a teacher trained on other folds (its folds_id is not the student's data's) or one without a finished fold k;
- a prediction table (pred_oof.csv and the like) or a .pt as a teacher: its boxes of fold j's images come from teacher
  fold j, which trained on fold k's validation images;
- a lung detector (task=lung) or a crop=lung teacher (not yet), the same teacher twice;
- a student of task=lung or crop=lung, or of another family (family=torchvision: its own check refuses distill=);
- a resume with other teachers: each teacher (its folder, folds_id, the sha256 of each fold's best checkpoint) is
  recorded in what the run learned (detect.yaml: learned.distill_teachers), which a resume must match.
A teacher's checkpoints load as `detect predict` loads them (a YOLO .pt is a pickle): name runs you trained or trust.

The run folder's distill/ holds each fold's training set: fold<k>/images/ (hard links of the prepared images),
fold<k>/labels/ (the blended YOLO labels), fold<k>/boxes.csv (tables.DISTILL_BOXES, the same boxes in original pixels),
fold<k>.txt (the list Ultralytics reads) and, written last, fold<k>/distill.yaml: what they were made from (a cache,
reused while its teachers_id is that of the teachers and settings given).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from siimcovid import rundir
from siimcovid.detect.files import FILES
from siimcovid.engine.distill import check_not_leaky
from siimcovid.tables import BOX_COLUMNS, DISTILL_BOXES
from siimcovid.utils import LOGGER, SiimError, atomic_write_text, file_sha256

FOLDER = "distill"  # in the run folder (FILES.run)
RECORD = "distill.yaml"  # per fold, written last
TEACHER_CONF = 0.01  # the teachers' confidence floor when they predict: a box below it moves no label
LEAKY_TABLE = (
    "a prediction table is not a teacher for distillation: its boxes of fold j's images come from teacher fold j, which "
    "trained on fold k's validation images, so a student of fold k learning from them would be leaky (optimistic OOF); "
    "give the teacher's run folder instead (its fold-k model then predicts fold k's training images)"
)


@dataclass(frozen=True)
class Teacher:
    """A teacher detect run, checked: its folder (absolute), family, folds_id and its finished folds' checkpoints."""

    run: Path
    family: str
    folds_id: str
    best: dict  # {fold: checkpoint}
    sha256: dict  # {fold: sha256 of the checkpoint}

    def record(self) -> dict:
        """What the student's detect.yaml keeps of it (learned.distill_teachers): a resume must find the same."""
        return {"run": str(self.run), "folds_id": self.folds_id, "best_sha256": {str(k): v for k, v in self.sha256.items()}}


# ---------------------------------------------------------------- the teachers, checked


def check_student(cfg) -> None:
    """distill= trains a YOLO opacity student on whole images: others are refused before anything is read."""
    if not cfg.get("distill"):
        return
    if cfg.get("task") == "lung":
        raise SiimError("distill= teaches opacity boxes: a lung detector (task=lung) learns prepare's lung boxes")
    if cfg.get("crop") == "lung":
        raise SiimError("distill= with crop=lung is not yet supported: the lung crops would keep the hard labels")


def teacher_dir(given, project: str | Path) -> Path:
    """A teacher as given (a detect run folder, or a run name under project=) -> its folder; a table refused."""
    path = Path(str(given))
    if path.is_file() or path.suffix in (".csv", ".pt"):
        raise SiimError(f"distill={given}: {LEAKY_TABLE}")
    for cand in (path, Path(project) / str(given)):
        if (cand / FILES.settings).is_file():
            return cand.resolve()
    raise SiimError(f"distill={given}: not a detect run folder (no {FILES.settings} in {path} or {Path(project) / str(given)})")


def open_teacher(given, folds_id: str, folds: list[int], project: str | Path) -> Teacher:
    """One teacher, checked against the student's fold assignment and the folds it trains (module docstring)."""
    from siimcovid.config import Config
    from siimcovid.engine.family import family_class

    run = teacher_dir(given, project)
    cfg = rundir.read_run(run / FILES.settings)
    if (cfg.get("task") or "opacity") != "opacity":
        raise SiimError(f"distill={run} is a task={cfg.get('task')} detector: a teacher finds opacity boxes")
    if (cfg.get("crop") or "none") != "none":
        raise SiimError(f"distill={run} predicts with lung-crop views (crop={cfg.get('crop')}): not yet a teacher")
    check_not_leaky(run, cfg)  # siimcovid.engine.distill
    recorded = cfg.get("folds_id")
    if not recorded:
        raise SiimError(f"distill={run} records no fold assignment ({FILES.settings}: folds_id): its folds cannot be checked")
    if recorded != folds_id:
        raise SiimError(
            f"distill={run} was trained on other folds than the student's data (folds_id {recorded} != {folds_id}): its "
            "fold-k model saw some of the student's fold-k validation images, so the student's OOF would be leaky; "
            "train the teachers on the student's data="
        )
    family = cfg.get("family") or "yolo"
    own = family_class(family, "detect")(Config())
    best = {}
    for k in rundir.fold_numbers(run):  # every finished fold: the record is the teacher's, whichever folds a call trains
        path = own.files.checkpoint(rundir.fold_dir(run, k))
        if path.is_file() and own.fold_state(rundir.fold_dir(run, k)) == "done":
            best[k] = path
    missing = [k for k in folds if k not in best]
    if missing:
        raise SiimError(
            f"distill={run} has no finished fold {', '.join(map(str, missing))}: the student's fold k learns only from "
            "teacher fold k (which never saw fold k's validation images); train those folds of the teacher"
        )
    return Teacher(run, family, recorded, best, {k: file_sha256(p) for k, p in sorted(best.items())})


def prepare_run(cfg, folds_id: str, folds: list[int], data) -> list[Teacher]:
    """distill=: the teachers checked, their folders resolved in the settings and recorded in what the run learns (a
    resume with other teachers is then a changed run, refused); a teacher folder is only read."""
    if not cfg.get("distill"):
        return []
    teachers = [open_teacher(t, folds_id, folds, cfg.project) for t in cfg.distill]
    runs = [str(t.run) for t in teachers]
    twice = sorted({r for r in runs if runs.count(r) > 1})
    if twice:
        raise SiimError(f"distill= names {twice[0]} twice")
    cfg.distill = runs
    data.learned["distill_teachers"] = [t.record() for t in teachers]
    data.sources += runs
    LOGGER.info(
        f"detect: distillation from {len(teachers)} teacher(s) ({', '.join(t.run.name for t in teachers)}), "
        f"distill_weight={cfg.distill_weight}: fold k learns from teacher fold k's boxes on its training images"
    )
    return teachers


def teachers_id(teachers: list[Teacher], fold: int, cfg, prep, size: int) -> str:
    """The fingerprint of fold `fold`'s labels: the teachers, their fold's checkpoint, the settings that blend them and
    the hard labels (prepare run again with other boxes, the same folds: other labels)."""
    settings = [cfg.distill_weight, cfg.distill_iou, cfg.distill_conf, bool(cfg.distill_tta), size]
    digest = hashlib.sha1()
    for image_id in prep.fold(fold, "train").image_id:
        label = prep.label_path(image_id, size)
        digest.update(f"{image_id}:".encode() + (label.read_bytes() if label.is_file() else b"-"))
    text = json.dumps([[str(t.run), t.sha256[fold]] for t in teachers] + settings + [digest.hexdigest()])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the labels of a fold


def teacher_boxes(teacher: Teacher, fold: int, image_ids: list[str], cfg) -> pd.DataFrame:
    """Teacher fold `fold`'s boxes (DETECTIONS, original pixels) on those training images of its own prepared data."""
    from siimcovid import stages
    from siimcovid.detect.predict import load_run
    from siimcovid.engine.family import family_class

    path = teacher.best[fold]
    if file_sha256(path) != teacher.sha256[fold]:
        raise SiimError(f"{path} changed since this training started (its sha256): the teacher was retrained; start again")
    run = load_run(teacher.run, allow_unfinished=True)
    if run.prepared.folds_id != teacher.folds_id:
        raise SiimError(f"distill={teacher.run}: its prepared folder {run.prepared.root} has other folds now")
    settings = {"tta": bool(cfg.distill_tta), "conf": TEACHER_CONF, "batch": cfg.batch, "device": cfg.device}
    family = family_class(teacher.family, "detect")(stages.stage_config("detect", "predict", settings))
    model = family.load_fold(run, fold, path, cfg.device)
    return family.predict_images(model, run, fold, image_ids, "train")


def blend(hard: np.ndarray, teachers: list[tuple[np.ndarray, np.ndarray]], weight: float, iou: float, conf: float):
    """One image's labels: hard boxes (n, 4) and each teacher's (boxes (m, 4), confidences (m,)), all normalised
    x1y1x2y2 -> (boxes (k, 4), blended confidences (k,), whether a hard box is in each), confidence >= conf only.

    Weighted Boxes Fusion's clustering (ensemble-boxes' rule: most confident first, a box joins the cluster whose fused
    box it overlaps most at IoU >= iou; corners: the confidence-weighted mean), written here because ensemble-boxes lets
    one source put two boxes into one cluster, which breaks the linear blend: here a cluster holds at most one box of
    each source (the hard boxes, each teacher), so its confidence is exactly (1 - weight) [a hard box] + weight x the
    teachers' mean (a miss counts 0)."""
    sources = [] if weight >= 1 else [(np.asarray(hard, dtype=np.float64).reshape(-1, 4), None, 1.0 - weight)]
    if weight > 0:  # weight 0: the teachers weigh nothing (their boxes alone would be labels of confidence 0)
        sources += [(np.asarray(b, dtype=np.float64).reshape(-1, 4), s, weight / len(teachers)) for b, s in teachers]
    items = []  # (weighted score, source, box)
    for src, (boxes, scores, w) in enumerate(sources):
        scores = np.ones(len(boxes)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
        for box, score in zip(boxes.clip(0, 1), scores):
            if (box[2] - box[0]) * (box[3] - box[1]) > 0 and score > 0:
                items.append((w * score, src, box))
    from siimcovid.metrics import box_iou

    items.sort(key=lambda t: -t[0])
    clusters: list[dict] = []  # sources in it, the sum of their weighted scores, of their weighted corners, the box
    for score, src, box in items:
        free = [c for c in clusters if src not in c["sources"]]
        candidates = np.array([c["box"] for c in free]).reshape(-1, 4)
        overlaps = box_iou(np.broadcast_to(box, candidates.shape), candidates)
        best = int(np.argmax(overlaps)) if len(overlaps) else -1
        if best >= 0 and overlaps[best] >= iou:
            c = free[best]
        else:
            c = {"sources": set(), "sum": 0.0, "corners": np.zeros(4)}
            clusters.append(c)
        c["sources"].add(src)
        c["sum"] += score
        c["corners"] = c["corners"] + score * box
        c["box"] = c["corners"] / c["sum"]
    found = np.array([c["box"] for c in clusters]).reshape(-1, 4)
    fused = np.clip(np.array([c["sum"] for c in clusters], dtype=np.float64), 0, 1)
    has_hard = np.array([weight < 1 and 0 in c["sources"] for c in clusters], dtype=bool)
    keep = np.flatnonzero((fused >= conf - 1e-9) & (fused > 0))
    keep = keep[np.argsort(-fused[keep], kind="stable")]
    return found[keep], fused[keep], has_hard[keep]


def fold_labels(prep, size: int, fold: int, teachers: list[Teacher], cfg) -> pd.DataFrame:
    """The DISTILL_BOXES table of student fold `fold`: per training image of the fold (never a validation image), the
    blend of its hard boxes and teacher fold `fold`'s boxes (module docstring)."""
    from siimcovid.detect.crops import yolo_labels
    from siimcovid.fuse.wbf import denormalise_boxes, normalise_boxes

    train = prep.fold(fold, "train")
    ids = list(train.image_id)
    meta = prep.meta.set_index("image_id")
    found = [teacher_boxes(t, fold, ids, cfg) for t in teachers]
    by_teacher = [{i: g for i, g in f.groupby("image_id")} for f in found]
    empty = pd.DataFrame(columns=[*BOX_COLUMNS, "conf"])
    rows = []
    for image_id in ids:
        r, c = int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"])
        hard = yolo_labels(prep.label_path(image_id, size))
        soft = []
        for table in by_teacher:
            g = table.get(image_id, empty)
            soft.append((normalise_boxes(g[BOX_COLUMNS].to_numpy(dtype=np.float64), r, c), g["conf"].to_numpy(dtype=np.float64)))
        boxes, conf, has_hard = blend(hard, soft, cfg.distill_weight, cfg.distill_iou, cfg.distill_conf)
        for box, s, h in zip(denormalise_boxes(boxes, r, c), conf, has_hard):
            rows.append({"image_id": image_id, "fold": fold, **dict(zip(BOX_COLUMNS, box)), "conf": s, "hard": int(h)})
    columns = [c for c in DISTILL_BOXES.required if c != "teachers_id"]
    return pd.DataFrame(rows, columns=columns) if rows else DISTILL_BOXES.empty()[columns]


def fold_folder(run_dir: Path, fold: int) -> Path:
    return Path(run_dir) / FOLDER / f"fold{fold}"


def cached(folder: Path, want: str, ids: list[str]) -> bool:
    """Whether a fold's distill folder holds the labels of these teachers and settings for these images."""
    record = folder / RECORD
    try:
        done = yaml.safe_load(record.read_text()) if record.is_file() else None
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(done, dict) and done.get("teachers_id") == want and done.get("images") == len(ids)


def same_file(copy: Path, source: Path) -> bool:
    """Whether `copy` is the prepared image `source` still: its hard link, or (where links fail) a copy of it
    (shutil.copy2 keeps the time); a prepare run again since replaced the source's file."""
    if not copy.is_file():
        return False
    if os.path.samefile(copy, source):
        return True
    a, b = copy.stat(), source.stat()
    return a.st_nlink == 1 and a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def link_images(prep, size: int, fold: int, folder: Path) -> list[str]:
    """fold<k>/images/ of distill/: a hard link of each of the fold's prepared training images, made again where the
    prepared file is another since (a prepare run again); the fold's image ids."""
    from siimcovid.pseudo import link

    ids = list(prep.fold(fold, "train").image_id)
    for image_id in ids:
        image, source = folder / "images" / f"{image_id}.{prep.ext}", prep.image_path(image_id, "train", size)
        if not source.is_file():
            raise SiimError(f"{source}: a prepared image is missing: re-run `siimcovid prepare`")
        if not same_file(image, source):
            link(source, image)
    return ids


def write_fold(prep, size: int, fold: int, table: pd.DataFrame, folder: Path, want: str) -> None:
    """fold<k>/ of distill/: the YOLO labels (an empty file: a background image), boxes.csv, the list Ultralytics
    reads, then the record (the fold's labels are complete)."""
    from siimcovid.data.boxes import to_yolo

    (folder / RECORD).unlink(missing_ok=True)  # incomplete from here until the record is written again
    meta = prep.meta.set_index("image_id")
    by_image = {i: g for i, g in table.groupby("image_id")}
    ids = list(prep.fold(fold, "train").image_id)
    for image_id in ids:
        g = by_image.get(image_id)
        lines = ""
        if g is not None:
            r, c = int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"])
            lines = "".join(f"0 {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for x, y, w, h in to_yolo(g[BOX_COLUMNS].to_numpy(), c, r))
        label = folder / "labels" / f"{image_id}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(label, lines)
    DISTILL_BOXES.write(table.assign(teachers_id=want), folder / "boxes.csv")
    listed = "".join(f"{(folder / 'images' / f'{i}.{prep.ext}').resolve()}\n" for i in ids)
    atomic_write_text(folder.parent / f"{folder.name}.txt", listed)
    record = {"teachers_id": want, "images": len(ids), "boxes": len(table), "hard": int(table["hard"].sum())}
    atomic_write_text(folder / RECORD, yaml.safe_dump(record, sort_keys=False))


def fold_list(cfg, prep, size: int, fold: int, teachers: list[Teacher], run_dir: Path) -> Path:
    """Fold k's training list of the student (distill/fold<k>.txt), its labels made or reused."""
    folder = fold_folder(run_dir, fold)
    want = teachers_id(teachers, fold, cfg, prep, size)
    ids = link_images(prep, size, fold, folder)  # also on a cache hit: the labels are the teachers', the pixels prepare's
    if not cached(folder, want, ids):
        LOGGER.info(f"detect: fold {fold}: the teachers predict its {len(ids)} training images (distill_tta={cfg.distill_tta})")
        table = fold_labels(prep, size, fold, teachers, cfg)
        write_fold(prep, size, fold, table, folder, want)
    done = yaml.safe_load((folder / RECORD).read_text())
    LOGGER.info(
        f"detect: fold {fold} learns {done['boxes']} distilled boxes ({done['hard']} holding a hard box) on its "
        f"{done['images']} training images"
    )
    return folder.parent / f"{folder.name}.txt"
