"""A torchvision detect run as a bundle member (siimcovid.bundle.members.Kind): like a YOLO detector's.

    detect/<name>/model.yaml         {family: torchvision, arch: <one of ARCHS>, num_classes: 2, imgsz: <int>}
    detect/<name>/settings.yaml      the detector's settings (members.DETECT_SETTINGS: size, imgsz per fold, conf, iou,
                                     tta, max_det, predict_imgsz, weights; crop=lung: crop, lung and the view
                                     settings), as the run's own predict made its boxes
    detect/<name>/fold<k>.safetensors the state dict of fold k's best.pt

A bundle is a file from elsewhere: model.yaml must hold exactly those keys, each of its type and range; the
tensors' names and shapes must be exactly those of the architecture it names, built on the meta device (no memory,
no download); the model is then built with weights=None and loaded strictly. Nothing in it names code.
"""

from __future__ import annotations

from pathlib import Path

from siimcovid.utils import SiimError


def check_description(desc: dict, where: str) -> dict:
    """model.yaml of a torchvision member (beside `family`), every field checked."""
    from siimcovid.bundle.files import typed
    from siimcovid.detect.torchvision_model import ARCHS, DESCRIPTION_KEYS, NUM_CLASSES

    if not isinstance(desc, dict) or set(desc) != set(DESCRIPTION_KEYS):
        keys = sorted(map(str, desc)) if isinstance(desc, dict) else type(desc).__name__
        raise SiimError(f"{where}: a torchvision model is described by {', '.join(DESCRIPTION_KEYS)} exactly, not {keys}")
    if not isinstance(desc["arch"], str) or desc["arch"] not in ARCHS:
        raise SiimError(f"{where}: arch={desc['arch']!r}: one of {', '.join(ARCHS)}")
    classes = desc["num_classes"]
    if not isinstance(classes, int) or isinstance(classes, bool) or classes != NUM_CLASSES:
        raise SiimError(f"{where}: num_classes={classes!r}: a detector of background + opacity has {NUM_CLASSES}")
    return {"arch": desc["arch"], "num_classes": NUM_CLASSES, "imgsz": typed("detect", "imgsz")(desc["imgsz"], where)}


def check_state(desc: dict, shapes: dict, where: str) -> None:
    """The tensors of a fold (names and shapes, from the safetensors header) are exactly the described model's."""
    import torch

    from siimcovid.detect.torchvision_model import build

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build(desc["arch"], desc["imgsz"]).state_dict().items()}
    if shapes != expected:
        missing, unknown = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
        detail = "; ".join(f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                           (("missing", missing), ("unknown", unknown), ("other shapes", wrong)) if names)  # fmt: skip
        raise SiimError(f"{where}: not the tensors of a {desc['arch']} ({detail})")


def bundle_kind(cls):
    """The member kind of the torchvision family: DETECT_SETTINGS and detector_member as YOLO's (detect predict's
    load_run reads the run by its family), its own packing, checks and prediction."""
    from siimcovid import weights
    from siimcovid.bundle.members import DETECT_SETTINGS, Kind, check_views, detector_member

    def pack(src: Path, dst: Path, half: bool):
        from siimcovid.config import Config

        state, desc = cls(Config()).pack_state(src)
        return weights.save_state(state, dst, half), {"family": cls.name, **desc}, None

    def check(settings: dict, model: dict, folds: set, label: str) -> None:
        sizes = settings["imgsz"]
        if folds - set(sizes) or any(sizes[k] != model["imgsz"] for k in folds):
            raise SiimError(f"{label}: imgsz {sizes} is not the model's {model['imgsz']} for every fold {sorted(folds)}")
        settings.pop("ultralytics", None)  # YOLO's predict arguments (agnostic_nms, classes): nothing to a torchvision model
        check_views(settings, "detect", label)

    def describe(desc, label: str) -> dict:
        if not isinstance(desc, dict) or desc.get("family") != cls.name:
            raise SiimError(f"{label}: not a description of family {cls.name}")
        return {"family": cls.name, **check_description({k: v for k, v in desc.items() if k != "family"}, label)}

    def fits(desc: dict, shapes: dict, label: str, size) -> None:
        check_state(desc, shapes, label)

    def predict(member, prepared, hw, tta: bool, lungs: dict | None = None):
        """Every fold on the test images (crop=lung: each whole and cropped to its lung member's box of the same fold,
        `lungs` {lung member name: LungBoxes}, as siimcovid.predict.members.predict_detector)."""
        from siimcovid.detect.predict import Run
        from siimcovid.engine import folds
        from siimcovid.predict.members import detector_family

        family = detector_family(cls, member, hw, tta, lungs)
        model = {k: v for k, v in member.model.items() if k != "family"}
        family.packed = {path: (model, member.digests.get(k)) for k, path in member.weights.items()}
        size = prepared.check_size(member.settings["size"])
        wts = dict(sorted(member.weights.items()))
        run = Run(Path(next(iter(wts.values()))).parent, prepared, size, wts, dict(member.settings["imgsz"]),
                  name=member.name, family=cls.name)  # fmt: skip
        return folds.predict(family, run, wts, ["test"], hw.device)["test"].assign(model=member.name)

    return Kind("det", DETECT_SETTINGS, detector_member, pack, lambda s: s["size"],
                lambda s: None, check, describe, fits, predict)  # fmt: skip
