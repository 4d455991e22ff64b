"""Convert one image (a DICOM, or a PNG/JPEG file): the work each `siimcovid prepare` process does.

Kept free of heavy imports (no pandas, sklearn, torch) so worker processes start fast.
Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from siimcovid.data.boxes import clip_boxes, fill_mask, to_yolo
from siimcovid.data.dicom import TAGS_CHECKED, area_resize_with_range, check_pixel_count, dicom_to_uint8, read_header
from siimcovid.data.prepared_paths import image_file, label_file, mask_file
from siimcovid.utils import DataError, SiimError

MASK_PARAMS = [cv2.IMWRITE_PNG_BILEVEL, 1]  # masks are 1-bit PNGs (read back as 0/255)


def encode_params(ext: str, png_level: int = 0, jpg_quality: int = 95) -> list[int]:
    """OpenCV write parameters.

    PNG level 0 stores the pixels uncompressed (a 512 px image is 257 KB, written in 0.3 ms
    and read in under 1 ms); deflate costs ~3 ms per 512 px radiograph, half a decode of the
    DICOM. Level 1 is the fastest that compresses (the "up" filter, Huffman coding only:
    ~3x smaller); 2-9 are zlib's levels with the "up" filter.
    """
    if ext == "jpg":
        return [cv2.IMWRITE_JPEG_QUALITY, int(jpg_quality)]
    if png_level == 0:
        return [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    if png_level == 1:
        return [
            cv2.IMWRITE_PNG_FILTER,
            cv2.IMWRITE_PNG_FILTER_UP,
            cv2.IMWRITE_PNG_STRATEGY,
            cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY,
        ]
    return [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP, cv2.IMWRITE_PNG_COMPRESSION, int(png_level)]


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_image(path: Path, img: np.ndarray, ext: str, params: list[int]) -> None:
    ok, buf = cv2.imencode(f".{ext}", img, params)
    if not ok:
        raise SiimError(f"could not encode {path}")
    _write_bytes(path, buf.tobytes())


PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"  # signature, then the IHDR chunk's length and type
PNG_TAIL = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk (with its CRC) that ends every whole PNG


def image_is_whole(path: Path, size: int, ext: str) -> bool:
    """Whether a prepared image is one prepare finished: a size x size 8-bit grey PNG (or JPEG) that ends as it
    should. Two small reads, no decode: a resume must stay as fast as checking that the file exists. Catches
    a 0-byte, truncated or foreign file (another size, colour), whatever put it there."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024 if ext == "jpg" else 26)
            f.seek(-len(PNG_TAIL), os.SEEK_END)
            tail = f.read()
    except OSError:  # missing, or shorter than its tail
        return False
    if ext == "jpg":
        return tail.endswith(b"\xff\xd9") and _jpeg_shape(head) == (size, size, 1)
    if not (head.startswith(PNG_HEAD) and tail == PNG_TAIL):
        return False
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return (width, height, head[24], head[25]) == (size, size, 8, 0)  # bit depth 8, colour type 0: grey


def _jpeg_shape(head: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the start-of-frame segment of a JPEG's first bytes; None if not found."""
    if not head.startswith(b"\xff\xd8"):
        return None
    i = 2
    while i + 4 <= len(head) and head[i] == 0xFF:
        marker, length = head[i + 1], int.from_bytes(head[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            if i + 10 > len(head):
                return None
            return int.from_bytes(head[i + 7 : i + 9], "big"), int.from_bytes(head[i + 5 : i + 7], "big"), head[i + 9]
        i += 2 + length
    return None


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")  # inputs read as image files, not DICOM


def is_picture(path: str | os.PathLike) -> bool:
    """Whether prepare reads `path` as a PNG/JPEG file (by its suffix) rather than as a DICOM."""
    return Path(path).suffix.lower() in PICTURE_SUFFIXES


def _picture_info(rows: int, cols: int, bits: int) -> dict:
    """META's header facts for an image file: its size and bit depth; the DICOM-only facts empty."""
    return {
        "rows": rows,
        "cols": cols,
        "patient_id": "",
        **dict.fromkeys(TAGS_CHECKED, ""),
        "photometric": "",
        "bits_stored": bits,
        "transfer_syntax": "",
        "voi": "",
    }


def picture_header(path: str | os.PathLike, max_pixels: int | None = None) -> dict:
    """Size and bit depth of a PNG/JPEG without decoding its pixels (the resume path, and the size check before a
    decode: DataError when it holds more than max_pixels values)."""
    from PIL import Image

    if Path(path).is_file() and os.stat(path).st_size == 0:  # nothing to read (a file of /proc that says 0 bytes blocks)
        raise DataError("an empty image file", path)
    try:
        with Image.open(path) as im:
            cols, rows = im.size
            bits = 16 if im.mode.startswith("I") else 8
            count = rows * cols * len(im.getbands())
    except FileNotFoundError:
        raise DataError("image file not found", path) from None
    except Exception as e:  # PIL: OSError, UnidentifiedImageError, DecompressionBombError (past twice its own limit)
        raise DataError(f"cannot read image ({type(e).__name__}: {e})", path) from None
    check_pixel_count(rows, cols, count, max_pixels, path)
    return _picture_info(rows, cols, bits)


def picture_to_uint8(
    path: str | os.PathLike, sizes: list[int], max_pixels: int | None = None
) -> tuple[dict[int, np.ndarray], dict]:
    """A PNG/JPEG (8 or 16 bit, grey or colour -> luminance) -> square 8-bit images at each size, like a DICOM:
    an area resize of the original values to the largest size, smaller sizes from it. 8-bit values are kept
    as they are (the file is already windowed); 16-bit ones are min-max stretched over the full image. One
    of more than max_pixels values is refused from its header, before decoding."""
    if not Path(path).is_file():
        raise DataError("image file not found", path)
    picture_header(path, max_pixels)
    # from its bytes: cv2.imread crashes the process on a file name that is not UTF-8 (a folder from another system)
    arr = cv2.imdecode(np.frombuffer(Path(path).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise DataError("cannot read image (not a PNG/JPEG OpenCV can decode)", path)
    if arr.ndim == 3:  # OpenCV gives BGR or BGRA
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if arr.dtype not in (np.uint8, np.uint16):
        raise DataError(f"unsupported pixel type {arr.dtype} (expected 8 or 16 bit)", path)
    sizes = sorted({int(s) for s in sizes}, reverse=True)
    small, (lo, hi) = area_resize_with_range(arr, (sizes[0], sizes[0]))
    if arr.dtype == np.uint16:
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        small = np.clip((small.astype(np.float32) - lo) * scale, 0, 255)
    images = {sizes[0]: np.rint(small).astype(np.uint8) if small.dtype != np.uint8 else small}
    for s in sizes[1:]:
        images[s] = cv2.resize(images[sizes[0]], (s, s), interpolation=cv2.INTER_AREA)
    return images, _picture_info(arr.shape[0], arr.shape[1], 16 if arr.dtype == np.uint16 else 8)


def made_from(settings: dict) -> int:
    """The size a prepared folder's images were made at, every smaller size area-resized from it: resize_from, else
    the largest of its sizes (the one place of that rule: convert_one makes images by it, prepare checks a re-run
    against it, export records it for predict)."""
    return int(settings.get("resize_from") or max(int(s) for s in settings["sizes"]))


def convert_one(job: dict) -> dict:
    """Convert one DICOM or PNG/JPEG file (worker). Returns header info and clipped boxes, or the DataError."""
    out, sizes, ext, image_id, split = Path(job["out"]), job["sizes"], job["ext"], job["image_id"], job["split"]
    picture = is_picture(job["path"])
    try:
        targets = {s: image_file(out, s, split, image_id, ext) for s in sizes}
        if all(image_is_whole(p, s, ext) for s, p in targets.items()):  # done by an earlier run
            info, converted = (picture_header if picture else read_header)(job["path"]), False
        else:
            made = sorted({*sizes, made_from(job)})  # resize_from: made first, not written
            images, info = (picture_to_uint8 if picture else dicom_to_uint8)(job["path"], made, job.get("max_pixels"))
            for s, p in targets.items():
                _write_image(p, images[s], ext, job.get("params") or encode_params(ext))
            converted = True
        boxes = np.zeros((0, 4))
        if split == "train":
            if job["boxes"]:
                boxes = clip_boxes(job["boxes"], info["cols"], info["rows"], job["csv"], job["line"])
            yolo = to_yolo(boxes, info["cols"], info["rows"])
            text = "".join(f"0 {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}\n" for xc, yc, w, h in yolo)
            for s in sizes:
                _write_bytes(label_file(out, s, image_id), text.encode())
                _write_image(
                    mask_file(out, s, image_id), fill_mask(boxes, info["cols"], info["rows"], (s, s)), "png", MASK_PARAMS
                )
        return {"image_id": image_id, "ok": True, "converted": converted, "boxes": boxes.tolist(), **info}
    except DataError as e:
        return {"image_id": image_id, "ok": False, "error": e}


def init_worker(parent: int | None = None) -> None:
    """Set up a decode process. parent: the pid of the prepare process, whose death must end this one."""
    cv2.setNumThreads(1)  # one image per process; threads inside would oversubscribe the cores
    if parent is not None:
        die_with_parent(parent)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """End this process when `parent` dies, however it dies (kill -9 included): a worker must not outlive prepare.

    Linux: the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG). Elsewhere, or if prctl
    is unavailable, a daemon thread polls the parent pid once a second.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed: nobody would send it
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int, period: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(period)
    os._exit(1)
