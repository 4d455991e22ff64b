"""crop=lung, crop_train=true for YOLO: each train image's lung crop as one more training image of every fold that
trains on that image (siimcovid.views). The crops are the windows of the lung run's OUT-OF-FOLD boxes (an image of fold
f cropped by fold f's lung model, which never saw it): the views a model will be shown at predict time.

Written into the run folder, beside the YAMLs of extra= (siimcovid.detect.common.extra_data_yaml):
    <run>/data/crops/images/<image_id>.png   the crop of the prepared image (its own pixels: Ultralytics resizes)
    <run>/data/crops/labels/<image_id>.txt   its opacity boxes (`0 xc yc w h`, normalised to the crop, clipped to it)
    <run>/data/fold<k>_extra.txt             fold k's extra training images: extra= data's, then the crops of fold k's
                                             training images (the other folds' images)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siimcovid.utils import LOGGER, SiimError, atomic_path, atomic_write_text
from siimcovid.views import LungBoxes, cut, from_original, read_gray

MIN_SIDE = 1.0  # a box clipped to less than one crop pixel wide or high is left out of the crop's labels


def yolo_labels(path: Path) -> np.ndarray:
    """A prepared YOLO label file -> (n, 4) x1y1x2y2 normalised to the image (no file: no boxes)."""
    if not path.is_file():
        return np.zeros((0, 4))
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    xywh = np.array([[float(v) for v in r[1:5]] for r in rows], dtype=np.float64).reshape(-1, 4)
    half = xywh[:, 2:] / 2
    return np.hstack([xywh[:, :2] - half, xywh[:, :2] + half])


def crop_labels(boxes: np.ndarray, shape_hw: tuple[int, int], shown) -> str:
    """Normalised image boxes -> the YOLO label text of a crop of shape (h, w) showing `shown` (normalised window)."""
    h, w = shape_hw
    inside = from_original(boxes, (h, w), shown)
    keep = ((inside[:, 2] - inside[:, 0]) >= MIN_SIDE) & ((inside[:, 3] - inside[:, 1]) >= MIN_SIDE)
    lines = []
    for x0, y0, x1, y1 in inside[keep]:
        lines.append(f"0 {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}\n")
    return "".join(lines)


def write_crops(prepared, size: int, lungs: LungBoxes, cfg, run_dir: Path) -> dict[str, Path]:
    """{image_id: crop image} of every train image with a confident lung box (written once, every fold uses them)."""
    import cv2

    train = prepared.split("train")
    folder = Path(run_dir) / "data" / "crops"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    sizes = train.set_index("image_id")
    out = {}
    for image_id, window in lungs.own_fold_windows(prepared.meta, train, cfg.lung_conf, cfg.crop_margin).items():
        if window is None:
            continue
        rows, cols = int(sizes.at[image_id, "rows"]), int(sizes.at[image_id, "cols"])
        image = read_gray(prepared.image_path(image_id, "train", size))
        crop, shown = cut(image, window, rows, cols)
        unit = (shown[0] / cols, shown[1] / rows, shown[2] / cols, shown[3] / rows)  # the window, normalised
        labels = crop_labels(yolo_labels(prepared.label_path(image_id, size)), crop.shape[:2], unit)
        path = folder / "images" / f"{image_id}.png"
        with atomic_path(path) as tmp:  # a kill leaves the crop before, or this one
            if not cv2.imwrite(str(tmp), crop):
                raise SiimError(f"{path}: the crop could not be written")
        atomic_write_text(folder / "labels" / f"{image_id}.txt", labels)
        out[image_id] = path.resolve()
    LOGGER.info(f"detect: {len(out)} of {len(train)} train images have a lung crop ({folder})")
    return out


def fold_crops(prepared, crops: dict[str, Path], fold: int) -> list[str]:
    """The crops of fold k's training images (the other folds' images)."""
    ids = prepared.fold(fold, "train").image_id
    return [str(crops[i]) for i in ids if i in crops]
