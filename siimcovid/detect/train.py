"""`siimcovid detect train`: one Ultralytics YOLO training per fold into <project>/<name>/fold<k>/.

Each fold trains from the data YAML `siimcovid prepare` wrote (data_yaml/<name>_fold<k>.yaml)
with a hyperparameter preset (siimcovid/cfg/hyp/) under the command-line settings. Re-running
the same command skips folds that finished and resumes an interrupted fold from its last.pt
(Ultralytics resume), so folds can also go to different machines: `fold=k` on each.
`device=0,1` trains one fold with Ultralytics DDP over two GPUs. `engine=ray` trains the folds in parallel, each as a
Ray task (siimcovid/ray_engine.py) running train_fold as the serial path does, on at most one GPU each (DDP inside a
Ray task is refused: siimcovid.engine.devices.check_ray). The fold engine (siimcovid.engine.folds) runs the folds; this
module holds what one Ultralytics fold is (the family: siimcovid.detect.family).

A kill at any instant costs at most the epoch in progress: the trainers write every checkpoint
through a temporary file and a rename (last.pt last, as the commit of an epoch), a resume trims
results.csv to the epochs its last.pt holds, and the settings a fold started with are kept in
args_start.yaml (Ultralytics' resume rewrites args.yaml with model=<fold>/weights/last.pt), so a
fold resumes, and a finished one is skipped, however often it was interrupted.

Pretraining and extra data: `data=<a prepared folder of layout rsna>` trains on its boxes like on SIIM's;
`init=<a detect run dir or .pt>` starts every fold from those weights (Ultralytics' pretrained=<weights>: each
tensor whose name and shape match; it logs "Transferred N/M items from pretrained weights");
`extra=<dir>[,<dir>]` adds ExtraData(dir).detector_images(fold, size) to every fold's TRAINING list through a
data YAML of the run's own (<run>/data/fold<k>.yaml), its validation list unchanged.

SWA (swa_epochs, swa_lr; siimcovid.engine.swa; one process only, not Ultralytics' DDP): the last swa_epochs epochs
average the model's own weights (Ultralytics' raw model, not its ModelEMA: the EMA still validates each epoch and
picks best.pt until the end), at swa_lr (SWALR, set again after each epoch's scheduler step; the warmup's
iterations, if they reach that far, set their own). The average travels in last.pt under "swa" (a resume puts it
back; the raw model it goes on averaging is the one Ultralytics' resume rebuilds from its EMA, so a resumed fold is
close to, not equal to, an uninterrupted one). When the training stops (its last epoch, or early stopping), the
average's batch-norm statistics are recomputed over the training loader (update_bn) and it is saved as the
checkpoint's "ema", Ultralytics' own format, in last.pt and best.pt both (so the final validation, `detect predict`
and a bundle read it unchanged); the stripped checkpoints keep "swa": {swa: true, swa_epochs, n_averaged}, the fold's
record.

The run folder is the run's own when its detect.yaml is one a training saved, a fold folder when the args.yaml
Ultralytics wrote there names it (siimcovid.rundir's outputs rule): another folder that holds files is refused
unless overwrite=true, which trains beside them, never over a file of the names a training writes (family.FILES).
"""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable
from unittest import mock

import pandas as pd
import torch
import ultralytics.engine.trainer as ultralytics_trainer
import yaml
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import strip_optimizer, unwrap_model

from siimcovid.config import Config, runtime_keys
from siimcovid.data.extra import open_extra
from siimcovid.data.prepared import Prepared
from siimcovid.detect.common import TRAIN_KEYS, ULTRALYTICS_RUNTIME_KEYS, extra_data_yaml, fold_state
from siimcovid.detect.files import FILES, START_ARGS
from siimcovid.engine.swa import SWA, SWA_KEY
from siimcovid.outputs import read_mapping
from siimcovid.rundir import changed_settings, fold_dir, refuse_changed
from siimcovid.tables import read_csv
from siimcovid.utils import LOGGER, atomic_path, atomic_write_text

MAP50 = "metrics/mAP50(B)"
# What a resume passes on to Ultralytics (it lets a resume change these): the train keys that may differ between a
# run and its resume. The others, batch included, are refused by check_fold_settings when changed, so the
# resumed fold keeps them from its checkpoint.
RESUME_KEYS = tuple(k for k in TRAIN_KEYS if k in runtime_keys("detect"))


class AtomicFile(type(Path())):
    """A checkpoint path whose write_bytes goes through a temporary file and os.replace (siimcovid.utils.atomic_path):
    a kill leaves the previous file or the new one, never a truncated one."""

    def write_bytes(self, data) -> int:
        with atomic_path(self) as tmp:
            tmp.write_bytes(data)
        return len(data)


class PendingFile(AtomicFile):
    """last.pt during a save: held until the other checkpoints are written, then committed (AtomicSaveTrainer)."""

    def write_bytes(self, data) -> int:
        self.data = data
        return len(data)

    def commit(self) -> None:
        if getattr(self, "data", None) is not None:
            AtomicFile(self).write_bytes(self.data)
            self.data = None


def strip_optimizer_atomically(f, s: str = "", updates: dict | None = None) -> dict:
    """Ultralytics' strip_optimizer (the end of a training: last.pt and best.pt lose their optimizer), written through
    a temporary file: it torch.saves over the checkpoint in place otherwise."""
    target, stripped = Path(s or f), {}

    class NotACheckpoint(Exception):
        pass

    try:
        with atomic_path(target) as tmp:
            stripped = strip_optimizer(f, str(tmp), updates)
            if not stripped:  # not an Ultralytics checkpoint: it wrote nothing, leave the file as it is
                raise NotACheckpoint
    except NotACheckpoint:
        pass
    return stripped


def keep_epochs(csv: Path, epochs: int) -> None:
    """results.csv as far as the checkpoint goes: its header and the rows of epochs 1..`epochs`.

    Ultralytics appends an epoch's row before it saves last.pt, so a kill in between (or in the append) leaves a
    row, maybe half of one, that the resumed epoch would append again. No epochs: no file.
    """
    if not csv.is_file():
        return
    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = lines[:1] if lines and lines[0].endswith("\n") else []
    for line in lines[1:] if keep else []:
        head = line.split(",", 1)[0].strip()
        if not line.endswith("\n") or not head.isdigit() or int(head) > epochs:
            break
        keep.append(line)
    if len(keep) <= 1 and epochs == 0:
        csv.unlink()
        LOGGER.info(f"detect: removed {csv} of an attempt killed before its first checkpoint")
    elif keep != lines:
        atomic_write_text(csv, "".join(keep))
        LOGGER.info(f"detect: {csv} trimmed to epochs 1-{epochs}, those its last.pt holds (the rest was written before a kill)")


class AtomicSaveTrainer(DetectionTrainer):
    """Ultralytics' DetectionTrainer whose checkpoints survive a kill at any instant.

    Ultralytics writes last.pt, best.pt (and epoch<k>.pt) in place: a kill while saving truncates last.pt and the fold
    cannot resume. Here each goes through a temporary file and a rename, last.pt after the others: once last.pt says
    an epoch is done, best.pt is as of that epoch too. The final strip of the optimizer is atomic as well.
    Kept at module level: DDP pickles the trainer class by reference into the script torchrun runs.
    """

    swa: SWA | None = None  # swa_epochs > 0: set on the trainer by train_fold (module docstring)

    def save_model(self):
        paths, final = (self.wdir, self.last, self.best), self.swa_weights()
        self.wdir, self.best = AtomicFile(self.wdir), AtomicFile(self.best)
        self.last = last = PendingFile(paths[1])
        try:
            with self.swa_in_checkpoint(final):
                saved = super().save_model()
            if final is not None:  # best.pt holds the SWA weights too
                self.best.write_bytes(last.data)
        finally:
            self.wdir, self.last, self.best = paths
        last.commit()
        return saved

    def swa_weights(self):
        """When the training stops with SWA epochs averaged: the average, batch-norm recomputed (else None)."""
        if self.swa is None or not self.stop or not self.swa.n_averaged:
            if self.swa is not None and self.stop:
                LOGGER.warning(f"detect: {self.save_dir} stopped before its first SWA epoch: no SWA weights")
            return None
        batches = (self.preprocess_batch(batch)["img"] for batch in self.train_loader)
        with torch.autocast(self.device.type, enabled=bool(self.amp)):
            return self.swa.final_model(batches)

    @contextmanager
    def swa_in_checkpoint(self, final):
        """The checkpoint Ultralytics serializes gains "swa" (the average so far); final: the SWA weights stand in for
        its "ema", and "swa" becomes the fold's record."""
        if self.swa is None:
            yield
            return
        record = {"swa": True, "swa_epochs": self.swa.epochs, "n_averaged": self.swa.n_averaged}
        extra = record if final is not None else self.swa.state_dict()
        save, ema = torch.save, self.ema.ema

        def with_swa(obj, f, *args, **kwargs):
            return save({**obj, SWA_KEY: extra} if isinstance(obj, dict) and "ema" in obj else obj, f, *args, **kwargs)

        if final is not None:
            self.ema.ema = final
        try:
            with mock.patch.object(ultralytics_trainer.torch, "save", with_swa):
                yield
        finally:
            self.ema.ema = ema
        if final is not None:
            LOGGER.info(f"detect: {self.save_dir}: SWA of {self.swa.n_averaged} epochs; best.pt and last.pt hold it")

    def _model_train(self):
        """Each epoch, after the scheduler's step: SWALR's swa_lr in the SWA epochs."""
        super()._model_train()
        if self.swa is not None:
            self.swa.set_lr(self.optimizer, self.epoch + 1)

    def swa_update(self) -> None:
        """on_train_epoch_end: the raw model's weights join the average in the SWA epochs."""
        if self.swa is not None:
            self.swa.update(unwrap_model(self.model), self.epoch + 1)

    def final_eval(self):
        with mock.patch.object(ultralytics_trainer, "strip_optimizer", strip_optimizer_atomically):
            return super().final_eval()

    def resume_training(self, ckpt):
        super().resume_training(ckpt)
        if RANK in {-1, 0}:  # before the first epoch appends its row
            keep_epochs(self.csv, self.start_epoch if self.resume else 0)
        if self.swa is not None and self.resume and ckpt:
            self.swa.load_state_dict(ckpt.get(SWA_KEY), unwrap_model(self.model))
            LOGGER.info(f"detect: {self.save_dir} resumes SWA with {self.swa.n_averaged} epochs averaged")

    is_better = None  # siimcovid's checkpoint rule ((stats, best) -> bool), set on a trainer by the yolo family

    def validate(self):
        """The validation of the fitness rule (validated), then siimcovid's is_better event when one was given: it
        decides whether this epoch's checkpoint is best.pt (the first epoch's always is)."""
        best_before = self.best_fitness
        metrics, fitness = self.validated()
        if self.is_better is not None and metrics:
            best = {"score": best_before if best_before is not None else -math.inf, "epoch": getattr(self, "best_epoch", 0)}
            if best_before is None or self.is_better({**metrics, "fitness": fitness}, best):
                self.best_fitness, self.best_epoch = fitness, self.epoch + 1
            else:  # Ultralytics saves best.pt when best_fitness == fitness: a tie the rule refused is one ulp below
                self.best_fitness = best_before if best_before != fitness else math.nextafter(best_before, -math.inf)
        return metrics, fitness

    def validated(self):
        return super().validate()


class Map50Trainer(AtomicSaveTrainer):
    """Ultralytics ranks checkpoints by mAP50-95; the competition scores boxes at IoU 0.5.

    With this trainer best.pt, early stopping (patience) and the fitness in the checkpoint follow
    the validation mAP@0.5 instead.
    """

    def validated(self):
        best_before = self.best_fitness
        metrics, fitness = super().validated()
        if metrics and MAP50 in metrics:
            fitness = float(metrics[MAP50])
            self.best_fitness = fitness if best_before is None or fitness > best_before else best_before
        return metrics, fitness


TRAINERS = {"map50": Map50Trainer, "map50-95": AtomicSaveTrainer}  # by detect.yaml's `fitness`, whose spec lists these


def check_fold_settings(folder: Path, cfg_args: dict, model: str) -> None:
    """Refuse to skip or resume a fold trained with other settings (its scores would be reported under the new ones)."""
    saved = folder / START_ARGS  # a resumed fold's args.yaml says model=<fold>/weights/last.pt
    if not saved.is_file():
        saved = folder / "args.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    changed = changed_settings(old, cfg_args, runtime_keys("detect") | ULTRALYTICS_RUNTIME_KEYS)
    was = old.get("model")
    if was and not own_last(folder, was) and Path(str(was)).name != Path(model).name:
        changed.insert(0, ("model", was, model))
    refuse_changed(folder, changed, f"use another name=, or delete {folder} to train it again")


def own_last(folder: Path, model) -> bool:
    """The model a resume records: the fold's own weights/last.pt (wherever the run was when it resumed).

    A fold resumed before args_start.yaml existed has no other record of its model, which then goes unchecked.
    """
    return Path(str(model)).parts[-3:] == (folder.name, "weights", "last.pt")


def keep_start_args(folder: Path) -> None:
    """Before a fold's first resume: args.yaml (the settings it started with) -> args_start.yaml."""
    args, start = folder / "args.yaml", folder / START_ARGS
    if args.is_file() and not start.is_file():
        with atomic_path(start) as tmp:
            shutil.copyfile(args, tmp)


def own_fold(folder: Path) -> bool:
    """A fold folder detect train made: the args.yaml Ultralytics wrote there says it trained it as name=fold<k>."""
    started = [read_mapping(folder / name) or {} for name in (START_ARGS, "args.yaml")]
    return any(args.get("mode") == "train" and args.get("name") == folder.name for args in started)


def train_fold(
    cfg_args: dict,
    model: str,
    data_yaml: Path,
    run_dir: Path,
    fold: int,
    fitness: str,
    callbacks: dict[str, Callable] | None = None,
    state: str | None = None,
    swa: tuple[int, float | None] = (0, None),
) -> str:
    """Train (or resume, or skip) one fold. Returns what happened: trained, resumed or skipped.

    `state`: the fold's fold_state when the caller has it (it loads last.pt, which is large); `swa`: (swa_epochs,
    swa_lr), SWA of the last epochs (module docstring).
    """
    folder = fold_dir(run_dir, fold)
    state = state or fold_state(folder)
    if state == "done":
        LOGGER.info(f"detect: {folder} is finished, skipping (delete it to train again)")
        return "skipped"
    trainer = TRAINERS[fitness]
    if state == "partial":
        LOGGER.info(f"detect: resuming {folder} from weights/last.pt")
        keep_start_args(folder)
        yolo = YOLO(str(folder / FILES.last))
        kwargs = {"resume": True, "data": str(data_yaml), **{k: cfg_args[k] for k in RESUME_KEYS if k in cfg_args}}
    else:
        LOGGER.info(f"detect: training fold {fold} -> {folder}")
        (folder / START_ARGS).unlink(missing_ok=True)  # of a fold whose weights were deleted: it starts again
        yolo = YOLO(model)
        kwargs = {**cfg_args, "data": str(data_yaml), "project": str(run_dir), "name": folder.name, "exist_ok": True}
    for event, fn in (callbacks or {}).items():
        yolo.add_callback(event, fn)
    if swa[0] > 0:
        yolo.add_callback("on_pretrain_routine_start", lambda t: setattr(t, "swa", SWA(swa[0], t.epochs, swa[1])))
        yolo.add_callback("on_train_epoch_end", lambda t: t.swa_update())
    yolo.train(trainer=trainer, **kwargs)
    return "resumed" if state == "partial" else "trained"


def fold_summary(run_dir: Path, folds: list[int]) -> pd.DataFrame:
    """Best validation mAP@0.5 and mAP50-95 per fold, from each fold's results.csv."""
    rows = []
    for k in folds:
        csv = fold_dir(run_dir, k) / FILES.log
        if not csv.is_file():
            continue
        res = read_csv(csv, [], text=[])  # Ultralytics' numbers, inferred
        res.columns = [c.strip() for c in res.columns]
        best = res.loc[res[MAP50].idxmax()] if MAP50 in res and len(res) else None
        rows.append(
            {
                "fold": k,
                "epochs": len(res),
                "best_epoch": int(best["epoch"]) if best is not None else None,
                "mAP50": float(best[MAP50]) if best is not None else None,
                "mAP50-95": float(best["metrics/mAP50-95(B)"]) if best is not None and "metrics/mAP50-95(B)" in res else None,
            }
        )
    return pd.DataFrame(rows)


def fold_yamls(cfg: Config, source, folds: list[int], run_dir: Path, lungs=None, teachers=()) -> dict[int, Path]:
    """Each fold's data YAML: prepare's, or with extra= (or crop=lung crop_train=true, or distill=), the run's own one
    whose training list has the extra images (and the lung crops of the fold's training images: siimcovid.detect.crops;
    distill=: the fold's training images with the distilled labels instead of prepare's, siimcovid.detect.distill)."""
    from siimcovid.detect.crops import fold_crops, write_crops
    from siimcovid.detect.distill import fold_list

    prepared = Prepared(source.prepared)
    crops = write_crops(prepared, source.size, lungs, cfg, run_dir) if lungs is not None and cfg.crop_train else None
    if not cfg.extra and crops is None and not teachers:
        return {k: source.yaml(k) for k in folds}
    dedup = (prepared, source.size, cfg.dedup, int(cfg.dedup_distance), run_dir)
    extras = open_extra(cfg.extra, prepared.folds_id, source.n_folds, dedup) if cfg.extra else []
    yamls = {}
    for k in folds:
        train = [str(fold_list(cfg, prepared, source.size, k, teachers, run_dir).resolve())] if teachers else None
        yamls[k] = extra_data_yaml(source, k, run_dir, extras, fold_crops(prepared, crops, k) if crops else [], train)
    return yamls


def train(cfg: Config, callbacks: dict[str, Callable] | None = None) -> Path:
    """Train the folds of cfg.fold (the fold engine, family yolo); callbacks: siimcovid's events
    (siimcovid.engine.events: {event: fn or [fn]}). Returns the run folder."""
    from siimcovid.engine.family import create
    from siimcovid.engine.folds import train as train_folds

    train_folds(create(cfg, "detect", "yolo"), callbacks)
    return (Path(cfg.project) / cfg.name).resolve()


def main(cfg: Config) -> Path:
    return train(cfg)
