"""`siimcovid prepare`: a SIIM-layout root -> images, labels, masks, folds, data YAMLs, meta table.

Decoding runs in a pool of processes, one image at a time each (memory stays bounded by
the number of workers), with a progress bar. Every file is written under a temporary name
and renamed, so an interrupted run leaves no half-written image; re-running skips the
DICOMs whose images all exist (reading only their header) and rewrites the cheap parts
(labels, masks, folds, lists, meta.csv, which is written last).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from siimcovid.config import Config
from siimcovid.data.boxes import as_array, boxes_to_json, clip_boxes, fill_mask, to_yolo
from siimcovid.data.dicom import dicom_to_uint8, read_header
from siimcovid.data.folds import make_folds
from siimcovid.data.prepared import META_COLUMNS, image_file, label_file, mask_file
from siimcovid.data.siim import IMAGE_CSV, STUDY_CLASSES, Problems, load_test, load_train
from siimcovid.utils import LOGGER, DataError, SiimError, atomic_write_text, write_csv

IMWRITE = {"png": [cv2.IMWRITE_PNG_COMPRESSION, 1], "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95]}


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_image(path: Path, img: np.ndarray, ext: str) -> None:
    ok, buf = cv2.imencode(f".{ext}", img, IMWRITE.get(ext, []))
    if not ok:
        raise SiimError(f"could not encode {path}")
    _write_bytes(path, buf.tobytes())


def convert_one(job: dict) -> dict:
    """Convert one DICOM (worker). Returns header info and clipped boxes, or the DataError."""
    out, sizes, ext, image_id, split = Path(job["out"]), job["sizes"], job["ext"], job["image_id"], job["split"]
    try:
        targets = {s: image_file(out, s, split, image_id, ext) for s in sizes}
        if all(p.exists() for p in targets.values()):
            info, converted = read_header(job["path"]), False
        else:
            images, info = dicom_to_uint8(job["path"], sizes)
            for s, p in targets.items():
                _write_image(p, images[s], ext)
            converted = True
        boxes = np.zeros((0, 4))
        if split == "train":
            if job["boxes"]:
                boxes = clip_boxes(job["boxes"], info["cols"], info["rows"], job["csv"], job["line"])
            yolo = to_yolo(boxes, info["cols"], info["rows"])
            text = "".join(f"0 {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}\n" for xc, yc, w, h in yolo)
            for s in sizes:
                _write_bytes(label_file(out, s, image_id), text.encode())
                _write_image(mask_file(out, s, image_id), fill_mask(boxes, info["cols"], info["rows"], (s, s)), "png")
        return {"image_id": image_id, "ok": True, "converted": converted, "boxes": boxes.tolist(), **info}
    except DataError as e:
        return {"image_id": image_id, "ok": False, "error": e}


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; threads inside would oversubscribe the cores


def run_jobs(jobs: list[dict], workers: int, desc: str):
    """Yield convert_one results, in parallel when workers > 1, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", smoothing=0.05)
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker()
            for job in jobs:
                yield convert_one(job)
                bar.update()
        else:
            with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
                for result in pool.imap_unordered(convert_one, jobs, chunksize=2):
                    yield result
                    bar.update()
    finally:
        bar.close()


def _resolve(cfg: Config) -> tuple[Path, str, Path, list[int], int]:
    root = Path(cfg.data)
    if not root.is_dir():
        raise SiimError(f"data folder not found: {root}")
    name = str(cfg.name or root.resolve().name)
    out = Path(cfg.out or Path("runs") / "prepare" / name)
    sizes = sorted({int(s) for s in cfg.sizes})
    if not sizes or min(sizes) < 32:
        raise SiimError(f"sizes must be image sizes of at least 32 px, got {cfg.sizes}")
    if cfg.ext not in IMWRITE:
        raise SiimError(f"ext must be one of {list(IMWRITE)}, got '{cfg.ext}'")
    yolo_size = int(cfg.yolo_size or sizes[-1])
    if yolo_size not in sizes:
        raise SiimError(f"yolo_size {yolo_size} is not one of sizes {sizes}")
    bad = set(cfg.splits) - {"train", "test"}
    if bad or not cfg.splits:
        raise SiimError(f"splits must be a subset of [train, test], got {cfg.splits}")
    return root, name, out, sizes, yolo_size


def _check_previous(out: Path, root: Path) -> None:
    """Refuse to mix two datasets in one output folder."""
    previous = out / "prepare.yaml"
    if previous.is_file():
        old = yaml.safe_load(previous.read_text()) or {}
        if old.get("data_resolved") and old["data_resolved"] != str(root.resolve()):
            raise SiimError(
                f"{out} already holds data prepared from {old['data_resolved']}; "
                f"choose another name= or out= for {root.resolve()}"
            )


def write_yolo_lists(meta: pd.DataFrame, out: Path, size: int, n_folds: int, exclude_none: bool, ext: str) -> list[Path]:
    """Per-fold image lists (paths relative to <out>/<size>, Ultralytics' './' form)."""
    lists = []
    train = meta[meta.split == "train"]
    rel = lambda df, split: "".join(f"./images/{split}/{i}.{ext}\n" for i in df.image_id)  # noqa: E731
    for k in range(n_folds):
        fit = train[train.fold != k]
        if exclude_none:
            fit = fit[fit.n_boxes > 0]
        for part, df in (("train", fit), ("val", train[train.fold == k])):
            path = out / str(size) / f"fold{k}_{part}.txt"
            atomic_write_text(path, rel(df, "train"))
            lists.append(path)
    test = meta[meta.split == "test"]
    if len(test):
        atomic_write_text(out / str(size) / "test.txt", rel(test, "test"))
    return lists


def write_data_yamls(name: str, out: Path, size: int, n_folds: int, yaml_dir: Path, has_test: bool) -> list[Path]:
    """data_yaml/<name>_fold<k>.yaml: plain Ultralytics data files, usable with `yolo detect train`."""
    paths = []
    for k in range(n_folds):
        data = {
            "path": str((out / str(size)).resolve()),
            "train": f"fold{k}_train.txt",
            "val": f"fold{k}_val.txt",
            **({"test": "test.txt"} if has_test else {}),
            "names": {0: "opacity"},
        }
        text = f"# Generated by `siimcovid prepare` from {out}: fold {k} of {n_folds}, {size} px images.\n"
        text += yaml.safe_dump(data, sort_keys=False)
        path = yaml_dir / f"{name}_fold{k}.yaml"
        atomic_write_text(path, text)
        paths.append(path)
    return paths


def fold_summary(meta: pd.DataFrame) -> str:
    train = meta[meta.split == "train"]
    table = pd.crosstab(train.fold, train.study_label).reindex(columns=STUDY_CLASSES, fill_value=0)
    table["with_boxes"] = train.groupby("fold").n_boxes.apply(lambda s: int((s > 0).sum()))
    table["patients"] = train.groupby("fold").patient_id.nunique()
    table["images"] = train.groupby("fold").size()
    return table.to_string()


def prepare(cfg: Config) -> Path:
    root, name, out, sizes, yolo_size = _resolve(cfg)
    _check_previous(out, root)
    out.mkdir(parents=True, exist_ok=True)
    saved = Config(cfg, name=name, out=str(out), sizes=sizes, yolo_size=yolo_size, data_resolved=str(root.resolve()))
    saved.save(out / "prepare.yaml")

    problems = Problems(cfg.on_error)
    frames = []
    if "train" in cfg.splits:
        train = load_train(root, problems)
        train["split"] = "train"
        frames.append(train)
    if "test" in cfg.splits:
        test = load_test(root, problems)
        test["split"], test["boxes"], test["study_label"], test["line"] = "test", [[]] * len(test), "", None
        frames.append(test)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if table.empty:
        raise SiimError(f"no images found under {root} for splits {cfg.splits}")

    for s in sizes:
        for sub in ("images/train", "images/test", "labels/train", "masks/train"):
            (out / str(s) / sub).mkdir(parents=True, exist_ok=True)
    csv = str(root / IMAGE_CSV)
    jobs = [
        {"out": str(out), "sizes": sizes, "ext": cfg.ext, "image_id": r.image_id, "split": r.split,
         "path": r.path, "boxes": r.boxes, "line": r.line, "csv": csv}
        for r in table.itertuples(index=False)
    ]
    workers = int(cfg.workers) or os.cpu_count() or 1
    results, converted = {}, 0
    for res in run_jobs(jobs, workers, f"prepare {name} {sizes}"):
        if not res["ok"]:
            problems.add(res["error"])  # raises unless on_error=skip
            continue
        results[res["image_id"]] = res
        converted += res["converted"]
    problems.report("images")

    table = table[table.image_id.isin(results)].reset_index(drop=True)
    info = pd.DataFrame([results[i] for i in table.image_id]).drop(columns=["ok", "converted", "image_id", "boxes"])
    meta = pd.concat([table.drop(columns=["boxes"]), info], axis=1)
    meta["boxes"] = [results[i]["boxes"] for i in table.image_id]
    meta["n_boxes"] = [len(b) for b in meta.boxes]
    meta["fold"] = -1
    is_train = (meta.split == "train").to_numpy()
    if is_train.any():
        meta.loc[is_train, "fold"] = make_folds(meta[is_train], int(cfg.n_folds), int(cfg.seed))
    meta["dicom"] = [os.path.relpath(p, root) for p in meta.path]
    meta["boxes"] = [boxes_to_json(as_array(b)) for b in meta.boxes]
    meta = meta[META_COLUMNS]

    if is_train.any():
        write_yolo_lists(meta, out, yolo_size, int(cfg.n_folds), bool(cfg.yolo_exclude_none), cfg.ext)
        yamls = write_data_yamls(name, out, yolo_size, int(cfg.n_folds), Path(cfg.data_yaml_dir), (meta.split == "test").any())
    else:
        yamls = []
    if problems.items:
        write_csv(problems.table(), out / "skipped.csv")
    elif (out / "skipped.csv").exists():
        (out / "skipped.csv").unlink()
    write_csv(meta, out / "meta.csv")  # last: its presence marks a finished prepare

    n_train, n_test = int(is_train.sum()), int((~is_train).sum())
    LOGGER.info(
        f"prepare: {n_train} train + {n_test} test images -> {out} "
        f"({converted} decoded, {len(results) - converted} already done, {len(problems.items)} skipped)"
    )
    if is_train.any():
        LOGGER.info("folds (grouped by patient):\n" + fold_summary(meta))
        LOGGER.info(f"data YAMLs: {yamls[0]} ... {yamls[-1].name}")
    return out


def main(cfg: Config) -> Path:
    return prepare(cfg)
