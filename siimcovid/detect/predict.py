"""`siimcovid detect predict`: opacity boxes from every fold's model, in ORIGINAL DICOM pixels.

    siimcovid detect predict run=runs/detect/siim-yolov5xu split=oof,test tta=true conf=0.001 iou=0.5

split=oof runs each fold's model on the validation images of its own fold (out-of-fold
predictions for every train image once all folds are trained); split=test runs every fold's
model on every test image. Several runs at once: run=runs/detect/a,runs/detect/b.
source=<prepared folder> (split=test, with out=) predicts that folder's test split instead (e.g. an
unlabelled pool for `siimcovid pseudo`); its boxes go to <out>/<run name>/pred_test.csv, not the run dir.

Outputs, in each run dir (and all runs together in <out>/ when out= is set):

    pred_oof.csv, pred_test.csv   one row per predicted box:
        image_id  the image (SOP instance UID, without the _image suffix)
        model     the run name (runs/detect/<name>): fusion weights and groups by it
        fold      the fold whose model predicted the box (test: 0..K-1, one set of boxes per fold)
        x_min, y_min, x_max, y_max   the box in ORIGINAL DICOM pixels (meta.csv rows/cols)
        conf      the detector's confidence
      An image with no box above `conf` has no rows (meta.csv lists every image).
    scores_oof.csv  the competition's opacity AP (IoU 0.5) of the OOF boxes against the competition's
                  truth (the unclipped boxes of the CSVs): one row over all train images of the folds
                  predicted, then one per fold (siimcovid.tables.SCORES, plus the `model` column)

out= follows the outputs rule (siimcovid.outputs): a new or empty folder, or detect predict's own (its record
detect_predict_files.yaml lists the tables it wrote there), else overwrite=true, which writes beside the files
there, never over them; never the root, the home folder or a folder holding a run or the source.

The detector sees the prepared square image of side s (the run's image size); Ultralytics
returns boxes in that image's pixels, which map back with x * cols / s, y * rows / s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from siimcovid import metrics
from siimcovid.config import Config
from siimcovid.data.boxes import scale_boxes
from siimcovid.data.prepared import Prepared
from siimcovid.data.truth import image_truth, oof_images
from siimcovid.detect.common import RUN_CONFIG, fold_state, passthrough, prepared_of_yaml
from siimcovid.engine import devices
from siimcovid.rundir import fold_checkpoints, fold_dir, read_run, save_predict_settings
from siimcovid.tables import BOX_COLUMNS, BOX_PRED_COLUMNS, DETECTIONS, SCORES
from siimcovid.utils import LOGGER, SiimError, as_list
from siimcovid.views import view_record, warn_other_views

PREDICT_KEYS = ("conf", "iou", "tta", "max_det", "predict_imgsz")  # the settings that change the boxes
OUT_RECORD = "detect_predict_files.yaml"  # out='s record (siimcovid.outputs.Written): the tables written there


@dataclass
class Run:
    """A trained detect run: its folds' weights and the prepared data it predicts (the one it was
    trained on, or, for a bundle's member, the data `siimcovid predict` prepared)."""

    dir: Path
    prepared: Prepared
    size: int  # side of the prepared square images the detector reads
    weights: dict[int, Path]
    imgsz: dict[int, int]  # training image size per fold
    name: str = ""  # the `model` column of its boxes; default: the run folder's name
    load: Callable | None = None  # weights file -> Ultralytics YOLO; None: YOLO(file), a run's own checkpoint
    family: str = "yolo"  # the model family it was trained with (its learned record)
    task: str = "opacity"  # what its boxes are: "opacity" (the competition's) or "lung" (one box around both lungs)

    def __post_init__(self):
        self.name = self.name or self.dir.name


def fold_done(fold_dir: Path) -> bool:
    """A YOLO fold whose training finished (its last.pt says so)."""
    return fold_state(fold_dir) == "done"


def load_run(run_dir: str | Path, weights: str = "best", allow_unfinished: bool = False) -> Run:
    """A trained detect run of any family: the run's learned `family` picks its fold files and what a finished fold
    is; YOLO's folds give their imgsz in Ultralytics' args.yaml, another family's the run's settings (imgsz)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SiimError(f"run not found: {run_dir} (train it with `siimcovid detect train`)")
    if (run_dir / "classify.yaml").is_file() and not (run_dir / RUN_CONFIG).is_file():
        raise SiimError(f"{run_dir} is a classify run (its classify.yaml), not a detect one: `siimcovid classify predict`")
    saved = run_dir / RUN_CONFIG
    cfg = read_run(saved) if saved.is_file() else {}  # written by `siimcovid detect train`
    family = cfg.get("family") or "yolo"
    if family != "yolo":
        return family_run(run_dir, cfg, family, weights, allow_unfinished)
    found = fold_checkpoints(run_dir, f"weights/{weights}.pt", fold_done, allow_unfinished, "detect")
    args_files = {k: fold_dir(run_dir, k) / "args.yaml" for k in found}
    args = {k: (yaml.safe_load(f.read_text()) or {}) if f.is_file() else {} for k, f in args_files.items()}
    if cfg:
        prepared, size = Path(cfg["prepared"]), int(cfg["size"])
    else:  # folds trained with the plain `yolo` CLI on a prepared data YAML
        data_yaml = Path(args[min(found)]["data"])
        prepared = prepared_of_yaml(data_yaml)
        size = int(Path(yaml.safe_load(data_yaml.read_text())["path"]).name)
        LOGGER.warning(
            f"detect predict: {run_dir} has no {RUN_CONFIG} (trained with the plain yolo CLI?), so its fold assignment "
            "cannot be checked: its out-of-fold boxes are honest only if prepare has not re-run with other data or seed since"
        )
    prep = Prepared(prepared)
    prep.check_size(size)
    prep.check_folds(cfg.get("folds_id"), str(run_dir))
    imgsz = {k: int(a.get("imgsz") or size) for k, a in args.items()}
    return Run(run_dir, prep, size, found, imgsz, family=family, task=cfg.get("task") or "opacity")


def family_run(run_dir: Path, cfg: dict, family: str, weights: str, allow_unfinished: bool) -> Run:
    """A detect run of a family other than YOLO: its files (FoldFiles) say where each fold's checkpoint is, its
    fold_state which are finished; its settings the prepared folder, the side read and the training imgsz."""
    from siimcovid.engine.family import family_class

    own = family_class(family, "detect")(Config())
    done = lambda folder: own.fold_state(Path(folder)) == "done"  # noqa: E731
    found = fold_checkpoints(run_dir, own.files.checkpoint(Path(), weights).as_posix(), done, allow_unfinished, "detect")
    prep = Prepared(cfg["prepared"])
    size = prep.check_size(int(cfg["size"]))
    prep.check_folds(cfg.get("folds_id"), str(run_dir))
    imgsz = {k: int(cfg.get("imgsz") or size) for k in found}
    return Run(run_dir, prep, size, found, imgsz, family=family, task=cfg.get("task") or "opacity")


def boxes_to_original(result, rows: int, cols: int) -> np.ndarray:
    """An Ultralytics Results -> (n, 5) [x_min, y_min, x_max, y_max, conf] in original pixels.

    Ultralytics already undid its own letterbox: boxes are in the pixels of the image it read
    (orig_shape, the prepared s x s image). The prepared image is the original resized to a
    square, so x scales by cols / s and y by rows / s.
    """
    boxes = result.boxes
    xyxy = boxes.xyxy.cpu().numpy().astype(np.float64).reshape(-1, 4)
    conf = boxes.conf.cpu().numpy().astype(np.float64).reshape(-1, 1)
    height, width = result.orig_shape
    xyxy = scale_boxes(xyxy, (width, height), (cols, rows))
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, cols)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, rows)
    return np.hstack([xyxy, conf])


def predict_images(yolo, run: Run, fold: int, image_ids: list[str], split: str, args: dict) -> pd.DataFrame:
    """One fold's model on some images, in batches -> tidy rows (the DETECTIONS contract, without tta)."""
    meta = run.prepared.meta.set_index("image_id")
    paths = [run.prepared.image_path(i, split, run.size) for i in image_ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SiimError(f"{len(missing)} prepared images missing, e.g. {missing[0]}: re-run `siimcovid prepare`")
    batch = max(args.get("batch") or 1, 1)
    frames = []
    with tqdm(total=len(paths), desc=f"predict {run.name} fold {fold} {split}", unit="img") as bar:
        for start in range(0, len(paths), batch):
            chunk = image_ids[start : start + batch]
            results = yolo.predict([str(p) for p in paths[start : start + batch]], **args)
            for image_id, result in zip(chunk, results):
                found = boxes_to_original(result, int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"]))
                frame = pd.DataFrame(found, columns=[*BOX_COLUMNS, "conf"])
                frame.insert(0, "image_id", image_id)
                frames.append(frame)
            bar.update(len(chunk))
    out = pd.concat(frames, ignore_index=True) if frames else no_detections()
    out["model"], out["fold"] = run.name, fold
    return out[DETECTIONS.required]


def predict_run(run: Run, splits: list[str], cfg: Config) -> dict[str, pd.DataFrame]:
    """Every fold's model on its OOF images and/or the test images (the fold engine's loop, family yolo)."""
    from siimcovid.engine.family import family_class
    from siimcovid.engine.folds import predict

    return predict(family_class(run.family, "detect")(cfg), run, run.weights, splits, cfg.device)


def no_detections() -> pd.DataFrame:
    """An empty detection table: the DETECTIONS columns `detect predict` writes (no tta variants)."""
    return DETECTIONS.empty()[DETECTIONS.required]


def predict_args(cfg: Config) -> dict:
    """Ultralytics predict arguments: siimcovid's predict keys, then any Ultralytics key the user gave."""
    device = devices.ultralytics(cfg.device)
    if isinstance(device, str) and "," in device:
        device = device.split(",")[0]  # inference runs on one GPU
    args = {
        "conf": cfg.conf,
        "iou": cfg.iou,
        "augment": cfg.tta,
        "max_det": cfg.max_det,
        "batch": cfg.batch,
        "device": device,
        "quantize": 16,  # fp16 inference on a GPU (Ultralytics 8.4 computes in fp32 on the CPU); quantize=32 overrides
    }
    return {**args, **passthrough(cfg), "verbose": False, "save": False}


def on_source(run: Run, source, splits: list[str], out) -> Run:
    """The run, predicting the test split of another prepared folder (`source=`: e.g. an unlabelled pool)."""
    if splits != ["test"]:
        raise SiimError(f"detect predict source={source}: only split=test (out-of-fold images are the run's own data)")
    if not out:
        raise SiimError(f"detect predict source={source} needs out=<folder>: the run's own pred_test.csv is left as it is")
    prepared = Prepared(source)
    prepared.check_size(run.size)
    return replace(run, prepared=prepared)


def scores_oof(pred: pd.DataFrame, prepared: Prepared, folds: list[int], model: str, task: str = "opacity") -> pd.DataFrame:
    """The competition's opacity AP of out-of-fold boxes (a DETECTIONS table) against the competition's
    truth (siimcovid.data.truth: the unclipped boxes): the SCORES table over every train image of
    `folds` ("all", first), then per fold, with the `model` column. task=lung: the AP (IoU 0.5, the same
    metric) of a lung detector's boxes against the lung boxes (Prepared.lungs), class `lung`, over the
    train images that have one."""
    train = prepared.split("train")
    images = train[train.fold.isin(folds)]
    if task == "lung":
        return lung_scores(pred, prepared, images).assign(model=model)
    truth = image_truth(oof_images(prepared.root, images.image_id))
    boxes = metrics.image_pred(pred[BOX_PRED_COLUMNS], None)
    return metrics.fold_scores(truth, boxes, images, classes=["opacity"]).assign(model=model)


def lung_scores(pred: pd.DataFrame, prepared: Prepared, images: pd.DataFrame) -> pd.DataFrame:
    """AP(lung) of out-of-fold lung boxes against lungs.csv, over `images` that have a lung box (SCORES rows)."""
    from siimcovid.tables import IMAGE_SUFFIX

    lungs = prepared.lungs()
    if lungs is None:
        raise SiimError(f"{prepared.root} has no lung boxes (lungs.csv) to score a lung detector on: re-run prepare lung_boxes=")
    images = images[images.image_id.isin(set(lungs.image_id))]
    truth = lungs[lungs.image_id.isin(set(images.image_id))]
    truth = pd.DataFrame({"id": truth.image_id + IMAGE_SUFFIX, "cls": "lung", **{c: truth[c] for c in BOX_COLUMNS}})
    boxes = metrics.image_pred(pred[BOX_PRED_COLUMNS], None).assign(cls="lung")
    return metrics.fold_scores(truth.reset_index(drop=True), boxes, images, classes=["lung"])


def resolve_run(run, project: str | Path) -> Path:
    """A run= value as cfg/shared.yaml means it: a run folder, else a run name under <project> (runs/detect)."""
    path, under = Path(str(run)), Path(project) / str(run)
    return under if not path.is_dir() and under.is_dir() else path


def predict(cfg: Config) -> dict[str, dict[str, Path]]:
    runs = [resolve_run(r, cfg.project) for r in as_list(cfg.run)]
    if not runs:
        raise SiimError("run= is required: a detect run dir (runs/detect/<name>), or several: run=a,b")
    splits = as_list(cfg.split)
    if not splits:
        raise SiimError("split= is empty: give oof, test or both")
    devices.check_run_precision("detect", cfg.device, cfg.get("precision"), cfg.source)
    if cfg.out:  # before any run is loaded: a user's file in the way stops it at once
        open_out_folder(cfg, [Path(r) for r in runs], splits, create=False)
    loaded = [load_run(r, cfg.weights, cfg.allow_unfinished) for r in runs]  # check every run before predicting with any
    for run in loaded:
        warn_other_views(read_run(run.dir / RUN_CONFIG), cfg, str(run.dir))
    if cfg.source:
        loaded = [on_source(run, cfg.source, splits, cfg.out) for run in loaded]
    names = [run.name for run in loaded]
    if len(set(names)) < len(names):
        raise SiimError(f"runs must have different names (the `model` column): {names}")
    if cfg.out:
        open_out_folder(cfg, [run.dir for run in loaded], splits, create=True)
    written: dict[str, dict[str, Path]] = {}
    together: dict[str, list[pd.DataFrame]] = {s: [] for s in splits}
    for run in loaded:
        written[run.name] = predict_and_score(run, splits, cfg, together)
    if cfg.out:
        for split, frames in together.items():
            path = DETECTIONS.write(pd.concat(frames, ignore_index=True), Path(cfg.out) / f"pred_{split}.csv")
            LOGGER.info(f"detect predict: all runs' {split} boxes -> {path}")
    return written


def open_out_folder(cfg: Config, runs: list[Path], splits: list[str], create: bool) -> None:
    """out= by the outputs rule (module docstring), every table of this command claimed before any prediction: a
    user's file of that name stops it at once. runs: the run folders (their names: the `model` column); create=False
    only checks (before the runs are loaded: a refusal leaves the folder as it was, no record in it)."""
    from siimcovid.outputs import Written, check_out, open_out

    out, sources = Path(cfg.out), [*runs, cfg.source]
    tables = [out / f"pred_{split}.csv" for split in splits]
    tables += [out / run.name / "pred_test.csv" for run in runs] if cfg.source else []
    if create:
        open_out(out, OUT_RECORD, "detect", cfg.overwrite, sources).claim(*tables)
    else:
        check_out(out, OUT_RECORD, cfg.overwrite, sources)
        Written(out, OUT_RECORD, "detect").check(*tables)


def predict_and_score(run: Run, splits: list[str], cfg: Config, together: dict[str, list[pd.DataFrame]]) -> dict[str, Path]:
    """One run: its pred_<split>.csv files (each split's table also appended to `together`) and, for oof, scores_oof.csv."""
    if "oof" in splits and len(run.weights) < run.prepared.n_folds:
        folds = f"folds {sorted(run.weights)} of {run.prepared.n_folds}"
        LOGGER.warning(f"detect predict: {run.dir} has {folds}: OOF covers those folds only")
    preds = predict_run(run, splits, cfg)
    written = {}
    # another source's boxes are not the run's test predictions: they go to <out>/<run name>/
    where = Path(cfg.out) / run.name if cfg.source else run.dir
    for split, df in preds.items():
        written[split] = DETECTIONS.write(df, where / f"pred_{split}.csv")
        together[split].append(df)
    if not cfg.source and "test" in splits:  # what made the run's test boxes: `siimcovid export` packs these settings
        saved = {k: cfg[k] for k in (*PREDICT_KEYS, "weights")} | view_record(cfg, "detect")  # crop=lung: its views too
        save_predict_settings(run.dir, {**saved, "ultralytics": passthrough(cfg)} if passthrough(cfg) else saved)
    if "oof" in splits:
        table = scores_oof(preds["oof"], run.prepared, sorted(run.weights), run.name, run.task)
        written["scores"] = SCORES.write(table, run.dir / "scores_oof.csv")
        truth = "the lung boxes of lungs.csv" if run.task == "lung" else "unclipped truth"
        LOGGER.info(f"detect predict: OOF {run.task} AP (IoU 0.5, {truth}) of {run.name}:\n{table.to_string(index=False)}")
    LOGGER.info(f"detect predict: {', '.join(str(p) for p in written.values())}")
    return written


def main(cfg: Config) -> dict[str, dict[str, Path]]:
    return predict(cfg)
