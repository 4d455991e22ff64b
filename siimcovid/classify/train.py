"""`siimcovid classify train`: one timm study classifier per fold, with the auxiliary mask loss.

Run dir <project>/<name>/ (the resolved config in classify.yaml), one folder per fold:

fold<k>/classify.yaml        the resolved config
fold<k>/last.pt              everything to resume: model, EMA, optimizer, scheduler, scaler, wave/epoch
fold<k>/best.pt              the weights with the best validation study mAP (EMA weights when ema > 0)
fold<k>/results.csv          one row per epoch (columns: LOG_COLUMNS)
fold<k>/results.png          losses, study mAP and lr per epoch
fold<k>/val_pred_image.csv   the best checkpoint's predictions on the fold's held-out images
                             (schema of pred_oof_image.csv in predict.py, no TTA)
fold<k>/done.json            written last: the fold is finished and is skipped on a re-run

Training runs in waves: wave 0 is `epochs` epochs at `lr` with warmup and a cosine decay;
each later wave (fine_lr, fine_epochs) restarts from the best checkpoint so far with a new
optimizer and a lower lr (the two-wave schedule of the team notes in shared/seeds/).
The checkpoint criterion is the competition's study mAP on the fold's validation images,
averaged per study. An interrupted fold resumes from last.pt at the next epoch.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from siimcovid.classify import predict as P
from siimcovid.classify.data import StudyDataset, build_augment, check_files, image_table, mix_batch, seed_worker, to_device
from siimcovid.classify.dist import Dist, cleanup, setup
from siimcovid.classify.model import StudyLoss, build_model, check_model_name, model_cfg
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import STUDY_CLASSES
from siimcovid.tables import write_csv
from siimcovid.tables import write_csv as write_predictions
from siimcovid.utils import LOGGER, SiimError, atomic_path, atomic_write_text, save_png

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
SYNC_EVERY = 20  # training steps between host syncs (loss check, progress bar)

# Settings that may differ when a run resumes or skips its finished folds: where and how it runs,
# and the predict settings. Any other change (model, epochs, lr, augmentation...) would put folds
# trained one way under settings that say another, so it is refused.
RUNTIME_KEYS = {
    "device", "workers", "amp", "channels_last", "project", "name", "resume", "fold", "mode",
    "run", "split", "tta", "weights", "ensemble", "out", "source", "allow_unfinished", "reuse",
}  # fmt: skip


def resolve_folds(fold, n_folds: int, prep: Prepared) -> list[int]:
    if fold in (None, "all", "ALL"):
        return list(range(n_folds))
    folds = fold if isinstance(fold, list) else [fold]
    try:
        return [prep.check_fold(int(f)) for f in folds]
    except (TypeError, ValueError):
        raise SiimError(f"fold={fold}: expected all, an integer or a list of integers") from None


def wave_plan(cfg) -> list[tuple[float, int, int]]:
    """[(lr, epochs, warmup_epochs)] per wave; later waves restart from the best checkpoint, no warmup."""
    fine = cfg.fine_lr if isinstance(cfg.fine_lr, list) else ([] if cfg.fine_lr in (None, 0) else [cfg.fine_lr])
    waves = [(float(cfg.lr), int(cfg.epochs), int(cfg.warmup_epochs))]
    waves += [(float(lr), int(cfg.fine_epochs), 0) for lr in fine if int(cfg.fine_epochs) > 0]
    return waves


def check_config(cfg) -> None:
    if int(cfg.epochs) < 1:
        raise SiimError(f"epochs={cfg.epochs}: need at least 1")
    if int(cfg.batch) < 1:
        raise SiimError(f"batch={cfg.batch}: need at least 1")
    for key in ("mask_weight", "mask_bce", "mask_dice", "none_weight", "mixup", "ema"):
        if float(cfg[key]) < 0:
            raise SiimError(f"{key}={cfg[key]} must be >= 0")
    if not 0 <= float(cfg.ema) < 1:
        raise SiimError(f"ema={cfg.ema}: expected a decay in [0, 1), e.g. 0.997 (0 = off)")
    if float(cfg.mixup) > 0 and float(cfg.mixup_alpha) <= 0 and float(cfg.cutmix_alpha) <= 0:
        raise SiimError("mixup > 0 needs mixup_alpha > 0 or cutmix_alpha > 0")
    if int(cfg.in_chans) not in (1, 3):
        raise SiimError(f"in_chans={cfg.in_chans}: expected 1 or 3")
    check_model_name(cfg.model)
    from timm.optim import list_optimizers

    known = list_optimizers()
    name = str(cfg.optimizer).lower()
    if name.split("_", 1)[-1] not in known and name not in known:  # also accepts timm's "lookahead_<opt>"
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SiimError(f"optimizer={cfg.optimizer}: not a timm optimizer{hint}")


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
    axes[1].plot(log.epoch, log.val_map, marker="o", label="val study mAP")
    best = log[log.best.astype(bool)]
    axes[1].scatter(best.epoch, best.val_map, color="red", zorder=3, label="new best")
    axes[1].set_title("validation study mAP")
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

    def __init__(self, cfg, prep: Prepared, fold: int, size: int, fold_dir: Path, d: Dist):
        self.cfg, self.prep, self.fold, self.size, self.dir, self.d = cfg, prep, fold, size, fold_dir, d
        self.device = d.device
        cuda = self.device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        self.channels_last = bool(cfg.channels_last) and cuda
        self.amp_dtype = P.amp_dtype_for(self.device, bool(cfg.amp))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.train_tab = image_table(prep, "train", fold, "train")
        self.val_tab = image_table(prep, "train", fold, "val")
        if self.val_tab.empty or self.train_tab.empty:
            raise SiimError(f"fold {fold} has {len(self.train_tab)} training and {len(self.val_tab)} validation images")
        self.batch = max(1, int(cfg.batch) // d.world)
        if len(self.train_tab) < self.batch * d.world:
            raise SiimError(f"fold {fold}: {len(self.train_tab)} training images, fewer than batch={cfg.batch}")
        # Seeded augmentation (one stream per rank, re-seeded per worker): the same seed gives the same run.
        train_ds = StudyDataset(prep, self.train_tab, size, build_augment(cfg, seed=int(cfg.seed) + d.rank))
        self.sampler = DistributedSampler(
            train_ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=int(cfg.seed), drop_last=True
        )
        kw = {"num_workers": int(cfg.workers), "pin_memory": cuda, "persistent_workers": int(cfg.workers) > 0}
        self.train_loader = DataLoader(
            train_ds,
            batch_size=self.batch,
            sampler=self.sampler,
            drop_last=True,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(int(cfg.seed) + d.rank),
            **kw,
        )
        # Validation: rank r takes images r, r+world, ...; the ranks' predictions are gathered.
        val_ds = Subset(StudyDataset(prep, self.val_tab, size), list(range(d.rank, len(self.val_tab), d.world)))
        self.val_loader = DataLoader(val_ds, batch_size=self.batch * 2, shuffle=False, **kw)

        torch.manual_seed(int(cfg.seed))  # same initial weights on every rank
        self.model = build_model(
            model_cfg(cfg),
            bool(cfg.pretrained) or bool(cfg.pretrained_file),
            cfg.pretrained_file,
            channels_last=self.channels_last,
        ).to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_model = self.model
        if d.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[self.device.index] if cuda else None)
            torch.manual_seed(int(cfg.seed) + d.rank)  # weights are equal now; dropout / drop-path masks differ per rank
        self.loss_fn = StudyLoss.from_cfg(cfg)
        self.ema = None
        self.rng = np.random.default_rng(int(cfg.seed) + d.rank)

    # ---------------------------------------------------------------- pieces

    def new_ema(self):
        from timm.utils import ModelEmaV3

        # Warmup: the decay grows with the step count, so short runs still get a useful average.
        self.ema = ModelEmaV3(self.model, decay=float(self.cfg.ema), use_warmup=True) if float(self.cfg.ema) > 0 else None

    def new_optimizer(self, lr: float, epochs: int, warmup: int):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        try:
            opt = create_optimizer_v2(self.model, opt=cfg.optimizer, lr=lr, weight_decay=float(cfg.weight_decay))
        except (AssertionError, ValueError) as e:
            raise SiimError(f"optimizer={cfg.optimizer}: {e}") from None
        sched, _ = create_scheduler_v2(
            opt,
            sched=cfg.sched,
            num_epochs=epochs,
            warmup_epochs=min(warmup, max(epochs - 1, 0)),
            warmup_lr=float(cfg.warmup_lr),
            min_lr=float(cfg.min_lr),
            step_on_epochs=False,
            updates_per_epoch=len(self.train_loader),
        )
        return opt, sched

    def eval_model(self):
        return self.ema.module if self.ema is not None else self.model

    def train_one_epoch(self, epoch: int, opt, sched, step: int) -> tuple[dict, int]:
        cfg, d = self.cfg, self.d
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        sums, n, wait, t0 = {}, 0, 0.0, time.perf_counter()
        mixing = float(cfg.mixup) > 0
        bar = tqdm(self.train_loader, desc=f"fold {self.fold} epoch {epoch}", unit="batch", disable=not d.is_main, leave=False)
        tw = time.perf_counter()
        for batch in bar:
            wait += time.perf_counter() - tw
            b = to_device(batch, self.device)
            target = b["label"]
            if mixing and self.rng.random() < float(cfg.mixup):
                b = mix_batch(b, len(STUDY_CLASSES), float(cfg.mixup_alpha), float(cfg.cutmix_alpha), self.rng)
                target = b["label"]
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                out = self.train_model(b["image"])
            parts = self.loss_fn(out, target, b["none"], b["mask"])
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(parts["loss"]).backward()
            if float(cfg.clip_grad) > 0:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(cfg.clip_grad))
            self.scaler.step(opt)
            self.scaler.update()
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
        keys = ["loss", "cls", "none", "mask"]
        tot = d.sum([sums.get(k, 0.0) for k in keys] + [n])
        stats = {f"train_{k}": tot[i] / max(tot[-1], 1) for i, k in enumerate(keys)}
        stats["train_img_s"] = tot[-1] / max(elapsed, 1e-9)
        stats["loader_wait"] = wait / max(elapsed, 1e-9)
        return stats, step

    def validate(self) -> tuple[dict, pd.DataFrame]:
        self.d.broadcast_buffers(self.eval_model())  # each rank's batch-norm statistics drifted apart; rank 0's are saved
        idx, study, none, sums = P.infer(self.eval_model(), self.val_loader, self.device, self.amp_dtype, loss_fn=self.loss_fn)
        # Items carry their row in val_tab (not their position in this rank's shard).
        parts = self.d.gather((idx if idx is not None else np.zeros(0, int), study, none, sums))
        rows = np.concatenate([p[0] for p in parts])
        study = np.concatenate([p[1] for p in parts if p[1] is not None])
        none = np.concatenate([p[2] for p in parts if p[2] is not None]) if parts[0][2] is not None else None
        n = sum(p[3]["n"] for p in parts)
        loss = {f"val_{k}": sum(p[3].get(k, 0.0) for p in parts) / max(n, 1) for k in ("loss", "cls", "none", "mask")}
        images = P.image_frame(self.val_tab.iloc[rows], study, none, self.cfg.name).sort_values("image_id").reset_index(drop=True)
        stats = dict(loss, val_map=P.study_map(self.prep, images), val_none_auc=self.none_auc(images))
        return stats, images

    def none_auc(self, images: pd.DataFrame) -> float:
        from sklearn.metrics import roc_auc_score

        truth = self.val_tab.set_index("image_id").loc[images.image_id, "none"].values
        return float(roc_auc_score(truth, images["none"])) if len(set(truth)) == 2 else float("nan")

    def check_loss(self, loss_sum: float, epoch: int) -> None:
        if not math.isfinite(loss_sum):
            raise SiimError(f"fold {self.fold} epoch {epoch}: the loss became {loss_sum}; lower lr or turn amp off")

    def checkpoint(self, opt, sched, wave: int, wave_epoch: int, epoch: int, step: int, best: dict) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": self.scaler.state_dict(),
            "wave": wave,
            "wave_epoch": wave_epoch,
            "epoch": epoch,
            "step": step,
            "best": best,
            "rng": self.rng.bit_generator.state,
            "model_cfg": model_cfg(self.cfg),
            "fold": self.fold,
            "folds_id": self.cfg.folds_id,
        }

    def load_best_weights(self) -> None:
        state = torch.load(self.dir / "best.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])

    # ---------------------------------------------------------------- the fold

    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        waves = wave_plan(cfg)
        offsets = np.cumsum([0] + [w[1] for w in waves])
        last_path, log_path = self.dir / "last.pt", self.dir / "results.csv"
        state, rows = None, []
        best = {"score": -math.inf, "epoch": 0, "wave": 0}
        if last_path.is_file():
            # CPU: load_state_dict moves what belongs on the GPU; Adam's step counters must stay on the CPU
            state = torch.load(last_path, map_location="cpu", weights_only=False)
            best = state["best"]
            if log_path.is_file():
                rows = [r for r in pd.read_csv(log_path).to_dict("records") if r["epoch"] <= state["epoch"]]
            if d.is_main:
                LOGGER.info(
                    f"fold {self.fold}: resuming after epoch {state['epoch']} (wave {state['wave']}, best {best['score']:.4f})"
                )
        self.new_ema()
        for wave, (lr, n_epochs, warmup) in enumerate(waves):
            start = 0
            resuming = state is not None and wave == state["wave"]
            if state is not None and wave < state["wave"]:
                continue
            if resuming:
                start = state["wave_epoch"] + 1
                if start >= n_epochs:  # that wave had finished; the next one restarts from best
                    state = None
                    continue
            elif wave > 0:
                d.barrier()
                self.load_best_weights()
                self.new_ema()
                if d.is_main:
                    LOGGER.info(
                        f"fold {self.fold}: wave {wave} restarts from the best checkpoint (epoch {best['epoch']}, "
                        f"study mAP {best['score']:.4f}) with lr {lr:g} for {n_epochs} epochs"
                    )
            opt, sched = self.new_optimizer(lr, n_epochs, warmup)
            step = 0
            if resuming:
                self.model.load_state_dict(state["model"])
                if self.ema is not None and state["ema"] is not None:
                    self.ema.module.load_state_dict(state["ema"])
                opt.load_state_dict(state["optimizer"])
                if sched is not None:
                    sched.load_state_dict(state["scheduler"])
                if state["scaler"] and self.scaler.is_enabled():  # empty where the run had no fp16 scaler
                    self.scaler.load_state_dict(state["scaler"])
                self.rng.bit_generator.state = state["rng"]
                step = state["step"]
                state = None
            for wave_epoch in range(start, n_epochs):
                epoch = int(offsets[wave]) + wave_epoch + 1
                t0 = time.perf_counter()
                train_stats, step = self.train_one_epoch(epoch, opt, sched, step)
                val_stats, images = self.validate()
                score = val_stats["val_map"]
                improved = not math.isnan(score) and score > best["score"]
                if improved or best["epoch"] == 0:
                    best = {"score": score if not math.isnan(score) else -math.inf, "epoch": epoch, "wave": wave}
                    if d.is_main:
                        save_torch(
                            {
                                "model": self.eval_model().state_dict(),
                                "model_cfg": model_cfg(cfg),
                                "epoch": epoch,
                                "wave": wave,
                                "score": score,
                                "imgsz": self.size,
                                "classes": STUDY_CLASSES,
                                "ema": float(cfg.ema),
                                "fold": self.fold,
                                "folds_id": cfg.folds_id,  # travels with the weights: predict checks it per fold
                            },
                            self.dir / "best.pt",
                        )
                        write_predictions(images.assign(model=cfg.name), self.dir / "val_pred_image.csv")
                row = {
                    "epoch": epoch,
                    "wave": wave,
                    "wave_epoch": wave_epoch + 1,
                    "lr": opt.param_groups[0]["lr"],
                    **train_stats,
                    **val_stats,
                    "best": bool(best["epoch"] == epoch),
                    "time_s": time.perf_counter() - t0,
                }
                rows.append(row)
                log = pd.DataFrame(rows, columns=LOG_COLUMNS)
                if d.is_main:
                    save_torch(self.checkpoint(opt, sched, wave, wave_epoch, epoch, step, best), last_path)
                    write_csv(log, log_path, float_format="%.6g")
                    plot_log(log, self.dir / "results.png")
                    LOGGER.info(
                        f"fold {self.fold} epoch {epoch} (wave {wave}): loss {train_stats['train_loss']:.4f} "
                        f"val loss {val_stats['val_loss']:.4f} study mAP {score:.4f}"
                        f"{' *best*' if row['best'] else ''}  {train_stats['train_img_s']:.1f} img/s"
                    )
                d.barrier()
        summary = {
            "fold": self.fold,
            "best_score": best["score"],
            "best_epoch": best["epoch"],
            "best_wave": best["wave"],
            "epochs": int(offsets[-1]),
        }
        if d.is_main:
            atomic_write_text(self.dir / "done.json", json.dumps(summary, indent=1))
        d.barrier()
        return summary


def run_name(cfg) -> str:
    return cfg.name or f"{cfg.model}_{int(cfg.imgsz)}"


def prepare_run_dir(cfg, run_dir: Path, d: Dist) -> None:
    """Refuse to resume a run with different fixed settings; save the resolved config."""
    saved = run_dir / "classify.yaml"
    if saved.is_file() and cfg.resume:
        from siimcovid.config import read_yaml

        old = read_yaml(saved)
        changed = [k for k in cfg if k in old and k not in RUNTIME_KEYS and str(old[k]) != str(cfg[k])]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)} -> {cfg[k]}" for k in changed)
            raise SiimError(
                f"{run_dir} was trained with other settings ({diff}); use another name= or resume=false"
                + (" (folds_id: the prepared folds changed since)" if "folds_id" in changed else "")
            )
    if d.is_main:
        cfg.save(saved)


def train(cfg, d: Dist) -> dict:
    prep = Prepared(cfg.data)
    size = prep.check_size(cfg.imgsz)
    folds = resolve_folds(cfg.fold, prep.n_folds, prep)
    check_config(cfg)
    cfg.name = run_name(cfg)
    cfg.data = str(Path(cfg.data).resolve())
    cfg.imgsz = size
    cfg.folds_id = prep.folds_id  # predict refuses a run whose folds no longer match
    run_dir = Path(cfg.project) / cfg.name
    check_files(prep, prep.split("train").assign(split="train"), size, masks=True)
    prepare_run_dir(cfg, run_dir, d)
    results = {}
    for fold in folds:
        fold_dir = run_dir / f"fold{fold}"
        done = fold_dir / "done.json"
        if cfg.resume and done.is_file():
            results[fold] = json.loads(done.read_text())
            if d.is_main:
                LOGGER.info(f"fold {fold}: finished before (best study mAP {results[fold]['best_score']:.4f}), skipping")
            continue
        if not cfg.resume and fold_dir.exists() and d.is_main:
            shutil.rmtree(fold_dir)
        d.barrier()
        if d.is_main:
            fold_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(fold_dir / "classify.yaml")
        d.barrier()
        results[fold] = FoldTrainer(cfg, prep, fold, size, fold_dir, d).run()
    if d.is_main:
        report_oof(prep, run_dir)
    return results


def report_oof(prep: Prepared, run_dir: Path) -> None:
    """When every fold is finished, print the OOF study mAP of the best checkpoints (no TTA)."""
    files = [run_dir / f"fold{k}" / "val_pred_image.csv" for k in range(prep.n_folds)]
    if not all((f.parent / "done.json").is_file() and f.is_file() for f in files):
        return
    images = pd.concat([pd.read_csv(f, dtype={"image_id": str, "study_id": str}) for f in files], ignore_index=True)
    LOGGER.info(
        f"{run_dir.name}: OOF study mAP over {prep.n_folds} folds (no TTA): {P.study_map(prep, images):.4f}; "
        f"`siimcovid classify predict run={run_dir}` writes the OOF and test tables"
    )


def main(cfg) -> dict:
    d = setup(cfg.device)
    try:
        return train(cfg, d)
    finally:
        cleanup(d)
