"""Lung boxes: one box around both lungs per train image, the input of the lung detector (`detect train task=lung`).

The 1st-place team boxed 6,334 SIIM train images by hand and published the boxes with its code (MIT licence) in two
formats, one file per image, both in one folder (their dataset/lung_crop/labels/train/):

    <image_id>.xml   Pascal VOC: <size><width>/<height> of the ORIGINAL image, one <object> whose
                     <bndbox><xmin><ymin><xmax><ymax> are its absolute pixels (the object's <name> is free: theirs
                     say "lunga")
    <image_id>.txt   YOLO: one line `0 xc yc w h`, normalised to the original image, class 0

`prepare lung_boxes=<folder>` reads them (read_lung_boxes) for every prepared train image; `siimcovid synth` writes
both for its own images (write_lung_files). Image ids are SIIM's (meta.csv's image_id; a file named
<image_id>_image.xml is taken too). Where both files of an image are there, they must agree (within AGREE_PX).

Every file is hostile input, read with a size limit (MAX_BYTES): an XML file with a DOCTYPE or an entity declaration
is refused before it is parsed (no entity is ever expanded), and so is one holding a NUL (UTF-16 in disguise). A
file that cannot be read, holds no box or several, a box outside its image (by more than BORDER_PX, which is
clipped) or of zero area, a <size> that is not the image's, or a missing file, is a DataError naming the file:
prepare stops at it, or with on_error=skip leaves that image out of the lung data and lists it in skipped.csv.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from siimcovid.tables import BOX_COLUMNS, IMAGE_SUFFIX, LUNG_BOXES
from siimcovid.utils import DataError, SiimError, atomic_write_text, decode_utf8, read_input

MAX_BYTES = 64 * 1024  # one box: the team's VOC files are ~600 bytes
BORDER_PX = 1.0  # a box may pass the image's border by this much (VOC counts pixels from 1): it is clipped
AGREE_PX = 2.0  # the most the .xml and the .txt of one image may differ, per coordinate (the .txt has rounded floats)
FORMATS = (".xml", ".txt")
_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


# ----------------------------------------------------------------------------- reading one file
def _text(path: Path) -> str:
    data = read_input(path, MAX_BYTES, "lung box file")
    if b"\x00" in data:
        raise DataError("holds a NUL byte: not a UTF-8 text file", path)
    return decode_utf8(data, path)


def _number(text, what: str, path: Path) -> float:
    try:
        value = float(str(text).strip())
    except (TypeError, ValueError):
        raise DataError(f"{what} is not a number: {str(text)[:40]!r}", path) from None
    if not math.isfinite(value):
        raise DataError(f"{what} is not finite: {text!r}", path)
    return value


def read_voc(path: Path, rows: int, cols: int) -> list[float]:
    """A Pascal VOC file's one box -> [x_min, y_min, x_max, y_max] in original pixels (checked against the image)."""
    text = _text(path)
    if _DECLARATION.search(text):  # entities (a "billion laughs", an external file) are never expanded
        raise DataError("an XML file with a DOCTYPE or ENTITY declaration is refused (a lung box file needs neither)", path)
    try:
        root = ET.fromstring(text.encode())
    except ET.ParseError as e:
        raise DataError(f"not a Pascal VOC XML file: {e}", path) from None
    size = root.find("size")
    if size is not None:  # where the file says which image it boxed, it must be this one (another size: another image)
        width, height = (_number(size.findtext(k, "0"), f"<size><{k}>", path) for k in ("width", "height"))
        if width > 0 and height > 0 and (round(width), round(height)) != (cols, rows):
            raise DataError(
                f"its <size> is {width:g} x {height:g}, the image is {cols} x {rows} (width x height): "
                "boxes of another image, or of a resized one?",
                path,
            )
    boxes = [o.find("bndbox") for o in root.iter("object")]
    if not boxes:
        raise DataError("no <object> box in it: a lung box file holds one box around both lungs", path)
    if len(boxes) > 1:
        raise DataError(f"{len(boxes)} <object> boxes in it: a lung box file holds one box around both lungs", path)
    if boxes[0] is None:
        raise DataError("its <object> has no <bndbox>", path)
    box = [_number(boxes[0].findtext(k), f"<{k}>", path) for k in ("xmin", "ymin", "xmax", "ymax")]
    return check_box(box, rows, cols, path)


def read_yolo(path: Path, rows: int, cols: int) -> list[float]:
    """A YOLO label file's one line `0 xc yc w h` (normalised) -> [x_min, y_min, x_max, y_max] in original pixels."""
    lines = [line.split() for line in _text(path).splitlines() if line.strip()]
    if not lines:
        raise DataError("empty: a lung box file holds one line `0 xc yc w h`", path)
    if len(lines) > 1:
        raise DataError(f"{len(lines)} lines: a lung box file holds one box around both lungs (`0 xc yc w h`)", path)
    values = lines[0]
    if len(values) != 5:
        raise DataError(f"expected `0 xc yc w h` (5 numbers), got {len(values)} values", path)
    cls, xc, yc, w, h = (_number(v, what, path) for v, what in zip(values, ("class", "xc", "yc", "w", "h")))
    if cls != 0:
        raise DataError(f"class {values[0]}: a lung box is class 0 (one class)", path)
    box = [(xc - w / 2) * cols, (yc - h / 2) * rows, (xc + w / 2) * cols, (yc + h / 2) * rows]
    return check_box(box, rows, cols, path)


def check_box(box: list[float], rows: int, cols: int, path: Path) -> list[float]:
    """The box inside its image (a pixel's slack, clipped) and of some area; else a DataError naming the file."""
    x_min, y_min, x_max, y_max = box
    if x_max <= x_min or y_max <= y_min:
        raise DataError(f"the box {_fmt(box)} has no area (x_max <= x_min or y_max <= y_min)", path)
    if x_min < -BORDER_PX or y_min < -BORDER_PX or x_max > cols + BORDER_PX or y_max > rows + BORDER_PX:
        raise DataError(f"the box {_fmt(box)} is outside its image of {cols} x {rows} pixels (width x height)", path)
    return [max(x_min, 0.0), max(y_min, 0.0), min(x_max, float(cols)), min(y_max, float(rows))]


def _fmt(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


READERS = {".xml": read_voc, ".txt": read_yolo}


# ----------------------------------------------------------------------------- one image, every image
def box_files(folder: Path, image_id: str, names: set[str] | None = None) -> list[Path]:
    """The lung box files of an image in `folder` (<id>.xml, <id>.txt, or the same with _image), .xml first.
    names: the folder's file names, listed once (None: ask the filesystem)."""
    found = []
    for ext in FORMATS:
        for stem in (image_id, image_id + IMAGE_SUFFIX):
            name = stem + ext
            if (name in names) if names is not None else (folder / name).exists():
                found.append(folder / name)
                break
    return found


def no_box_file(folder: Path, image_id: str) -> DataError:
    return DataError(f"no lung box file for train image {image_id} (<image_id>.xml or .txt)", Path(folder) / f"{image_id}.xml")


def lung_box(folder: Path, image_id: str, rows: int, cols: int, names: set[str] | None = None) -> list[float]:
    """The lung box of one image in original pixels, from its .xml or .txt (both: they must agree; the .xml's
    absolute pixels are kept). A missing or bad file is a DataError naming it."""
    files = box_files(folder, image_id, names)
    if not files:
        raise no_box_file(folder, image_id)
    boxes = [READERS[p.suffix](p, rows, cols) for p in files]
    if len(boxes) == 2 and max(abs(a - b) for a, b in zip(*boxes)) > AGREE_PX:
        raise DataError(
            f"its box {_fmt(boxes[0])} and the box {_fmt(boxes[1])} of {files[1].name} disagree "
            f"(by more than {AGREE_PX:g} pixels): which one is right?",
            files[0],
        )
    return boxes[0]


def read_lung_boxes(folder, images: pd.DataFrame, problems) -> pd.DataFrame:
    """The lung box of each image (image_id, rows, cols: the prepared train images) -> the LUNG_BOXES table, in the
    order of `images`. A bad or missing file goes to `problems` (siimcovid.data.siim.Problems: raises, or with
    on_error=skip counts it and leaves the image out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiimError(f"lung_boxes={folder}: no such folder (a folder of <image_id>.xml or .txt lung box files)")
    names = {p.name for p in folder.iterdir()}  # listed once: thousands of look-ups
    rows = []
    for r in images.itertuples(index=False):
        try:
            box = lung_box(folder, str(r.image_id), int(r.rows), int(r.cols), names)
        except DataError as e:
            problems.add(e)
            continue
        rows.append({"image_id": str(r.image_id), **dict(zip(BOX_COLUMNS, box))})
    problems.report("lung box files")
    return pd.DataFrame(rows, columns=LUNG_BOXES.names).astype({c: float for c in BOX_COLUMNS})


# ----------------------------------------------------------------------------- writing (synth) and the YOLO label
def yolo_line(box, rows: int, cols: int) -> str:
    """The YOLO label line of a box in original pixels: `0 xc yc w h`, normalised (the prepared image is the original
    resized to a square, so the same line labels every prepared size)."""
    x_min, y_min, x_max, y_max = box
    values = ((x_min + x_max) / 2 / cols, (y_min + y_max) / 2 / rows, (x_max - x_min) / cols, (y_max - y_min) / rows)
    return "0 " + " ".join(f"{v:.6f}" for v in values) + "\n"


def voc_text(image_id: str, box, rows: int, cols: int) -> str:
    """A Pascal VOC file of one lung box, as the 1st-place team's (labelImg's) are: whole pixels of the original."""
    x_min, y_min, x_max, y_max = (int(round(v)) for v in box)
    return (
        "<annotation>\n\t<folder>train</folder>\n"
        f"\t<filename>{image_id}.png</filename>\n"
        f"\t<size>\n\t\t<width>{cols}</width>\n\t\t<height>{rows}</height>\n\t\t<depth>1</depth>\n\t</size>\n"
        "\t<segmented>0</segmented>\n"
        "\t<object>\n\t\t<name>lung</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
        "\t\t<difficult>0</difficult>\n"
        f"\t\t<bndbox>\n\t\t\t<xmin>{x_min}</xmin>\n\t\t\t<ymin>{y_min}</ymin>\n"
        f"\t\t\t<xmax>{x_max}</xmax>\n\t\t\t<ymax>{y_max}</ymax>\n\t\t</bndbox>\n"
        "\t</object>\n</annotation>\n"
    )


def write_lung_files(folder: Path, image_id: str, box, rows: int, cols: int) -> list[Path]:
    """<folder>/<image_id>.xml and .txt of one box in original pixels, in both published formats, from the same whole
    pixels (so the two agree)."""
    whole = [float(int(round(v))) for v in box]
    return [
        atomic_write_text(Path(folder) / f"{image_id}.xml", voc_text(image_id, whole, rows, cols)),
        atomic_write_text(Path(folder) / f"{image_id}.txt", yolo_line(whole, rows, cols)),
    ]
