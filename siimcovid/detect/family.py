"""The Ultralytics YOLO detector as a model family (`family=yolo`, the default of `siimcovid detect`).

What is its own: the data (prepare's per-fold data YAMLs, siimcovid.detect.common), one fold's training (an
Ultralytics YOLO training with the checkpoint-safe trainers of siimcovid.detect.train), its fold state (the
checkpoint says: Ultralytics strips last.pt's optimizer at the end), its TTA (Ultralytics' flips and scales), and
its predictions (tables.DETECTIONS). The fold engine (siimcovid.engine.folds) does the rest.

Training events: Ultralytics' callbacks call siimcovid's events (siimcovid.engine.events) with a view of the fold
(YoloView: siimcovid's attributes, and every attribute of Ultralytics' trainer: trainer.start_epoch, save_dir, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from siimcovid.detect.files import FILES
from siimcovid.engine.family import Family, FoldData, FoldView, Job, register_family
from siimcovid.utils import LOGGER, SiimError

ULTRALYTICS_EVENTS = ("on_train_start", "on_train_epoch_start", "on_train_epoch_end", "on_model_save")
NOT_MAPPED = ("on_train_data", "on_loss")  # a classifier's loop events: Ultralytics builds its data and loss itself


class YoloView(FoldView):
    """What siimcovid's events see of an Ultralytics training: the fold's attributes, then Ultralytics' trainer's."""

    ultralytics = None

    def __getattr__(self, name: str) -> Any:  # only for names not set: Ultralytics' trainer's
        trainer = self.__dict__.get("ultralytics")
        if trainer is None:
            raise AttributeError(name)
        return getattr(trainer, name)


def epoch_row(trainer) -> dict:
    """The epoch's results.csv row as Ultralytics logs it: epoch, train losses, metrics, lr."""
    row = {"epoch": trainer.epoch + 1}
    row.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
    row.update({k: float(v) for k, v in (trainer.metrics or {}).items()})
    row.update(getattr(trainer, "lr", {}) or {})
    return row


def ultralytics_callbacks(hooks: dict, view: YoloView) -> dict:
    """siimcovid's events as Ultralytics callbacks (on each, view.ultralytics is Ultralytics' trainer)."""

    def call(event: str, *extra):
        def fn(trainer):
            view.ultralytics, view.epoch = trainer, getattr(trainer, "epoch", getattr(trainer, "start_epoch", 0)) + 1
            view.is_main = getattr(trainer.args, "rank", -1) in (-1, 0)
            for hook in hooks.get(event, []):
                hook(view, *(e(trainer) for e in extra))

        return fn

    out = {event: call(event) for event in ULTRALYTICS_EVENTS if hooks.get(event)}
    if hooks.get("on_fit_epoch_end"):
        out["on_fit_epoch_end"] = call("on_fit_epoch_end", epoch_row)
    if hooks.get("on_train_end"):
        out["on_train_end"] = call("on_train_end", train_summary)
    return out


def pretrain_routine(job: Job, view: YoloView, own_mlflow: bool):
    """Before Ultralytics' training: siimcovid's is_better (the last one added decides) on the trainer, and with
    tracking=mlflow (siimcovid's MLflow run of the fold) Ultralytics' own MLflow callbacks off."""
    rules = job.callbacks.get("is_better") or []

    def start(trainer) -> None:
        view.ultralytics = trainer
        if rules:
            trainer.is_better = lambda stats, best: rule(trainer, stats, best)

    def rule(trainer, stats: dict, best: dict) -> bool:
        view.epoch = trainer.epoch + 1  # the epoch validated
        return bool(rules[-1](view, stats, best))
        if own_mlflow:
            without_ultralytics_mlflow(trainer)

    return start


def without_ultralytics_mlflow(trainer) -> None:
    """Ultralytics' own MLflow callbacks off for this trainer only (its settings file is the user's: left as it is)."""
    from ultralytics.utils.callbacks import mlflow

    for event, fn in mlflow.callbacks.items():
        if fn in trainer.callbacks.get(event, []):
            trainer.callbacks[event].remove(fn)


def train_summary(trainer) -> dict:
    best = trainer.best_fitness
    return {"best_score": float(best) if best is not None else math.nan, "epochs": trainer.epochs, "fold": None}


def check_task(cfg) -> None:
    """task=lung learns the lung boxes of data= alone: extra= images hold opacity boxes, and a lung detector crops
    the images itself (crop=lung needs one)."""
    if cfg.get("task") != "lung":
        return
    if cfg.get("extra"):
        raise SiimError("detect task=lung trains on the lung boxes of data= only: extra= adds images of opacity boxes")
    if cfg.get("crop") == "lung":
        raise SiimError("detect task=lung is the lung detector that crop=lung crops with: train it with crop=none")


@register_family("yolo")
class YoloFamily(Family):
    stage, output, files = "detect", "det", FILES
    resolve_run_dir = True
    crops = True  # crop=lung: predict_images sees each image whole and cropped to its lungs; training adds the crops
    derived = ("data_yamls",)  # prepare's YAMLs, then the run's own with extra= (before_folds): data= and extra= decide
    reads_precision = True  # predict_images and detect_arrays under cpu_autocast

    @classmethod
    def bundle_kind(cls):
        """A member of a bundle: siimcovid.bundle.members.KINDS["detect"] (safetensors + a checked description)."""
        from siimcovid.bundle.members import KINDS

        return KINDS["detect"]

    def open_data(self) -> FoldData:
        from siimcovid.config import default_name
        from siimcovid.data.prepared import Prepared
        from siimcovid.detect.common import check_model, resolve_data, select_folds

        cfg = self.cfg
        check_task(cfg)
        if cfg.get("lung"):  # recorded as an absolute path, like data=: a resume from elsewhere reads the same lung run
            cfg.lung = str(Path(cfg.lung).resolve())
        source = resolve_data(cfg.data, cfg.data_yaml_dir, cfg.task)
        folds = select_folds(cfg.fold, source)
        for k in folds:
            source.yaml(k)  # every YAML must exist before the first fold starts
        self.source, self.model = source, check_model(cfg.model)
        if isinstance(cfg.pretrained, str):
            check_model(cfg.pretrained, "pretrained")
        folds_id = Prepared(source.prepared).folds_id
        stem = f"{source.name}-{'lung-' if cfg.task == 'lung' else ''}{Path(self.model).stem}"
        name = default_name("detect", stem, "the dataset, the task and the model")
        learned = {"prepared": str(source.prepared), "size": source.size, "n_folds": source.n_folds}
        learned["data_yamls"] = {k: str(p.resolve()) for k, p in source.yamls.items()}
        return FoldData(source, source.n_folds, folds, folds_id, name, [source.prepared, *source.yamls.values()], learned)

    def check_init(self, path: Path) -> None:
        from siimcovid.detect.common import warn_if_foreign

        if path.suffix != ".pt":
            raise SiimError(f"init={self.cfg.init}: {path} is not a .pt weights file")
        warn_if_foreign(path, "init")

    def check(self, data: FoldData) -> None:
        from siimcovid.detect.common import load_hyp, train_args
        from siimcovid.detect.distill import check_student, prepare_run
        from siimcovid.engine.devices import parse
        from siimcovid.engine.swa import check_swa

        check_student(self.cfg)
        check_swa(self.cfg, self.cfg.epochs)
        if self.cfg.get("swa_epochs") and (parse(self.cfg.device).count or 0) > 1:  # DDP's processes: not reached
            raise SiimError(f"swa_epochs > 0 trains on one device, not device={self.cfg.device} (Ultralytics' DDP)")
        hyp = load_hyp(self.cfg.hyp)
        self.args = train_args(self.cfg, hyp)
        if self.cfg.init:  # Ultralytics transfers every tensor of it whose name and shape match
            self.args["pretrained"] = str(self.init_path)
            LOGGER.info(f"detect: init from {self.init_path} (Ultralytics logs how many tensors it transferred)")
        data.learned.update(hyp_values=hyp, folds_id=data.folds_id)
        self.teachers = prepare_run(self.cfg, data.folds_id, data.folds, data)

    def own_fold(self, folder: Path, own_run: bool) -> bool:
        from siimcovid.detect.train import own_fold

        return own_run and own_fold(folder)

    def fold_state(self, folder: Path) -> str:
        from siimcovid.detect.common import fold_state

        return fold_state(folder)

    def check_resume(self, run_dir: Path, data: FoldData, states: dict[int, str]) -> None:
        from siimcovid.detect.common import check_run_dataset
        from siimcovid.detect.train import check_fold_settings
        from siimcovid.rundir import fold_dir, trained_any

        if trained_any(run_dir, self.files.last):  # before that, another data= may take the name
            check_run_dataset(run_dir, self.source)
        for k, state in states.items():  # before the run's settings are saved over those the folds were trained with
            if state in ("done", "partial"):
                check_fold_settings(fold_dir(run_dir, k), self.args, self.model)

    def learned(self, data: FoldData) -> dict:
        return {**super().learned(data), "model": self.model}  # the model file check_model resolved

    def before_folds(self, run_dir: Path, data: FoldData, folds: list[int]) -> dict:
        from siimcovid.detect.train import fold_yamls

        lungs, teachers = self.lung_boxes(data.folds_id), getattr(self, "teachers", [])
        self.yamls = fold_yamls(self.cfg, self.source, folds, run_dir, lungs, teachers)
        return {"data_yamls": {**data.learned["data_yamls"], **{k: str(p.resolve()) for k, p in self.yamls.items()}}}

    def callbacks(self, data: FoldData) -> dict:
        return {}

    def train_fold(self, job: Job) -> str:
        from siimcovid.detect.train import train_fold
        from siimcovid.engine.devices import parse

        given = [e for e in NOT_MAPPED if job.callbacks.get(e)]
        if given:
            raise SiimError(f"family=yolo: Ultralytics' training loop has no {', '.join(given)} event")
        args = self.args if job.device == self.cfg.device else {**self.args, "device": job.device}
        if (parse(args.get("device")).count or 0) > 1 and any(job.callbacks.values()):
            LOGGER.warning(
                f"detect: device={args['device']} trains with Ultralytics' DDP in processes of its own, which siimcovid's "
                "events and tracking= do not reach; Ultralytics' own integrations (`yolo settings`) do"
            )
        view = YoloView(self, job)
        hooks = ultralytics_callbacks(job.callbacks, view)
        own_mlflow = self.cfg.get("tracking") == "mlflow"
        if job.callbacks.get("is_better") or own_mlflow:
            hooks["on_pretrain_routine_start"] = pretrain_routine(job, view, own_mlflow)
        data_yaml = self.yamls[job.fold].resolve()
        swa = (int(self.cfg.get("swa_epochs") or 0), self.cfg.get("swa_lr"))
        return train_fold(args, self.model, data_yaml, job.run_dir, job.fold, self.cfg.fitness, hooks, job.state, swa)

    def skipped(self, job: Job) -> str:
        return "skipped"

    def report(self, run_dir: Path, data: FoldData, results: dict) -> None:
        from siimcovid.detect.train import fold_summary

        summary = fold_summary(run_dir, data.folds)
        LOGGER.info(f"detect train: {run_dir} ({', '.join(f'fold{k} {v}' for k, v in results.items())})")
        if len(summary):
            LOGGER.info(summary.to_string(index=False))

    # ---------------------------------------------------------------- prediction

    def load_fold(self, run, fold: int, path: Path, device) -> tuple:
        """(Ultralytics YOLO, its predict arguments) of one fold's weights."""
        from ultralytics import YOLO

        from siimcovid.detect.predict import predict_args

        try:
            yolo = run.load(path) if run.load else YOLO(str(path))
        except SiimError:
            raise
        except Exception as e:
            raise SiimError(f"{path} cannot be loaded ({type(e).__name__}: {e})") from None
        return yolo, {**predict_args(self.cfg), "imgsz": self.cfg.predict_imgsz or run.imgsz[fold]}

    def oof_ids(self, run, fold: int) -> list[str]:
        return list(run.prepared.fold(fold, "val").image_id)

    def test_ids(self, run) -> list[str]:
        ids = list(run.prepared.split("test").image_id)
        if not ids:
            LOGGER.warning(f"detect predict: {run.prepared.root} has no test images")
        return ids

    def predict_images(self, model, run, fold: int, image_ids: list[str], split: str) -> pd.DataFrame:
        from siimcovid.detect.predict import predict_images
        from siimcovid.engine.devices import cpu_autocast

        yolo, args = model
        lungs = self.lung_boxes(run.prepared.folds_id)
        if lungs is None:
            with cpu_autocast(args.get("device"), self.cfg.get("precision")):  # precision=bf16 on the CPU
                return predict_images(yolo, run, fold, image_ids, split, args)
        from siimcovid.tables import DETECTIONS
        from siimcovid.views import detect_views

        desc = f"predict {run.name} fold {fold} {split} (whole + lung crop)"
        detector = lambda arrays: self.detect_arrays(model, arrays, args["augment"])  # noqa: E731
        found = detect_views(detector, run.prepared, run.size, fold, image_ids, split, lungs, self.cfg, desc)
        found["model"], found["fold"] = run.name, fold
        return found[DETECTIONS.required]

    def detect_arrays(self, model, images: list, tta: bool) -> list:
        """Boxes of each image (uint8 gray or BGR, any size: Ultralytics letterboxes it to imgsz), (n, 5) [x_min, y_min,
        x_max, y_max, conf] in that array's pixels (Ultralytics undoes its letterbox)."""
        import numpy as np

        from siimcovid.engine.devices import cpu_autocast

        yolo, args = model
        arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]
        batch, out = max(int(args.get("batch") or 1), 1), []
        for start in range(0, len(arrays), batch):
            with cpu_autocast(args.get("device"), self.cfg.get("precision")):
                results = yolo.predict(arrays[start : start + batch], **{**args, "augment": tta})
            for result in results:
                xyxy = result.boxes.xyxy.cpu().numpy().astype(np.float64).reshape(-1, 4)
                conf = result.boxes.conf.cpu().numpy().astype(np.float64).reshape(-1, 1)
                out.append(np.hstack([xyxy, conf]))
        return out

    def join(self, run, parts: list[pd.DataFrame], split: str) -> pd.DataFrame:
        from siimcovid.detect.predict import no_detections

        return pd.concat(parts, ignore_index=True) if parts else no_detections()
