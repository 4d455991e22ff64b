"""Read and check what fusion eats: detection and classifier prediction files, the prepared dir.

Detection prediction file (`siimcovid detect predict`: pred_oof.csv / pred_test.csv), CSV, one
row per box in ORIGINAL pixels; extra columns are ignored:

    image_id, model, fold, x_min, y_min, x_max, y_max, conf     (+ optional tta)

  out of fold: each image predicted by its own fold's model (fold = the image's fold in meta.csv);
  test: every fold's model on every test image. A box set (a WBF member) is one
  (file, model[, tta]) out of fold and one (file, model, fold[, tta]) on test. An optional `tta`
  column (e.g. orig / hflip) makes each TTA variant its own member; Ultralytics' augment=True
  merges its TTA itself, so its files have no such column.

Classifier prediction file (`siimcovid classify predict`: pred_<split>_image.csv), CSV, one row
per image (or several, e.g. one per fold: they are averaged); extra columns are ignored:

    image_id, study_id, negative, typical, indeterminate, atypical   (+ optional none)

  `none` is P(image has no opacity) from a none head. Study probabilities are computed here, as
  the mean over the study's images (a study-level file is not accepted: it has no none).

The prepared dir (data=) gives each image's original rows / cols, its study, its fold and, out of
fold, the truth (siimcovid.evaluate.load_truth: the unclipped boxes of the original CSVs when
reachable). On test, the ids come from sample_submission.csv (default: the one in the data root
that prepare.yaml records as data_resolved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import SAMPLE_SUBMISSION, STUDY_CLASSES, read_sample_submission
from siimcovid.data.truth import oof_truth
from siimcovid.utils import LOGGER, DataError, SiimError

DET_COLUMNS = ["image_id", "model", "fold", "x_min", "y_min", "x_max", "y_max", "conf"]
CLS_COLUMNS = ["image_id", "study_id", *STUDY_CLASSES]
BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
SPLITS = ("oof", "test")
NONE_SOURCES = ("auto", "none", "negative")


def as_list(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_csv(path: Path, required: list[str], text_columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        df = pd.read_csv(
            path, dtype={c: str for c in text_columns}, keep_default_na=False, low_memory=False, skip_blank_lines=False
        )
    except pd.errors.EmptyDataError:
        raise DataError("empty file (not even a header)", path) from None
    except pd.errors.ParserError as e:
        raise DataError(f"malformed CSV: {e}", path) from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"missing column(s) {missing}; expected {required} (found {list(df.columns)})", path)
    blank = df.replace("", np.nan).isna().all(axis=1)
    return df[~blank]  # blank lines go; the index keeps counting them: a row's file line is index + 2


def _numbers(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    """Columns -> float64 in place; the first non-number or non-finite value is an error (file, line)."""
    for c in columns:
        values = pd.to_numeric(df[c].replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"column {c}: not a finite number: {df[c].iloc[i]!r}", path, int(df.index[i]) + 2)
        df[c] = values


def _first_bad(mask, path: Path, message: str) -> None:
    index = mask.index if isinstance(mask, pd.Series) else None
    mask = np.asarray(mask)
    if mask.any():
        i = int(np.flatnonzero(mask)[0])
        raise DataError(message, path, (int(index[i]) if index is not None else i) + 2)


def read_detections(path: str | Path) -> pd.DataFrame:
    """One detection file, checked: image_id, model, fold (int), tta ('' if absent), box, conf."""
    path = Path(path)
    df = _read_csv(path, DET_COLUMNS, ["image_id", "model", "tta"])
    _numbers(df, ["fold", *BOX_COLUMNS, "conf"], path)
    _first_bad(df["fold"] != np.round(df["fold"]), path, "fold must be an integer")
    _first_bad(df["image_id"] == "", path, "empty image_id")
    _first_bad(df["model"] == "", path, "empty model name")
    _first_bad((df["conf"] < 0) | (df["conf"] > 1), path, "conf must be in [0, 1]")
    _first_bad((df["x_max"] < df["x_min"]) | (df["y_max"] < df["y_min"]), path, "box has x_max < x_min or y_max < y_min")
    out = df[DET_COLUMNS].copy()
    out["fold"] = out["fold"].astype(np.int64)
    out["tta"] = df["tta"].astype(str) if "tta" in df.columns else ""
    out["line"] = df.index.to_numpy() + 2
    return out


def read_classifier(path: str | Path, fold_of: dict | None = None) -> pd.DataFrame:
    """One classifier file, checked, averaged per image: image_id, study_id, 4 classes, none (NaN if absent).

    fold_of (out of fold): image_id -> its fold; a `fold` column that disagrees is an error.
    """
    path = Path(path)
    df = _read_csv(path, CLS_COLUMNS, ["image_id", "study_id"])
    if fold_of is not None and "fold" in df.columns:
        _numbers(df, ["fold"], path)
        wrong = df["image_id"].isin(fold_of) & (df["fold"].to_numpy() != df["image_id"].map(fold_of).to_numpy())
        _first_bad(
            wrong, path, "predicted by another fold's model than the image's fold: not out-of-fold (a test file? split=test)"
        )
    probs = STUDY_CLASSES + (["none"] if "none" in df.columns else [])
    _numbers(df, probs, path)
    _first_bad(df["image_id"] == "", path, "empty image_id")
    _first_bad(
        (df[probs] < 0).any(axis=1) | (df[probs] > 1).any(axis=1), path, f"probabilities ({', '.join(probs)}) must be in [0, 1]"
    )
    studies = df.groupby("image_id")["study_id"].nunique()
    if (studies > 1).any():
        image = studies.index[studies > 1][0]
        _first_bad(
            (df["image_id"] == image) & df["image_id"].duplicated(),
            path,
            f"image {image} has two study_ids",
        )
    if "none" not in df.columns:
        df["none"] = np.nan
    out = df.groupby("image_id", sort=False).agg({"study_id": "first", **{c: "mean" for c in [*STUDY_CLASSES, "none"]}})
    return out.reset_index()


@dataclass
class FuseInputs:
    """Everything fusion needs, checked and aligned with `images` (the rows to fuse and write)."""

    split: str
    images: pd.DataFrame  # image_id, study_id, fold, rows, cols (row i = image code i)
    study_ids: list[str]  # studies to write (test: sample_submission's; oof: those of `images`)
    boxes: pd.DataFrame  # image_id, set, x_min, y_min, x_max, y_max, conf (images of `images` only)
    sets: pd.DataFrame  # one row per box set: set, file, model, fold (-1 out of fold), tta, name
    members: list[pd.DataFrame] = field(default_factory=list)  # per cls file, aligned with images: 4 classes, none
    member_files: list[str] = field(default_factory=list)
    det_files: list[str] = field(default_factory=list)
    priors: dict[str, float] = field(default_factory=dict)  # train class frequencies (study rows without cls)
    truth: pd.DataFrame | None = None  # metric truth rows (oof)
    sample: Path | None = None  # sample_submission.csv (test)
    data: Path | None = None

    @property
    def n_sets(self) -> int:
        return len(self.sets)


def set_weights(sets: pd.DataFrame, det_weights, det_files: list[str]) -> list[float]:
    """One WBF weight per box set, from det_weights: [] (all 1), a list (one per det file), or a
    mapping {model name: weight} (models not named get 1)."""
    if det_weights is None or (isinstance(det_weights, (list, tuple, dict)) and len(det_weights) == 0):
        return [1.0] * len(sets)
    if isinstance(det_weights, dict):
        unknown = sorted(set(map(str, det_weights)) - set(sets["model"]))
        if unknown:
            raise SiimError(
                f"det_weights names model(s) {unknown} not in the detection files (models: {sorted(set(sets['model']))})"
            )
        weights = [float(det_weights.get(m, 1.0)) for m in sets["model"]]
    else:
        per_file = [float(w) for w in as_list(det_weights)]
        if len(per_file) != len(det_files):
            raise SiimError(
                f"det_weights has {len(per_file)} value(s) for {len(det_files)} det file(s): "
                "give one per file, e.g. det_weights=2,1"
            )
        weights = [per_file[f] for f in sets["file"]]
    if any(w <= 0 for w in weights):
        raise SiimError(f"det_weights must be > 0 (leave a file out rather than weight it 0), got {det_weights}")
    return weights


def _sample_path(cfg, prepared: Prepared) -> Path:
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


def _check_pixels(df: pd.DataFrame, path: str, meta: pd.DataFrame) -> None:
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


def _boxes_and_sets(
    frames: list[pd.DataFrame], files: list[str], split: str, meta: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check every box belongs to the split (and, out of fold, to its image's fold); code box sets."""
    fold_of = dict(zip(meta["image_id"], meta["fold"]))
    boxes, set_rows = [], []
    for f, (df, path) in enumerate(zip(frames, files)):
        unknown = ~df["image_id"].isin(fold_of)
        if unknown.any():
            rec = df[unknown].iloc[0]
            where = "train (out-of-fold)" if split == "oof" else "test"
            raise DataError(
                f"image {rec.image_id} is not a {where} image of the prepared data (wrong split= or data=?)", path, int(rec.line)
            )
        _check_pixels(df, path, meta)
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
            key = ["model", "tta"]
        else:
            key = ["model", "fold", "tta"]
        groups = df.groupby(key, sort=True)
        base = len(set_rows)
        for k in groups.size().reset_index()[key].itertuples(index=False):
            fold = int(k.fold) if split == "test" else -1
            name = f"{Path(path).name}:{k.model}" + (f":fold{fold}" if fold >= 0 else "") + (f":{k.tta}" if k.tta else "")
            set_rows.append({"set": len(set_rows), "file": f, "model": k.model, "fold": fold, "tta": k.tta, "name": name})
        coded = df.assign(set=groups.ngroup().to_numpy() + base) if len(df) else df.assign(set=np.zeros(0, dtype=np.int64))
        boxes.append(coded[["image_id", "set", "fold", *BOX_COLUMNS, "conf"]])
    sets = pd.DataFrame(set_rows, columns=["set", "file", "model", "fold", "tta", "name"])
    box_table = (
        pd.concat(boxes, ignore_index=True) if boxes else pd.DataFrame(columns=["image_id", "set", "fold", *BOX_COLUMNS, "conf"])
    )
    return box_table, sets


def load_inputs(cfg) -> FuseInputs:
    """Read and check cfg.det / cfg.cls / cfg.data for cfg.split (see the module docstring)."""
    split = str(cfg.split)
    if split not in SPLITS:
        raise SiimError(f"split must be oof or test, got '{cfg.split}'")
    if str(cfg.get("none_source", "auto")) not in NONE_SOURCES:
        raise SiimError(f"none_source={cfg.none_source!r}: expected one of {', '.join(NONE_SOURCES)}")
    det_files, cls_files = [str(p) for p in as_list(cfg.det)], [str(p) for p in as_list(cfg.cls)]
    if not det_files and not cls_files:
        raise SiimError("fuse needs det=<detection predictions.csv> and/or cls=<classifier predictions.csv>")
    if not cfg.data:
        raise SiimError("fuse needs data=<prepared dir> (original image sizes, studies, folds, truth)")
    prepared = Prepared(cfg.data)
    meta = prepared.split("train" if split == "oof" else "test")
    if meta.empty:
        raise SiimError(f"{prepared.root} has no {'train' if split == 'oof' else 'test'} images")

    det_frames = [read_detections(p) for p in det_files]
    boxes, sets = _boxes_and_sets(det_frames, det_files, split, meta)
    fold_of = dict(zip(meta["image_id"], meta["fold"])) if split == "oof" else None
    members = [read_classifier(p, fold_of) for p in cls_files]
    for m, path in zip(members, cls_files):
        unknown = ~m["image_id"].isin(set(meta["image_id"]))
        if unknown.any():
            where = "train (out-of-fold)" if split == "oof" else "test"
            raise DataError(
                f"image {m.image_id[unknown].iloc[0]} is not a {where} image of the prepared data (wrong split= or data=?)", path
            )
        study_of = dict(zip(meta["image_id"], meta["study_id"]))
        clash = m["study_id"] != m["image_id"].map(study_of)
        if clash.any():
            rec = m[clash].iloc[0]
            raise DataError(
                f"image {rec.image_id}: study_id {rec.study_id} but the prepared data says {study_of[rec.image_id]}", path
            )

    sample = None
    if split == "oof":
        keep = np.ones(len(meta), dtype=bool)
        if str(cfg.get("folds", "all")) != "all":  # e.g. tune on some folds, score another
            chosen = {prepared.check_fold(int(k)) for k in as_list(cfg.folds)}
            keep &= meta["fold"].isin(chosen).to_numpy()
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
        study_ids = list(pd.unique(images["study_id"]))
    else:
        sample = _sample_path(cfg, prepared)
        sample_studies, sample_images = read_sample_submission(sample)
        by_id = meta.set_index("image_id")
        missing = [i for i in sample_images if i not in by_id.index]
        if missing:
            skipped = prepared.root / "skipped.csv"
            why = (
                f"prepare skipped unreadable images (see {skipped}): fix or replace them and re-run prepare, since "
                "a submission must cover every image"
                if skipped.is_file() and skipped.read_text().count(missing[0])
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
                raise DataError(
                    f"{len(absent)} test image(s) of the sample submission have no prediction, e.g. {absent[0]}", path
                )
        study_ids = list(sample_studies)

    images = images[["image_id", "study_id", "fold", "rows", "cols"]].reset_index(drop=True)
    index = pd.Index(images["image_id"])
    boxes = boxes[boxes["image_id"].isin(index)].reset_index(drop=True)
    aligned = [m.set_index("image_id").loc[index, [*STUDY_CLASSES, "none"]].reset_index(drop=True) for m in members]
    if cfg.get("none_source") == "none":
        lacking = [p for m, p in zip(aligned, cls_files) if m["none"].isna().any()]
        if lacking:
            raise SiimError(f"none_source=none but {lacking[0]} has no `none` column (use none_source=auto or negative)")

    labels = prepared.split("train")[["study_id", "study_label"]].drop_duplicates("study_id")
    counts = labels["study_label"].value_counts()
    priors = {c: float(counts.get(c, 0)) / max(len(labels), 1) for c in STUDY_CLASSES}

    truth = None
    if split == "oof":
        truth = oof_truth(cfg.data, index)
    return FuseInputs(
        split=split,
        images=images,
        study_ids=study_ids,
        boxes=boxes,
        sets=sets,
        members=aligned,
        member_files=cls_files,
        det_files=det_files,
        priors=priors,
        truth=truth,
        sample=sample,
        data=Path(cfg.data),
    )
