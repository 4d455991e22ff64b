"""Reading chest radiographs from DICOM into 8-bit images.

The usual recipe (decode -> VOI LUT -> invert MONOCHROME1 -> min-max to 0..255 -> resize)
applies a float VOI LUT and min-max to the full-size image, which costs several times the
decode itself on a 2500 x 3000 uncompressed file. `dicom_to_uint8` gives the same picture
at a fraction of the cost by resizing first, on the integer stored values:

1. area-downsample the stored values to the output size (exact 2x box-filter halvings,
   which OpenCV runs fast, then one bilinear step of less than 2x), reading uncompressed
   files straight from a memory map;
2. apply the VOI LUT / window (pydicom's own implementation, a pointwise map) to the
   small image, invert MONOCHROME1, min-max to 0..255 using the range the full-size
   image has after its VOI LUT (computed from its min and max stored values).

The VOI LUT is pointwise, so doing it after an area resize differs from the recipe only
where the LUT bends inside one output pixel: a level or two at the edges of the wide
windows radiographs carry (a narrow CT soft-tissue window would differ more).
"""

from __future__ import annotations

import io
import mmap
import os
import re
import unicodedata
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from siimcovid.utils import DataError

TAGS_CHECKED = {"modality": "Modality", "body_part": "BodyPartExamined", "view_position": "ViewPosition"}  # column: tag


def header_info(ds: Dataset) -> dict:
    """The header fields the meta table keeps ('' for a tag the file lacks or leaves empty)."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return {
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "patient_id": str(ds.get("PatientID", "") or ""),
        **{column: str(ds.get(tag, "") or "").strip() for column, tag in TAGS_CHECKED.items()},
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "transfer_syntax": tsyntax.name if tsyntax is not None else "",
        "voi": "lut" if ds.get("VOILUTSequence") else ("window" if "WindowCenter" in ds else ""),
    }


# ----------------------------------------------------------------------------- is it a frontal chest radiograph?
RADIOGRAPH_MODALITIES = ("CR", "DX")  # DICOM Modality of computed and digital radiography
CHEST_WORDS = {"CHEST", "THORAX", "THORACIC", "TORAX", "TORACE", "TORACICO", "LUNG", "LUNGS", "PECHO"}  # as vendors spell it
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"}  # ViewPosition of a lateral projection


def _words(value: str) -> set[str]:
    """The upper-case words of a free-text tag, accents dropped ('Tórax' -> {'TORAX'}, 'PORT CHEST' -> {'PORT', 'CHEST'})."""
    plain = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode()
    return set(re.split(r"[^A-Z]+", plain.upper())) - {""}


def radiograph_problem(modality: str, body_part: str, view_position: str) -> str | None:
    """Why an image's tags say it is not a frontal chest radiograph, or None. A missing (empty) tag says nothing:
    the image passes on the tags it has (a PNG/JPEG has none)."""
    if modality and modality.upper() not in RADIOGRAPH_MODALITIES:
        return f"Modality {modality!r} is not a radiograph ({' or '.join(RADIOGRAPH_MODALITIES)})"
    if body_part and not _words(body_part) & CHEST_WORDS:
        return f"BodyPartExamined {body_part!r} is not the chest"
    if view_position and _words(view_position) & LATERAL_VIEWS:
        return f"ViewPosition {view_position!r} is a lateral view, not a frontal one"
    return None


# ----------------------------------------------------------------------------- reading a file, pixels last
HEADER_BYTES = 16 * 2**20  # the most of a deflated file inflated to read its header (a radiograph's: a few KB)
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # float, double float and integer pixel data


def _open_error(path: str | os.PathLike, e: Exception) -> DataError:
    if isinstance(e, DataError):
        return e
    if isinstance(e, FileNotFoundError) or not Path(path).exists():
        return DataError("DICOM file not found", path)
    return DataError(f"cannot read DICOM ({type(e).__name__}: {e})", path)


def _check_image(ds: Dataset) -> None:
    if "Rows" not in ds or "Columns" not in ds:
        raise ValueError("no Rows/Columns: not an image")
    if int(ds.Rows or 0) < 1 or int(ds.Columns or 0) < 1:  # OpenCV would crash the process on an empty image
        raise ValueError(f"image of {ds.Columns} x {ds.Rows} pixels")


def pixel_count(ds: Dataset) -> int:
    """The values the header says the pixel data holds: rows x columns x frames x samples per pixel."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.Rows) * int(ds.Columns) * max(frames, 1) * max(int(ds.get("SamplesPerPixel", 1) or 1), 1)


def check_pixel_count(rows: int, cols: int, count: int, max_pixels: int | None, path) -> None:
    """DataError before any decoding when an image claims more than max_pixels values (a few KB of deflate or JPEG
    can claim gigabytes). The largest radiographs hold about 4300 x 3500 = 15 megapixels."""
    if max_pixels is not None and count > max_pixels:
        raise DataError(
            f"claims {cols} x {rows} pixels, {count:,} values with its frames and colour samples: more than "
            f"max_pixels={max_pixels}, not decoded (raise max_pixels= if it is a real image)",
            path,
        )


class _Inflated:
    """A deflated data set as a file for pydicom's reader, inflated only as far as it is read, and never past `limit`
    bytes (read() then gives less: pydicom sees a truncated file). Reading a header costs the header's bytes only."""

    def __init__(self, f, limit: int):
        self._f, self._limit, self._pos = f, limit, 0
        self._inflater, self._data = zlib.decompressobj(-zlib.MAX_WBITS), bytearray()

    def _fill(self, end: int) -> None:
        end = min(end, self._limit + 1)  # one byte past the limit: tells a cut stream from one that ends there
        while len(self._data) < end and not self._inflater.eof:
            chunk = self._inflater.unconsumed_tail or self._f.read(1 << 16)
            if not chunk:
                break
            self._data += self._inflater.decompress(chunk, end - len(self._data))

    @property
    def cut(self) -> bool:
        """Whether the stream holds more than `limit` bytes."""
        self._fill(self._limit + 1)
        return len(self._data) > self._limit

    def read(self, size: int | None = -1) -> bytes:
        end = self._limit if size is None or size < 0 else min(self._pos + size, self._limit)
        self._fill(end)
        out = bytes(self._data[self._pos : end])
        self._pos += len(out)
        return out

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            raise OSError("a deflated data set has no known end")
        self._pos = max(0, offset + (self._pos if whence == os.SEEK_CUR else 0))
        return self._pos

    def tell(self) -> int:
        return self._pos


def _file_meta(f) -> FileMetaDataset:
    """The file meta group (0002,xxxx), always explicit VR little endian; `f` is left at the data set's start."""
    return FileMetaDataset(read_dataset(f, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2))


def _read_deflated(path, f, meta: FileMetaDataset, header_only: bool, max_pixels: int | None) -> Dataset:
    """A deflated file's data set: its header (at most HEADER_BYTES inflated), then, once checked, no more than its
    pixels need."""
    start = f.tell()
    ds = read_dataset(_Inflated(f, HEADER_BYTES), False, True, stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS)
    ds.file_meta = meta
    if header_only:
        return ds
    _check_image(ds)
    check_pixel_count(int(ds.Rows), int(ds.Columns), pixel_count(ds), max_pixels, path)
    f.seek(start)
    bits = max(int(ds.get("BitsAllocated", 16) or 16), 8)
    whole = _Inflated(f, 2 * HEADER_BYTES + pixel_count(ds) * bits // 8)
    ds = read_dataset(whole, False, True)
    if whole.cut:
        raise DataError(f"its deflated data inflates to more than its {ds.Columns} x {ds.Rows} pixels need: not read", path)
    ds.file_meta = meta
    return ds


def _read_unprefixed(f) -> Dataset:
    """The header of a file without the DICM prefix, from its first HEADER_BYTES only: a forced read of a large
    foreign file (zeros parse as empty elements, 50 MB in 15 s) must not take minutes to fail."""
    head = f.read(HEADER_BYTES)
    if len(head) < 8 or head[:2] == b"\0\0":  # group 0000 (zeros, a DIMSE command): no image data set starts so
        raise ValueError("no data element at the start")
    return pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True, force=True)


def read_dicom(path: str | os.PathLike, header_only: bool = False, max_pixels: int | None = None, force: bool = False) -> Dataset:
    """The data set with its pixel data deferred (not read), after the checks that need no pixel: an image of at most
    `max_pixels` values (header_only: the header, unchecked). pydicom inflates the whole of a deflated file even to
    stop before its pixels (a 0.8 MB file of 20000 x 20000 pixels: 1.6 GB of memory); here at most HEADER_BYTES
    for the header, then only what its pixels need. Raises what pydicom raises on a damaged file, or DataError."""
    if os.stat(path).st_size == 0:  # nothing to read (and a file of /proc that says 0 bytes, e.g. kmsg, blocks a read)
        raise DataError("an empty file, not a DICOM", path)
    with open(path, "rb") as f:
        if read_preamble(f, force) is None and header_only:  # forced, no DICM prefix: an old ACR-NEMA file, or anything
            return _read_unprefixed(f)
        meta = _file_meta(f)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            return _read_deflated(path, f, meta, header_only, max_pixels)
    ds = pydicom.dcmread(path, stop_before_pixels=header_only, defer_size=None if header_only else "64 KB", force=force)
    if not header_only:
        _check_image(ds)
        check_pixel_count(int(ds.Rows), int(ds.Columns), pixel_count(ds), max_pixels, path)
    return ds


def read_header(path: str | os.PathLike) -> dict:
    """Header only (no pixel decode): fast, used when an image is already converted."""
    try:
        ds = read_dicom(path, header_only=True)
        _check_image(ds)
        return header_info(ds)
    except Exception as e:  # pydicom raises many types for corrupt files
        raise _open_error(path, e) from None


# Uncompressed little-endian transfer syntaxes whose pixel bytes can be mapped as they are.
_NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _map_native(path: str | os.PathLike, ds: Dataset) -> np.ndarray | None:
    """Memory-map the pixel values of an uncompressed file instead of copying them.

    Most uncompressed radiographs take this path: the resize then reads the page cache
    directly (pages mapped in one go with MAP_POPULATE where the OS has it). Returns None
    where pydicom's general decoder is needed (compressed, big endian, multi-frame, colour,
    signed values with unused high bits).
    """
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    bits_alloc, bits_stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if (
        tsyntax not in _NATIVE
        or bits_alloc not in (8, 16)
        or int(ds.get("SamplesPerPixel", 1)) != 1
        or int(ds.get("NumberOfFrames", 1) or 1) != 1
        or (signed and bits_stored != bits_alloc)
        or "PixelData" not in ds
    ):
        return None
    elem = ds.get_item(0x7FE00010, keep_deferred=True)  # a deferred element knows its file offset
    offset = getattr(elem, "value_tell", None)
    rows, cols = int(ds.Rows), int(ds.Columns)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_alloc // 8}")
    if elem.value is not None or offset is None or elem.length < rows * cols * dtype.itemsize:
        return None
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
    except (AttributeError, TypeError, OSError):  # no flags/prot (Windows): plain read-only map
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(rows, cols))
    return np.frombuffer(mapped, dtype=dtype, count=rows * cols, offset=offset).reshape(rows, cols)


def _min_max(arr: np.ndarray) -> tuple[float, float]:
    if arr.dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64):
        lo, hi = cv2.minMaxLoc(arr)[:2]  # one fast pass
        return float(lo), float(hi)
    return float(arr.min()), float(arr.max())


def _decode(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, Dataset, bool]:
    """(2-D stored values, dataset, whether the values are memory-mapped from an uncompressed file); an image of
    more than max_pixels values is refused before its pixels are read."""
    try:
        ds = read_dicom(path, max_pixels=max_pixels)
        arr = _map_native(path, ds)
        native = arr is not None
        if not native:
            arr = ds.pixel_array
    except Exception as e:  # pydicom and its plugins raise many types for corrupt files
        raise _open_error(path, e) from None
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))  # OpenCV reads native byte order only
    if arr.ndim == 3 and ds.get("SamplesPerPixel", 1) == 3:
        # Colour secondary captures turn up in the wild: keep their luminance.
        arr = cv2.cvtColor(np.ascontiguousarray(arr).astype(np.float32), cv2.COLOR_RGB2GRAY)
    if arr.ndim != 2:
        raise DataError(f"expected one grayscale frame, got pixel array of shape {arr.shape}", path)
    return arr, ds, native


def _garbage_bits(arr: np.ndarray, ds: Dataset, native: bool, value_range: tuple[float, float]) -> int | None:
    """The mask of the stored bits where a mapped file's unused high bits hold garbage (old overlays), else None."""
    top = (1 << int(ds.get("BitsStored", 16) or 16)) - 1
    return top if native and arr.dtype.kind == "u" and value_range[1] > top else None


def read_stored(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, Dataset, tuple[float, float]]:
    """Decode the stored values (any transfer syntax the installed plugins support).

    Returns the 2-D array of stored values (read-only and memory-mapped for uncompressed
    files), the file's dataset (header, VOI LUT module; pixel data left on disk) and the
    values' (min, max).
    """
    arr, ds, native = _decode(path, max_pixels)
    value_range = _min_max(arr)
    top = _garbage_bits(arr, ds, native, value_range)
    if top is not None:
        arr = np.bitwise_and(arr, top)  # drop the unused high bits, as pydicom does
        value_range = _min_max(arr)
    return arr, ds, value_range


def read_pixels(path: str | os.PathLike) -> tuple[np.ndarray, Dataset]:
    """The stored values and the dataset (see read_stored)."""
    arr, ds, _ = read_stored(path)
    return arr, ds


STRIP_ROWS = 64  # rows per strip when halving and taking the range together (~300 KB of 16-bit: stays in cache)
_CV_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)  # what OpenCV's area resize takes as is


def halve_with_range(arr: np.ndarray, fx: int, fy: int) -> tuple[np.ndarray, tuple[float, float]]:
    """One exact area halving and the (min, max) of the WHOLE input, in one pass over memory.

    Strip by strip, so each strip is still in cache when the min-max reads it: on a
    2544 x 3028 16-bit radiograph this costs less than the halving alone plus a separate
    min-max pass (one ~15 MB read instead of two). The output equals one cv2.resize call:
    each output row depends on its own `fy` input rows only.
    """
    hh, ww = arr.shape[0] // fy * fy, arr.shape[1] // fx * fx
    out = np.empty((hh // fy, ww // fx), dtype=arr.dtype)
    lo, hi = np.inf, -np.inf
    step = STRIP_ROWS // fy * fy
    for y in range(0, hh, step):
        strip = arr[y : min(y + step, hh), :ww]
        s_lo, s_hi = cv2.minMaxLoc(strip)[:2]
        lo, hi = min(lo, s_lo), max(hi, s_hi)
        cv2.resize(strip, (ww // fx, len(strip) // fy), dst=out[y // fy : (y + len(strip)) // fy], interpolation=cv2.INTER_AREA)
    for rest in (arr[hh:], arr[:hh, ww:]):  # an odd last row/column: dropped by halving, but in the range
        if rest.size:
            r_lo, r_hi = _min_max(rest)
            lo, hi = min(lo, r_lo), max(hi, r_hi)
    return out, (float(lo), float(hi))


def area_resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (width, height): exact 2x area halvings, then one bilinear step (< 2x).

    OpenCV's 2x INTER_AREA is a fast SIMD box filter (a 2500 x 3000 16-bit image halves in
    ~2 ms, where a direct INTER_AREA to 512 takes ~16 ms). Halving needs even sides, so it
    drops an odd last row/column; the final step is an affine warp whose scale is computed
    from the ORIGINAL size, so the output covers exactly the original extent and boxes map
    back with x * cols / width. Edge pixels lost to halving are replicated.
    """
    return area_resize_with_range(arr, size, want_range=False)[0]


def area_resize_with_range(
    arr: np.ndarray, size: tuple[int, int], want_range: bool = True
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """area_resize, plus the (min, max) of the full-size input (the first halving reads it anyway)."""
    h, w = arr.shape[:2]
    out_w, out_h = size
    value_range = None
    if want_range and arr.ndim == 2 and arr.dtype in _CV_DTYPES and w >= 2 * out_w and h >= 2 * out_h:
        arr, value_range = halve_with_range(arr, 2, 2)
        kx = ky = 2
    else:
        if want_range:
            value_range = _min_max(arr)
        kx = ky = 1  # total halving factor per axis
    if arr.dtype not in _CV_DTYPES:
        arr = arr.astype(np.float32)
    while arr.shape[1] >= 2 * out_w or arr.shape[0] >= 2 * out_h:
        fx, fy = int(arr.shape[1] >= 2 * out_w) + 1, int(arr.shape[0] >= 2 * out_h) + 1
        hh, ww = arr.shape[0] // fy * fy, arr.shape[1] // fx * fx
        arr = cv2.resize(arr[:hh, :ww], (ww // fx, hh // fy), interpolation=cv2.INTER_AREA)
        kx, ky = kx * fx, ky * fy
    if arr.shape[:2] == (out_h, out_w) and w == out_w * kx and h == out_h * ky:
        return np.asarray(arr), value_range
    # dst pixel j (centre j + 0.5) samples source position (j + 0.5) * a - 0.5 in the halved image.
    a, b = w / kx / out_w, h / ky / out_h
    m = np.array([[a, 0, 0.5 * a - 0.5], [0, b, 0.5 * b - 0.5]], dtype=np.float64)
    small = cv2.warpAffine(
        np.ascontiguousarray(arr),
        m,
        (out_w, out_h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return small, value_range


def output_range(stored_range: tuple[float, float], ds: Dataset) -> tuple[float, float]:
    """Min and max of VOI(stored) over the FULL-size image, as the usual recipe's min-max sees them.

    The VOI LUT is evaluated on the range of stored values only (two points for a window,
    which is monotonic; every value in [min, max] for a LUT table, which need not be).
    """
    lo, hi = int(np.floor(stored_range[0])), int(np.ceil(stored_range[1]))
    if ds.get("VOILUTSequence"):
        probe = np.arange(lo, hi + 1, dtype=np.int64)
    else:
        probe = np.array([lo, hi], dtype=np.int64)
    mapped = np.asarray(apply_voi_lut(probe, ds), dtype=np.float64)
    return float(mapped.min()), float(mapped.max())


def window_to_uint8(values: np.ndarray, ds: Dataset, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """VOI LUT / window (where present) -> invert MONOCHROME1 -> min-max to uint8.

    `value_range` is the (min, max) the min-max stretches to (default: that of `values`).
    """
    out = np.asarray(apply_voi_lut(values, ds), dtype=np.float32)
    lo, hi = value_range if value_range is not None else (float(out.min()), float(out.max()))
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = (hi - out) * scale  # bone bright, like MONOCHROME2
    else:
        out = (out - lo) * scale
    return np.clip(out, 0, 255).astype(np.uint8)  # truncates, like the usual recipe


def dicom_to_uint8(
    path: str | os.PathLike, sizes: list[int], max_pixels: int | None = None
) -> tuple[dict[int, np.ndarray], dict]:
    """Convert one DICOM to square 8-bit images at each size (largest first).

    Returns ({size: image}, header info). The largest size is computed from the stored
    values; smaller sizes are area-resized from it. An image of more than max_pixels
    values is refused (DataError) before its pixels are read.
    """
    arr, ds, native = _decode(path, max_pixels)
    sizes = sorted({int(s) for s in sizes}, reverse=True)
    small, stored_range = area_resize_with_range(arr, (sizes[0], sizes[0]))
    top = _garbage_bits(arr, ds, native, stored_range)
    if top is not None:  # rare: redo on the cleaned values
        small, stored_range = area_resize_with_range(np.bitwise_and(arr, top), (sizes[0], sizes[0]))
    images = {sizes[0]: window_to_uint8(small, ds, output_range(stored_range, ds))}
    for s in sizes[1:]:
        images[s] = cv2.resize(images[sizes[0]], (s, s), interpolation=cv2.INTER_AREA)
    return images, header_info(ds)


def naive_dicom_to_uint8(path: str | os.PathLike, size: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The public-notebook recipe, kept as the reference for tests and the benchmark."""
    ds = pydicom.dcmread(path)
    data = apply_voi_lut(ds.pixel_array, ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        data = np.amax(data) - data
    data = data - np.min(data)
    data = data / max(np.max(data), 1e-12)
    data = (data * 255).astype(np.uint8)
    return cv2.resize(data, (size, size), interpolation=interpolation)
