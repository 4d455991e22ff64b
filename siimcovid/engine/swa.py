"""SWA, stochastic weight averaging, for every model family (torch.optim.swa_utils: AveragedModel, SWALR, update_bn).

Settings (classify.yaml, detect.yaml): swa_epochs=N averages the weights of the fold's last N epochs (0 = off);
swa_lr = the constant lr of those epochs (SWALR with anneal_epochs=0, set from the first of them), null = the
family's own schedule goes on.

- What is averaged: the model's own weights at the end of each SWA epoch's training steps (AveragedModel, an equal
  mean: after n of them, the mean of those n), never an EMA's (classify's ema, Ultralytics' ModelEMA): the EMA goes on
  validating each epoch as before; the fold's weights are SWA's.
- At the end of the fold, update_bn recomputes the average's batch-norm statistics by one pass over the training
  loader (train mode, no gradients, nothing stepped); those weights are the fold's: best.pt (and last.pt's model)
  hold them, their validation score is the fold's best_score, and the done record says swa: true and n_averaged.
  The per-epoch best.pt before that stays the checkpoint rule's until the end (a later wave restarts from it).
- Checkpoint: state_dict() -> {"model": the average's state dict, "n_averaged": n}, kept in last.pt under "swa";
  load_state_dict() puts it back, so a fold killed during the SWA epochs and resumed averages the same weights.

A family calls: SWA.of(cfg, total_epochs) (None when off), then per epoch set_lr(opt, epoch) before training and
update(model, epoch) after it, and at the end final_model(batches, forward).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch

from siimcovid.utils import SiimError

SWA_KEY = "swa"  # last.pt's key (classify, family=torchvision)


def check_swa(cfg, total: int, last_wave: int | None = None) -> None:
    """The combinations the settings' declared types cannot refuse; total: the fold's epochs; last_wave: the
    epochs of its last wave, where a family restarts a wave from best.pt (classify)."""
    n, lr = int(cfg.get("swa_epochs") or 0), cfg.get("swa_lr")
    if n == 0:
        if lr is not None:
            raise SiimError(f"swa_lr={lr} without swa_epochs: give swa_epochs > 0 (the last epochs that average) or drop swa_lr")
        return
    if n >= total:
        raise SiimError(
            f"swa_epochs={n}: the fold has {total} epochs; SWA averages the last ones after the model has trained, "
            "so give fewer than that"
        )
    if last_wave is not None and n > last_wave:
        raise SiimError(
            f"swa_epochs={n}: the last wave has {last_wave} epochs and a wave restarts from best.pt, so SWA cannot "
            f"span waves: give swa_epochs <= {last_wave} (fine_epochs), or one wave (fine_lr=[])"
        )


class SWA:
    """The running average of one fold's model over its last `epochs` epochs (module docstring)."""

    def __init__(self, epochs: int, total: int, lr: float | None = None):
        self.epochs, self.total, self.lr = int(epochs), int(total), lr
        self.averaged: torch.optim.swa_utils.AveragedModel | None = None
        self.sched = self.sched_for = None  # SWALR and the optimizer it was put on

    @classmethod
    def of(cls, cfg, total: int) -> "SWA | None":
        n = int(cfg.get("swa_epochs") or 0)
        return cls(n, total, cfg.get("swa_lr")) if n > 0 else None

    @property
    def first(self) -> int:
        """The first SWA epoch (1-based, over the fold)."""
        return self.total - self.epochs + 1

    def averaging(self, epoch: int) -> bool:
        return epoch >= self.first

    @property
    def n_averaged(self) -> int:
        return int(self.averaged.n_averaged) if self.averaged is not None else 0

    def owns_lr(self, epoch: int) -> bool:
        """Whether SWALR sets this epoch's lr (the family's scheduler must then not step)."""
        return self.lr is not None and self.averaging(epoch)

    def set_lr(self, opt, epoch: int) -> None:
        """swa_lr: from the first SWA epoch on, SWALR's constant lr (anneal_epochs=0), put on the optimizer once and
        stepped at each later call (a family whose scheduler steps every epoch, Ultralytics', sets it again)."""
        if not self.owns_lr(epoch):
            return
        if self.sched_for is not opt:
            self.sched, self.sched_for = torch.optim.swa_utils.SWALR(opt, swa_lr=float(self.lr), anneal_epochs=0), opt
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": it only sets swa_lr
            self.sched.step()

    def update(self, model: torch.nn.Module, epoch: int) -> None:
        """After epoch `epoch`'s training steps: the model's weights join the average when it is an SWA epoch."""
        if not self.averaging(epoch):
            return
        if self.averaged is None:
            self.averaged = torch.optim.swa_utils.AveragedModel(model)
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict | None:
        if self.averaged is None:
            return None
        return {"model": self.averaged.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: dict | None, model: torch.nn.Module) -> None:
        """last.pt's "swa" (None: no SWA epoch had finished); model: the fold's, the average's architecture."""
        if not state:
            self.averaged = None
            return
        self.averaged = torch.optim.swa_utils.AveragedModel(model)
        self.averaged.module.load_state_dict(state["model"])
        self.averaged.n_averaged.fill_(int(state["n_averaged"]))

    def final_model(self, batches: Iterable[Any], forward: Callable | None = None) -> torch.nn.Module:
        """The averaged model with its batch-norm statistics recomputed over `batches` (update_bn: each batch a
        tensor or a dict, not a list or tuple, whose first item alone it would pass); forward(model, batch): how a
        batch goes through the model (default model(batch))."""
        if self.averaged is None:
            raise SiimError("swa: no SWA epoch was averaged (the fold ended before its first SWA epoch)")
        model = self.averaged.module
        target = model if forward is None else Forward(model, forward)
        torch.optim.swa_utils.update_bn(batches, target)
        return model.eval()


class Forward(torch.nn.Module):
    """update_bn calls model(batch): this one calls forward(model, batch) (a detector's images and targets)."""

    def __init__(self, model: torch.nn.Module, forward: Callable):
        super().__init__()
        self.model, self.forward_fn = model, forward

    def forward(self, batch):
        return self.forward_fn(self.model, batch)
