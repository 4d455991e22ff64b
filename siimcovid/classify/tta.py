"""A classifier's test-time augmentation: the views a `tta` setting names, as transforms of an image batch.

    tta=none    the image alone
    tta=hflip   the image and its left-right mirror
    tta=vflip   the image and its upside-down mirror
    tta=d4      the 8 symmetries of the square: the image turned by 0, 90, 180 and 270 degrees, each also mirrored

The probabilities are the mean of the views' (classify/predict.py infer); the loss, when asked, reads the image as it
is. A view moves pixels only: no mask or box takes part at predict. Rotations keep the shape of a square input (the
prepared images are square); a non-square batch comes out transposed, which a pooled classifier reads alike.

true / false (what tta was in the releases between, in settings, run folders' predict.yaml and bundles) read as
hflip / none: the mirror was the one view then. A setting shared with detectors (predict's tta, run's, pseudo's) is
on or off for them (detector_tta: none and false off, any view name on: Ultralytics' augment has its own views).
"""

from __future__ import annotations

from dataclasses import dataclass

from siimcovid.utils import SiimError

TTA_NAMES = ("none", "hflip", "vflip", "d4")  # cfg/classify.yaml tta
ALIASES = {True: "hflip", False: "none"}  # tta's values when it was on or off


@dataclass(frozen=True)
class View:
    """One view: turned `rot` quarter turns counter-clockwise (torch.rot90), then mirrored left-right if `flip`."""

    name: str
    rot: int = 0
    flip: bool = False


IDENTITY = View("identity")
HFLIP = View("hflip", 0, True)
VFLIP = View("vflip", 2, True)  # a half turn then the left-right mirror: the upside-down mirror
D4 = (
    IDENTITY, View("rot90", 1), View("rot180", 2), View("rot270", 3),
    HFLIP, View("rot90+hflip", 1, True), VFLIP, View("rot270+hflip", 3, True),
)  # fmt: skip
VIEWS = {"none": (IDENTITY,), "hflip": (IDENTITY, HFLIP), "vflip": (IDENTITY, VFLIP), "d4": D4}


def tta_name(value, where: str = "tta") -> str:
    """The view name of a tta value: a name of TTA_NAMES, or true / false (hflip / none); else an error naming them."""
    if isinstance(value, bool):
        return ALIASES[value]
    if isinstance(value, str) and value.strip().lower() in (*TTA_NAMES, "true", "false"):
        text = value.strip().lower()
        return ALIASES[text == "true"] if text in ("true", "false") else text
    raise SiimError(f"{where}={value!r}: tta is one of {', '.join(TTA_NAMES)} (true = hflip, false = none)")


def detector_tta(value, where: str = "tta") -> bool:
    """A shared tta value as a detector takes it: on or off (none / false: off; any view name or true: on)."""
    return tta_name(value, where) != "none"


def tta_views(value, where: str = "tta") -> tuple[View, ...]:
    """The views of a tta value, the image as it is first."""
    return VIEWS[tta_name(value, where)]


def apply(view: View, x):
    """The view of a batch (a tensor whose last two dimensions are height and width)."""
    import torch

    y = torch.rot90(x, view.rot, dims=(-2, -1)) if view.rot % 4 else x
    return y.flip(-1) if view.flip else y


def invert(view: View, y):
    """The batch a view was made of: apply's steps undone in reverse order."""
    import torch

    x = y.flip(-1) if view.flip else y
    return torch.rot90(x, -view.rot, dims=(-2, -1)) if view.rot % 4 else x
