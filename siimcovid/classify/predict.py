"""`siimcovid classify predict`: per-image and per-study probabilities, OOF scores, ensembles.

Outputs in the run dir (or in `out` for an ensemble of several runs); the columns of each table
are its contract in siimcovid/tables.py:

pred_<split>_image.csv   tables.CLASSIFIER_IMAGES: one row per image
pred_<split>_study.csv   tables.CLASSIFIER_STUDIES: one row per study, the mean over its images
scores_oof.csv           tables.SCORES: AP of the four study classes (on the study table) and of none
                         (on the image rows), per fold and for all folds, with model, tta and weights

oof: each fold's best checkpoint predicts its own validation images.
test: every fold's best checkpoint predicts every test image; the probabilities are averaged.
tta=none | hflip | vflip | d4 averages each model's probabilities over those views of each image (siimcovid.classify.tta:
the mirror, the upside-down mirror, the 8 turns and mirrors of the square); true / false, as tta was before, = hflip / none.
crop=lung (lung=<a lung detector run>): each fold model also sees each image cropped to the lung window that the lung
run's model of the same fold found (oof: its out-of-fold boxes; test: its test boxes; siimcovid.views), resized to the
input size, seen in the same TTA views; the two views' probabilities combine per image by view_fusion (fuse_views). An image
without a confident lung box is seen whole only. crop=none is the path of a single view, unchanged.
Ensembles (several run=...) combine the runs' tables row by row with siimcovid.ensemble.combine:
mean, geometric (alias geomean: the product of members, up to a power) or rank (mean of each
column's percentile rank; keeps only the ordering, which is all that AP reads).
An ensemble's folder (out=, default <project>/ensemble) follows the outputs rule (siimcovid.outputs): new, empty or an
ensemble's own (its record ensemble.yaml: the ensemble it holds and the files written), else overwrite=true, which
writes beside the files there, never over them; never the root, the home folder or a folder holding a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from siimcovid import ensemble, metrics, rundir
from siimcovid.classify.files import FILES
from siimcovid.tables import CLASSES, CLASSIFIER_FOLDS, CLASSIFIER_IMAGES, CLASSIFIER_STUDIES, SCORES, STUDY_CLASSES
from siimcovid.utils import LOGGER, SiimError, as_list
from siimcovid.views import view_record, warn_other_views

PROB_COLUMNS = [c for c in CLASSIFIER_STUDIES.names if c in CLASSES]  # the four study classes and none
SCORED_CLASSES = STUDY_CLASSES + ["none"]  # what scores_oof.csv scores
DONE = FILES.done  # fold<k>/done.json, written last by `classify train`: the fold is finished


# ---------------------------------------------------------------- tables (no torch needed)


def view(tta) -> str:
    """The TTA a table (the `tta` column of scores) and a record name: the view name (true = hflip, false = none)."""
    from siimcovid.classify.tta import tta_name

    return tta_name(tta)


def study_table(images: pd.DataFrame) -> pd.DataFrame:
    """Aggregate per-image probabilities per study: the mean over the study's images."""
    missing = [c for c in ["model", "study_id", "fold"] + PROB_COLUMNS if c not in images.columns]
    if missing:
        raise SiimError(f"image table lacks columns {missing}")
    g = images.groupby(["model", "study_id"], sort=True)
    out = metrics.study_mean(images, PROB_COLUMNS, by=["model", "study_id"], sort=True)
    out.insert(0, "n_images", g.size())
    out.insert(0, "fold", g["fold"].first())
    return out.reset_index()[CLASSIFIER_STUDIES.names]


def combine(tables: list[pd.DataFrame], method: str = "mean", weights: list[float] | None = None) -> pd.DataFrame:
    """Combine several runs' image or study tables (same ids, any row order) into one table of the same schema:
    the probability columns by siimcovid.ensemble.combine, model = the members' names joined by '+'."""
    if not tables:
        raise SiimError("combine: no tables given")
    key = "image_id" if "image_id" in tables[0].columns else "study_id"
    aligned = [t.sort_values(key).reset_index(drop=True) for t in tables]
    ids = aligned[0][key].tolist()
    if any(t[key].tolist() != ids for t in aligned[1:]):
        raise SiimError(f"combine: the tables do not hold the same {key}s (models predicted different data?)")
    out = aligned[0].copy()
    out[PROB_COLUMNS] = ensemble.combine([t[PROB_COLUMNS].to_numpy(dtype=float) for t in aligned], weights, method)
    out["model"] = "+".join(dict.fromkeys(str(m) for t in tables for m in t["model"].unique()))
    return out


def truth_frames(prep, images: pd.DataFrame):
    """Truth rows (metric API) for the studies and images of a prediction table."""
    from siimcovid.data import truth

    rows = truth.oof_images(prep.root, images["image_id"])
    return truth.study_truth(rows), truth.image_truth(rows)


def oof_scores(prep, images: pd.DataFrame, studies: pd.DataFrame) -> pd.DataFrame:
    """The SCORES table of OOF tables (siimcovid.metrics.fold_scores): AP of the study classes on the
    study table and AP(none) on the image rows, for all folds and per fold."""
    from siimcovid.data import truth

    pred = pd.concat(
        [metrics.study_pred(studies[["study_id"] + STUDY_CLASSES]), metrics.image_pred(None, images[["image_id", "none"]])],
        ignore_index=True,
    )
    return metrics.fold_scores(truth.oof_truth(prep.root, images["image_id"]), pred, images, classes=SCORED_CLASSES)


def study_map(prep, images: pd.DataFrame) -> float:
    """The study mAP of image-level predictions (aggregated per study): the checkpoint criterion."""

    studies = study_table(images)
    st_truth, _ = truth_frames(prep, images)
    return float(metrics.score(st_truth, metrics.study_pred(studies[["study_id"] + STUDY_CLASSES])).study_map)


def image_frame(table: pd.DataFrame, study: np.ndarray, none: np.ndarray | None, model: str) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "model": model,
            "image_id": table["image_id"].values,
            "study_id": table["study_id"].values,
            "fold": table["fold"].values.astype(int),
        }
    )
    # float64 now, so the scores computed here equal those recomputed from the written table
    study = np.asarray(study, dtype=np.float64)
    out[STUDY_CLASSES] = study
    out["none"] = np.asarray(none, dtype=np.float64) if none is not None else study[:, STUDY_CLASSES.index("negative")]
    return out[CLASSIFIER_IMAGES.names]


def read_tables(run_dir: Path, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    paths = [run_dir / f"pred_{split}_image.csv", run_dir / f"pred_{split}_study.csv"]
    for p in paths:
        if not p.is_file():
            raise SiimError(f"{p} does not exist: run `siimcovid classify predict run={run_dir} split={split}` first")
    return CLASSIFIER_IMAGES.read(paths[0]), CLASSIFIER_STUDIES.read(paths[1])


def table_paths(out_dir: Path, split: str) -> tuple[Path, Path]:
    """Where a run (or an ensemble) keeps its image and study tables of a split."""
    return out_dir / f"pred_{split}_image.csv", out_dir / f"pred_{split}_study.csv"


def folds_path(out_dir: Path) -> Path:
    """Where `classify predict per_fold=true` keeps each fold model's test predictions (tables.CLASSIFIER_FOLDS)."""
    return Path(out_dir) / "pred_test_image_folds.csv"


def write_tables(out_dir: Path, split: str, images: pd.DataFrame, studies: pd.DataFrame) -> tuple[Path, Path]:
    image_path, study_path = table_paths(out_dir, split)
    return CLASSIFIER_IMAGES.write(images, image_path), CLASSIFIER_STUDIES.write(studies, study_path)


def run_table_paths(out_dir: Path, split: str) -> dict[str, Path]:
    """{split: image table, "<split>_study": study table} of a run or an ensemble; a none model (task=none):
    {split: its none table} (tables.NONE_IMAGES, siimcovid.classify.none)."""
    from siimcovid.classify.none import is_none_run, none_path

    if is_none_run(out_dir):
        return {split: none_path(out_dir, split)}
    return dict(zip((split, f"{split}_study"), table_paths(out_dir, split)))


def write_run_tables(run_dir: Path, split: str, images: pd.DataFrame, studies: pd.DataFrame) -> None:
    """A run's tables of a split (write_tables); a none model's: its none table alone (its study head learned nothing)."""
    from siimcovid.classify.none import is_none_run, none_path, none_table
    from siimcovid.tables import NONE_IMAGES

    if is_none_run(run_dir):
        NONE_IMAGES.write(none_table(images), none_path(run_dir, split))
    else:
        write_tables(run_dir, split, images, studies)


# ---------------------------------------------------------------- views (crop=lung)

VIEW_FUSIONS = ("mean", "gmean")  # cfg/classify.yaml view_fusion
EPS = 1e-12  # the least probability gmean takes the log of (a float32 softmax may underflow to 0)


def fuse_probabilities(views: list[np.ndarray], method: str, total: bool) -> np.ndarray:
    """One probability array from its views' (arrays of one shape): mean, or gmean, the geometric mean, renormalised:
    total=True, rows that sum to 1 (the study softmax: each row divided by its sum); total=False, probabilities of
    a yes/no event (none: p against 1 - p, so that gmean treats the two outcomes alike)."""
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in views])
    if method == "mean":
        return stack.mean(axis=0)
    if method != "gmean":
        raise SiimError(f"view_fusion={method}: one of {', '.join(VIEW_FUSIONS)}")
    log_yes = np.log(stack.clip(EPS, 1.0)).mean(axis=0)
    if total:
        g = np.exp(log_yes - log_yes.max(axis=-1, keepdims=True))
        return g / g.sum(axis=-1, keepdims=True)
    yes, no = np.exp(log_yes), np.exp(np.log((1.0 - stack).clip(EPS, 1.0)).mean(axis=0))
    return yes / (yes + no)


def fuse_views(study, none, at, crop_study, crop_none, method: str):
    """The whole view's probabilities (study (N,4), none (N,) or None) with the crop view's of rows `at` fused in."""
    study = np.array(study, dtype=np.float64)
    study[at] = fuse_probabilities([study[at], crop_study], method, total=True)
    if none is not None:
        none = np.array(none, dtype=np.float64)
        none[at] = fuse_probabilities([none[at], crop_none], method, total=False)
    return study, none


@dataclass
class Views:
    """crop=lung: the lung boxes whose windows make each fold's crop views (a siimcovid.views.LungBoxes, or any object
    with its windows(meta, fold, image_ids, split, conf, margin): a bundle hands in its own), the settings that turn a
    box into a window (lung_conf, crop_margin) and how the views' probabilities combine (view_fusion)."""

    lungs: object
    conf: float
    margin: float
    fusion: str

    def __post_init__(self):
        if self.fusion not in VIEW_FUSIONS:  # a bundle's value too: checked before any image is predicted
            raise SiimError(f"view_fusion={self.fusion}: one of {', '.join(VIEW_FUSIONS)}")

    @classmethod
    def of(cls, cfg, folds_id: str | None) -> "Views | None":
        """The views of these settings (crop, lung, lung_conf, crop_margin, view_fusion); None for crop=none. The lung
        run must have the folds of the model (folds_id), else a crop view leaks."""
        from siimcovid.views import lungs_of

        lungs = lungs_of(cfg)
        if lungs is None:
            return None
        lungs.check_folds(folds_id, "this classify run")
        return cls(lungs, cfg.lung_conf, cfg.crop_margin, cfg.view_fusion)

    def windows(self, prep, fold: int, table: pd.DataFrame, split: str) -> list:
        """Each row's window (original pixels) or None, from fold k's lung model: oof (split oof or train: the
        held-out images of fold k) or test."""
        which = "test" if split == "test" else "oof"
        found = self.lungs.windows(prep.meta, fold, list(table.image_id), which, self.conf, self.margin)
        return [found[i] for i in table.image_id]


def own_fold_windows(views: Views, prep, table: pd.DataFrame) -> list:
    """Each training row's window from the lung run's out-of-fold boxes of the row's OWN fold j: found by lung model
    j, which never saw the image (views.LungBoxes.own_fold_windows)."""
    found = views.lungs.own_fold_windows(prep.meta, table, views.conf, views.margin)
    return [found[i] for i in table.image_id]


def crop_subset(table: pd.DataFrame, windows: list) -> tuple[np.ndarray, pd.DataFrame, list]:
    """(the rows that have a window, their table, their windows): the images a crop view is made of."""
    at = np.array([i for i, w in enumerate(windows) if w is not None], dtype=int)
    return at, table.iloc[at].reset_index(drop=True), [windows[i] for i in at]


# ---------------------------------------------------------------- inference


def infer(model, loader, device, amp_dtype=None, tta="none", loss_fn=None, progress: bool = False, outputs=None):
    """Run a model over a loader. Returns (indices, study probs (N,4), none probs (N,) or None, loss sums dict).

    tta: none | hflip | vflip | d4 (true = hflip, false = none): the mean of the probabilities of the views of each
    image (siimcovid.classify.tta), made of the batch on the device (the loss uses the plain image).
    outputs: the model's output -> (probabilities, none or None); default the study softmax and the none sigmoid
    (multi-label pretraining: the labels' sigmoid).
    """
    import torch
    from tqdm import tqdm

    from siimcovid.classify.data import to_device
    from siimcovid.classify.model import probabilities
    from siimcovid.classify.tta import apply, tta_views

    views = tta_views(tta)[1:]  # the first is the image as it is
    outputs = outputs or probabilities
    model.eval()
    idx, studies, nones, sums, n = [], [], [], {}, 0
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    with torch.inference_mode():
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress, leave=False):
            b = to_device(batch, device)
            with autocast:
                out = model(b["image"])
            study, none = outputs(out)
            if loss_fn is not None:
                parts = loss_fn(out, b["label"], b["none"], b["mask"], b.get("has_mask"))
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(study)
            for v in views:
                with autocast:
                    s2, n2 = outputs(model(apply(v, b["image"])))
                study = study + s2
                none = none + n2 if none is not None else None
            if views:
                study = study / (len(views) + 1)
                none = none / (len(views) + 1) if none is not None else None
            n += len(study)
            idx.append(b["index"].cpu())
            studies.append(study.cpu())
            if none is not None:
                nones.append(none.cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else None  # noqa: E731
    return cat(idx), cat(studies), cat(nones), {k: v for k, v in sums.items()} | {"n": n}


def resolve_run(run, project: str | Path) -> Path:
    for cand in (Path(str(run)), Path(project) / str(run)):
        if (cand / FILES.settings).is_file():
            return cand
    other = next((c for c in (Path(str(run)), Path(project) / str(run)) if (c / "detect.yaml").is_file()), None)
    if other is not None:
        raise SiimError(f"run '{run}': {other} is a detect run (its detect.yaml), not a classify one: `siimcovid detect predict`")
    raise SiimError(f"run '{run}' not found: no {FILES.settings} in {run} or {Path(project) / str(run)}")


def fold_done(fold_dir: Path) -> bool:
    """A fold whose training finished: `classify train` wrote its done.json last."""
    return (fold_dir / DONE).is_file()


def fold_checkpoints(run_dir: Path, allow_unfinished: bool = False, weights: str = "best") -> dict[int, Path]:
    """best.pt (or last.pt) of every fold; a fold still training (no done.json) is an error unless allowed."""
    return rundir.fold_checkpoints(run_dir, f"{weights}.pt", fold_done, allow_unfinished, "classify")


def checkpoint_folds_id(path: Path, ckpt: dict) -> str | None:
    """The fold fingerprint a fold's model was trained on: in the checkpoint, else in the fold's classify.yaml."""
    if ckpt.get("folds_id"):
        return ckpt["folds_id"]
    saved = path.parent / FILES.settings
    return rundir.read_run(saved).get("folds_id")


def load_checkpoint_model(path: Path, device, channels_last: bool = False):
    import torch

    from siimcovid.classify.checkpoints import BEST_KEYS
    from siimcovid.classify.model import build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a run's own checkpoint (a bundle: safetensors)
    if not isinstance(ckpt, dict) or not {"model", "model_cfg"} <= set(ckpt):
        raise SiimError(f"{path} is not a classify checkpoint (best.pt holds {', '.join(BEST_KEYS)})")
    model = build_model(ckpt["model_cfg"], pretrained=False, channels_last=channels_last)
    # last.pt holds the whole training state: evaluate its EMA weights, as best.pt stores them
    state = ckpt["ema"] if "optimizer" in ckpt and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval(), ckpt


def amp_dtype_for(device, amp: bool, precision: str | None = None):
    """The autocast dtype of inference: on a GPU (amp) bf16 or fp16; on the CPU bf16 where `precision` says so
    (siimcovid.engine.devices.cpu_precision), else None (fp32)."""
    import torch

    from siimcovid.engine.devices import cpu_precision

    if device.type == "cpu":
        return torch.bfloat16 if cpu_precision(device, precision) == "bf16" else None
    if not amp or device.type != "cuda":
        return None
    # bf16 needs Ampere or newer; is_bf16_supported() also says yes to emulated bf16 (T4, V100: slow)
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


@dataclass
class Inference:
    """How one run's fold models predict: device, precision, memory format, TTA and loader settings."""

    device: object
    amp_dtype: object
    channels_last: bool
    tta: str | bool  # a view name of siimcovid.classify.tta (true / false: hflip / none)
    loader_kw: dict
    load: Callable | None = None  # (weights file, device, channels_last) -> model; None: a run's own checkpoint
    views: Views | None = None  # crop=lung: the lung-crop views (None: the whole image only)

    def model(self, path: Path):
        """The model of one fold's weights file, on the device, in eval mode."""
        if self.load is not None:
            return self.load(path, self.device, self.channels_last)
        return load_checkpoint_model(path, self.device, self.channels_last)[0]

    def loader(self, dataset):
        from torch.utils.data import DataLoader

        return DataLoader(dataset, **self.loader_kw)


def run_inference(
    run_dir: Path,
    split: str,
    tta: str | bool,
    device,
    batch: int,
    workers: int,
    source=None,
    amp: bool = True,
    channels_last: bool = True,
    allow_unfinished: bool = False,
    weights: str = "best",
    views_cfg=None,
    precision: str | None = None,
):
    """What predicting one run needs: (prepared folder, image size, fold checkpoints, Inference); folds checked for oof.
    views_cfg: the settings of the views (crop=, lung=, ...: classify predict's), None for the whole image only;
    precision: on the CPU, fp32 / bf16 / auto (bf16: autocast and channels_last)."""
    from siimcovid.data.prepared import Prepared

    run_cfg = rundir.read_run(run_dir / FILES.settings)
    warn_other_views(run_cfg, views_cfg, str(run_dir))
    if run_cfg.get("label_names"):
        raise SiimError(
            f"{run_dir} is a multi-label pretraining run (labels {run_cfg['label_names']}): it predicts no study classes; "
            f"start a SIIM classifier from it with `classify train init={run_dir}`"
        )
    prep = Prepared(source or run_cfg["data"])
    size = prep.check_size(run_cfg["imgsz"])
    if split == "oof":
        prep.check_folds(run_cfg.get("folds_id"), str(run_dir))
    ckpts = fold_checkpoints(run_dir, allow_unfinished, weights)
    amp_dtype = amp_dtype_for(device, amp, precision)
    how = Inference(
        device,
        amp_dtype,
        (channels_last and device.type == "cuda") or (device.type == "cpu" and amp_dtype is not None),
        tta,
        {"batch_size": batch, "num_workers": workers, "pin_memory": device.type == "cuda"},
        views=Views.of(views_cfg, run_cfg.get("folds_id")) if views_cfg is not None else None,
    )
    return prep, size, ckpts, how


def run_family(run_dir: Path):
    """The family a classify run was trained with (its learned record; timm for runs of an earlier release)."""
    from siimcovid.engine.family import family_class

    path = Path(run_dir) / FILES.settings
    try:
        return family_class(rundir.read_run(path).get("family") or "timm", "classify")
    except SiimError as e:
        raise SiimError(f"{path}: the family it learned is not one of this siimcovid ({e})") from None


def predict_run(run_dir: Path, split: str, *args, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predict one run on oof or test; returns (image table, study table). Arguments: those of run_inference.
    A run of another family than timm predicts through its family (Family.predict_run)."""
    from siimcovid.config import Config
    from siimcovid.engine import folds
    from siimcovid.engine.devices import cpu_precision
    from siimcovid.engine.family import family_class

    family = run_family(run_dir)
    if not issubclass(family, family_class("timm", "classify")):
        if kwargs.get("views_cfg") is not None:
            raise SiimError(f"crop=lung: {run_dir} is a run of family={family.name}, which has no lung-crop views (crop=none)")
        tta, device, batch, workers, source, amp, channels_last, allow_unfinished, weights = args
        if not family.reads_precision and cpu_precision(device, kwargs.get("precision")) != "fp32":
            LOGGER.warning(f"{run_dir}: family={family.name} predicts in fp32 (it does not read precision=)")
        images = folds.predict_run(family(Config()), run_dir, split, device, source, allow_unfinished, weights)
        return images, study_table(images)
    prep, size, ckpts, how = run_inference(run_dir, split, *args, **kwargs)
    images = (predict_oof if split == "oof" else predict_test)(prep, size, ckpts, run_dir.name, how)
    return images, study_table(images)


def predict_run_folds(run_dir: Path, *args, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Predict one run on test (or a source's test split); returns (image table of the fold mean, study table,
    the per-fold table CLASSIFIER_FOLDS: each fold model's own probabilities, for honest per-fold pseudo-labels)."""
    prep, size, ckpts, how = run_inference(run_dir, "test", *args, **kwargs)
    images, folds = predict_test_folds(prep, size, ckpts, run_dir.name, how)
    return images, study_table(images), folds


@dataclass
class Source:
    """What one classify run predicts on: the prepared data, the image size, how (Inference), the `model` name;
    the test table and loader, built once for every fold."""

    prep: object
    size: int
    how: Inference
    name: str
    test: tuple | None = None

    def test_loader(self):
        from siimcovid.classify.data import StudyDataset, check_files, image_table

        if self.test is None:
            table = image_table(self.prep, "test")
            if table.empty:
                raise SiimError(f"{self.prep.root} has no test images (prepare with splits=train,test)")
            check_files(self.prep, table, self.size, masks=False)
            self.test = table, self.how.loader(StudyDataset(self.prep, table, self.size, masks=False))
        return self.test


def fold_model(src: Source, path: Path) -> tuple:
    """(model, its checkpoint record or None, path) of one fold: a run's own checkpoint, or Inference.load's."""
    if src.how.load is not None:
        return src.how.model(path), None, path
    model, ckpt = load_checkpoint_model(path, src.how.device, src.how.channels_last)
    return model, ckpt, path


def predict_fold(loaded: tuple, src: Source, fold: int, split: str):
    """One fold's model: on its held-out images (split train: the image table) or on the test images (the part
    (fold, study, none) in the test table's row order, averaged by join_folds)."""
    from siimcovid.classify.data import StudyDataset, check_files, image_table

    model, ckpt, path = loaded
    how = src.how
    if split == "test":
        table, loader = src.test_loader()
        idx, study, none, _ = infer(model, loader, how.device, how.amp_dtype, how.tta, progress=True)
        order = np.argsort(idx)
        study, none = study[order], none[order] if none is not None else None
        if how.views is not None:
            study, none = with_crop_views(model, src, fold, split, table, study, none)
        return fold, study, none
    table = image_table(src.prep, "train", src.prep.check_fold(fold), "val")
    check_files(src.prep, table, src.size, masks=False)
    if ckpt is not None:  # per fold, not only per run: `train resume=false fold=0` leaves the other folds as they were
        src.prep.check_folds(checkpoint_folds_id(path, ckpt), str(path.parent))
    loader = how.loader(StudyDataset(src.prep, table, src.size, masks=False))
    idx, study, none, _ = infer(model, loader, how.device, how.amp_dtype, how.tta, progress=True)
    LOGGER.info(f"{src.name} fold {fold}: predicted {len(table)} held-out images")
    table = table.iloc[idx].reset_index(drop=True)  # the rows in the order predicted
    if how.views is not None:
        study, none = with_crop_views(model, src, fold, split, table, study, none)
    return image_frame(table, study, none, src.name)


def with_crop_views(model, src: Source, fold: int, split: str, table: pd.DataFrame, study, none):
    """crop=lung: the whole view's probabilities (in the rows of `table`) fused with the lung-crop view's, by fold
    `fold`'s lung windows; rows without a window keep the whole view's."""
    from siimcovid.classify.data import StudyDataset

    how, views = src.how, src.how.views
    at, crops, windows = crop_subset(table, views.windows(src.prep, fold, table, split))
    LOGGER.info(
        f"{src.name} fold {fold} {'test' if split == 'test' else 'oof'}: {len(at)} of {len(table)} images also seen "
        f"cropped to the lungs (view_fusion={views.fusion})"
    )
    if not len(at):
        return study, none
    dataset = StudyDataset(src.prep, crops, src.size, masks=False, windows=windows)
    idx, crop_study, crop_none, _ = infer(model, how.loader(dataset), how.device, how.amp_dtype, how.tta, progress=True)
    order = np.argsort(idx)
    crop_none = crop_none[order] if crop_none is not None else None
    return fuse_views(study, none, at, crop_study[order], crop_none, views.fusion)


def run_folds(prep, size: int, ckpts: dict[int, Path], name: str, how: Inference, split: str):
    """The fold engine's prediction loop (family timm) over one split: {split: joined result}."""
    from siimcovid.config import Config
    from siimcovid.engine.family import family_class
    from siimcovid.engine.folds import predict

    return predict(family_class("timm", "classify")(Config()), Source(prep, size, how, name), ckpts, [split], how.device)[split]


def predict_oof(prep, size: int, ckpts: dict[int, Path], name: str, how: Inference) -> pd.DataFrame:
    """Each fold model on its own held-out images: the image table, fold by fold."""
    images = run_folds(prep, size, ckpts, name, how, "oof")
    missing = sorted(set(range(prep.n_folds)) - set(ckpts))
    if missing:
        LOGGER.warning(f"{name}: folds {missing} are not trained; OOF covers folds {sorted(ckpts)} only")
    return images


def fold_probabilities(prep, size: int, ckpts: dict[int, Path], how: Inference, name: str):
    """Every fold model on every test image: (the test image table, [(fold, study (N,4), none (N,) or None)]),
    the probabilities in the table's row order."""
    table, per_fold = run_folds(prep, size, ckpts, name, how, "test")
    LOGGER.info(f"{name}: predicted {len(table)} test images with {len(ckpts)} fold models (tta={view(how.tta)})")
    return table, per_fold


def mean_over_folds(table: pd.DataFrame, per_fold: list, name: str) -> pd.DataFrame:
    """The image table of the fold models' mean probabilities (fold = -1)."""
    study_sum, none_sum, none_ok = 0.0, 0.0, True
    for _, study, none in per_fold:
        study_sum = study_sum + study
        none_ok = none_ok and none is not None
        none_sum = none_sum + (none if none is not None else 0.0)
    k = len(per_fold)
    return image_frame(table, study_sum / k, none_sum / k if none_ok else None, name)


def each_fold(table: pd.DataFrame, per_fold: list, name: str) -> pd.DataFrame:
    """The CLASSIFIER_FOLDS table: one row per (fold model, test image), fold = the model's fold."""
    parts = [image_frame(table.assign(fold=fold), study, none, name) for fold, study, none in per_fold]
    return CLASSIFIER_FOLDS.check(pd.concat(parts, ignore_index=True))


def predict_test(prep, size: int, ckpts: dict[int, Path], name: str, how: Inference) -> pd.DataFrame:
    """Every fold model on every test image: the image table of their mean probabilities."""
    table, per_fold = fold_probabilities(prep, size, ckpts, how, name)
    return mean_over_folds(table, per_fold, name)


def predict_test_folds(prep, size: int, ckpts: dict[int, Path], name: str, how: Inference) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every fold model on every test image: (the mean image table, as predict_test; the per-fold table)."""
    table, per_fold = fold_probabilities(prep, size, ckpts, how, name)
    return mean_over_folds(table, per_fold, name), each_fold(table, per_fold, name)


def main(cfg) -> dict[str, dict[str, Path]]:
    """Predict each run (or reuse its tables), combine several runs, score the OOF split.

    Returns, per run (and ensemble) folder name, the files written: {split: image table,
    "<split>_study": study table, "scores": scores_oof.csv}, as `detect predict` does."""
    from siimcovid.classify.none import refuse_none_runs
    from siimcovid.engine.devices import check_run_precision, torch_device

    runs = [resolve_run(r, cfg.project) for r in as_list(cfg.run)]
    if not runs:
        raise SiimError("predict needs run=<name or dir> (several: run=a,b)")
    refuse_none_runs(runs, cfg.per_fold)  # task=none: predicted alone, its own table (siimcovid.classify.none)
    device = torch_device(cfg.device)
    check_run_precision("classify", device, cfg.get("precision"), cfg.source)
    if len(runs) > 1:  # before any prediction: a user's file in the way stops it at once
        open_ensemble_dir(cfg, runs)
    written: dict[str, dict[str, Path]] = {}
    for split in as_list(cfg.split):
        for run_dir, images, studies in split_tables(cfg, runs, split, device):
            files = written.setdefault(run_dir.name, {})
            files.update(run_table_paths(run_dir, split))
            if split == "oof":
                files["scores"] = write_scores(cfg, run_dir, runs, images, studies)
            LOGGER.info(f"{run_dir.name}: wrote {', '.join(str(files[k]) for k in run_table_paths(run_dir, split))}")
    return written


def split_tables(cfg, runs: list[Path], split: str, device) -> list[tuple[Path, pd.DataFrame, pd.DataFrame]]:
    """(folder, image table, study table) of each run (predicted and written, or reused), then of their ensemble."""
    per_run = []
    for run_dir in runs:
        if cfg.reuse and len(runs) > 1:
            images, studies = read_tables(run_dir, split)
        else:
            how = (cfg.tta, device, cfg.batch, cfg.workers, cfg.source, cfg.amp, cfg.channels_last)
            how += (cfg.allow_unfinished, cfg.weights)
            crops = (cfg.get("crop") or "none") != "none"
            views = {"views_cfg": cfg} if crops else {}  # crop=none: as before
            views["precision"] = cfg.get("precision")
            if cfg.per_fold and split == "test":
                images, studies, folds = predict_run_folds(run_dir, *how, **views)
                CLASSIFIER_FOLDS.write(folds, folds_path(run_dir))
                LOGGER.info(f"{run_dir.name}: wrote each fold model's test predictions to {folds_path(run_dir)}")
            else:
                images, studies = predict_run(run_dir, split, *how, **views)
            write_run_tables(run_dir, split, images, studies)
            if not cfg.source and split == "test":  # what made the run's test tables: `siimcovid export` packs these
                saved = {"tta": view(cfg.tta), "weights": cfg.weights} | view_record(cfg, "classify")
                rundir.save_predict_settings(run_dir, saved)
        per_run.append((run_dir, images, studies))
    if len(runs) > 1:
        out_dir = ensemble_dir(cfg)
        images = combine([r[1] for r in per_run], cfg.ensemble)
        studies = combine([r[2] for r in per_run], cfg.ensemble)
        write_tables(out_dir, split, images, studies)
        per_run.append((out_dir, images, studies))
    return per_run


def write_scores(cfg, run_dir: Path, runs: list[Path], images: pd.DataFrame, studies: pd.DataFrame) -> Path:
    """scores_oof.csv of a run's (or an ensemble's) OOF tables (full precision, as every stage writes it)."""
    from siimcovid.classify.none import is_none_run, none_scores
    from siimcovid.data.prepared import Prepared

    prep, none_model = Prepared(cfg.source or run_data(run_dir, runs)), is_none_run(run_dir)
    scores = none_scores(prep, images) if none_model else oof_scores(prep, images, studies)  # task=none: AP(none) alone
    table = scores.assign(model=run_dir.name, tta=view(cfg.tta), weights=cfg.weights)
    path = SCORES.write(table, run_dir / "scores_oof.csv")
    overall = table.iloc[0]
    study = "" if none_model else f"study mAP {overall.study_map:.4f}  "
    LOGGER.info(
        f"{run_dir.name}: OOF {study}AP(none) {overall.get('none', float('nan')):.4f}  "
        f"({overall.n_studies} studies, tta={view(cfg.tta)})\n{table.to_string(index=False)}"
    )
    return path


ENSEMBLE_RECORD = "ensemble.yaml"  # an ensemble folder's record (siimcovid.outputs.Written)
ENSEMBLE_KEYS = ("runs", "ensemble", "tta", "weights")  # what an ensemble is, recorded beside the files written


def ensemble_dir(cfg) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.project) / "ensemble"


def open_ensemble_dir(cfg, runs: list[Path]):
    """The ensemble folder by the outputs rule (module docstring), every table of this command checked before any
    prediction; the tables of another ensemble there (those its record lists) are removed, not left stale.

    Otherwise `split=oof` with runs a,b then `split=test` with runs a,c would leave OOF tables of
    one ensemble beside test tables of another, and fusion would tune on one and apply to the other.
    """
    from siimcovid.outputs import open_out

    out_dir, splits = ensemble_dir(cfg), as_list(cfg.split)
    tables = [p for split in splits for p in table_paths(out_dir, split)]
    tables += [out_dir / "scores_oof.csv"] if "oof" in splits else []
    definition = dict(zip(ENSEMBLE_KEYS, ([str(Path(r).resolve()) for r in runs], cfg.ensemble, view(cfg.tta), cfg.weights)))
    sources = [*runs, cfg.source]
    written = open_out(
        out_dir, ENSEMBLE_RECORD, "classify", cfg.overwrite, sources, earlier=earlier_ensemble, check=tables
    )
    if written.data and same_tta(written.data) != definition:
        gone = written.remove_all()
        LOGGER.warning(f"{out_dir} held another ensemble: removed its {len(gone)} prediction file(s)")
    written.data = definition
    written.claim(*tables)
    written.save()
    return written


def same_tta(record: dict) -> dict:
    """An ensemble record whose tta is true / false (tta on or off, as it was) with the view name it meant."""
    return {**record, "tta": view(record["tta"])} if isinstance(record.get("tta"), bool) else record


def earlier_ensemble(out_dir: Path):
    """An ensemble folder of a release before the outputs rule (outputs.Earlier): its ensemble.yaml held the ensemble
    only, without siimcovid's first line; the tables of the ensemble's names there become its own."""
    from siimcovid.outputs import Earlier, is_record, present, read_mapping

    record = out_dir / ENSEMBLE_RECORD
    data = read_mapping(record)
    if is_record(record) or data is None or set(data) != set(ENSEMBLE_KEYS):
        return None
    return Earlier(present(out_dir, ["scores_oof.csv"], ["pred_*_image.csv", "pred_*_study.csv"]), data)


def run_data(run_dir: Path, runs: list[Path]) -> str:

    src = run_dir if (run_dir / FILES.settings).is_file() else runs[0]
    return rundir.read_run(src / FILES.settings)["data"]
