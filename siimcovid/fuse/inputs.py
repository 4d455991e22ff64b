"""Read and check what fusion eats: detection and classifier prediction files, the prepared dir.

The files' columns are the contracts `siimcovid.tables.DETECTIONS` (`siimcovid detect predict`:
pred_oof.csv / pred_test.csv, one row per box in ORIGINAL pixels) and
`siimcovid.tables.CLASSIFIER_IMAGES` (`siimcovid classify predict`: pred_<split>_image.csv); they
are read with those contracts, then checked against the prepared data here (errors name the file
and, where there is one, the line):

* detections out of fold: each image predicted by its own fold's model (fold = the image's fold
  in meta.csv); test: every fold's model on every test image. Every image must be one of the
  split's, every box must touch its image (ORIGINAL pixels; all boxes in [0, 1] is warned about).
* A box set (a WBF member) is one (file, model[, tta]) out of fold and one (file, model, fold[, tta])
  on test. A `tta` column (e.g. orig / hflip) makes each TTA variant its own member; Ultralytics'
  augment=True merges its TTA itself, so its files have no such column.
* classifier rows of one image (e.g. one per fold) are averaged; their study_id must be the
  prepared one, and out of fold a `fold` column must be the image's fold. Two rows of one
  (image, fold, model) are an error naming both lines (the contract's key). `none` is P(image has
  no opacity) from a none head. Study probabilities are computed by fusion, as the mean over the
  study's images (a study-level file is not accepted: it has no none).
* none model rows (none_cls=, the contract `siimcovid.tables.NONE_IMAGES` of a binary none model, `classify train
  task=none`: pred_<split>_none.csv) are checked as classifier rows are (the split's images, their prepared study where
  the file has study_id, out of fold the image's fold) and averaged per image; a file without a row is refused.

The prepared dir (data=) gives each image's original rows / cols, its study, its fold and, out of
fold, the truth (siimcovid.data.truth: the unclipped boxes of the original CSVs when reachable).
Out of fold, the images fused are those every file predicted (of the `folds` chosen); on test, the
ids come from sample_submission.csv (default: the one in the data root that prepare.yaml records
as data_resolved), and every one must be predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import SAMPLE_SUBMISSION, read_sample_submission
from siimcovid.data.truth import oof_truth
from siimcovid.fuse.record import input_entry
from siimcovid.metrics import class_priors
from siimcovid.tables import BOX_COLUMNS, CLASSIFIER_IMAGES, DETECTIONS, NONE_IMAGES, STUDY_CLASSES, file_lines, first_bad
from siimcovid.utils import LOGGER, DataError, SiimError, as_list

DET_COLUMNS = DETECTIONS.required  # image_id, model, fold, x_min, y_min, x_max, y_max, conf
BOX_SET_COLUMNS = ["image_id", "set", "fold", *BOX_COLUMNS, "conf"]  # FuseInputs.boxes: each box with its set (WBF member)
SET_COLUMNS = ["set", "file", "model", "fold", "tta", "name"]


@dataclass
class FuseInputs:
    """Everything fusion needs, checked and aligned with `images` (the rows to fuse and write)."""

    split: str
    images: pd.DataFrame  # image_id, study_id, fold, rows, cols (row i = image code i)
    study_ids: list[str]  # studies to write (test: sample_submission's; oof: those of `images`)
    boxes: pd.DataFrame  # BOX_SET_COLUMNS (images of `images` only)
    sets: pd.DataFrame  # one row per box set: SET_COLUMNS (fold -1 out of fold)
    members: list[pd.DataFrame] = field(default_factory=list)  # per cls file, aligned with images: 4 classes, none
    member_files: list[str] = field(default_factory=list)
    det_files: list[str] = field(default_factory=list)
    priors: dict[str, float] = field(default_factory=dict)  # train class frequencies (study rows without cls)
    truth: pd.DataFrame | None = None  # metric truth rows (oof)
    sample: Path | None = None  # sample_submission.csv (test)
    data: Path | None = None
    files: dict[str, list[dict]] = field(default_factory=dict)  # {"det" | "cls" | "none_cls": [the record's entry of each file]}
    none_members: list[np.ndarray] = field(default_factory=list)  # per none_cls file, aligned with images: its none
    none_files: list[str] = field(default_factory=list)

    @property
    def n_sets(self) -> int:
        return len(self.sets)


# ----------------------------------------------------------------------------- one file
def read_detections(path: str | Path) -> pd.DataFrame:
    """One detection file (tables.DETECTIONS), checked: DET_COLUMNS, tta ('' if absent), line (its file line)."""
    df = DETECTIONS.read(path)
    out = df[DET_COLUMNS].copy()
    out["tta"] = df["tta"] if "tta" in df.columns else ""
    out["line"] = file_lines(df)
    return out


def check_models_folds(df: pd.DataFrame, path: Path, fold_of: dict | None, models: list | None) -> None:
    """models: filled with the file's `model` names; fold_of (out of fold): a `fold` column must be the image's fold."""
    if models is not None and "model" in df.columns:
        models.extend(dict.fromkeys(df["model"]))
    if fold_of is not None and "fold" in df.columns:
        wrong = df["image_id"].isin(fold_of) & (df["fold"].to_numpy() != df["image_id"].map(fold_of).to_numpy())
        first_bad(
            wrong, path, "predicted by another fold's model than the image's fold: not out-of-fold (a test file? split=test)"
        )


def read_classifier(path: str | Path, fold_of: dict | None = None, models: list | None = None) -> pd.DataFrame:
    """One classifier file (tables.CLASSIFIER_IMAGES), checked, averaged per image:
    image_id, study_id, 4 classes, none (NaN if absent).

    fold_of (out of fold): image_id -> its fold; a `fold` column that disagrees is an error.
    models: filled with the file's `model` names, in order of appearance (none without a model column).
    """
    path = Path(path)
    df = CLASSIFIER_IMAGES.read(path)
    check_models_folds(df, path, fold_of, models)
    if "none" not in df.columns:
        df["none"] = np.nan
    out = df.groupby("image_id", sort=False).agg({"study_id": "first", **{c: "mean" for c in [*STUDY_CLASSES, "none"]}})
    return out.reset_index()


def read_none_model(path: str | Path, fold_of: dict | None = None, models: list | None = None) -> pd.DataFrame:
    """One none model file (tables.NONE_IMAGES), checked as read_classifier checks a classifier file, averaged per
    image: image_id, study_id (NaN if absent), none. A file of no row is refused (it would empty the fusion)."""
    path = Path(path)
    df = NONE_IMAGES.read(path)
    if set(STUDY_CLASSES) <= set(df.columns):  # its none head's column read as a none model's: allowed, but likely a slip
        LOGGER.warning(f"fuse: none_cls={path} has the study classes of a classifier's table (cls=): read its `none` column")
    if df.empty:
        raise DataError("no rows: a none model file holds one row per image it predicted (none_cls=)", path)
    check_models_folds(df, path, fold_of, models)
    if "study_id" not in df.columns:
        df["study_id"] = np.nan
    return df.groupby("image_id", sort=False).agg(study_id=("study_id", "first"), none=("none", "mean")).reset_index()


def split_name(split: str) -> str:
    return "train (out-of-fold)" if split == "oof" else "test"


def check_pixels(df: pd.DataFrame, path: str, meta: pd.DataFrame) -> None:
    """Boxes must be in original DICOM pixels: one wholly outside its image is an error; all in [0, 1] is suspect."""
    if not len(df):
        return
    sizes = meta.set_index("image_id")[["cols", "rows"]].reindex(df["image_id"]).to_numpy(dtype=np.float64)
    cols, rows = sizes[:, 0], sizes[:, 1]
    outside = (df["x_min"].to_numpy() >= cols) | (df["y_min"].to_numpy() >= rows)
    outside |= (df["x_max"].to_numpy() <= 0) | (df["y_max"].to_numpy() <= 0)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        rec = df.iloc[i]
        box = [round(float(rec[c]), 1) for c in BOX_COLUMNS]
        raise DataError(
            f"box {box} lies outside image {rec.image_id} ({int(cols[i])} x {int(rows[i])} px): "
            "boxes must be in original DICOM pixels",
            path,
            int(rec.line),
        )
    if (df[BOX_COLUMNS].to_numpy() <= 1.0).all() and (np.minimum(cols, rows) > 32).all():
        LOGGER.warning(
            f"fuse: every box in {path} lies within [0, 1]: normalised coordinates? fuse expects original DICOM pixels"
        )


def check_detections(df: pd.DataFrame, path: str, split: str, meta: pd.DataFrame) -> None:
    """Every box on an image of the split, in its original pixels, and (out of fold) by the image's fold's model."""
    fold_of = dict(zip(meta["image_id"], meta["fold"]))
    unknown = ~df["image_id"].isin(fold_of)
    if unknown.any():
        rec = df[unknown].iloc[0]
        raise DataError(
            f"image {rec.image_id} is not a {split_name(split)} image of the prepared data (wrong split= or data=?)",
            path,
            int(rec.line),
        )
    check_pixels(df, path, meta)
    if split == "oof":
        wrong = df["fold"].to_numpy() != df["image_id"].map(fold_of).to_numpy()
        if wrong.any():
            rec = df[wrong].iloc[0]
            raise DataError(
                f"image {rec.image_id} is in fold {fold_of[rec.image_id]} but was predicted by fold {rec.fold}'s model: "
                "not out-of-fold predictions (a test file? use split=test)",
                path,
                int(rec.line),
            )


def code_box_sets(df: pd.DataFrame, f: int, path: str, split: str, first: int) -> tuple[pd.DataFrame, list[dict]]:
    """File f's boxes with their set code (from `first` on), and one SET_COLUMNS row per set.

    A set is one (model, tta) out of fold, one (model, fold, tta) on test."""
    key = ["model", "tta"] if split == "oof" else ["model", "fold", "tta"]
    groups = df.groupby(key, sort=True)
    rows = []
    for k in groups.size().reset_index()[key].itertuples(index=False):
        fold = int(k.fold) if split == "test" else -1
        name = f"{Path(path).name}:{k.model}" + (f":fold{fold}" if fold >= 0 else "") + (f":{k.tta}" if k.tta else "")
        rows.append({"set": first + len(rows), "file": f, "model": k.model, "fold": fold, "tta": k.tta, "name": name})
    coded = df.assign(set=groups.ngroup().to_numpy() + first) if len(df) else df.assign(set=np.zeros(0, dtype=np.int64))
    return coded[BOX_SET_COLUMNS], rows


def refuse_lung_run(path: str | Path) -> None:
    """A lung detector's boxes (a detect run of task=lung, its settings beside the file) are lungs, not opacities."""
    from siimcovid.rundir import read_run

    settings = Path(path).parent / "detect.yaml"
    if settings.is_file() and read_run(settings).get("task") == "lung":
        raise SiimError(
            f"det={path} holds the boxes of a lung detector ({settings}: task=lung), not opacities: fuse takes opacity "
            "detectors; a lung run crops the images of the others (crop=lung lung=<that run>)"
        )


# ----------------------------------------------------------------------------- every file
def read_detection_files(
    files: list[str], split: str, meta: pd.DataFrame, record: list | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every detection file, read and checked against the split: (boxes with their set, the sets).
    record: filled with each file's entry in the fusion record (siimcovid.fuse.record: its sha256 and models)."""
    for path in files:
        refuse_lung_run(path)
    frames = [read_detections(p) for p in files]
    if record is not None:  # hashed once read: a regular file of a readable size (read_input's checks)
        record += [input_entry(path, list(dict.fromkeys(df["model"]))) for df, path in zip(frames, files)]
    boxes, set_rows = [], []
    for f, (df, path) in enumerate(zip(frames, files)):
        check_detections(df, path, split, meta)
        coded, rows = code_box_sets(df, f, path, split, len(set_rows))
        boxes.append(coded)
        set_rows += rows
    sets = pd.DataFrame(set_rows, columns=SET_COLUMNS)
    return (pd.concat(boxes, ignore_index=True) if boxes else pd.DataFrame(columns=BOX_SET_COLUMNS)), sets


def read_classifier_files(
    files: list[str], split: str, meta: pd.DataFrame, record: list | None = None, reader=read_classifier
) -> list[pd.DataFrame]:
    """Every classifier file, read (one row per image) and checked: images of the split, their prepared study.
    record: filled with each file's entry in the fusion record (siimcovid.fuse.record: its sha256 and models).
    reader: read_none_model for the none model files (none_cls=), checked alike."""
    fold_of = dict(zip(meta["image_id"], meta["fold"])) if split == "oof" else None
    names = [[] for _ in files]
    members = [reader(p, fold_of, models) for p, models in zip(files, names)]
    if record is not None:  # hashed once read: a regular file of a readable size (read_input's checks)
        record += [input_entry(path, models) for path, models in zip(files, names)]
    check_split_images(members, files, split, meta)
    return members


def check_split_images(members: list[pd.DataFrame], files: list[str], split: str, meta: pd.DataFrame) -> None:
    """Each file's images are the split's (named by the prepared data), with their prepared study (a study_id of NaN:
    the file named none)."""
    study_of = dict(zip(meta["image_id"], meta["study_id"]))
    for m, path in zip(members, files):
        unknown = ~m["image_id"].isin(set(meta["image_id"]))
        if unknown.any():
            raise DataError(
                f"image {m.image_id[unknown].iloc[0]} is not a {split_name(split)} image of the prepared data "
                "(wrong split= or data=?)",
                path,
            )
        clash = (m["study_id"] != m["image_id"].map(study_of)) & m["study_id"].notna()
        if clash.any():
            rec = m[clash].iloc[0]
            raise DataError(
                f"image {rec.image_id}: study_id {rec.study_id} but the prepared data says {study_of[rec.image_id]}", path
            )


# ----------------------------------------------------------------------------- the images to fuse
def oof_images_to_fuse(
    cfg, prepared: Prepared, meta: pd.DataFrame, boxes: pd.DataFrame, sets: pd.DataFrame, members
) -> pd.DataFrame:
    """The train images to fuse: of the chosen folds, in every fold each box set predicted, in every classifier file."""
    keep = meta["fold"].isin(prepared.select_folds(cfg.folds)).to_numpy(copy=True)  # e.g. tune on some folds, score another
    if len(sets):  # folds every detection member predicted (one fold's model per image)
        covered = None
        for s in sets.itertuples():
            folds = set(boxes.loc[boxes["set"] == s.set, "fold"])
            covered = folds if covered is None else covered & folds
        keep &= meta["fold"].isin(covered).to_numpy()
    for m in members:
        keep &= meta["image_id"].isin(set(m["image_id"])).to_numpy()
    images = meta[keep]
    if images.empty:
        raise SiimError("the detection and classifier files share no out-of-fold image: nothing to fuse")
    if len(images) < len(meta):
        LOGGER.warning(
            f"fuse: out-of-fold predictions cover {len(images)} of {len(meta)} train images "
            f"(folds {sorted(images['fold'].unique())}); scoring those only"
        )
    return images


def sample_path(cfg, prepared: Prepared) -> Path:
    """sample_submission.csv: sample=, else the one in the data root prepare.yaml records."""
    if cfg.get("sample"):
        path = Path(cfg.sample)
    else:
        root = prepared.cfg.get("data_resolved") or prepared.cfg.get("data")
        if not root:
            raise SiimError(f"{prepared.root}/prepare.yaml records no data root: give sample=<sample_submission.csv>")
        path = Path(root) / SAMPLE_SUBMISSION
    if not path.is_file():
        raise SiimError(f"sample submission not found: {path} (give sample=<sample_submission.csv>)")
    return path


def submission_images(
    sample: Path, prepared: Prepared, meta: pd.DataFrame, members, cls_files: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """The test images and studies of the sample submission, each prepared and predicted by every classifier file."""
    sample_studies, sample_images = read_sample_submission(sample)
    by_id = meta.set_index("image_id")
    missing = [i for i in sample_images if i not in by_id.index]
    if missing:
        skipped = prepared.skipped_path
        why = (
            f"prepare skipped unreadable images (see {skipped}): fix or replace them and re-run prepare, since "
            "a submission must cover every image"
            if prepared.was_skipped(missing[0])
            else "re-run prepare with splits=train,test"
        )
        raise SiimError(f"{len(missing)} image(s) of {sample} are not in the prepared test data, e.g. {missing[0]}: {why}")
    images = by_id.loc[sample_images].reset_index()
    lonely = sorted(set(sample_studies) - set(images["study_id"]))
    if lonely:
        raise SiimError(f"{len(lonely)} study(ies) of {sample} have no image in it, e.g. {lonely[0]}: cannot predict them")
    for m, path in zip(members, cls_files):
        absent = sorted(set(sample_images) - set(m["image_id"]))
        if absent:
            raise DataError(f"{len(absent)} test image(s) of the sample submission have no prediction, e.g. {absent[0]}", path)
    return images, list(sample_studies)


def align_members(members, index: pd.Index) -> list[pd.DataFrame]:
    """Each classifier member's 4 classes and none (NaN without a none column), in the order of `index`."""
    return [m.set_index("image_id").loc[index, [*STUDY_CLASSES, "none"]].reset_index(drop=True) for m in members]


def load_inputs(cfg) -> FuseInputs:
    """Read and check cfg.det / cfg.cls / cfg.data for cfg.split (see the module docstring)."""
    split = cfg.split
    det_files, cls_files = [str(p) for p in as_list(cfg.det)], [str(p) for p in as_list(cfg.cls)]
    none_files = [str(p) for p in as_list(cfg.get("none_cls") or [])]
    if not det_files and not cls_files and not none_files:
        raise SiimError("fuse needs det=<detection predictions.csv> and/or cls=<classifier predictions.csv>")
    if not cfg.data:
        raise SiimError("fuse needs data=<prepared dir> (original image sizes, studies, folds, truth)")
    prepared = Prepared(cfg.data)
    meta = prepared.split("train" if split == "oof" else "test")
    if meta.empty:
        raise SiimError(f"{prepared.root} has no {'train' if split == 'oof' else 'test'} images")

    files: dict[str, list[dict]] = {"det": [], "cls": [], "none_cls": []}
    boxes, sets = read_detection_files(det_files, split, meta, files["det"])
    members = read_classifier_files(cls_files, split, meta, files["cls"])
    nones = read_classifier_files(none_files, split, meta, files["none_cls"], reader=read_none_model)
    sample = None
    if split == "oof":  # the images of every file: classifier and none model files alike
        images = oof_images_to_fuse(cfg, prepared, meta, boxes, sets, members + nones)
        study_ids = list(pd.unique(images["study_id"]))
    else:
        sample = sample_path(cfg, prepared)
        images, study_ids = submission_images(sample, prepared, meta, members + nones, cls_files + none_files)

    images = images[["image_id", "study_id", "fold", "rows", "cols"]].reset_index(drop=True)
    index = pd.Index(images["image_id"])
    return FuseInputs(
        split=split,
        images=images,
        study_ids=study_ids,
        boxes=boxes[boxes["image_id"].isin(index)].reset_index(drop=True),
        sets=sets,
        members=align_members(members, index),
        member_files=cls_files,
        det_files=det_files,
        none_members=[m.set_index("image_id").loc[index, "none"].to_numpy(dtype=np.float64) for m in nones],
        none_files=none_files,
        priors=class_priors(prepared.split("train")),  # the study rows when no classifier file is given
        truth=oof_truth(cfg.data, index) if split == "oof" else None,
        sample=sample,
        data=Path(cfg.data),
        files=files,
    )
