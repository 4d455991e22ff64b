"""The study classifier: a timm backbone, a 4-class study head, a "none" head and a mask head.

Multi-label pretraining (`labels`: the label names of an external set) swaps the study and none heads for one
label head of that size (out["labels"], BCE with unknown labels masked); `init_from` starts a model from
another's checkpoint (the backbone and every tensor whose name and shape match; the rest keeps its fresh init).

    image (N,1,H,W) in [0,1] -> repeat to in_chans, normalise with the backbone's mean/std
      -> backbone.forward_intermediates -> final features -> pooled -> study logits (N,4)
                                                                   -> none logit   (N,)
                                        -> feature map at mask_stride -> mask head -> mask logits (N,1,h,w)

The mask head is deliberately light (3x3 conv, BN, ReLU, 1x1 conv): it only has to make the
backbone look at the opacities (the auxiliary-loss trick of the competition's best teams).
Its target is the box mask from prepare, area-downsampled to the head's resolution.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F

from siimcovid.tables import STUDY_CLASSES
from siimcovid.utils import SiimError

# What a checkpoint must remember to rebuild the model (pretrained weights are not needed again).
MODEL_KEYS = ("model", "in_chans", "drop_rate", "drop_path_rate", "mask_stride", "none_head")


def check_model_name(name: str) -> str:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else " See timm.list_models()."
        raise SiimError(f"unknown timm model '{name}'.{hint}")
    return name


def create_backbone(name: str, pretrained: bool = False, pretrained_file: str | None = None, **kwargs) -> nn.Module:
    """timm.create_model without its classifier, with real pretrained-weight loading.

    pretrained=True downloads the ImageNet weights through timm (Hugging Face hub, then cached);
    pretrained_file loads them from a local file instead (machines without internet).
    """
    import timm

    check_model_name(name)
    extra = {}
    if pretrained_file:
        check_weights_only(pretrained_file)
        pretrained, extra["pretrained_cfg_overlay"] = True, {"file": str(pretrained_file)}
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **extra, **kwargs)
    except TypeError as e:  # e.g. drop_path_rate on a model without stochastic depth
        raise SiimError(f"timm model '{name}' does not accept {sorted(kwargs)}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if not pretrained:
            raise
        raise SiimError(
            f"could not load pretrained weights for '{name}' ({type(e).__name__}: {e}). "
            "Without internet use pretrained_file=<weights file> or pretrained=false."
        ) from None
    if not hasattr(model, "forward_intermediates"):
        raise SiimError(f"timm model '{name}' has no forward_intermediates(): the mask head cannot read its features")
    return model


def load_weights_only(path, key: str, advice: str = ""):
    """torch.load of a file that may come from anywhere (init=, pretrained_file=): weights_only=True, so that only
    tensors and plain containers load and a pickle naming code to run is refused; errors name `key`."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SiimError(f"{key}={path}: holds Python objects besides weights, and loading those could run code{advice}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SiimError(f"{key}={path}: not a PyTorch weights file ({str(e).splitlines()[0][:160]})") from None


def check_weights_only(path) -> None:
    """pretrained_file= must load with weights_only=True, whichever torch.load default the installed timm passes on
    when it reads the file after this check (a .safetensors holds tensors only)."""
    if not str(path).endswith(".safetensors"):
        load_weights_only(path, "pretrained_file")


class StudyNet(nn.Module):
    """Backbone + study head (4 logits) + optional none head (1 logit) + mask head (1 channel)."""

    def __init__(
        self,
        model: str,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mask_stride: int = 16,
        none_head: bool = True,
        channels_last: bool = False,
        labels: list[str] | None = None,
    ):
        super().__init__()
        kwargs = {"in_chans": in_chans, "drop_rate": drop_rate}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.backbone = create_backbone(model, pretrained, pretrained_file, **kwargs)
        self.in_chans, self.channels_last = in_chans, channels_last
        strides = [int(f["reduction"]) for f in self.backbone.feature_info]
        if mask_stride not in strides:
            raise SiimError(f"mask_stride={mask_stride}: '{model}' has feature maps of strides {sorted(set(strides))}")
        # The deepest feature map of that stride (richest features at that resolution).
        self.mask_index = max(i for i, s in enumerate(strides) if s == mask_stride)
        mask_chs = int(self.backbone.feature_info[self.mask_index]["num_chs"])
        # The backbone's own normalisation (its pretrained config), applied on the device.
        cfg = getattr(self.backbone, "pretrained_cfg", {}) or {}
        mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
        std = list(cfg.get("std", (0.229, 0.224, 0.225)))
        if in_chans == 1:  # timm sums the stem over RGB; use the mean statistics
            mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
        self.register_buffer("mean", torch.tensor(mean[:in_chans]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std[:in_chans]).view(1, -1, 1, 1), persistent=False)
        n_feat = self.backbone.num_features
        self.labels = list(labels) if labels else None
        if self.labels:  # multi-label pretraining: one head over the external set's labels, no SIIM heads
            self.label_head = nn.Linear(n_feat, len(self.labels))
            self.study_head = self.none_head = None
        else:
            self.study_head = nn.Linear(n_feat, len(STUDY_CLASSES))
            self.none_head = nn.Linear(n_feat, 1) if none_head else None
        self.mask_head = nn.Sequential(
            nn.Conv2d(mask_chs, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N,1,H,W) grey images scaled to [0,1]. Returns logits: study (N,4), none (N,) or None, mask (N,1,h,w)."""
        x = (x.expand(-1, self.in_chans, -1, -1) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        final, (feat,) = self.backbone.forward_intermediates(x, indices=[self.mask_index])
        pooled = self.backbone.forward_head(final, pre_logits=True)
        if self.labels:
            return {"labels": self.label_head(pooled), "none": None, "mask": self.mask_head(feat)}
        return {
            "study": self.study_head(pooled),
            "none": self.none_head(pooled).squeeze(1) if self.none_head is not None else None,
            "mask": self.mask_head(feat),
        }


def model_cfg(cfg) -> dict:
    """The settings that define the architecture; stored in every checkpoint (`labels`: multi-label runs only)."""
    out = {k: cfg[k] for k in MODEL_KEYS}
    if cfg.get("label_names"):
        out["labels"] = list(cfg["label_names"])
    return out


def build_model(
    mcfg: dict, pretrained: bool = False, pretrained_file: str | None = None, channels_last: bool = False
) -> StudyNet:
    """A StudyNet from model_cfg(...) (a checkpoint's copy needs no pretrained weights: its own replace them)."""
    return StudyNet(
        model=mcfg["model"],
        pretrained=pretrained,
        pretrained_file=pretrained_file,
        in_chans=mcfg["in_chans"],
        drop_rate=mcfg["drop_rate"],
        drop_path_rate=mcfg["drop_path_rate"],
        mask_stride=mcfg["mask_stride"],
        none_head=mcfg["none_head"],
        channels_last=channels_last,
        labels=mcfg.get("labels"),
    )


# ---------------------------------------------------------------- init from another run


def init_weights(path) -> tuple[dict, dict]:
    """(weights, model_cfg) of a checkpoint: best.pt's (the evaluated ones) or last.pt's EMA, else its model.

    init= may name a file from elsewhere: it is read with weights_only=True (load_weights_only), so a pickle that
    names code to run is refused instead of run; a .safetensors file is read as one."""
    if str(path).endswith(".safetensors"):
        from siimcovid.utils import read_input, safetensors_state

        return safetensors_state(read_input(path, what="weights file"), f"init={path}"), {}
    advice = ": give a classify run (its best.pt holds weights only), or weights as .safetensors"
    ckpt = load_weights_only(path, "init", advice)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SiimError(f"init={path}: not a siimcovid classify checkpoint (no 'model' weights)")
    state = ckpt["ema"] if "optimizer" in ckpt and ckpt.get("ema") is not None else ckpt["model"]
    return state, ckpt.get("model_cfg") or {}


def init_from(model: nn.Module, path, expect_model: str | None = None) -> tuple[int, list[str]]:
    """Load every tensor of the checkpoint whose name and shape match the model's; the others keep their fresh init.
    Returns (tensors loaded, the modules rebuilt: those with a tensor not loaded, e.g. study_head, none_head)."""
    state, mcfg = init_weights(path)
    if expect_model and mcfg.get("model") and mcfg["model"] != expect_model:
        raise SiimError(f"init={path}: a checkpoint of model={mcfg['model']}, this run builds model={expect_model}")
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not any(k.startswith("backbone.") for k in fits):
        raise SiimError(f"init={path}: none of its backbone tensors fit this model (another architecture?)")
    model.load_state_dict(fits, strict=False)
    rebuilt = dict.fromkeys(k.split(".", 1)[0] for k in own if k not in fits)
    return len(fits), list(rebuilt)


# ---------------------------------------------------------------- losses


def mask_target(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Box mask (N,1,H,W) on the 0..255 scale (uint8, or float after mixing) -> the fraction of
    each head cell covered by boxes, (N,1,h,w) in [0,1]."""
    m = mask.float() / 255.0
    return F.adaptive_avg_pool2d(m, size) if tuple(m.shape[-2:]) != tuple(size) else m


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over the whole batch (stable when many images have empty masks)."""
    p = torch.sigmoid(logits.float())
    inter = (p * target).sum()
    return 1 - (2 * inter + eps) / (p.sum() + target.sum() + eps)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with target probabilities (N,C); rows with an unknown (NaN) target contribute nothing.
    The mean is over the known rows (0, still tied to the graph, when none is known)."""
    known = ~torch.isnan(target).any(dim=1)
    if not known.any():
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float()[known], target[known].float(), label_smoothing=label_smoothing)


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits over the known (non-NaN) targets only, averaged over them (0 when none is known)."""
    known = ~torch.isnan(target)
    if not known.any():
        return logits.float().sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits.float()[known], target[known].float())


def mask_loss(logits: torch.Tensor, mask: torch.Tensor, bce_share: float, dice_share: float, has_mask=None) -> torch.Tensor:
    """bce_share * BCE + dice_share * Dice of the mask head against the box masks; has_mask (N,) bool: the samples
    whose mask is known (the others contribute nothing; None: all)."""
    logits = logits.float()
    if has_mask is not None:
        if not has_mask.any():
            return logits.sum() * 0.0
        logits, mask = logits[has_mask], mask[has_mask]
    target = mask_target(mask, logits.shape[-2:])
    return bce_share * F.binary_cross_entropy_with_logits(logits, target) + dice_share * dice_loss(logits, target)


class MaskLoss(nn.Module):
    """The auxiliary mask loss both losses share: mask_weight * (mask_bce * BCE + mask_dice * Dice) of the mask head."""

    def __init__(self, mask_weight=4.0, mask_bce=0.6, mask_dice=0.4):
        super().__init__()
        self.mask_weight, self.mask_bce, self.mask_dice = mask_weight, mask_bce, mask_dice

    def mask_part(self, out: dict, mask: torch.Tensor, has_mask=None) -> torch.Tensor:
        """The mask term (before mask_weight); has_mask: the samples whose mask is known (None: all)."""
        if self.mask_weight:
            return mask_loss(out["mask"], mask, self.mask_bce, self.mask_dice, has_mask)
        # the mask head still runs: tie it to the loss with weight 0, so DDP sees every parameter used
        return out["mask"].float().sum() * 0.0


class StudyLoss(MaskLoss):
    """study_weight * CE(study) + none_weight * BCE(none) + mask_weight * (mask_bce * BCE + mask_dice * Dice).

    study_weight 0: task=none, a binary none model (the study head's CE still computed and logged, not learned)."""

    def __init__(self, mask_weight=4.0, mask_bce=0.6, mask_dice=0.4, none_weight=1.0, label_smoothing=0.0, study_weight=1.0):
        super().__init__(mask_weight, mask_bce, mask_dice)
        self.none_weight, self.label_smoothing, self.study_weight = none_weight, label_smoothing, study_weight

    @classmethod
    def from_cfg(cls, cfg) -> "StudyLoss":
        study = 0.0 if (cfg.get("task") or "study") == "none" else 1.0
        return cls(cfg.mask_weight, cfg.mask_bce, cfg.mask_dice, cfg.none_weight, cfg.label_smoothing, study)

    def forward(self, out: dict, study: torch.Tensor, none: torch.Tensor, mask: torch.Tensor, has_mask=None) -> dict:
        """study: (N,) class indices or (N,4) soft targets; none: (N,) in [0,1]; mask: (N,1,H,W) box masks.

        has_mask (N,) bool: a batch with extra training data (soft targets, NaN = unknown): the study CE, the none
        BCE and the mask loss each count the samples whose target is known only. None: the plain SIIM loss."""
        if has_mask is not None:
            parts = {"cls": soft_cross_entropy(out["study"], study, self.label_smoothing)}
            parts["none"] = masked_bce(out["none"], none) if out["none"] is not None else parts["cls"].new_zeros(())
            parts["mask"] = self.mask_part(out, mask, has_mask.bool())
        else:
            parts = {"cls": F.cross_entropy(out["study"].float(), study, label_smoothing=self.label_smoothing)}
            logits, zero = out["none"], parts["cls"].new_zeros(())
            parts["none"] = F.binary_cross_entropy_with_logits(logits.float(), none.float()) if logits is not None else zero
            parts["mask"] = self.mask_part(out, mask)
        parts["loss"] = self.study_weight * parts["cls"] + self.none_weight * parts["none"] + self.mask_weight * parts["mask"]
        return parts


class LabelLoss(MaskLoss):
    """Multi-label pretraining: BCE over the known labels (NaN = unknown, masked) + mask_weight * the mask loss
    (mask_weight 0: the external set has no boxes). Parts named as StudyLoss's (cls = the label BCE)."""

    def forward(self, out: dict, labels: torch.Tensor, none: torch.Tensor, mask: torch.Tensor, has_mask=None) -> dict:
        parts = {"cls": masked_bce(out["labels"], labels)}
        parts["none"] = parts["cls"].new_zeros(())
        parts["mask"] = self.mask_part(out, mask, has_mask)
        parts["loss"] = parts["cls"] + self.mask_weight * parts["mask"]
        return parts


def probabilities(out: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Study softmax (N,4) and none sigmoid (N,) from the logits."""
    study = torch.softmax(out["study"].float(), dim=1)
    none = torch.sigmoid(out["none"].float()) if out["none"] is not None else None
    return study, none
