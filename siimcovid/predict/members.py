"""One member of a bundle (siimcovid.bundle.Member: kind, name, weights {fold: safetensors file}, settings, model
description) on a prepared folder.

The numerics are `detect predict` and `classify predict`'s own (their per-fold functions run the
bundle's checkpoints), so a bundle predicts what its runs predicted on the same images:

    detector    siimcovid.detect.predict.predict_run on a Run built from the member: each fold's
                model rebuilt once from its description and weights (siimcovid.weights.detector), every
                test image in batches of `batch` -> tables.DETECTIONS
    classifier  siimcovid.classify.predict.predict_test: one loader for all folds, each fold's model
                rebuilt once (siimcovid.weights.classifier), the fold mean (and hflip TTA) -> tables.CLASSIFIER_IMAGES
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from siimcovid import weights as weights_of
from siimcovid.data.prepared import Prepared
from siimcovid.engine import devices
from siimcovid.stages import stage_config
from siimcovid.utils import SiimError


@dataclass(frozen=True)
class Hardware:
    """Where and how the members run (predict's runtime settings, resolved once)."""

    device: object  # torch.device
    batch: int
    loader_workers: int
    half: bool


def member_tta(member, tta: bool | None):
    """The member's TTA, on or off: the bundle's (tta=null), or predict's for every member (each its own views)."""
    return bool(member.settings.get("tta")) if tta is None else bool(tta)


def detector_config(member, hw: Hardware, tta: bool):
    """The `detect predict` config of a detector member: its recorded predict settings, predict's runtime ones."""
    s = member.settings
    settings = {
        **(s.get("ultralytics") or {}),  # Ultralytics predict arguments the run gave (e.g. agnostic_nms)
        "conf": s["conf"],
        "iou": s["iou"],
        "max_det": s["max_det"],
        "predict_imgsz": s.get("predict_imgsz"),
        "tta": tta,
        "batch": hw.batch,
        "device": devices.from_torch(hw.device),
        "quantize": 16 if hw.half else 32,  # Ultralytics' precision (its `half` before 8.4): fp16 on a GPU, fp32 on the CPU
    }
    return stage_config("detect", "predict", settings)


def predict_detector(member, prepared: Prepared, hw: Hardware, tta: bool) -> pd.DataFrame:
    """Every fold of a detector member on every test image of `prepared`: tables.DETECTIONS (model = member name)."""
    from siimcovid.detect.predict import Run, predict_run

    s = member.settings
    size = prepared.check_size(s["size"])
    imgsz = {int(k): int(v) for k, v in (s.get("imgsz") or {}).items()}
    weights = dict(sorted(member.weights.items()))
    if set(weights) - set(imgsz):
        raise SiimError(f"detector {member.name}: settings.yaml gives no imgsz for folds {sorted(set(weights) - set(imgsz))}")
    folder = Path(next(iter(weights.values()))).parent
    sha = {path: member.digests.get(k) for k, path in member.weights.items()}  # what each file hashed to when opened
    load = lambda path: weights_of.detector(member.model, path, f"{member.kind}/{member.name}/{path.name}", sha[path])  # noqa: E731
    run = Run(folder, prepared, size, weights, imgsz, name=member.name, load=load)
    return predict_run(run, ["test"], detector_config(member, hw, tta))["test"]


def predict_classifier(member, prepared: Prepared, hw: Hardware, tta: bool) -> pd.DataFrame:
    """Every fold of a classifier member on every test image of `prepared`, averaged: tables.CLASSIFIER_IMAGES."""
    from siimcovid.classify.predict import Inference, amp_dtype_for, predict_test

    size = prepared.check_size(member.settings["imgsz"])
    cuda = hw.device.type == "cuda"
    # one loader for every fold; its worker processes live through the fold loop instead of restarting per fold
    loader = {"batch_size": hw.batch, "num_workers": hw.loader_workers, "pin_memory": cuda}
    loader["persistent_workers"] = hw.loader_workers > 0
    channels_last = cuda  # as `classify predict` does by default
    where = f"{member.kind}/{member.name}"
    sha = {path: member.digests.get(k) for k, path in member.weights.items()}  # what each file hashed to when opened
    load = lambda path, device, cl: weights_of.classifier(member.model, path, f"{where}/{path.name}", device, cl, sha[path])  # noqa: E731
    how = Inference(hw.device, amp_dtype_for(hw.device, hw.half), channels_last, tta, loader, load)
    return predict_test(prepared, size, dict(sorted(member.weights.items())), member.name, how)
