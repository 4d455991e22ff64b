"""`siimcovid pseudo`: pseudo-labels from trained teachers on unlabelled images, as extra training data.

    siimcovid pseudo teacher_det=runs/detect/demo teacher_cls=runs/classify/demo source=runs/prepare/pool name=pool

The teachers (a detect run and a classify run, trained per fold on the students' prepared folder
`data`) predict the test split of `source` fold model by fold model. For teacher fold k and each
unlabelled image (the rules are settings; defaults from the 1st place):

    boxes     the study's P(negative) < negative_max and its best other class > positive_min, and the
              detector has a box with conf >= box_conf: the (at most max_boxes) most confident boxes
              become YOLO labels and a mask; the image joins fold k's detector list
    negative  P(none) >= none_min and no box >= box_conf: an empty label file and an empty mask; in the list
    soft      anything else: the soft study labels only (no label file, no mask, not in the detector list)

Every image gets soft study labels: the teacher's study probabilities (the mean over the study's
images, as the metric's study probability) and the image's P(none).

teacher=fold (default) is honest: fold k's students learn only from fold k's teachers, which never
saw fold k's validation images. teacher=all (the fold mean; boxes fused across folds with WBF)
leaks them into the out-of-fold CV: it is flagged in prepare.yaml, in `siimcovid runs` and in the log.

The folder (its format is this list; its tables are declared in siimcovid/tables.py; data.extra.ExtraData reads it):

    prepare.yaml                       layout: pseudo, source, teachers, teacher, folds_id, sizes, ext, leaky, rules
    teachers/                          the teachers' per-fold predictions on the source (reused on re-runs)
    boxes.csv                          tables.PSEUDO_BOXES: the kept boxes (original pixels)
    copies.csv                         tables.COPIES: pool images left out as SIIM's own under other ids (dedup=drop)
    <size>/fold<k>/images/<id>.<ext>   hard link (else copy) of the source's prepared test image
    <size>/fold<k>/labels/<id>.txt     YOLO labels (boxes and negative images)
    <size>/fold<k>/masks/<id>.png      0/255 masks of those boxes (boxes and negative images)
    <size>/fold<k>.txt                 fold k's detector list (absolute image paths); fold-1 for teacher=all
    labels.csv                         tables.PSEUDO_LABELS, written last: its presence marks a finished folder
    pseudo_files.yaml                  pseudo's record (siimcovid.outputs): every file it wrote in the folder

The folder follows the outputs rule: a new, empty or own folder (it holds pseudo's record), never the root, the home
folder or a folder holding the teachers or the prepared folders; pseudo replaces and removes only the files its record
lists (a re-run's stale labels and cached predictions included: a user's file beside them stays). A folder the release
before that rule wrote (its prepare.yaml says layout: pseudo, no record) is adopted (earlier_pseudo).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from siimcovid.classify.files import FILES as CLASSIFY_FILES
from siimcovid.config import Config, default_name, read_yaml
from siimcovid.data.boxes import fill_mask, to_yolo
from siimcovid.data.prepared import Prepared
from siimcovid.detect.files import FILES as DETECT_FILES
from siimcovid.fuse.formulas import study_probabilities
from siimcovid.outputs import Earlier, Written, open_out, present, read_mapping
from siimcovid.rundir import read_run
from siimcovid.tables import BOX_COLUMNS, CLASSIFIER_FOLDS, DETECTIONS, PSEUDO_BOXES, PSEUDO_LABELS, STUDY_CLASSES
from siimcovid.utils import LOGGER, SiimError, atomic_path, atomic_write_text

ALL = -1  # the fold of the all-folds teacher's labels
LEAK_WARNING = "teacher=all leaks into out-of-fold scores: use it only for the final test-time students"
LABELS, BOXES, CONFIG = "labels.csv", "boxes.csv", "prepare.yaml"
COPIES_CSV = "copies.csv"  # tables.COPIES: the pool images dedup=drop left out as SIIM's own
RECORD, CACHE = "pseudo_files.yaml", "teachers"  # pseudo's record of the folder; the teachers' predictions


@dataclass(frozen=True)
class Rules:
    """What a teacher must say for a pseudo-label to be written (the confidence settings)."""

    negative_max: float = 0.3
    positive_min: float = 0.7
    max_boxes: int = 2
    box_conf: float = 0.3
    none_min: float = 0.8

    @classmethod
    def of(cls, cfg) -> Rules:
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------- the rules (no I/O)
def kept_boxes(boxes: pd.DataFrame, rules: Rules) -> pd.DataFrame:
    """Per (fold, image), the at most max_boxes boxes with conf >= box_conf, most confident first."""
    sure = boxes[boxes.conf >= rules.box_conf].sort_values(["fold", "image_id", "conf"], ascending=[True, True, False])
    return sure.groupby(["fold", "image_id"], sort=False).head(rules.max_boxes).reset_index(drop=True)


def choose(probs: pd.DataFrame, boxes: pd.DataFrame, rules: Rules) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pseudo-labels of a teacher's predictions.

    probs: image_id, study_id, fold, the four study classes and none (one row per teacher fold and image);
    boxes: image_id, fold, x_min, y_min, x_max, y_max, conf (the teacher detector's boxes, same folds).
    Returns (labels: the PSEUDO_LABELS table, boxes: the PSEUDO_BOXES table of the boxes written)."""
    sure = kept_boxes(boxes, rules)
    n_sure = sure.groupby(["fold", "image_id"]).size()
    key = pd.MultiIndex.from_arrays([probs.fold, probs.image_id])
    found = n_sure.reindex(key, fill_value=0).to_numpy()
    others = probs[[c for c in STUDY_CLASSES if c != "negative"]].max(axis=1).to_numpy()
    positive = (probs.negative.to_numpy() < rules.negative_max) & (others > rules.positive_min) & (found > 0)
    empty = ~positive & (probs.none.to_numpy() >= rules.none_min) & (found == 0)
    labels = probs.assign(
        n_boxes=np.where(positive, found, 0), kind=np.select([positive, empty], ["boxes", "negative"], "soft")
    ).reset_index(drop=True)
    chosen = labels.loc[labels.kind == "boxes", ["fold", "image_id"]]
    written = sure.merge(chosen, on=["fold", "image_id"])
    return PSEUDO_LABELS.check(labels), PSEUDO_BOXES.check(written)


def fold_mean(probs: pd.DataFrame) -> pd.DataFrame:
    """The all-folds teacher's probabilities: the mean over the fold models, fold = -1."""
    columns = STUDY_CLASSES + ["none"]
    mean = probs.groupby(["image_id", "study_id"], sort=False)[columns].mean().reset_index()
    return mean.assign(fold=ALL)[["image_id", "study_id", "fold", *columns]]


def fold_fused_boxes(boxes: pd.DataFrame, sizes: pd.DataFrame, folds: list[int]) -> pd.DataFrame:
    """The all-folds teacher's boxes: WBF of the fold models' boxes per image (a box found by j of K folds keeps
    j/K of its mean confidence), fold = -1."""
    from siimcovid.fuse.wbf import wbf_table

    code = {f: i for i, f in enumerate(folds)}
    sets = boxes.assign(set=boxes.fold.map(code))
    fused = wbf_table(sets, sizes[sizes.image_id.isin(boxes.image_id)], len(folds), workers=1)
    return fused.assign(fold=ALL)[["image_id", "fold", *BOX_COLUMNS, "conf"]]


# ----------------------------------------------------------------------------- the teachers
def folds_of(run_dir: Path, config: str) -> str | None:
    """The fold fingerprint a run recorded (detect.yaml / classify.yaml: folds_id)."""
    return read_run(run_dir / config).get("folds_id")


def check_teachers(det_dir: Path, cls_dir: Path, data: Prepared) -> None:
    """Refuse teachers trained on other folds than the students' prepared folder: fold k's labels would then come
    from models that saw fold k's validation images."""
    for run_dir, config in ((det_dir, DETECT_FILES.settings), (cls_dir, CLASSIFY_FILES.settings)):
        recorded = folds_of(run_dir, config)
        if recorded is None:
            raise SiimError(f"{run_dir} records no fold assignment ({config}: folds_id): its folds cannot be checked")
        if recorded != data.folds_id:
            raise SiimError(
                f"teacher {run_dir} was trained on other folds than {data.root} (folds_id {recorded} != {data.folds_id}): "
                "its fold-k pseudo-labels would carry what it learnt from fold k's validation images; "
                "train the teachers on that prepared folder (or give the data= they were trained on)"
            )


def check_source(source: Prepared, data: Prepared) -> pd.DataFrame:
    """The source's test images; refused when one of them is a labelled train image of the students' data."""
    pool = source.split("test")
    if pool.empty:
        raise SiimError(f"{source.root} has no test (unlabelled) images to pseudo-label")
    shared = sorted(set(pool.image_id) & set(data.split("train").image_id))
    if shared:
        raise SiimError(f"{source.root}: {len(shared)} unlabelled images are train images of {data.root}, e.g. {shared[0]}")
    return pool


def teacher_folds(det_dir: Path, cls_dir: Path) -> list[int]:
    """The folds both teachers trained."""
    from siimcovid.rundir import fold_numbers

    det, cls = fold_numbers(det_dir), fold_numbers(cls_dir)
    if det != cls:
        raise SiimError(f"the teachers trained other folds: {det_dir} {det}, {cls_dir} {cls}")
    return det


def detector_boxes(cfg: Config, det_dir: Path, source: Prepared, written: Written) -> pd.DataFrame:
    """Every fold model's boxes on the source's test images (DETECTIONS; fold = the model's fold)."""
    from siimcovid import stages

    own = Path(read_run(det_dir / DETECT_FILES.settings)["prepared"]).resolve() == source.root.resolve()
    if cfg.reuse and own and (det_dir / "pred_test.csv").is_file():
        LOGGER.info(f"pseudo: reusing {det_dir / 'pred_test.csv'}")
        return DETECTIONS.read(det_dir / "pred_test.csv")
    cache = written.folder / CACHE
    path = cache / det_dir.name / "pred_test.csv"
    written.claim(path, cache / "pred_test.csv")  # detect predict's tables with out=cache: never a user's file
    if not path.is_file():
        # out=cache holds pseudo's own files: detect predict writes beside them (its two tables, which pseudo listed)
        settings = {"run": [str(det_dir)], "split": ["test"], "source": str(source.root), "out": str(cache), "overwrite": True}
        settings |= {"tta": cfg.det_tta, "conf": cfg.det_conf, "batch": cfg.batch, "device": cfg.device}
        stages.load("siimcovid.detect.predict:predict")(stages.stage_config("detect", "predict", settings))
    return DETECTIONS.read(path)


def classifier_probabilities(cfg: Config, cls_dir: Path, source: Prepared, written: Written) -> pd.DataFrame:
    """Every fold model's probabilities on the source's test images (CLASSIFIER_FOLDS)."""
    from siimcovid.classify import predict

    own = Path(read_run(cls_dir / CLASSIFY_FILES.settings)["data"]).resolve() == source.root.resolve()
    if cfg.reuse and own and predict.folds_path(cls_dir).is_file():
        LOGGER.info(f"pseudo: reusing {predict.folds_path(cls_dir)}")
        return CLASSIFIER_FOLDS.read(predict.folds_path(cls_dir))
    path = predict.folds_path(written.folder / CACHE / cls_dir.name)
    written.claim(path)
    if not path.is_file():
        from siimcovid.engine.devices import torch_device

        device = torch_device(cfg.device)
        how = (cfg.cls_tta, device, cfg.batch, cfg.workers, str(source.root))
        _, _, folds = predict.predict_run_folds(cls_dir, *how)
        CLASSIFIER_FOLDS.write(folds, path)
    return CLASSIFIER_FOLDS.read(path)


def claim_cache(written: Written, definition: dict) -> None:
    """The teachers' cached predictions (<out>/teachers/) belong to one (teachers, source, settings): others are
    removed (those pseudo's record lists: a user's file there stays), not reused."""
    cache = written.folder / CACHE
    record = cache / "teachers.yaml"
    written.check(record)
    if record.is_file() and read_yaml(record) != definition:
        gone = written.remove_all(CACHE)
        LOGGER.warning(f"{cache} held other teachers' predictions: removed {len(gone)} files")
    written.claim(record)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, yaml.safe_dump(definition, sort_keys=False))


def checkpoints_id(run_dir: Path, relative: str) -> str:
    """A fingerprint of a teacher's fold checkpoints (size, modification time): teachers retrained in the same folder
    are other teachers, whose labels and cached predictions must not be reused."""
    from siimcovid.rundir import fold_files

    files = fold_files(run_dir, relative)
    text = "\n".join(f"{k}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for k, p in sorted(files.items()))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the folder
def link(src: Path, dst: Path) -> None:
    """A hard link of the source's image (a copy where links do not work, e.g. across file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fold_paths(out: Path, size: int, fold: int, image_id: str, ext: str) -> tuple[Path, Path, Path]:
    """An image's files in teacher fold k's folder of a size: (image, YOLO label, mask)."""
    base = out / str(size) / f"fold{fold}"
    return base / "images" / f"{image_id}.{ext}", base / "labels" / f"{image_id}.txt", base / "masks" / f"{image_id}.png"


def folder_files(out: Path, sizes: list[int], labels: pd.DataFrame, ext: str) -> list[Path]:
    """Every file write_folder writes."""
    files = [out / BOXES, out / LABELS]
    for size in sizes:
        files += [out / str(size) / f"fold{fold}.txt" for fold in labels.fold.unique()]
        for row in labels.itertuples():
            image, label, mask = fold_paths(out, size, row.fold, row.image_id, ext)
            files += [image] if row.kind == "soft" else [image, label, mask]
    return files


def write_fold(out: Path, size: int, fold: int, labels: pd.DataFrame, boxes: pd.DataFrame, source: Prepared) -> Path:
    """<size>/fold<k>/ (images, labels, masks) and the detector list <size>/fold<k>.txt of one teacher fold."""
    import cv2

    from siimcovid.data.convert import MASK_PARAMS

    meta = source.meta.set_index("image_id")
    by_image = {i: g[BOX_COLUMNS].to_numpy() for i, g in boxes.groupby("image_id")}
    listed = []
    for row in labels.itertuples():
        image, label, mask = fold_paths(out, size, fold, row.image_id, source.ext)
        link(source.image_path(row.image_id, "test", size), image)
        if row.kind == "soft":
            continue
        rows, cols = int(meta.at[row.image_id, "rows"]), int(meta.at[row.image_id, "cols"])
        found = by_image.get(row.image_id, np.zeros((0, 4)))
        text = "".join(f"0 {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}\n" for xc, yc, w, h in to_yolo(found, cols, rows))
        atomic_write_text(label, text)
        with atomic_path(mask) as tmp:
            cv2.imwrite(str(tmp), fill_mask(found, cols, rows, (size, size)), MASK_PARAMS)
        listed.append(str(image.resolve()))
    return atomic_write_text(out / str(size) / f"fold{fold}.txt", "".join(f"{p}\n" for p in listed))


def write_folder(written: Written, sizes: list[int], labels: pd.DataFrame, boxes: pd.DataFrame, source: Prepared) -> None:
    """Every size and teacher fold's files, boxes.csv, then labels.csv last (the folder is finished); only files
    pseudo's record lists are replaced or removed."""
    from tqdm import tqdm

    out = written.folder
    written.remove(out / LABELS)
    for size in sizes:
        written.remove_all(str(size))  # no stale images or labels of an earlier run (a user's file there stays)
    written.claim(*folder_files(out, sizes, labels, source.ext))
    jobs = [(s, f) for s in sizes for f in sorted(labels.fold.unique())]
    for size, fold in tqdm(jobs, desc="pseudo folder", unit="fold"):
        write_fold(out, size, fold, labels[labels.fold == fold], boxes[boxes.fold == fold], source)
    PSEUDO_BOXES.write(boxes, out / BOXES)
    PSEUDO_LABELS.write(labels, out / LABELS)


# ----------------------------------------------------------------------------- the stage
def resolve(cfg: Config) -> tuple[Path, Path, Prepared, Prepared, Path]:
    """(teacher detect dir, teacher classify dir, students' data, source, out), checked."""
    if not cfg.teacher_det or not cfg.teacher_cls:
        raise SiimError("pseudo needs teacher_det=<detect run dir> and teacher_cls=<classify run dir>")
    det_dir, cls_dir = Path(cfg.teacher_det), Path(cfg.teacher_cls)
    for run_dir, config in ((det_dir, DETECT_FILES.settings), (cls_dir, CLASSIFY_FILES.settings)):
        if not (run_dir / config).is_file():
            raise SiimError(f"{run_dir} is not a {config.split('.')[0]} run (no {config})")
    data = Prepared(cfg.data or read_run(cls_dir / CLASSIFY_FILES.settings)["data"])
    source = Prepared(cfg.source) if cfg.source else data
    name = cfg.name or default_name("pseudo", f"{det_dir.name}-pseudo", "teacher_det")
    out = Path(cfg.out) if cfg.out else Path(cfg.project) / name
    return det_dir, cls_dir, data, source, out


def open_folder(cfg: Config, out: Path, inputs: list[Path]) -> Written:
    """The pseudo folder by the outputs rule (module docstring), before the teachers predict: a folder holding other
    files is refused unless overwrite=true; a user's prepare.yaml, labels.csv or boxes.csv there is refused anyway."""
    what = "out" if cfg.out else "project/name"
    fixed = [out / name for name in (CONFIG, LABELS, BOXES)]
    return open_out(out, RECORD, "pseudo", cfg.overwrite, inputs, what, earlier=earlier_pseudo, check=fixed)


def earlier_pseudo(out: Path) -> Earlier | None:
    """A pseudo folder the release before the outputs rule wrote (outputs.Earlier): its prepare.yaml says layout:
    pseudo, and no record. The files there named as pseudo names its own become its own."""
    config = read_mapping(out / CONFIG)
    if os.path.lexists(out / RECORD) or not config or config.get("layout") != "pseudo":
        return None
    sizes = [str(s) for s in config.get("sizes") or [] if isinstance(s, int)]
    names = [CONFIG, LABELS, BOXES, f"{CACHE}/teachers.yaml", f"{CACHE}/pred_test.csv"]
    patterns = [f"{CACHE}/*/pred_test.csv", f"{CACHE}/*/pred_test_image_folds.csv", *(f"{s}/fold*.txt" for s in sizes)]
    patterns += [f"{s}/fold*/{part}/*" for s in sizes for part in ("images", "labels", "masks")]
    return Earlier(present(out, names, patterns))


def pick_sizes(cfg: Config, source: Prepared, data: Prepared) -> list[int]:
    sizes = list(cfg.sizes) if cfg.sizes else [s for s in source.sizes if s in data.sizes]
    if not sizes:
        raise SiimError(f"{source.root} (sizes {source.sizes}) and {data.root} (sizes {data.sizes}) share no image size")
    return [source.check_size(s) for s in sizes]


def definition(cfg: Config, det_dir: Path, cls_dir: Path, data: Prepared, source: Prepared, sizes: list[int]) -> dict:
    """prepare.yaml: what ExtraData and `siimcovid runs` read, and what a re-run compares to skip finished work."""
    rules = {k: cfg[k] for k in Rules.__dataclass_fields__}
    return {
        "layout": "pseudo",
        "name": (Path(cfg.out).name if cfg.out else cfg.name) or f"{det_dir.name}-pseudo",
        "source": str(source.root.resolve()),
        "data": str(data.root.resolve()),
        "teacher_det": str(det_dir.resolve()),
        "teacher_cls": str(cls_dir.resolve()),
        "teacher_weights": {
            "det": checkpoints_id(det_dir, DETECT_FILES.best),
            "cls": checkpoints_id(cls_dir, CLASSIFY_FILES.best),
        },
        "teacher": cfg.teacher,
        "leaky": cfg.teacher == "all",
        "folds_id": data.folds_id,
        "n_folds": data.n_folds,
        "sizes": sizes,
        "ext": source.ext,
        "rules": rules,
        "predict": {"det_tta": cfg.det_tta, "cls_tta": cfg.cls_tta, "det_conf": cfg.det_conf, "reuse": cfg.reuse},
        "dedup": {"mode": cfg.dedup, "distance": cfg.dedup_distance},
    }


def without_copies(cfg: Config, source: Prepared, data: Prepared, pool: pd.DataFrame, sizes: list[int], written: Written):
    """The pool less its images whose pixels are a SIIM train or test image's (siimcovid.data.dedup): the SIIM data
    was drawn from the public sets, so a pool holds SIIM's own images under other ids. dedup=drop leaves them out and
    lists them in copies.csv, refuse raises naming them, keep (and a pool that is the data's own test split) passes."""
    out = written.folder / COPIES_CSV
    if cfg.dedup == "keep" or source.root.resolve() == data.root.resolve():
        written.remove(out)
        return pool
    from siimcovid.data.dedup import check_pool, siim_copies
    from siimcovid.tables import COPIES

    copies = siim_copies(source, data, min(sizes), cfg.dedup_distance)
    check_pool(copies, f"{source.root} (against {data.root})", "pool images", len(pool), cfg.dedup, cfg.dedup_distance, out)
    written.claim(out)
    COPIES.write(copies, out)
    return pool[~pool.image_id.isin(copies.image_id)].reset_index(drop=True)


def teacher_labels(cfg, det_dir: Path, cls_dir: Path, source: Prepared, pool: pd.DataFrame, written: Written):
    """The teachers' per-fold predictions -> the labels and boxes of teacher=fold or teacher=all."""
    folds = teacher_folds(det_dir, cls_dir)
    boxes = detector_boxes(cfg, det_dir, source, written)
    probs = classifier_probabilities(cfg, cls_dir, source, written)
    probs = probs[probs.image_id.isin(pool.image_id) & probs.fold.isin(folds)]
    boxes = boxes[boxes.image_id.isin(pool.image_id) & boxes.fold.isin(folds)]
    studies = study_probabilities(probs, by=["fold", "study_id"])  # each teacher fold's own, as fusion computes them
    probs = probs[["image_id", "study_id", "fold", "none"]].merge(studies, on=["fold", "study_id"], how="left")
    if cfg.teacher == "all":
        probs, boxes = fold_mean(probs), fold_fused_boxes(boxes, pool[["image_id", "rows", "cols"]], folds)
    return choose(probs, boxes[["image_id", "fold", *BOX_COLUMNS, "conf"]], Rules.of(cfg))


def pseudo(cfg: Config) -> Path:
    """Write (or find finished) the pseudo-label folder; its path."""
    det_dir, cls_dir, data, source, out = resolve(cfg)
    check_teachers(det_dir, cls_dir, data)
    pool = check_source(source, data)
    sizes = pick_sizes(cfg, source, data)
    record = definition(cfg, det_dir, cls_dir, data, source, sizes)
    written = open_folder(cfg, out, [source.root, data.root, det_dir, cls_dir])
    if cfg.teacher == "all":
        LOGGER.warning(f"pseudo: {LEAK_WARNING}")
    if (out / LABELS).is_file() and (out / CONFIG).is_file() and read_yaml(out / CONFIG) == record:
        LOGGER.info(f"pseudo: {out} is finished with these settings: nothing to do")
        return out
    teachers = ("source", "teacher_det", "teacher_cls", "teacher_weights", "predict")
    claim_cache(written, {k: record[k] for k in teachers})
    pool = without_copies(cfg, source, data, pool, sizes, written)
    labels, boxes = teacher_labels(cfg, det_dir, cls_dir, source, pool, written)
    written.claim(out / CONFIG)
    atomic_write_text(out / CONFIG, yaml.safe_dump(record, sort_keys=False))
    write_folder(written, sizes, labels, boxes, source)
    LOGGER.info(f"pseudo: {out}\n{summary(labels).to_string()}")
    return out


def summary(labels: pd.DataFrame) -> pd.DataFrame:
    """Images per teacher fold and kind (boxes, negative, soft), and the boxes written."""
    table = labels.pivot_table(index="fold", columns="kind", values="image_id", aggfunc="count", fill_value=0)
    table = table.reindex(columns=["boxes", "negative", "soft"], fill_value=0)
    return table.assign(n_boxes=labels.groupby("fold").n_boxes.sum())


def main(cfg: Config) -> Path:
    return pseudo(cfg)


# ----------------------------------------------------------------------------- its row in `siimcovid runs`
def describe(run: Path) -> dict | None:
    """A pseudo folder -> its teachers, teacher mode (leaky flagged), rules, and what it holds; None if not one."""
    from siimcovid.runs import quiet_table, quiet_yaml, settings_text

    cfg = quiet_yaml(run / CONFIG)
    if cfg.get("layout") != "pseudo":
        return None
    labels = quiet_table(PSEUDO_LABELS, run / LABELS)
    held = "unfinished (no labels.csv)"
    if labels is not None:
        kinds = labels.groupby("kind").size() if "kind" in labels else pd.Series(dtype=int)
        per_fold = labels.groupby("fold").size()
        held = f"{int(per_fold.iloc[0]) if len(per_fold) else 0} images/fold: " + ", ".join(
            f"{kinds.get(k, 0) // max(len(per_fold), 1)} {k}" for k in ("boxes", "negative", "soft")
        )
    leaky = bool(cfg.get("leaky"))
    return {
        "model": f"{Path(str(cfg.get('teacher_det', ''))).name} + {Path(str(cfg.get('teacher_cls', ''))).name}",
        "imgsz": ",".join(str(s) for s in cfg.get("sizes", [])),
        "folds": "all (LEAKY)" if leaky else f"fold (of {cfg.get('n_folds', '')})",
        "settings": settings_text(cfg.get("rules") or {}, list(Rules.__dataclass_fields__)),
        "cv": ("LEAKY: " + LEAK_WARNING + "; " if leaky else "") + held,
    }
