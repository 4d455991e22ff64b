"""One member of a bundle (siimcovid.bundle.Member: kind, name, weights {fold: safetensors file}, settings, model
description) on a prepared folder.

The numerics are `detect predict` and `classify predict`'s own (their per-fold functions run the
bundle's checkpoints), so a bundle predicts what its runs predicted on the same images:

    detector    siimcovid.detect.predict.predict_run on a Run built from the member: each fold's
                model rebuilt once from its description and weights (siimcovid.weights.detector), every
                test image in batches of `batch` -> tables.DETECTIONS
    classifier  siimcovid.classify.predict.predict_test: one loader for all folds, each fold's model
                rebuilt once (siimcovid.weights.classifier), the fold mean (over its TTA views) -> tables.CLASSIFIER_IMAGES
    lung        a lung member (siimcovid.bundle.members.LUNG) predicts first, as a detector with its own settings;
                its table becomes the "test" split of a siimcovid.views.LungBoxes (lung_boxes), which each member
                of crop=lung gets (`lungs`): fold k of the member crops with lung fold k's boxes of the new images,
                as `detect predict crop=lung` and `classify predict crop=lung` crop test images; an image with no
                confident lung box is seen whole only
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from siimcovid import weights as weights_of
from siimcovid.data.prepared import Prepared
from siimcovid.engine import devices
from siimcovid.stages import stage_config
from siimcovid.utils import LOGGER, SiimError


@dataclass(frozen=True)
class Hardware:
    """Where and how the members run (predict's runtime settings, resolved once)."""

    device: object  # torch.device
    batch: int
    loader_workers: int
    half: bool
    precision: str = "fp32"  # what the CPU computes in, resolved (siimcovid.engine.devices.cpu_precision): fp32 or bf16
    backend: str = "torch"  # predict's backend= (torch | openvino | onnx | auto): member_engine resolves it per member
    int8: bool = False  # precision=int8: the members' int8 engines where the bundle has them; the rest in `precision`


def member_backend(member, hw: Hardware) -> str:
    """What runs a member's folds, as predict.yaml records it: torch, onnx or openvino (an int8 engine is OpenVINO's)."""
    from siimcovid.bundle.engines import INT8

    engine = member_engine(member, hw)
    return "openvino" if engine == INT8 else engine


def member_engine(member, hw: Hardware) -> str:
    """The engine a member's folds run: torch, or one the bundle exported for it (siimcovid.bundle.engines).
    precision=int8 (hw.int8): the member's int8 engine where it has one (the others as below, in hw.precision).
    backend=auto: on the CPU, OpenVINO where the member has it, else ONNX Runtime in fp32, else torch; on a GPU torch.
    A named engine the member lacks, or cannot run here, is an error naming the fix."""
    from siimcovid.bundle.engines import INT8, available, check_runtime

    where = f"predict: {member.kind}/{member.name}"
    if hw.int8 and INT8 in member.engines and hw.backend in ("openvino", "auto") and hw.device.type == "cpu":
        check_runtime("openvino", where)  # its runtime
        return INT8
    if hw.backend == "torch":
        return "torch"
    if hw.backend == "auto":
        if hw.device.type != "cpu":
            return "torch"
        usable = [e for e in ("openvino", "onnx") if e in member.engines and available(e)]
        usable = [e for e in usable if e != "onnx" or hw.precision == "fp32"]  # bf16 asked: torch's bf16 beats ORT's fp32
        return usable[0] if usable else "torch"
    if hw.backend not in member.engines:
        raise SiimError(
            f"{where}: the bundle holds no {hw.backend} engine of it (`siimcovid export ... formats={hw.backend}` writes "
            f"one{'; a family of its own has none' if member.family else ''}): backend=auto uses what is there, torch the rest"
        )
    check_runtime(hw.backend, where)
    if hw.device.type != "cpu":
        raise SiimError(f"{where}: backend={hw.backend} runs on the CPU, not {hw.device}: device=cpu, or backend=torch (or auto)")
    if hw.backend == "onnx" and hw.precision != "fp32":
        raise SiimError(f"{where}: backend=onnx computes in fp32 here, not {hw.precision}: backend=openvino for bf16")
    return hw.backend


def with_backend(member, hw: Hardware, load, wrap) -> tuple[str, object]:
    """(the member's engine, its fold loader): `load` (weights file, ... -> torch model) as it is for torch, else
    wrap(path, args, Net) with the fold's exported network (siimcovid.bundle.engines); the choice logged."""
    from siimcovid.bundle.engines import Net, engine_paths

    engine, where = member_engine(member, hw), f"{member.kind}/{member.name}"
    precision = hw_precision(hw, engine)
    LOGGER.info(f"predict: {where}: backend {member_backend(member, hw)}, {precision}")
    if engine == "torch":
        return engine, load
    files = {path: engine_paths(member.engines[engine][k].parent, k, engine) for k, path in member.weights.items()}
    return engine, lambda path, *args: wrap(path, args, Net(engine, files[path], member.engine_digests, precision, where))


def hw_precision(hw: Hardware, engine: str) -> str:
    """What an engine (member_engine's) computes in: int8 for the int8 engine, fp16 for torch on a GPU with half=."""
    from siimcovid.bundle.engines import INT8

    if engine == INT8:
        return "int8"
    return "fp16" if engine == "torch" and hw.half and hw.device.type == "cuda" else hw.precision


def member_tta(member, tta: str | bool | None) -> str | bool:
    """The member's TTA: the bundle's (tta=null), or predict's for every member (cfg/predict.yaml tta). A classifier's
    is a view name (siimcovid.classify.tta; true / false: hflip / none); a detector's on or off, its own views
    (detector_tta: none / false off, any other on)."""
    from siimcovid.classify.tta import detector_tta, tta_name

    value = member.settings.get("tta") if tta is None else tta
    where = f"{member.kind}/{getattr(member, 'name', '?')}: tta"
    if member.kind == "classify":
        return tta_name("none" if value is None else value, where)  # a family of its own may record no tta: none
    return detector_tta(bool(value) if value is None else value, where)


def lung_boxes(table: pd.DataFrame, name: str, where) -> "LungBoxes":  # noqa: F821
    """A lung member's boxes of the new images (tables.DETECTIONS, its `fold` the lung fold) as the crop windows of the
    members that crop with it: the "test" split of a LungBoxes (the bundle checked the folds when it was opened).
    Every lung fold predicted every image, so a fold that found no lung box on an image means no crop there: that image
    is seen whole only (unboxed_whole; crop_counts counts and logs them), never the abort a lung run's missing boxes are."""
    from siimcovid.views import LungBoxes

    return LungBoxes({"test": table}, f"{where} (the bundle's lung detector lung/{name})", unboxed_whole=True)


def member_lungs(member, lungs: dict | None):
    """The LungBoxes a member of crop=lung crops with (lungs: {lung member name: LungBoxes}); None: whole images."""
    from siimcovid.bundle.members import lung_of

    name = lung_of(member.settings)
    if name is None:
        return None
    if not lungs or name not in lungs:
        raise SiimError(f"{member.kind}/{member.name} crops with lung/{name}, whose boxes were not predicted first")
    return lungs[name]


def crop_counts(member, lungs: dict, prepared: Prepared) -> dict[int, int]:
    """{fold: how many of the test images fold k of a crop=lung member sees cropped (a confident lung box)}; the images
    a fold sees whole only (its lung fold found no box at or above lung_conf) are logged."""
    from siimcovid.bundle.members import lung_of

    s, ids, boxes = member.settings, list(prepared.split("test").image_id), member_lungs(member, lungs)
    found = {k: boxes.windows(prepared.meta, k, ids, "test", s["lung_conf"], s["crop_margin"]) for k in member.weights}
    counts = {int(k): sum(w is not None for w in windows.values()) for k, windows in sorted(found.items())}
    whole = {k: len(ids) - n for k, n in counts.items() if n < len(ids)}
    if whole:
        each = ", ".join(f"fold {k}: {n} of {len(ids)}" for k, n in whole.items())
        LOGGER.info(
            f"predict: {member.kind}/{member.name}: no lung crop for some images ({each}: no lung box at or above "
            f"lung_conf={s['lung_conf']} from lung/{lung_of(s)}): those are seen whole only"
        )
    return counts


def detector_family(cls, member, hw: Hardware, tta: bool, lungs: dict | None = None):
    """The family `cls` (a detect family) built for a detector member's predict (detector_config); crop=lung: with its
    lung member's LungBoxes (of `lungs`) handed in as the boxes its views crop with (Family.use_lungs: a bundle has no
    lung run on disk)."""
    family = cls(detector_config(member, hw, tta))
    boxes = member_lungs(member, lungs)
    if boxes is not None:
        family.use_lungs(boxes)
    return family


def detector_config(member, hw: Hardware, tta: bool):
    """The `detect predict` config of a detector member: its recorded predict settings, predict's runtime ones;
    crop=lung: its view settings (the boxes its views crop with: detector_family)."""
    from siimcovid.bundle.members import lung_of
    from siimcovid.views import VIEW_KEYS

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
        "precision": hw.precision,  # the CPU's: bf16 = under autocast (siimcovid.engine.devices)
    }
    if lung_of(s) is not None:
        settings |= {"crop": "lung", **{k: s[k] for k in VIEW_KEYS["detect"]}}
    return stage_config("detect", "predict", settings)


def predict_detector(member, prepared: Prepared, hw: Hardware, tta: bool, lungs=None) -> pd.DataFrame:
    """Every fold of a detector member (or a lung member) on every test image of `prepared`: tables.DETECTIONS
    (model = member name); lungs: {lung member name: its LungBoxes}, of which a member of crop=lung crops with its own."""
    from siimcovid.bundle.members import lung_of
    from siimcovid.detect.predict import Run, predict_run
    from siimcovid.engine.family import family_class
    from siimcovid.engine.folds import predict

    s = member.settings
    size = prepared.check_size(s["size"])
    imgsz = {int(k): int(v) for k, v in (s.get("imgsz") or {}).items()}
    weights = dict(sorted(member.weights.items()))
    if set(weights) - set(imgsz):
        raise SiimError(f"detector {member.name}: settings.yaml gives no imgsz for folds {sorted(set(weights) - set(imgsz))}")
    folder = Path(next(iter(weights.values()))).parent
    sha = {path: member.digests.get(k) for k, path in member.weights.items()}  # what each file hashed to when opened
    load = lambda path: weights_of.detector(member.model, path, f"{member.kind}/{member.name}/{path.name}", sha[path])  # noqa: E731
    from siimcovid.bundle.engines import detector_on

    engine, load = with_backend(member, hw, load, lambda path, args, net, torch_load=load: detector_on(torch_load(path), net))
    if engine != "torch":  # the engine is the network; Ultralytics around it computes in fp32 (no autocast)
        hw = replace(hw, precision="fp32")
    run = Run(folder, prepared, size, weights, imgsz, name=member.name, load=load)
    if lung_of(s) is None:  # detect predict's own loop (which builds its family from the settings alone)
        return predict_run(run, ["test"], detector_config(member, hw, tta))["test"]
    family = detector_family(family_class(run.family, "detect"), member, hw, tta, lungs)  # the same, with the lung boxes
    return predict(family, run, run.weights, ["test"], family.cfg.device)["test"]


def predict_classifier(member, prepared: Prepared, hw: Hardware, tta: str, lungs=None) -> pd.DataFrame:
    """Every fold of a classifier member on every test image of `prepared`, averaged: tables.CLASSIFIER_IMAGES;
    lungs: as for a detector (crop=lung: each image whole and cropped, the views fused by its view_fusion)."""
    from siimcovid.classify.predict import Inference, Views, amp_dtype_for, predict_test

    size = prepared.check_size(member.settings["imgsz"])
    cuda = hw.device.type == "cuda"
    # one loader for every fold; its worker processes live through the fold loop instead of restarting per fold
    loader = {"batch_size": hw.batch, "num_workers": hw.loader_workers, "pin_memory": cuda}
    loader["persistent_workers"] = hw.loader_workers > 0
    amp_dtype = amp_dtype_for(hw.device, hw.half, hw.precision)
    channels_last = cuda or amp_dtype is not None  # as `classify predict` does by default (and the CPU's bf16)
    where = f"{member.kind}/{member.name}"
    sha = {path: member.digests.get(k) for k, path in member.weights.items()}  # what each file hashed to when opened
    load = lambda path, device, cl: weights_of.classifier(member.model, path, f"{where}/{path.name}", device, cl, sha[path])  # noqa: E731
    from siimcovid.bundle.engines import ClassifierOn

    engine, load = with_backend(member, hw, load, lambda path, args, net: ClassifierOn(net))
    if engine != "torch":  # the engine is the whole network: nothing of the torch model is built
        amp_dtype, channels_last = None, False
    s, boxes = member.settings, member_lungs(member, lungs)
    views = Views(boxes, s["lung_conf"], s["crop_margin"], s["view_fusion"]) if boxes is not None else None
    how = Inference(hw.device, amp_dtype, channels_last, tta, loader, load, views=views)
    return predict_test(prepared, size, dict(sorted(member.weights.items())), member.name, how)
