"""A classifier fold's checkpoints and log (the files of siimcovid.classify.family.FILES; layout in
siimcovid/classify/train.py's docstring): what last.pt holds to resume, best.pt, results.csv and results.png.

best.pt (BEST_KEYS), read by `classify predict` and `siimcovid export`:
    model       the evaluated weights of the best epoch (EMA weights when ema > 0): a state dict; swa_epochs > 0:
                the SWA weights of the fold's end (siimcovid.classify.swa), also last.pt's model once the fold ends
    model_cfg   build_model's arguments (siimcovid.classify.model.MODEL_KEYS; multi-label: labels)
    epoch, wave, score   the best epoch (1-based), its wave and its checkpoint score (study mAP or mean AUC)
    imgsz       the input size; classes: the output classes (STUDY_CLASSES, or the pretraining's labels)
    ema         the EMA decay it was trained with; fold, folds_id: the fold and the fold fingerprint
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from siimcovid.classify.data import augment_state, set_augment_state
from siimcovid.classify.files import FILES
from siimcovid.classify.model import model_cfg
from siimcovid.tables import write_csv
from siimcovid.utils import LOGGER, atomic_path, save_png

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
BEST_KEYS = ("model", "model_cfg", "epoch", "wave", "score", "imgsz", "classes", "ema", "fold", "folds_id")


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
    if "val_none_ap" in log:  # a binary none model (task=none): its checkpoint score
        metric, title = "val_none_ap", "AP(none)"
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



class Checkpoints:
    """A FoldTrainer's checkpoints, resume and log (mixed into siimcovid.classify.train.FoldTrainer)."""

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
            "swa": self.swa_state(),  # the SWA average so far and its n_averaged (siimcovid.classify.swa)
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
        state = torch.load(self.dir / FILES.best, map_location=self.device, weights_only=False)  # the run's own
        self.model.load_state_dict(state["model"])

    def load_resume_state(self) -> dict | None:
        """last.pt of an interrupted fold (None: a fresh start); restores the best so far and the log up to it."""
        last_path, log_path = self.dir / FILES.last, self.dir / FILES.log
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

    def save_best(self, epoch: int, wave: int, score: float, images: pd.DataFrame, weights: dict) -> None:
        """best.pt (weights: the evaluated ones, EMA when ema > 0) and val_pred_image.csv of the best epoch."""
        cfg = self.cfg
        values = (weights, model_cfg(cfg), epoch, wave, score, self.size, self.classes, cfg.ema, self.fold, cfg.folds_id)
        best = dict(zip(BEST_KEYS, values))  # folds_id travels with the weights: predict checks it per fold
        save_torch(best, self.dir / FILES.best)
        self.write_best_images(images)

    def log_columns(self) -> list[str]:
        """LOG_COLUMNS, then the extra loss terms of on_loss hooks in the order they appeared."""
        extra = dict.fromkeys(k for r in self.rows for k in r if k not in LOG_COLUMNS)
        return LOG_COLUMNS + list(extra)

    def write_log(self) -> None:
        """results.csv and results.png of the epochs so far."""
        log = pd.DataFrame(self.rows, columns=self.log_columns())
        write_csv(log, self.dir / FILES.log, float_format="%.6g")
        plot_log(log, self.dir / "results.png")
