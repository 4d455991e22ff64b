"""The DICOM reader on pydicom's bundled real files and on synthetic chest DICOMs."""

from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from siimcovid.data.dicom import (
    area_resize,
    area_resize_with_range,
    dicom_to_uint8,
    halve_with_range,
    naive_dicom_to_uint8,
    read_header,
    read_pixels,
)
from siimcovid.data.siim import find_dicoms
from siimcovid.utils import DataError

# The same 64x64 MR image stored with six different transfer syntaxes.
MR_SMALL = {
    "Explicit VR Little Endian": "MR_small.dcm",
    "Implicit VR Little Endian": "MR_small_implicit.dcm",
    "Explicit VR Big Endian": "MR_small_bigendian.dcm",
    "RLE Lossless": "MR_small_RLE.dcm",
    "JPEG-LS Lossless Image Compression": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG 2000 Image Compression (Lossless Only)": "MR_small_jp2klossless.dcm",
}


@pytest.mark.parametrize("syntax,name", MR_SMALL.items())
def test_lossless_syntaxes_decode_to_the_same_image(syntax, name):
    reference, _ = dicom_to_uint8(get_testdata_file("MR_small.dcm"), [64])
    images, info = dicom_to_uint8(get_testdata_file(name), [64])
    assert info["transfer_syntax"] == syntax
    assert images[64].dtype == np.uint8 and images[64].shape == (64, 64)
    np.testing.assert_array_equal(images[64], reference[64])


def test_jpeg_lossless_process14_matches_rle_copy():
    # The same RGB secondary capture, JPEG Lossless (process 14) and RLE: identical luminance.
    a, ds = read_pixels(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    b, _ = read_pixels(get_testdata_file("SC_rgb_rle.dcm"))
    assert "Process 14" in ds.file_meta.TransferSyntaxUID.name
    assert a.shape == (100, 100)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm", "693_J2KI.dcm", "image_dfl.dcm", "CT_small.dcm"])
def test_other_real_files_convert(name):
    # 693_J2KI is a CT with a narrow soft-tissue window: resizing before windowing differs
    # there (by design, see dicom.py), so only the radiograph-like files are held to the recipe.
    images, info = dicom_to_uint8(get_testdata_file(name), [48, 32])
    assert set(images) == {48, 32}
    for s, img in images.items():
        assert img.shape == (s, s) and img.dtype == np.uint8 and img.std() > 5
    if info["voi"] != "window":
        reference = naive_dicom_to_uint8(get_testdata_file(name), 48, cv2.INTER_AREA)
        assert np.abs(images[48].astype(int) - reference).mean() < 2.0
    assert info["rows"] > 0 and info["cols"] > 0


def test_reader_matches_pydicom_values_uncompressed_and_compressed(synth_root):
    for path in find_dicoms(synth_root / "train").path[:12]:
        values, _ = read_pixels(path)
        np.testing.assert_array_equal(np.asarray(values), pydicom.dcmread(path).pixel_array)


def test_unused_high_bits_are_masked(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("examples_overlay.dcm"))
    arr = ds.pixel_array.copy()
    arr[:40, :40] |= 0x8000  # garbage above BitsStored=12, as old overlay planes leave
    ds.PixelData = arr.tobytes()
    path = tmp_path / "hb.dcm"
    ds.save_as(path)
    values, _ = read_pixels(path)
    np.testing.assert_array_equal(np.asarray(values), pydicom.dcmread(path).pixel_array)
    assert np.asarray(values).max() < 4096
    # the conversion (which takes the range during its first halving) sees the clean values too
    ds.PixelData = pydicom.dcmread(path).pixel_array.tobytes()
    ds.save_as(tmp_path / "clean.dcm")
    for got, want in zip(dicom_to_uint8(path, [128])[0].values(), dicom_to_uint8(tmp_path / "clean.dcm", [128])[0].values()):
        np.testing.assert_array_equal(got, want)


def _variant(tmp_path, name, **changes) -> str:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return str(path)


def test_an_empty_image_is_a_clear_error_not_a_crash(tmp_path):
    # Rows=0 used to reach OpenCV, which killed the whole process (SIGFPE)
    path = _variant(tmp_path, "empty.dcm", Rows=0)
    for read in (lambda p: dicom_to_uint8(p, [32]), read_header):
        with pytest.raises(DataError, match=r"empty\.dcm.*64 x 0 pixels"):
            read(path)


def test_monochrome1_is_inverted(tmp_path):
    mono2 = _variant(tmp_path, "m2.dcm", WindowCenter=None, WindowWidth=None)
    mono1 = _variant(tmp_path, "m1.dcm", WindowCenter=None, WindowWidth=None, PhotometricInterpretation="MONOCHROME1")
    a, _ = dicom_to_uint8(mono2, [64])
    b, _ = dicom_to_uint8(mono1, [64])
    assert np.abs(a[64].astype(int) + b[64].astype(int) - 255).max() <= 1
    assert np.abs(a[64].astype(int) - b[64].astype(int)).mean() > 50


def test_window_is_applied_like_pydicom(tmp_path):
    windowed = get_testdata_file("MR_small.dcm")  # Window Center/Width present
    plain = _variant(tmp_path, "plain.dcm", WindowCenter=None, WindowWidth=None)
    ours, info = dicom_to_uint8(windowed, [64])
    reference = naive_dicom_to_uint8(windowed, 64, cv2.INTER_AREA)
    assert info["voi"] == "window"
    assert np.abs(ours[64].astype(int) - reference).max() <= 1  # same size: identical up to rounding
    no_window, _ = dicom_to_uint8(plain, [64])
    assert np.abs(ours[64].astype(int) - no_window[64].astype(int)).mean() > 5


def test_voi_lut_sequence_takes_precedence(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PixelRepresentation = 0
    arr = ds.pixel_array.astype(np.int32)
    ds.PixelData = (arr - arr.min()).astype(np.uint16).tobytes()
    n = int(arr.max() - arr.min()) + 1
    item = Dataset()
    item.LUTDescriptor = [n, 0, 16]
    item.add_new(0x00283006, "OW", (65535 * (np.linspace(0, 1, n) ** 3)).astype("<u2").tobytes())
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    ours, info = dicom_to_uint8(path, [64])
    reference = naive_dicom_to_uint8(path, 64, cv2.INTER_AREA)
    assert info["voi"] == "lut"
    assert np.abs(ours[64].astype(int) - reference).max() <= 1
    # a cubic LUT darkens mid-tones compared with the linear window
    window_only, _ = dicom_to_uint8(get_testdata_file("MR_small.dcm"), [64])
    assert ours[64].mean() < window_only[64].mean() - 10


def test_downsampled_output_is_close_to_the_naive_recipe(synth_root):
    # Resize-then-VOI differs from VOI-then-resize only where the window bends inside a pixel.
    for path in find_dicoms(synth_root / "train").path[:8]:
        ours, _ = dicom_to_uint8(path, [128])
        reference = naive_dicom_to_uint8(path, 128, cv2.INTER_AREA)
        diff = np.abs(ours[128].astype(int) - reference.astype(int))
        assert diff.mean() < 2.0, path  # the last < 2x step is bilinear: some noise aliasing
        assert np.percentile(diff, 99) <= 8, path


@pytest.mark.parametrize("shape", [(3029, 2545), (200, 129), (64, 64), (130, 4)])
def test_halving_with_range_equals_one_resize_and_a_full_min_max(shape):
    # strip by strip (last strip short, odd row/column dropped), yet the same as one call
    rng = np.random.default_rng(1)
    img = rng.integers(100, 4000, shape).astype(np.uint16)
    img[-1, -1], img[-1, 0] = 7, 4095  # extremes only in the odd last row, which halving drops
    small, value_range = halve_with_range(img, 2, 2)
    h, w = shape[0] // 2 * 2, shape[1] // 2 * 2
    np.testing.assert_array_equal(small, cv2.resize(img[:h, :w], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    assert value_range == (float(img.min()), float(img.max()))
    resized, full_range = area_resize_with_range(img, (32, 32))
    np.testing.assert_array_equal(resized, area_resize(img, (32, 32)))
    assert full_range == value_range


def test_area_resize_keeps_geometry_exact():
    img = np.zeros((2500, 3001), np.uint16)
    img[500:900, 1000:1600] = 1000
    for size in (512, 300, 4000):
        out = area_resize(img, (size, size)).astype(float)
        cols = np.where(out.max(0) > 500)[0]
        rows = np.where(out.max(1) > 500)[0]
        assert abs(cols.min() - 1000 * size / 3001) <= 1 and abs(cols.max() + 1 - 1600 * size / 3001) <= 1
        assert abs(rows.min() - 500 * size / 2500) <= 1 and abs(rows.max() + 1 - 900 * size / 2500) <= 1


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        read_pixels(tmp_path / "nope.dcm")
    assert "nope.dcm" in str(e.value)
    bad = tmp_path / "corrupt.dcm"
    good = open(get_testdata_file("MR_small.dcm"), "rb").read()
    bad.write_bytes(good[:400])  # header cut short, no pixel data
    with pytest.raises(DataError, match="corrupt.dcm"):
        dicom_to_uint8(bad, [64])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a dicom at all" * 10)
    with pytest.raises(DataError, match="junk.dcm"):
        read_header(junk)
