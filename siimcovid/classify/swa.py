"""A classifier fold's SWA (swa_epochs, swa_lr; siimcovid.engine.swa), mixed into siimcovid.classify.train.FoldTrainer.

The last swa_epochs epochs (all in the last wave: check_swa) average self.model's weights, never the EMA's: with
ema > 0 the EMA is still what each epoch validates and what the per-epoch best.pt holds until the end. After the
last epoch the average's batch-norm statistics are recomputed over the training loader (update_bn, under the
training's autocast), it is validated like an epoch, and it becomes the fold's weights: best.pt (its score the
fold's best_score, its epoch the last), val_pred_image.csv, and last.pt's model (ema None: `weights=last` predicts
it too). last.pt's "swa" (the average before update_bn, and n_averaged) is what a resume puts back; a fold killed
after that rewrite of last.pt and before done.json recomputes the same weights from it.
"""

from __future__ import annotations

import math

import torch

from siimcovid.classify.checkpoints import save_torch
from siimcovid.classify.files import FILES
from siimcovid.engine.swa import SWA_KEY
from siimcovid.utils import LOGGER


class FoldSWA:
    """What FoldTrainer does for SWA: it reads self.swa (engine.swa.SWA or None), self.model, self.train_loader."""

    def swa_sched(self, opt, sched, epoch: int):
        """The scheduler epoch `epoch` steps: None where SWALR holds the lr at swa_lr (set here)."""
        if self.swa is None:
            return sched
        self.swa.set_lr(opt, epoch)
        return None if self.swa.owns_lr(epoch) else sched

    def swa_update(self, epoch: int) -> None:
        if self.swa is not None:
            self.swa.update(self.model, epoch)

    def swa_resume(self, state: dict | None) -> None:
        """The average as last.pt holds it (a fresh start: none)."""
        if self.swa is not None and self.d.is_main:
            ema = f"; ema={self.cfg.ema} still validates each epoch, the EMA is not what SWA averages" if self.cfg.ema > 0 else ""
            LOGGER.info(
                f"fold {self.fold}: SWA averages the model's own weights of epochs {self.swa.first}-{self.swa.total}{ema}; "
                "the fold ends with the SWA weights"
            )
        if self.swa is not None and state is not None:
            self.swa.load_state_dict(state.get(SWA_KEY), self.model)
            if self.d.is_main and self.swa.n_averaged:
                LOGGER.info(f"fold {self.fold}: SWA resumes with {self.swa.n_averaged} epochs averaged")

    def swa_state(self) -> dict | None:
        return self.swa.state_dict() if self.swa is not None else None

    def bn_batches(self):
        """The training loader's images, for update_bn (the sampler at an epoch of its own: the same order whether the
        fold was resumed or not)."""
        self.sampler.set_epoch(self.swa.total + 1)
        for batch in self.train_loader:
            yield batch["image"].to(self.device, non_blocking=True)

    def swa_finish(self, epoch: int, wave: int) -> None:
        """The SWA weights (batch-norm recomputed) validated and made the fold's (module docstring)."""
        if self.swa is None:
            return
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            model = self.swa.final_model(self.bn_batches())
        if self.d.active:  # each rank's statistics of its share: their mean
            from timm.utils import distribute_bn

            distribute_bn(model, self.d.world, reduce=True)
        self.final_model = model
        before = dict(self.best)
        stats, images = self.validate()
        score = stats[self.metric]
        self.best = {"score": score if not math.isnan(score) else -math.inf, "epoch": epoch, "wave": wave}
        if self.d.is_main:
            weights = model.state_dict()
            last = self.dir / FILES.last
            state = torch.load(last, map_location="cpu", weights_only=False)  # the run's own
            save_torch({**state, "model": weights, "ema": None, "best_images": None}, last)
            self.save_best(epoch, wave, score, images, weights)
            LOGGER.info(
                f"fold {self.fold}: SWA of the last {self.swa.epochs} epochs ({self.swa.n_averaged} averaged, batch-norm "
                f"recomputed): {self.metric_name} {score:.4f} (the best epoch before: {before['epoch']}, "
                f"{before['score']:.4f}); best.pt and last.pt hold the SWA weights"
            )
        self.d.barrier()

    def swa_summary(self) -> dict:
        """The done record's SWA keys (none when off)."""
        if self.swa is None:
            return {}
        return {"swa": True, "swa_epochs": self.swa.epochs, "n_averaged": self.swa.n_averaged}
