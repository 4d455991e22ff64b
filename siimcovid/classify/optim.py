"""A classifier fold's optimisation, as timm's train.py does it: the fp16 loss scaler, the weight EMA, the optimizer
and scheduler of a wave, one backward step (mixed into siimcovid.classify.train.FoldTrainer)."""

from __future__ import annotations

import torch

from siimcovid.utils import SiimError


class Optimisation:
    """What FoldTrainer builds to optimise: it reads self.cfg, self.model, self.amp_dtype, self.train_loader."""

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
