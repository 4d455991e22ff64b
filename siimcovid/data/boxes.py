"""Box conventions. Boxes are [x_min, y_min, x_max, y_max] in ORIGINAL DICOM pixels
unless a function says otherwise; images are (width=cols, height=rows)."""

from __future__ import annotations

import json

import numpy as np

from siimcovid.utils import DataError


def as_array(boxes) -> np.ndarray:
    """Any list of boxes -> float64 array of shape (n, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    return arr.reshape(-1, 4)


def clip_boxes(boxes, width: int, height: int, file=None, line=None) -> np.ndarray:
    """Clip boxes to the image; a box entirely outside it (or left with no area) is an error."""
    arr = as_array(boxes)
    out = arr.copy()
    out[:, [0, 2]] = arr[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = arr[:, [1, 3]].clip(0, height)
    for box, clipped in zip(arr, out):
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise DataError(f"box {np.round(box, 1).tolist()} lies outside the {width}x{height} image", file, line)
    return out


def to_yolo(boxes, width: int, height: int) -> np.ndarray:
    """Pixel x1y1x2y2 -> normalised (x_center, y_center, w, h), clipped to [0, 1]."""
    arr = as_array(boxes)
    x1, y1 = arr[:, 0].clip(0, width) / width, arr[:, 1].clip(0, height) / height
    x2, y2 = arr[:, 2].clip(0, width) / width, arr[:, 3].clip(0, height) / height
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=1)


def from_yolo(xywhn, width: int, height: int) -> np.ndarray:
    """Normalised (x_center, y_center, w, h) -> pixel x1y1x2y2."""
    arr = np.asarray(xywhn, dtype=np.float64).reshape(-1, 4)
    xc, yc, w, h = arr[:, 0] * width, arr[:, 1] * height, arr[:, 2] * width, arr[:, 3] * height
    return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=1)


def scale_boxes(boxes, src_wh: tuple[float, float], dst_wh: tuple[float, float]) -> np.ndarray:
    """Map x1y1x2y2 boxes from an image of size src_wh to one of size dst_wh (a plain resize)."""
    arr = as_array(boxes)
    sx, sy = dst_wh[0] / src_wh[0], dst_wh[1] / src_wh[1]
    return arr * np.array([sx, sy, sx, sy])


def boxes_to_json(boxes) -> str:
    """Boxes for a CSV cell: a JSON list of [x1, y1, x2, y2] rounded to 0.01 px."""
    return json.dumps([[round(float(v), 2) for v in b] for b in as_array(boxes)])


def boxes_from_json(text) -> list[list[float]]:
    if text is None or (isinstance(text, float) and np.isnan(text)) or text == "":
        return []
    return json.loads(text)


def fill_mask(boxes, width: int, height: int, size: tuple[int, int]) -> np.ndarray:
    """A uint8 mask (0/255) of size (w, h) with the boxes, given in original pixels, filled."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x1, y1, x2, y2 in scale_boxes(boxes, (width, height), size):
        # Pixel i covers [i, i+1): fill every pixel whose centre lies inside the box.
        c1, c2 = int(np.ceil(x1 - 0.5)), int(np.ceil(x2 - 0.5))
        r1, r2 = int(np.ceil(y1 - 0.5)), int(np.ceil(y2 - 0.5))
        mask[max(r1, 0) : max(r2, r1 + 1), max(c1, 0) : max(c2, c1 + 1)] = 255
    return mask
