"""`siimcovid classify train`: one timm study classifier per fold, with the auxiliary mask loss.

Run dir <project>/<name>/ (the resolved config in classify.yaml), one folder per fold:

fold<k>/classify.yaml        the resolved config
fold<k>/last.pt              everything to resume: model, EMA, optimizer, scheduler, scaler, wave/epoch, the log,
                             every random stream (numpy, torch, loader, augmentation; per rank); written first each epoch
fold<k>/best.pt              the weights of the best epoch by the checkpoint rule (EMA weights when ema > 0);
                             swa_epochs > 0: at the fold's end, the SWA weights (siimcovid.classify.swa)
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

Lung-crop views (crop=lung, lung=<a lung detector run>; siimcovid.views): with crop_train=true each training image
that has a lung window joins the fold's training data once more, cropped to it (its mask cut the same way, the same
labels); the window comes from the lung run's OUT-OF-FOLD boxes of the image's own fold, found by a lung model that
never saw it. Validation (best.pt's epoch) sees what `classify predict` sees: each held-out image whole and, where
fold k's lung model found a window, cropped, the two views' probabilities fused by view_fusion (no TTA).

Kill -9 at any instant costs at most the epoch in progress. last.pt is the record of an epoch:
written (atomically) before the files that follow from it (best.pt, val_pred_image.csv,
results.csv), which a resume writes again from last.pt, so a kill between them leaves nothing
inconsistent; done.json comes last. With workers=0 a resumed fold draws what the uninterrupted
one would (last.pt holds every random stream of every rank): on the CPU it ends weight for weight
the same (tests/test_kill_classify.py). With workers > 0 the DataLoader workers' augmentation
streams restart at a resume (they live in the workers, out of reach of last.pt), so the resumed
epochs draw other augmentations than an uninterrupted run would.

The fold engine (siimcovid.engine.folds) runs the folds: skip, resume, init=, extra=, serial or Ray, the outputs
rule; the family (siimcovid.classify.family, `family=timm`) says what a fold is; this module holds its trainer.

Events (siimcovid.engine.events, the same for every family): `main(cfg, callbacks={event: fn or [fn]})` adds
functions to them without touching the loop. With none added, training is exactly the plain loop: events draw no
random numbers and change no order of operations. The classifier's own events:

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
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from siimcovid.classify import predict as P
from siimcovid.classify.checkpoints import Checkpoints, save_torch
from siimcovid.classify.data import (
    SoftTargets,
    StudyDataset,
    TargetDataset,
    build_augment,
    check_paths,
    image_table,
    mix_batch,
    seed_worker,
    to_device,
)
from siimcovid.classify.dist import Dist
from siimcovid.classify.files import FILES, VAL_IMAGES
from siimcovid.classify.model import StudyLoss, build_model, check_model_name, init_from, model_cfg
from siimcovid.classify.optim import Optimisation
from siimcovid.classify.swa import FoldSWA
from siimcovid.config import default_name
from siimcovid.data.extra import TARGETS, ExtraData
from siimcovid.data.prepared import Prepared
from siimcovid.engine.events import EVENTS, Events
from siimcovid.engine.swa import SWA, check_swa
from siimcovid.rundir import fold_dir
from siimcovid.tables import CLASSIFIER_IMAGES, STUDY_CLASSES
from siimcovid.utils import LOGGER, SiimError

LOSS_PARTS = ["loss", "cls", "none", "mask"]  # what StudyLoss returns, logged as train_* and val_*
EXTRA_SEED = 1000  # the extra data's augmentation stream: seed + rank + this (the SIIM images' stream is unchanged)
SYNC_EVERY = 20  # training steps between host syncs (loss check, progress bar)
RUN_CONFIG = FILES.settings  # <run>/ and <run>/fold<k>/: the resolved settings, the record that makes them siimcovid's


# ---------------------------------------------------------------- hooks


def study_map_improved(trainer: "FoldTrainer", stats: dict, best: dict) -> bool:
    """The default checkpoint rule: the validation study mAP beats the best so far (NaN never does)."""
    score = stats["val_map"]
    return not math.isnan(score) and score > best["score"]


def default_callbacks() -> dict[str, list[Callable]]:
    """Every training event with its default functions (siimcovid.engine.events)."""
    return {**{event: [] for event in EVENTS}, "is_better": [study_map_improved]}


# ---------------------------------------------------------------- settings and files


def mixes(cfg, epoch: int) -> bool:
    """Whether epoch `epoch` (1-based, over all waves) mixes batches: mixup > 0, and not one of the last
    mixup_off_epochs epochs of the fold."""
    total = sum(n for _, n, _ in wave_plan(cfg))
    return cfg.mixup > 0 and epoch <= total - cfg.mixup_off_epochs


def wave_plan(cfg) -> list[tuple[float, int, int]]:
    """[(lr, epochs, warmup_epochs)] per wave; later waves restart from the best checkpoint, no warmup."""
    waves = [(cfg.lr, cfg.epochs, cfg.warmup_epochs)]
    waves += [(lr, cfg.fine_epochs, 0) for lr in cfg.fine_lr if cfg.fine_epochs > 0]
    return waves


def check_config(cfg) -> None:
    """What the settings' declared types and ranges cannot say: combinations, timm's model and optimizer names."""
    if cfg.mixup > 0 and cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        raise SiimError("mixup > 0 needs mixup_alpha > 0 or cutmix_alpha > 0")
    total = sum(n for _, n, _ in wave_plan(cfg))
    if cfg.freeze_epochs >= total:
        raise SiimError(f"freeze_epochs={cfg.freeze_epochs}: the fold has {total} epochs, so the backbone would never train")
    if cfg.mixup > 0 and cfg.mixup_off_epochs >= total:
        raise SiimError(
            f"mixup_off_epochs={cfg.mixup_off_epochs}: the fold has {total} epochs, so none would mix; give fewer or mixup=0"
        )
    check_swa(cfg, total, wave_plan(cfg)[-1][1])  # swa_epochs: in the last wave
    check_model_name(cfg.model)
    from timm.optim import list_optimizers

    known = list_optimizers()
    name = cfg.optimizer.lower()
    if name.split("_", 1)[-1] not in known and name not in known:  # also accepts timm's "lookahead_<opt>"
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SiimError(f"optimizer={cfg.optimizer}: not a timm optimizer{hint}")


class FoldTrainer(Events, Optimisation, Checkpoints, FoldSWA):
    """Everything one fold of a study classifier needs; `run()` trains it (or resumes it) to the end.
    Multi-label pretraining is a subclass (siimcovid.classify.pretrain.LabelTrainer)."""

    metric, metric_name, classes = "val_map", "study mAP", STUDY_CLASSES  # the score of best.pt and of the log's lines

    def __init__(
        self, cfg, prep: Prepared, fold: int, size: int, fold_dir: Path, d: Dist, callbacks: dict | None = None, init=None
    ):
        self.cfg, self.prep, self.fold, self.size, self.dir, self.d = cfg, prep, fold, size, fold_dir, d
        self.init_callbacks(default_callbacks(), callbacks)
        self.stage, self.family, self.run_dir = "classify", cfg.get("family") or "timm", fold_dir.parent
        self.project, self.settings, self.epoch, self.is_main = Path(cfg.project), dict(cfg), 0, d.is_main
        self.device = d.device
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        self.channels_last = cfg.channels_last and cuda
        self.amp_dtype = P.amp_dtype_for(self.device, cfg.amp)
        self.scaler = self.new_scaler()
        self.rows: list[dict] = []  # results.csv so far
        self.best = {"score": -math.inf, "epoch": 0, "wave": 0}
        self.views = P.Views.of(cfg, prep.folds_id)  # crop=lung: the lung-crop views (module docstring); else None
        self.build_loaders(cuda)

        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.model = build_model(
            model_cfg(cfg), cfg.pretrained or cfg.pretrained_file not in (None, ""), cfg.pretrained_file, self.channels_last
        ).to(self.device)
        if init is not None:  # init=: the checkpoint the fold engine resolved
            self.load_init(Path(init))
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_model = self.model
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if cfg.freeze_epochs > 0:  # DDP's reducer waits for the gradients of every parameter it was built with
                raise SiimError("freeze_epochs > 0 runs in one process only for now (not under torchrun): give freeze_epochs=0")

            self.train_model = DDP(self.model, device_ids=[self.device.index] if cuda else None)
            torch.manual_seed(cfg.seed + d.rank)  # weights are equal now; dropout / drop-path masks differ per rank
        self.loss_fn = self.new_loss()
        self.ema = None
        self.swa, self.final_model = SWA.of(cfg, sum(n for _, n, _ in wave_plan(cfg))), None  # SWA (classify.swa)
        self.rng = np.random.default_rng(cfg.seed + d.rank)

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

    def load_init(self, path: Path) -> None:
        """init=: the model starts from another run's weights (every tensor whose name and shape match)."""
        n, rebuilt = init_from(self.model, path, self.cfg.model)
        if self.d.is_main:
            LOGGER.info(f"init: loaded {n} tensors from {path}, rebuilt: {', '.join(rebuilt) or 'nothing'}")

    def fold_datasets(self, augment) -> tuple[Dataset, Dataset]:
        """(training dataset, validation dataset) of the fold's SIIM images; crop=lung with crop_train: the training
        images that have a lung window once more, cropped (module docstring)."""
        table, windows = self.train_tab, None
        if self.views is not None and self.cfg.crop_train:
            _, crops, found = P.crop_subset(table, P.own_fold_windows(self.views, self.prep, table))
            windows = [None] * len(table) + found
            table = pd.concat([table, crops], ignore_index=True)
            if self.d.is_main:
                LOGGER.info(f"fold {self.fold}: {len(self.train_tab)} training images + {len(crops)} lung crops of them")
        train = StudyDataset(self.prep, table, self.size, augment, windows=windows)
        return train, StudyDataset(self.prep, self.val_tab, self.size)

    def crop_val_loader(self, kw: dict):
        """crop=lung: a loader of this rank's share of the lung-crop views of the validation images that have a
        window (fold k's lung model's out-of-fold boxes, as `classify predict` sees them); None: whole images only."""
        if self.views is None:
            return None
        at, crops, windows = P.crop_subset(self.val_tab, self.views.windows(self.prep, self.fold, self.val_tab, "oof"))
        if not len(at):
            return None
        self.val_crop_rows = at  # crop row i is val_tab row at[i]
        dataset = StudyDataset(self.prep, crops, self.size, masks=False, windows=windows)
        share = Subset(dataset, list(range(self.d.rank, len(crops), self.d.world)))
        return DataLoader(share, batch_size=self.batch * 2, shuffle=False, **kw)

    def fold_tables(self) -> None:
        """train_tab / val_tab: the fold's rows."""
        self.train_tab = image_table(self.prep, "train", self.fold, "train")
        self.val_tab = image_table(self.prep, "train", self.fold, "val")

    def new_loss(self):
        return StudyLoss.from_cfg(self.cfg)

    def write_best_images(self, images: pd.DataFrame) -> None:
        """The best epoch's validation predictions: val_pred_image.csv (tables.CLASSIFIER_IMAGES)."""
        CLASSIFIER_IMAGES.write(images.assign(model=self.cfg.name), self.dir / VAL_IMAGES)

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
        self.val_crop_loader = self.crop_val_loader(kw)

    def eval_model(self):
        if self.final_model is not None:  # the SWA weights at the fold's end
            return self.final_model
        return self.ema.module if self.ema is not None else self.model

    def freeze_backbone(self, frozen: bool) -> None:
        """freeze_epochs: the backbone without gradients and in eval mode (its batch-norm statistics kept), the heads
        training; from the epoch after, everything trains."""
        backbone = self.model.backbone
        for p in backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            backbone.eval()

    def train_one_epoch(self, epoch: int, opt, sched, step: int) -> tuple[dict, int]:
        cfg, d = self.cfg, self.d
        self.train_model.train()
        if cfg.freeze_epochs:
            self.freeze_backbone(epoch <= cfg.freeze_epochs)
        self.sampler.set_epoch(epoch)
        sums, n, wait, t0 = {}, 0, 0.0, time.perf_counter()
        mixing = mixes(cfg, epoch)
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
        idx, study, none, sums = P.infer(self.eval_model(), self.val_loader, self.device, self.amp_dtype, loss_fn=self.loss_fn)
        # Items carry their row in val_tab (not their position in this rank's shard).
        parts = self.d.gather((idx if idx is not None else np.zeros(0, int), study, none, sums))
        rows = np.concatenate([p[0] for p in parts])
        study = np.concatenate([p[1] for p in parts if p[1] is not None])
        none = np.concatenate([p[2] for p in parts if p[2] is not None]) if parts[0][2] is not None else None
        n = sum(p[3]["n"] for p in parts)
        loss = {f"val_{k}": sum(p[3].get(k, 0.0) for p in parts) / max(n, 1) for k in LOSS_PARTS}
        if self.val_crop_loader is not None:  # the loss stays the whole view's
            study, none = self.with_crop_views(rows, study, none)
        images = P.image_frame(self.val_tab.iloc[rows], study, none, self.cfg.name).sort_values("image_id").reset_index(drop=True)
        stats = dict(loss, val_map=P.study_map(self.prep, images), val_none_auc=self.none_auc(images))
        return stats, images

    def with_crop_views(self, rows: np.ndarray, study: np.ndarray, none):
        """The validation probabilities (of val_tab rows `rows`) fused with the lung-crop views' (view_fusion)."""
        idx, crop_study, crop_none, _ = P.infer(self.eval_model(), self.val_crop_loader, self.device, self.amp_dtype)
        parts = self.d.gather((idx if idx is not None else np.zeros(0, int), crop_study, crop_none))
        crop_rows = self.val_crop_rows[np.concatenate([p[0] for p in parts]).astype(int)]
        crop_study = np.concatenate([p[1] for p in parts if p[1] is not None])
        crop_none = np.concatenate([p[2] for p in parts if p[2] is not None]) if none is not None else None
        where = {int(r): i for i, r in enumerate(rows)}
        at = np.array([where[int(r)] for r in crop_rows], dtype=int)
        return P.fuse_views(study, none, at, crop_study, crop_none, self.views.fusion)

    def none_auc(self, images: pd.DataFrame) -> float:
        from sklearn.metrics import roc_auc_score

        truth = self.val_tab.set_index("image_id").loc[images.image_id, "none"].values
        return float(roc_auc_score(truth, images["none"])) if len(set(truth)) == 2 else float("nan")

    def check_loss(self, loss_sum: float, epoch: int) -> None:
        if not math.isfinite(loss_sum):
            raise SiimError(f"fold {self.fold} epoch {epoch}: the loss became {loss_sum}; lower lr or turn amp off")

    def fit_epoch(self, epoch: int, wave: int, wave_epoch: int, opt, sched, step: int) -> int:
        """Train, validate, keep the best checkpoint, write the log; returns the step count."""
        t0 = time.perf_counter()
        self.epoch = epoch
        self.run_callbacks("on_train_epoch_start")
        train_stats, step = self.train_one_epoch(epoch, opt, self.swa_sched(opt, sched, epoch), step)
        self.swa_update(epoch)
        self.run_callbacks("on_train_epoch_end")
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
            save_torch(last, self.dir / FILES.last)
            if new_best:
                self.save_best(epoch, wave, score, images, self.eval_model().state_dict())
            self.write_log()
            self.log_epoch(row)
        self.run_callbacks("on_model_save")
        self.run_callbacks("on_fit_epoch_end", row)
        self.d.barrier()
        return step

    def log_epoch(self, row: dict) -> None:
        LOGGER.info(
            f"fold {self.fold} epoch {row['epoch']} (wave {row['wave']}): loss {row['train_loss']:.4f} "
            f"val loss {row['val_loss']:.4f} {self.metric_name} {row[self.metric]:.4f}"
            f"{' *best*' if row['best'] else ''}  {row['train_img_s']:.1f} img/s"
        )

    def run(self) -> dict:
        waves = wave_plan(self.cfg)
        offsets = np.cumsum([0] + [w[1] for w in waves])
        state = self.load_resume_state()
        self.new_ema()
        self.swa_resume(state)
        self.run_callbacks("on_train_start")
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
        self.swa_finish(int(offsets[-1]), len(waves) - 1)
        return self.finish(int(offsets[-1]))

    def finish(self, epochs: int) -> dict:
        """done.json: the fold's summary; its presence marks the fold finished."""
        summary = {
            "fold": self.fold,
            "best_score": self.best["score"],
            "best_epoch": self.best["epoch"],
            "best_wave": self.best["wave"],
            "epochs": epochs,
            **self.swa_summary(),
        }
        if self.d.is_main:
            FILES.write_done(self.dir, summary)
        self.d.barrier()
        self.run_callbacks("on_train_end", summary)
        return summary


def run_name(cfg, labels: bool = False) -> str:
    """The name= given, else <model>_<imgsz> (multi-label pretraining: _<the external set's folder name> added)."""
    if cfg.name:
        return cfg.name
    name = f"{cfg.model}_{cfg.imgsz}" + (f"_{Path(cfg.data).name}" if labels else "")
    return default_name("classify", name, "model= and imgsz=")  # e.g. hf-hub:timm/<model> holds a '/'


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


def report_oof(prep: Prepared, run_dir: Path) -> None:
    """When every fold is finished, print the OOF study mAP of the best checkpoints (no TTA)."""
    files = [fold_dir(run_dir, k) / VAL_IMAGES for k in range(prep.n_folds)]
    if not all(P.fold_done(f.parent) and f.is_file() for f in files):
        return
    images = pd.concat([CLASSIFIER_IMAGES.read(f) for f in files], ignore_index=True)
    LOGGER.info(
        f"{run_dir.name}: OOF study mAP over {prep.n_folds} folds (no TTA): {P.study_map(prep, images):.4f}; "
        f"`siimcovid classify predict run={run_dir}` writes the OOF and test tables"
    )


def train(cfg, callbacks: dict | None = None) -> dict:
    """Train the folds of cfg.fold with the fold engine (family timm, or timm-labels for an external labelled set);
    callbacks: {event: fn or [fn, ...]} added to every fold's trainer. Returns {fold: its done record}."""
    from siimcovid.engine.family import create
    from siimcovid.engine.folds import train as train_folds

    return train_folds(create(cfg, "classify", "timm"), callbacks)


def main(cfg, callbacks: dict | None = None) -> dict:
    return train(cfg, callbacks)
