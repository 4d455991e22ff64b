"""`siimcovid classify train`: one timm study classifier per fold, with the auxiliary mask loss.

Run dir <project>/<name>/ (the resolved config in classify.yaml), one folder per fold:

fold<k>/classify.yaml        the resolved config
fold<k>/last.pt              everything to resume: model, EMA, optimizer, scheduler, scaler, wave/epoch, the log,
                             every random stream (numpy, torch, loader, augmentation; per rank); written first each epoch
fold<k>/best.pt              the weights of the best epoch by the checkpoint rule (EMA weights when ema > 0)
fold<k>/results.csv          one row per epoch (columns: LOG_COLUMNS, then any extra loss term of an on_loss hook)
fold<k>/results.png          losses, study mAP and lr per epoch
fold<k>/val_pred_image.csv   the best checkpoint's predictions on the fold's held-out images, no TTA
                             (a siimcovid.tables.CLASSIFIER_IMAGES table)
fold<k>/done.json            written last: the fold is finished and is skipped on a re-run

The run folder is the run's own when its classify.yaml is one a training saved (siimcovid.rundir's outputs rule):
another folder that holds files is refused unless overwrite=true, which trains beside them, never over them; a
fold started again (resume=false) loses only the files above (FOLD_FILES), never a user's file beside them. The
settings saved are held to only once a fold trained an epoch: a start that a check stopped does not bind the name.

Training runs in waves: wave 0 is `epochs` epochs at `lr` with warmup and a cosine decay;
each later wave (fine_lr, fine_epochs) restarts from the best checkpoint so far with a new
optimizer and a lower lr (the two-wave schedule of the team notes in shared/seeds/).
The default checkpoint rule is the competition's study mAP on the fold's validation images,
averaged per study. An interrupted fold resumes from last.pt at the next epoch.

Pretraining and extra data (siimcovid/data/extra.py):
- data=<a prepared folder of layout rsna or csv>: multi-label pretraining over that folder's label_names (one
  BCE head, unknown labels masked; the mask loss only where the folder has boxes); the checkpoint rule is the mean
  ROC AUC over the labels (val_auc); fold<k>/val_pred_labels.csv holds the best epoch's validation probabilities.
- init=<a classify run dir (its fold init_fold's best.pt) or a .pt>: every fold's model starts from those weights
  (each tensor whose name and shape match; the heads that do not fit keep their fresh init, "rebuilt" in the log).
- extra=<dir>[,<dir>]: every fold's TRAINING data gains ExtraData(dir).classifier_rows(fold, imgsz) through the
  on_train_data hook (soft targets, unknown ones masked out of the loss); the validation images never change.

Kill -9 at any instant costs at most the epoch in progress. last.pt is the record of an epoch:
written (atomically) before the files that follow from it (best.pt, val_pred_image.csv,
results.csv), which a resume writes again from last.pt, so a kill between them leaves nothing
inconsistent; done.json comes last. With workers=0 a resumed fold draws what the uninterrupted
one would (last.pt holds every random stream of every rank): on the CPU it ends weight for weight
the same (tests/test_kill_classify.py). With workers > 0 the DataLoader workers' augmentation
streams restart at a resume (they live in the workers, out of reach of last.pt), so the resumed
epochs draw other augmentations than an uninterrupted run would.

Hooks (in the spirit of Ultralytics' trainer callbacks): `train(cfg, d, callbacks={event: fn or [fn]})`
adds functions to the events below without touching the loop. With none added, training is
exactly the plain loop: hooks draw no random numbers and change no order of operations.

    on_train_data(trainer)                  before the training loader is built: may replace
                                            trainer.train_dataset (e.g. ConcatDataset with pseudo-labelled
                                            images; items as StudyDataset's); trainer.train_tab = the fold's rows
    on_loss(trainer, out, batch, parts)     each training step, after the loss: return {name: tensor} extra
                                            terms; each is added to the loss and logged as train_<name>
    on_fit_epoch_end(trainer, row)          after the epoch's checkpoints and log are written (every rank);
                                            row = the epoch's results.csv row
    is_better(trainer, stats, best) -> bool the checkpoint rule (the last one added decides; default
                                            study_map_improved); stats: the epoch's train_*/val_* values,
                                            best: {score, epoch, wave} of the best so far (its row: trainer.rows).
                                            The first epoch always makes a best.pt (later waves restart from it).
"""

from __future__ import annotations

import difflib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from siimcovid import rundir
from siimcovid.classify import predict as P
from siimcovid.classify.data import (
    SoftTargets,
    StudyDataset,
    TargetDataset,
    augment_state,
    build_augment,
    check_files,
    check_paths,
    image_table,
    mix_batch,
    seed_worker,
    set_augment_state,
    to_device,
)
from siimcovid.classify.dist import Dist, cleanup, setup
from siimcovid.classify.model import LabelLoss, StudyLoss, build_model, check_model_name, init_from, model_cfg
from siimcovid.config import Config, default_name, runtime_keys
from siimcovid.data.extra import TARGETS, ExtraData, extra_roots, multilabel_layout, open_extra
from siimcovid.data.prepared import Prepared
from siimcovid.tables import CLASSIFIER_IMAGES, STUDY_CLASSES, write_csv
from siimcovid.utils import LOGGER, SiimError, as_list, atomic_path, atomic_write_text, save_png

LOG_COLUMNS = [
    "epoch",
    "wave",
    "wave_epoch",
    "lr",
    "train_loss",
    "train_cls",
    "train_none",
    "train_mask",
    "val_loss",
    "val_cls",
    "val_none",
    "val_mask",
    "val_map",
    "val_none_auc",
    "best",
    "train_img_s",
    "loader_wait",
    "time_s",
]
LOSS_PARTS = ["loss", "cls", "none", "mask"]  # what StudyLoss returns, logged as train_* and val_*
EXTRA_SEED = 1000  # the extra data's augmentation stream: seed + rank + this (the SIIM images' stream is unchanged)
LABEL_PREDICTIONS = "val_pred_labels.csv"  # multi-label runs: the best epoch's validation probabilities
SYNC_EVERY = 20  # training steps between host syncs (loss check, progress bar)
RUN_CONFIG = "classify.yaml"  # <run>/ and <run>/fold<k>/: the resolved settings, the record that makes them siimcovid's
FOLD_FILES = (RUN_CONFIG, "last.pt", "best.pt", "results.csv", "results.png", "val_pred_image.csv", LABEL_PREDICTIONS, P.DONE)
RUN_FILES = ("pred_*.csv", "scores_oof.csv", "predict.yaml")  # what `classify predict` writes into the run folder


# ---------------------------------------------------------------- hooks


def study_map_improved(trainer: "FoldTrainer", stats: dict, best: dict) -> bool:
    """The default checkpoint rule: the validation study mAP beats the best so far (NaN never does)."""
    score = stats["val_map"]
    return not math.isnan(score) and score > best["score"]


def auc_improved(trainer: "FoldTrainer", stats: dict, best: dict) -> bool:
    """The checkpoint rule of multi-label pretraining: the mean validation ROC AUC over labels beats the best so far."""
    score = stats["val_auc"]
    return not math.isnan(score) and score > best["score"]


def mean_auc(truth: np.ndarray, probs: np.ndarray) -> float:
    """Mean ROC AUC over the label columns that have both classes among the known (non-NaN) targets; NaN if none."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for j in range(truth.shape[1]):
        known = ~np.isnan(truth[:, j])
        t = truth[known, j] >= 0.5
        if t.any() and not t.all():
            aucs.append(roc_auc_score(t, probs[known, j]))
    return float(np.mean(aucs)) if aucs else float("nan")


def default_callbacks() -> dict[str, list[Callable]]:
    """Every training event with its default functions (see the module docstring)."""
    return {"on_train_data": [], "on_loss": [], "on_fit_epoch_end": [], "is_better": [study_map_improved]}


# ---------------------------------------------------------------- settings and files


def wave_plan(cfg) -> list[tuple[float, int, int]]:
    """[(lr, epochs, warmup_epochs)] per wave; later waves restart from the best checkpoint, no warmup."""
    waves = [(cfg.lr, cfg.epochs, cfg.warmup_epochs)]
    waves += [(lr, cfg.fine_epochs, 0) for lr in cfg.fine_lr if cfg.fine_epochs > 0]
    return waves


def check_config(cfg) -> None:
    """What the settings' declared types and ranges cannot say: combinations, timm's model and optimizer names."""
    if cfg.mixup > 0 and cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        raise SiimError("mixup > 0 needs mixup_alpha > 0 or cutmix_alpha > 0")
    check_model_name(cfg.model)
    from timm.optim import list_optimizers

    known = list_optimizers()
    name = cfg.optimizer.lower()
    if name.split("_", 1)[-1] not in known and name not in known:  # also accepts timm's "lookahead_<opt>"
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SiimError(f"optimizer={cfg.optimizer}: not a timm optimizer{hint}")


# Not timm.utils.CheckpointSaver: its checkpoints hold model, EMA, optimizer and scaler only (no scheduler, wave, rng,
# folds_id) under its own keys, and predict reads ours; torch.save to a temporary file + rename keeps the writes atomic.
def save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def plot_log(log: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for col in ("train_loss", "val_loss", "train_mask", "val_mask"):
        axes[0].plot(log.epoch, log[col], marker=".", label=col)
    axes[0].set_title("loss")
    metric, title = ("val_auc", "mean ROC AUC") if "val_auc" in log else ("val_map", "study mAP")
    axes[1].plot(log.epoch, log[metric], marker="o", label=f"val {title}")
    best = log[log.best.astype(bool)]
    axes[1].scatter(best.epoch, best[metric], color="red", zorder=3, label="new best")
    axes[1].set_title(f"validation {title}")
    axes[2].plot(log.epoch, log.lr, marker=".")
    axes[2].set_yscale("log")
    axes[2].set_title("lr (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


class FoldTrainer:
    """Everything one fold needs; `run()` trains it (or resumes it) to the end."""

    def __init__(self, cfg, prep: Prepared, fold: int, size: int, fold_dir: Path, d: Dist, callbacks: dict | None = None):
        self.cfg, self.prep, self.fold, self.size, self.dir, self.d = cfg, prep, fold, size, fold_dir, d
        self.callbacks = default_callbacks()
        for event, fns in (callbacks or {}).items():
            for fn in as_list(fns):
                self.add_callback(event, fn)
        self.device = d.device
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        self.channels_last = cfg.channels_last and cuda
        self.label_names = cfg.get("label_names")  # multi-label pretraining on an external set
        self.metric = "val_auc" if self.label_names else "val_map"  # the score of best.pt and of the log's lines
        self.amp_dtype = P.amp_dtype_for(self.device, cfg.amp)
        self.scaler = self.new_scaler()
        self.rows: list[dict] = []  # results.csv so far
        self.best = {"score": -math.inf, "epoch": 0, "wave": 0}
        self.build_loaders(cuda)

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = build_model(
            model_cfg(cfg), cfg.pretrained or cfg.pretrained_file not in (None, ""), cfg.pretrained_file, self.channels_last
        ).to(self.device)
        if cfg.get("init"):
            self.load_init()
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_model = self.model
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[self.device.index] if cuda else None)
            torch.manual_seed(cfg.seed + d.rank)  # weights are equal now; dropout / drop-path masks differ per rank
        self.loss_fn = StudyLoss.from_cfg(cfg)
        if self.label_names:  # the mask loss trains where the external set has boxes (rsna), else it is off
            self.loss_fn = LabelLoss(cfg.mask_weight if self.has_boxes else 0.0, cfg.mask_bce, cfg.mask_dice)
        self.ema = None
        self.rng = np.random.default_rng(cfg.seed + d.rank)

    # ---------------------------------------------------------------- hooks

    def add_callback(self, event: str, fn: Callable) -> None:
        if event not in self.callbacks:
            raise SiimError(f"unknown training event '{event}': expected one of {', '.join(self.callbacks)}")
        self.callbacks[event].append(fn)

    def run_callbacks(self, event: str, *args) -> list:
        """Call the event's functions in the order added, with the trainer first; their results."""
        return [fn(self, *args) for fn in self.callbacks[event]]

    def is_better(self, stats: dict) -> bool:
        """The checkpoint rule: the last is_better function added (default: study_map_improved)."""
        return bool(self.callbacks["is_better"][-1](self, stats, self.best))

    def add_extra_losses(self, out: dict, batch: dict, parts: dict) -> None:
        """The on_loss hooks' extra terms, each added to parts (logged) and to the loss, in the order returned."""
        for fn in self.callbacks["on_loss"]:
            for name, value in (fn(self, out, batch, parts) or {}).items():
                if name in parts:
                    raise SiimError(f"on_loss hook {getattr(fn, '__name__', fn)}: the loss already has a term '{name}'")
                parts[name] = value
                parts["loss"] = parts["loss"] + value

    def load_init(self) -> None:
        """init=: the model starts from another run's weights (every tensor whose name and shape match)."""
        path = resolve_init(self.cfg.init, self.cfg.init_fold)
        n, rebuilt = init_from(self.model, path, self.cfg.model)
        if self.d.is_main:
            LOGGER.info(f"init: loaded {n} tensors from {path}, rebuilt: {', '.join(rebuilt) or 'nothing'}")

    # ---------------------------------------------------------------- pieces

    def fold_datasets(self, augment) -> tuple[Dataset, Dataset]:
        """(training dataset, validation dataset): the SIIM fold's, or a multi-label external set's (label_names)."""
        if not self.label_names:
            return StudyDataset(self.prep, self.train_tab, self.size, augment), StudyDataset(self.prep, self.val_tab, self.size)
        ds = []
        for tab, aug in ((self.train_tab, augment), (self.val_tab, None)):
            images = [self.prep.image_path(i, "train", self.size) for i in tab.image_id]
            masks = [self.prep.mask_path(i, self.size) if self.has_boxes else None for i in tab.image_id]
            ds.append(TargetDataset(images, masks, tab[self.label_names].to_numpy(), np.full(len(tab), np.nan), self.size, aug))
        return ds[0], ds[1]

    def fold_tables(self) -> None:
        """train_tab / val_tab: the fold's rows (multi-label: image_id, study_id, fold, then the label columns)."""
        fold = self.fold
        if self.label_names:
            labels = ExtraData(self.prep.root).label_table().set_index("image_id")
            self.has_boxes = bool((self.prep.meta.n_boxes > 0).any())
            tabs = [self.prep.fold(fold, part)[["image_id", "study_id", "fold"]] for part in ("train", "val")]
            self.train_tab, self.val_tab = (t.join(labels, on="image_id").reset_index(drop=True) for t in tabs)
        else:
            self.train_tab = image_table(self.prep, "train", fold, "train")
            self.val_tab = image_table(self.prep, "train", fold, "val")

    def build_loaders(self, cuda: bool) -> None:
        """The fold's tables, the training dataset (after on_train_data), its sampler and both loaders."""
        cfg, d, fold = self.cfg, self.d, self.fold
        self.fold_tables()
        if self.val_tab.empty or self.train_tab.empty:
            raise SiimError(f"fold {fold} has {len(self.train_tab)} training and {len(self.val_tab)} validation images")
        self.batch = max(1, cfg.batch // d.world)
        # Seeded augmentation (one stream per rank, re-seeded per worker): the same seed gives the same run.
        self.train_dataset, val_dataset = self.fold_datasets(build_augment(cfg, seed=cfg.seed + d.rank))
        self.run_callbacks("on_train_data")
        if len(self.train_dataset) < self.batch * d.world:
            raise SiimError(f"fold {fold}: {len(self.train_dataset)} training images, fewer than batch={cfg.batch}")
        self.sampler = DistributedSampler(
            self.train_dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        kw = {"num_workers": cfg.workers, "pin_memory": cuda, "persistent_workers": cfg.workers > 0}
        self.train_loader = DataLoader(
            self.train_dataset,
            batch_size=self.batch,
            sampler=self.sampler,
            drop_last=True,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed + d.rank),
            **kw,
        )
        # Validation: rank r takes images r, r+world, ...; the ranks' predictions are gathered.
        val_ds = Subset(val_dataset, list(range(d.rank, len(self.val_tab), d.world)))
        self.val_loader = DataLoader(val_ds, batch_size=self.batch * 2, shuffle=False, **kw)

    def new_scaler(self):
        """timm's NativeScaler for CUDA fp16 only (bf16 and fp32 need no loss scaling), as timm's train.py."""
        from timm.utils import NativeScaler

        return NativeScaler("cuda") if self.amp_dtype == torch.float16 else None

    def new_ema(self):
        from timm.utils import ModelEmaV3

        # Warmup: the decay grows with the step count, so short runs still get a useful average.
        self.ema = ModelEmaV3(self.model, decay=self.cfg.ema, use_warmup=True) if self.cfg.ema > 0 else None

    def new_optimizer(self, lr: float, epochs: int, warmup: int):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        try:
            opt = create_optimizer_v2(self.model, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay)
        except (AssertionError, ValueError) as e:
            raise SiimError(f"optimizer={cfg.optimizer}: {e}") from None
        sched, _ = create_scheduler_v2(
            opt,
            sched=cfg.sched,
            num_epochs=epochs,
            warmup_epochs=min(warmup, max(epochs - 1, 0)),
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=False,
            updates_per_epoch=len(self.train_loader),
        )
        return opt, sched

    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def backward_step(self, loss: torch.Tensor, opt) -> None:
        """timm's train.py step: the fp16 scaler (scale, backward, unscale, clip, step, update), else backward, clip, step."""
        from timm.utils import dispatch_clip_grad

        clip = self.cfg.clip_grad if self.cfg.clip_grad > 0 else None
        if self.scaler is not None:
            self.scaler(loss, opt, clip_grad=clip, parameters=self.model.parameters())
            return
        loss.backward()
        if clip is not None:
            dispatch_clip_grad(self.model.parameters(), clip)
        opt.step()

    def train_one_epoch(self, epoch: int, opt, sched, step: int) -> tuple[dict, int]:
        cfg, d = self.cfg, self.d
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        sums, n, wait, t0 = {}, 0, 0.0, time.perf_counter()
        mixing = cfg.mixup > 0
        bar = tqdm(self.train_loader, desc=f"fold {self.fold} epoch {epoch}", unit="batch", disable=not d.is_main, leave=False)
        tw = time.perf_counter()
        for batch in bar:
            wait += time.perf_counter() - tw
            b = to_device(batch, self.device)
            if mixing and self.rng.random() < cfg.mixup:
                b = mix_batch(b, len(STUDY_CLASSES), cfg.mixup_alpha, cfg.cutmix_alpha, self.rng)
            target = b["label"]
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                out = self.train_model(b["image"])
            parts = self.loss_fn(out, target, b["none"], b["mask"], b.get("has_mask"))
            self.add_extra_losses(out, b, parts)
            opt.zero_grad(set_to_none=True)
            self.backward_step(parts["loss"], opt)
            step += 1
            if sched is not None:  # sched=none keeps the optimizer's lr
                sched.step_update(num_updates=step)
            if self.ema is not None:
                self.ema.update(self.model, step=step)
            for k, v in parts.items():  # summed on the device: no host sync per step (it starves a GPU)
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(target)
            n += len(target)
            if step % SYNC_EVERY == 0:
                self.check_loss(float(sums["loss"]), epoch)
                if d.is_main:
                    bar.set_postfix(loss=f"{float(sums['loss']) / n:.3f}")
            tw = time.perf_counter()
        sums = {k: float(v) for k, v in sums.items()}
        self.check_loss(sums.get("loss", 0.0), epoch)
        elapsed = time.perf_counter() - t0
        keys = LOSS_PARTS + [k for k in sums if k not in LOSS_PARTS]  # the built-in parts, then the hooks' terms
        tot = d.sum([sums.get(k, 0.0) for k in keys] + [n])
        stats = {f"train_{k}": tot[i] / max(tot[-1], 1) for i, k in enumerate(keys)}
        stats["train_img_s"] = tot[-1] / max(elapsed, 1e-9)
        stats["loader_wait"] = wait / max(elapsed, 1e-9)
        return stats, step

    def validate(self) -> tuple[dict, pd.DataFrame]:
        if self.d.active:  # each rank's batch-norm statistics drifted apart; rank 0's are saved
            from timm.utils import distribute_bn

            distribute_bn(self.eval_model(), self.d.world, reduce=False)
        if self.label_names:
            return self.validate_labels()
        idx, study, none, sums = P.infer(self.eval_model(), self.val_loader, self.device, self.amp_dtype, loss_fn=self.loss_fn)
        # Items carry their row in val_tab (not their position in this rank's shard).
        parts = self.d.gather((idx if idx is not None else np.zeros(0, int), study, none, sums))
        rows = np.concatenate([p[0] for p in parts])
        study = np.concatenate([p[1] for p in parts if p[1] is not None])
        none = np.concatenate([p[2] for p in parts if p[2] is not None]) if parts[0][2] is not None else None
        n = sum(p[3]["n"] for p in parts)
        loss = {f"val_{k}": sum(p[3].get(k, 0.0) for p in parts) / max(n, 1) for k in LOSS_PARTS}
        images = P.image_frame(self.val_tab.iloc[rows], study, none, self.cfg.name).sort_values("image_id").reset_index(drop=True)
        stats = dict(loss, val_map=P.study_map(self.prep, images), val_none_auc=self.none_auc(images))
        return stats, images

    def infer_labels(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """Multi-label validation on this rank's shard: (rows of val_tab, label probabilities, loss sums)."""
        model, idx, probs, sums, n = self.eval_model(), [], [], {}, 0
        model.eval()
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)
        with torch.inference_mode():
            for batch in self.val_loader:
                b = to_device(batch, self.device)
                with autocast:
                    out = model(b["image"])
                for k, v in self.loss_fn(out, b["label"], b["none"], b["mask"], b["has_mask"]).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(b["image"])
                n += len(b["image"])
                idx.append(b["index"].cpu().numpy())
                probs.append(torch.sigmoid(out["labels"].float()).cpu().numpy())
        width = len(self.label_names)
        cat = lambda xs, empty: np.concatenate(xs) if xs else empty  # noqa: E731
        return cat(idx, np.zeros(0, int)), cat(probs, np.zeros((0, width))), sums | {"n": n}

    def validate_labels(self) -> tuple[dict, pd.DataFrame]:
        """Multi-label validation: the losses and the mean ROC AUC over labels (val_auc) of every rank's shard."""
        parts = self.d.gather(self.infer_labels())
        rows = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts])
        n = sum(p[2]["n"] for p in parts)
        loss = {f"val_{k}": sum(p[2].get(k, 0.0) for p in parts) / max(n, 1) for k in LOSS_PARTS}
        tab = self.val_tab.iloc[rows]
        images = pd.DataFrame({"image_id": tab.image_id.values, "study_id": tab.study_id.values, "fold": self.fold})
        images[self.label_names] = probs
        auc = mean_auc(tab[self.label_names].to_numpy(dtype=np.float64), probs)
        stats = dict(loss, val_map=float("nan"), val_none_auc=float("nan"), val_auc=auc)
        return stats, images.sort_values("image_id").reset_index(drop=True)

    def none_auc(self, images: pd.DataFrame) -> float:
        from sklearn.metrics import roc_auc_score

        truth = self.val_tab.set_index("image_id").loc[images.image_id, "none"].values
        return float(roc_auc_score(truth, images["none"])) if len(set(truth)) == 2 else float("nan")

    def check_loss(self, loss_sum: float, epoch: int) -> None:
        if not math.isfinite(loss_sum):
            raise SiimError(f"fold {self.fold} epoch {epoch}: the loss became {loss_sum}; lower lr or turn amp off")

    def rng_streams(self) -> dict:
        """This process's random streams: mixing (numpy), torch (dropout, drop-path, the validation loader's seed),
        CUDA, the training loader's generator and the augmentation's generators (with workers=0 they draw here)."""
        return {
            "numpy": self.rng.bit_generator.state,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "loader": self.train_loader.generator.get_state(),
            "augment": augment_state(self.train_dataset),
        }

    def set_rng_streams(self, streams: dict) -> None:
        self.rng.bit_generator.state = streams["numpy"]
        torch.set_rng_state(streams["torch"])
        if streams["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(streams["cuda"], self.device)
        self.train_loader.generator.set_state(streams["loader"])
        if not set_augment_state(self.train_dataset, streams["augment"]) and self.d.is_main:
            LOGGER.warning(f"fold {self.fold}: the augmentation changed since last.pt; its random draws start afresh")

    def checkpoint(self, opt, sched, wave: int, wave_epoch: int, epoch: int, step: int, streams: list, best_images) -> dict:
        """last.pt: everything to resume; streams: every rank's rng_streams; best_images: this epoch's validation
        predictions when it is the best (a resume writes best.pt and val_pred_image.csv again from them)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "wave": wave,
            "wave_epoch": wave_epoch,
            "epoch": epoch,
            "step": step,
            "best": self.best,
            "best_images": best_images,
            "rows": self.rows,
            "rng_ranks": streams,
            "model_cfg": model_cfg(self.cfg),
            "fold": self.fold,
            "folds_id": self.cfg.folds_id,
        }

    def load_best_weights(self) -> None:
        state = torch.load(self.dir / "best.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])

    # ---------------------------------------------------------------- resume and waves

    def load_resume_state(self) -> dict | None:
        """last.pt of an interrupted fold (None: a fresh start); restores the best so far and the log up to it."""
        last_path, log_path = self.dir / "last.pt", self.dir / "results.csv"
        if not last_path.is_file():
            return None
        # CPU: load_state_dict moves what belongs on the GPU; Adam's step counters must stay on the CPU
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        self.best = state["best"]
        if "rows" in state:
            self.rows = [dict(r) for r in state["rows"]]
        elif log_path.is_file():  # a last.pt of an older version: the log holds the rows
            self.rows = [r for r in pd.read_csv(log_path).to_dict("records") if r["epoch"] <= state["epoch"]]
        streams = state.get("rng_ranks")
        if streams and len(streams) == self.d.world:
            self.set_rng_streams(streams[self.d.rank])
        elif "rng" in state:  # a last.pt of an older version: the mixing stream only
            self.rng.bit_generator.state = state["rng"]
        elif self.d.is_main:
            LOGGER.warning(
                f"fold {self.fold}: last.pt was written by {len(streams or [])} processes, now {self.d.world}: "
                "the random streams start afresh"
            )
        if self.d.is_main:
            LOGGER.info(
                f"fold {self.fold}: resuming after epoch {state['epoch']} (wave {state['wave']}, best {self.best['score']:.4f})"
            )
            self.rewrite_outputs(state)
        return state

    def rewrite_outputs(self, state: dict) -> None:
        """The files that follow last.pt, written again from it: a kill after last.pt and before them must not
        leave the previous epoch's log or a best.pt older than the best last.pt records."""
        best_row = [r for r in self.rows if r["epoch"] == state["epoch"]]
        if state["best"]["epoch"] == state["epoch"] and state.get("best_images") is not None and best_row:
            weights = state["ema"] if state["ema"] is not None else state["model"]  # as eval_model() gave them
            self.save_best(state["epoch"], state["wave"], best_row[0][self.metric], state["best_images"], weights)
        if self.rows:
            self.write_log()

    def restore(self, state: dict, opt, sched) -> int:
        """Put the interrupted wave's training state back (the random streams: load_resume_state); returns its step count."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler is not None:  # empty where the run had no fp16 scaler
            self.scaler.load_state_dict(state["scaler"])
        return state["step"]

    def restart_from_best(self, wave: int, lr: float, n_epochs: int) -> None:
        """A later wave starts from the best checkpoint so far, with a fresh EMA."""
        self.d.barrier()
        self.load_best_weights()
        self.new_ema()
        if self.d.is_main:
            LOGGER.info(
                f"fold {self.fold}: wave {wave} restarts from the best checkpoint (epoch {self.best['epoch']}, "
                f"{self.metric} {self.best['score']:.4f}) with lr {lr:g} for {n_epochs} epochs"
            )

    # ---------------------------------------------------------------- one epoch

    def fit_epoch(self, epoch: int, wave: int, wave_epoch: int, opt, sched, step: int) -> int:
        """Train, validate, keep the best checkpoint, write the log; returns the step count."""
        t0 = time.perf_counter()
        train_stats, step = self.train_one_epoch(epoch, opt, sched, step)
        val_stats, images = self.validate()
        new_best = self.is_better({**train_stats, **val_stats}) or self.best["epoch"] == 0
        score = val_stats[self.metric]
        if new_best:
            self.best = {"score": score if not math.isnan(score) else -math.inf, "epoch": epoch, "wave": wave}
        row = {
            "epoch": epoch,
            "wave": wave,
            "wave_epoch": wave_epoch + 1,
            "lr": opt.param_groups[0]["lr"],
            **train_stats,
            **val_stats,
            "best": bool(self.best["epoch"] == epoch),
            "time_s": time.perf_counter() - t0,
        }
        self.rows.append(row)
        streams = self.d.gather(self.rng_streams())  # every rank's: each resumes its own
        if self.d.is_main:
            # last.pt first, the record of the epoch; then what follows from it (rewrite_outputs on a resume)
            last = self.checkpoint(opt, sched, wave, wave_epoch, epoch, step, streams, images if new_best else None)
            save_torch(last, self.dir / "last.pt")
            if new_best:
                self.save_best(epoch, wave, score, images, self.eval_model().state_dict())
            self.write_log()
            LOGGER.info(
                f"fold {self.fold} epoch {row['epoch']} (wave {row['wave']}): loss {row['train_loss']:.4f} "
                f"val loss {row['val_loss']:.4f} {'mean AUC' if self.label_names else 'study mAP'} {row[self.metric]:.4f}"
                f"{' *best*' if row['best'] else ''}  {row['train_img_s']:.1f} img/s"
            )
        self.run_callbacks("on_fit_epoch_end", row)
        self.d.barrier()
        return step

    def save_best(self, epoch: int, wave: int, score: float, images: pd.DataFrame, weights: dict) -> None:
        """best.pt (weights: the evaluated ones, EMA when ema > 0) and val_pred_image.csv of the best epoch."""
        cfg = self.cfg
        best = {
            "model": weights,
            "model_cfg": model_cfg(cfg),
            "epoch": epoch,
            "wave": wave,
            "score": score,
            "imgsz": self.size,
            "classes": self.label_names or STUDY_CLASSES,
            "ema": cfg.ema,
            "fold": self.fold,
            "folds_id": cfg.folds_id,  # travels with the weights: predict checks it per fold
        }
        save_torch(best, self.dir / "best.pt")
        if self.label_names:
            write_csv(images, self.dir / LABEL_PREDICTIONS)
        else:
            CLASSIFIER_IMAGES.write(images.assign(model=cfg.name), self.dir / "val_pred_image.csv")

    def log_columns(self) -> list[str]:
        """LOG_COLUMNS, then the extra loss terms of on_loss hooks in the order they appeared."""
        extra = dict.fromkeys(k for r in self.rows for k in r if k not in LOG_COLUMNS)
        return LOG_COLUMNS + list(extra)

    def write_log(self) -> None:
        """results.csv and results.png of the epochs so far."""
        log = pd.DataFrame(self.rows, columns=self.log_columns())
        write_csv(log, self.dir / "results.csv", float_format="%.6g")
        plot_log(log, self.dir / "results.png")

    # ---------------------------------------------------------------- the fold

    def run(self) -> dict:
        waves = wave_plan(self.cfg)
        offsets = np.cumsum([0] + [w[1] for w in waves])
        state = self.load_resume_state()
        self.new_ema()
        for wave, (lr, n_epochs, warmup) in enumerate(waves):
            if state is not None and wave < state["wave"]:
                continue  # finished before the interruption
            resuming = state is not None and wave == state["wave"]
            start = state["wave_epoch"] + 1 if resuming else 0
            if resuming and start >= n_epochs:  # that wave had finished; the next one restarts from best
                state = None
                continue
            if not resuming and wave > 0:
                self.restart_from_best(wave, lr, n_epochs)
            opt, sched = self.new_optimizer(lr, n_epochs, warmup)
            step = self.restore(state, opt, sched) if resuming else 0
            state = None
            for wave_epoch in range(start, n_epochs):
                step = self.fit_epoch(int(offsets[wave]) + wave_epoch + 1, wave, wave_epoch, opt, sched, step)
        return self.finish(int(offsets[-1]))

    def finish(self, epochs: int) -> dict:
        """done.json: the fold's summary; its presence marks the fold finished."""
        summary = {
            "fold": self.fold,
            "best_score": self.best["score"],
            "best_epoch": self.best["epoch"],
            "best_wave": self.best["wave"],
            "epochs": epochs,
        }
        if self.d.is_main:
            atomic_write_text(self.dir / P.DONE, json.dumps(summary, indent=1))
        self.d.barrier()
        return summary


def run_name(cfg) -> str:
    """The name= given, else <model>_<imgsz> (multi-label pretraining: _<the external set's folder name> added)."""
    if cfg.name:
        return cfg.name
    name = f"{cfg.model}_{cfg.imgsz}" + (f"_{Path(cfg.data).name}" if cfg.get("label_names") else "")
    return default_name("classify", name, "model= and imgsz=")  # e.g. hf-hub:timm/<model> holds a '/'


def check_run_folders(cfg, run_dir: Path, folds: list[int]) -> None:
    """The outputs rule for the run folder and each fold folder it trains (siimcovid.rundir), before anything is
    written: a user's folder is refused unless overwrite=true, a file of training's names in it even then."""
    sources = [cfg.data, *cfg.extra, cfg.init]
    own = rundir.check_run_dir(run_dir, RUN_CONFIG, cfg.overwrite, sources)
    if not own:
        rundir.refuse_existing(run_dir, RUN_FILES, "classify")
    for fold in folds:
        folder = rundir.fold_dir(run_dir, fold)
        own_fold = own and rundir.is_run_config(folder / RUN_CONFIG)
        rundir.check_fold_dir(folder, own_fold, FOLD_FILES, cfg.overwrite, "classify")


def prepare_run_dir(cfg, run_dir: Path, d: Dist) -> None:
    """Refuse to resume a run with different fixed settings (once a fold trained); save the resolved config."""
    saved = run_dir / RUN_CONFIG
    if saved.is_file() and cfg.resume and rundir.trained_any(run_dir, "last.pt"):
        from siimcovid.config import read_yaml

        changed = rundir.changed_settings(read_yaml(saved), cfg, ignore=runtime_keys("classify"))
        folds_note = " (folds_id: the prepared folds changed since)" if any(k == "folds_id" for k, _, _ in changed) else ""
        rundir.refuse_changed(run_dir, changed, f"use another name= or resume=false{folds_note}")
    if d.is_main:
        cfg.save(saved)


def train_fold(cfg, prep: Prepared, fold: int, size: int, run_dir: Path, d: Dist, callbacks: dict | None) -> dict:
    """One fold: skipped when finished before (resume), else trained or resumed in fold<k>/."""
    fold_dir = rundir.fold_dir(run_dir, fold)
    done = fold_dir / P.DONE
    if cfg.resume and done.is_file():
        result = json.loads(done.read_text())
        if d.is_main:
            metric = "mean AUC" if cfg.get("label_names") else "study mAP"
            LOGGER.info(f"fold {fold}: finished before (best {metric} {result['best_score']:.4f}), skipping")
        return result
    if d.is_main and not cfg.resume:  # only the fold's own files (check_run_folders made sure of them)
        rundir.remove_fold_files(fold_dir, FOLD_FILES)
    if d.is_main:  # temporaries of atomic writes a kill -9 interrupted (a checkpoint each)
        rundir.remove_fold_files(fold_dir, FOLD_FILES, temporaries_only=True)
    d.barrier()
    if d.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(fold_dir / RUN_CONFIG)
    d.barrier()
    return FoldTrainer(cfg, prep, fold, size, fold_dir, d, callbacks).run()


def check_ray(cfg, d: Dist) -> None:
    """engine=ray: Ray is installed; each fold is one process on at most one GPU (DDP inside a fold is torchrun)."""
    from siimcovid.ray_engine import import_ray

    import_ray()
    if d.world > 1:
        raise SiimError(
            "engine=ray trains each fold in one process of its own; under torchrun (DDP inside a fold) use engine=serial"
        )
    cpu, gpus = str(cfg.device).lower() == "cpu", cfg.gpus_per_fold
    if gpus > 1:
        raise SiimError(
            f"engine=ray: gpus_per_fold={gpus:g}, but a fold trains in one process on one GPU: at most 1 "
            "(for DDP inside a fold use torchrun with engine=serial)"
        )
    if cpu and gpus > 0:
        raise SiimError(f"engine=ray: device={cfg.device} trains on the CPU; set gpus_per_fold=0")
    if cfg.device not in (None, "", "auto") and not cpu and gpus == 0:
        raise SiimError(f"engine=ray: device={cfg.device} asks for a GPU, but gpus_per_fold=0 gives a fold's task none")


def ray_fold(cfg, fold: int, size: int, run_dir: Path, callbacks: dict | None) -> dict:
    """One fold as a Ray task (engine=ray): train_fold in a world of one, on the GPU Ray gave the task (Ray sets its
    CUDA_VISIBLE_DEVICES: that GPU is cuda:0 here) or the CPU. A task run again after its process died resumes the
    fold from its last.pt, as a re-run does."""
    from siimcovid.ray_engine import task_gpus

    if str(cfg.device).lower() != "cpu":
        cfg = Config({**cfg, "device": "cuda" if task_gpus() else "cpu"})
    d = setup(cfg.device)
    try:
        return train_fold(cfg, Prepared(cfg.data), fold, size, run_dir, d, callbacks)
    finally:
        cleanup(d)


def resolve_init(init, init_fold: int) -> Path:
    """init=: a classify run dir (its fold init_fold's best.pt) or a checkpoint file."""
    path = Path(init)
    if path.is_dir():
        if not (path / "classify.yaml").is_file():
            raise SiimError(f"init={init}: not a classify run dir (no classify.yaml) and not a .pt file")
        path = rundir.fold_dir(path, init_fold) / "best.pt"
    if not path.is_file():
        raise SiimError(f"init={init}: {path} not found (train that run's fold {init_fold} first, or give init_fold=)")
    return path.resolve()


def extra_data_hook(cfg, extras: list[ExtraData]) -> Callable:
    """on_train_data: the fold's SIIM images (one-hot targets) + every extra folder's classifier_rows (soft targets)."""

    def add_extra_data(trainer: "FoldTrainer") -> None:
        rows = pd.concat([e.classifier_rows(trainer.fold, trainer.size) for e in extras], ignore_index=True)
        check_paths(rows["image"], "extra data image")
        check_paths(rows["mask"], "extra data mask")
        augment = build_augment(cfg, seed=cfg.seed + trainer.d.rank + EXTRA_SEED)
        extra = TargetDataset(
            rows["image"], rows["mask"], rows[STUDY_CLASSES].to_numpy(), rows["none"].to_numpy(), trainer.size, augment
        )
        base = len(trainer.train_dataset)
        trainer.train_dataset = ConcatDataset([SoftTargets(trainer.train_dataset, len(STUDY_CLASSES)), extra])
        trainer.extra_rows = rows
        if trainer.d.is_main:
            known = ", ".join(f"{c} {int(rows[c].notna().sum())}" for c in TARGETS if rows[c].notna().any())
            masks = int(rows["mask"].notna().sum())
            LOGGER.info(f"fold {trainer.fold}: {base} training images + {len(extra)} extra (known: {known}; masks {masks})")

    return add_extra_data


def run_callbacks(cfg, prep: Prepared, callbacks: dict | None) -> dict:
    """The built-in hooks of the run's settings (extra data, the multi-label checkpoint rule), then the caller's."""
    out: dict[str, list] = {}
    if cfg.extra:
        out["on_train_data"] = [extra_data_hook(cfg, open_extra(cfg.extra, prep.folds_id, prep.n_folds))]
    if cfg.get("label_names"):
        out["is_better"] = [auc_improved]
    for event, fns in (callbacks or {}).items():
        out[event] = out.get(event, []) + as_list(fns)
    return out


def check_multilabel(cfg, prep: Prepared) -> None:
    """data= an external labelled set (layout rsna or csv): multi-label pretraining over its label_names."""
    if not multilabel_layout(prep.root):
        return
    if cfg.extra:
        raise SiimError(f"extra= adds SIIM targets to a SIIM run; {prep.root} is an external set (multi-label pretraining)")
    names = ExtraData(prep.root).label_names
    if not names:
        raise SiimError(f"{prep.root}/prepare.yaml names no label_names: nothing to pretrain on")
    cfg.label_names = list(names)
    masks = "with the mask head on its boxes" if ExtraData(prep.root).layout == "rsna" else "no mask loss (no boxes)"
    LOGGER.info(
        f"classify: multi-label pretraining on {prep.root.name}: {len(names)} labels ({', '.join(names)}), BCE with unknown "
        f"labels left out, {masks}; best.pt by the mean validation ROC AUC. Then: classify train data=<SIIM> init=<this run>"
    )


def train(cfg, d: Dist, callbacks: dict | None = None) -> dict:
    """Train the folds of cfg.fold; callbacks: {event: fn or [fn, ...]} added to every fold's trainer.

    engine=ray: each fold is a Ray task (siimcovid/ray_engine.py) running train_fold as the serial path does; the
    run's checks and settings are done here before any task starts, the OOF report after they all end."""
    prep = Prepared(cfg.data)
    size = prep.check_size(cfg.imgsz)
    folds = prep.select_folds(cfg.fold)
    check_config(cfg)
    if cfg.engine == "ray":
        check_ray(cfg, d)
    check_multilabel(cfg, prep)
    cfg.name = run_name(cfg)
    cfg.data = str(Path(cfg.data).resolve())
    cfg.imgsz = size
    cfg.folds_id = prep.folds_id  # predict refuses a run whose folds no longer match
    if cfg.init:
        path = resolve_init(cfg.init, cfg.init_fold)  # exists, before any fold starts
        rundir.refuse_init_on_same_folds(cfg.init, path.parent.parent, prep.folds_id, "classify.yaml")
        cfg.init = str(Path(cfg.init).resolve())
    cfg.extra = [str(p) for p in extra_roots(cfg.extra)]
    callbacks = run_callbacks(cfg, prep, callbacks)
    run_dir = Path(cfg.project) / cfg.name
    masks = not cfg.get("label_names") or bool((prep.meta.n_boxes > 0).any())
    check_files(prep, prep.split("train").assign(split="train"), size, masks=masks)
    check_run_folders(cfg, run_dir, folds)
    prepare_run_dir(cfg, run_dir, d)
    if cfg.engine == "ray":
        from siimcovid.ray_engine import run_folds

        # the finished folds are skipped here (as train_fold skips them), the others go to Ray
        finished = [fold for fold in folds if cfg.resume and P.fold_done(rundir.fold_dir(run_dir, fold))]
        results = {fold: train_fold(cfg, prep, fold, size, run_dir, d, callbacks) for fold in finished}
        if not cfg.resume:  # retrain from scratch: cleared here once, so that a task Ray runs again resumes, not restarts
            for fold in folds:
                rundir.remove_fold_files(rundir.fold_dir(run_dir, fold), FOLD_FILES)
        task_cfg = Config({**cfg, "resume": True}) if not cfg.resume else cfg
        todo = {fold: (task_cfg, fold, size, run_dir.resolve(), callbacks) for fold in folds if fold not in results}
        if todo:
            results.update(run_folds(ray_fold, todo, cfg.ray_address, cfg.gpus_per_fold, cfg.cpus_per_fold, "classify"))
        results = {fold: results[fold] for fold in folds}
    else:
        results = {fold: train_fold(cfg, prep, fold, size, run_dir, d, callbacks) for fold in folds}
    if d.is_main:
        (report_oof_labels if cfg.get("label_names") else report_oof)(prep, run_dir)
    return results


def report_oof(prep: Prepared, run_dir: Path) -> None:
    """When every fold is finished, print the OOF study mAP of the best checkpoints (no TTA)."""
    files = [rundir.fold_dir(run_dir, k) / "val_pred_image.csv" for k in range(prep.n_folds)]
    if not all(P.fold_done(f.parent) and f.is_file() for f in files):
        return
    images = pd.concat([CLASSIFIER_IMAGES.read(f) for f in files], ignore_index=True)
    LOGGER.info(
        f"{run_dir.name}: OOF study mAP over {prep.n_folds} folds (no TTA): {P.study_map(prep, images):.4f}; "
        f"`siimcovid classify predict run={run_dir}` writes the OOF and test tables"
    )


def report_oof_labels(prep: Prepared, run_dir: Path) -> None:
    """Multi-label pretraining: when every fold is finished, the OOF mean ROC AUC over labels of the best checkpoints."""
    files = [rundir.fold_dir(run_dir, k) / LABEL_PREDICTIONS for k in range(prep.n_folds)]
    if not all(P.fold_done(f.parent) and f.is_file() for f in files):
        return
    probs = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    labels = ExtraData(prep.root).label_table().set_index("image_id").loc[probs.image_id]
    names = list(labels.columns)
    auc = mean_auc(labels.to_numpy(dtype=np.float64), probs[names].to_numpy(dtype=np.float64))
    LOGGER.info(
        f"{run_dir.name}: OOF mean ROC AUC over {len(names)} labels ({', '.join(names)}), {prep.n_folds} folds: {auc:.4f}; "
        f"fine-tune with `siimcovid classify train data=<SIIM prepared> init={run_dir}`"
    )


def main(cfg, callbacks: dict | None = None) -> dict:
    d = setup(cfg.device)
    try:
        return train(cfg, d, callbacks)
    finally:
        cleanup(d)
