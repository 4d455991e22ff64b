"""Inputs that cannot hang prepare or predict, nor blow them up (issue 17, items 5-7): what is no regular file is never
opened, linked and unreadable folders are never skipped in silence, a header claiming too many pixels is refused before
any decoding, images whose tags say they are no frontal chest radiograph are left out with the reason, a source of
unreadable files is one line, and a file name that is not UTF-8 costs nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from siimcovid import cli
from siimcovid.data.convert import convert_one
from siimcovid.data.dicom import radiograph_problem
from siimcovid.data.folder import folder_layout
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import Problems
from siimcovid.utils import DataError, SiimError

REPO = Path(__file__).resolve().parents[1]


def tiny_dicom(path, rows=32, cols=32, modality="DX", body="CHEST", view="PA", tsyntax=ExplicitVRLittleEndian) -> Path:
    """A small 12-bit chest DICOM; a tag given as None is left out."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in (("Modality", modality), ("BodyPartExamined", body), ("ViewPosition", view)):
        if value is not None:
            setattr(ds, keyword, value)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(rows * cols, dtype=np.uint16) % 4096).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def deflated_bomb(path: Path, rows: int, cols: int) -> Path:
    """A deflated DICOM whose zero pixels inflate to rows x cols x 2 bytes: a few hundred KB on disk."""
    header = pydicom.dcmread(tiny_dicom(path, rows=1, cols=1))
    del header.PixelData
    header.Rows, header.Columns = rows, cols
    header.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta, body = DicomBytesIO(), DicomBytesIO()
    for buf in (meta, body):
        buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(meta, header.file_meta, enforce_standard=True)
    write_dataset(body, header)
    size = rows * cols * 2
    deflate = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        f.write(deflate.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little")))
        for _ in range(size // 2**24):
            f.write(deflate.compress(bytes(2**24)))
        f.write(deflate.compress(bytes(size % 2**24)) + deflate.flush())
    return path


def prepare_folder(src: Path, out: Path, *extra: str) -> Path:
    """`siimcovid prepare layout=folder` of `src`, in this process."""
    cli.main(["prepare", f"data={src}", "layout=folder", "splits=test", f"out={out}", "sizes=32", "workers=1",
              f"data_yaml_dir={out.parent / 'data_yaml'}", *extra])  # fmt: skip
    return out


def run_prepare(src: Path, out: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """`siimcovid prepare layout=folder on_error=skip` of `src` as a user runs it (exit code, stderr), within `timeout` s."""
    command = [sys.executable, "-m", "siimcovid", "prepare", f"data={src}", "layout=folder", "splits=test", "on_error=skip",
               f"out={out}", "sizes=32", "workers=1", f"data_yaml_dir={out.parent / 'data_yaml'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=out.parent, env=env, capture_output=True, timeout=timeout)


def skipped(out: Path) -> dict[str, str]:
    """{file name: problem} of a prepared folder's skipped.csv."""
    table = pd.read_csv(out / "skipped.csv", keep_default_na=False)
    return {Path(f).name: p for f, p in zip(table.file, table.problem)}


# ----------------------------------------------------------------------------- item 5: hangs and blow-ups
def test_a_fifo_and_a_link_to_dev_zero_are_listed_never_opened(tmp_path):
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    os.mkfifo(src / "pipe")  # opening it blocks until someone writes; /dev/zero reads for ever
    (src / "zero").symlink_to("/dev/zero")
    (src / "gone").symlink_to(src / "nothing-here")
    done = run_prepare(src, tmp_path / "out", timeout=60)  # a hang fails here, it does not block the suite
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert len(Prepared(tmp_path / "out").meta) == 1
    reasons = skipped(tmp_path / "out")
    assert set(reasons) == {"pipe", "zero", "gone"}
    assert "FIFO" in reasons["pipe"] and "character device" in reasons["zero"] and "broken" in reasons["gone"]


def test_a_large_file_of_zeros_is_told_from_a_dicom_at_once(tmp_path):
    import time

    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    with open(src / "disk.img", "wb") as f:
        f.truncate(2 * 10**9)  # 2 GB of zeros, sparse: a forced DICOM read parsed them as empty elements, minutes long
    start = time.monotonic()
    problems = Problems("skip")
    table = folder_layout(src, ["test"], problems)
    assert time.monotonic() - start < 20
    assert [Path(p).name for p in table.path] == ["chest.dcm"]
    assert [(Path(e.file).name, e.reason) for e in problems.items] == [("disk.img", "neither a DICOM nor a PNG/JPEG")]


def test_a_linked_subfolder_is_followed_once_and_a_loop_is_listed(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    tiny_dicom(src / "a.dcm")
    tiny_dicom(elsewhere / "b.dcm")
    (src / "linked").symlink_to(elsewhere)
    (src / "same again").symlink_to(elsewhere)
    (src / "loop").symlink_to(src)
    (src / "disk").symlink_to("/")  # would scan the whole machine
    (src / "up").symlink_to(tmp_path)
    problems = Problems("skip")
    table = folder_layout(src, ["test"], problems)
    assert sorted(Path(p).relative_to(src).as_posix() for p in table.path) == ["a.dcm", "linked/b.dcm"]
    listed = dict(zip((Path(f).name for f in problems.table().file), problems.table().problem))
    assert sorted(listed) == ["disk", "loop", "same again", "up"]
    assert "scanned already" in listed["loop"] and "scanned already" in listed["same again"]
    assert "holding the source" in listed["disk"] and "holding the source" in listed["up"]


def test_an_unreadable_subfolder_is_listed_not_skipped_in_silence(tmp_path, monkeypatch):
    src = tmp_path / "src"
    tiny_dicom(src / "a.dcm")
    tiny_dicom(src / "locked" / "b.dcm")
    real = os.scandir

    def scandir(path="."):  # the tests run as root, whom chmod 000 does not stop: refuse the listing here
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems = Problems("skip")
    assert [Path(p).name for p in folder_layout(src, ["test"], problems).path] == ["a.dcm"]
    assert [(Path(e.file).name, "Permission denied" in e.reason) for e in problems.items] == [("locked", True)]
    with pytest.raises(DataError, match="locked: cannot list the folder"):
        folder_layout(src, ["test"], Problems("raise"))


def test_a_deflated_dicom_claiming_a_huge_image_is_refused_from_its_header(tmp_path):
    bomb = deflated_bomb(tmp_path / "src" / "bomb.dcm", 8000, 8000)  # 128 MB of pixels in ~130 KB
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        table = folder_layout(tmp_path / "src", ["test"], Problems("raise"))  # the scan reads the header only
        job = {"out": str(tmp_path / "out"), "sizes": [32], "ext": "png", "image_id": "bomb", "split": "test",
               "path": str(bomb), "max_pixels": 10_000_000}  # fmt: skip
        result = convert_one(job)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(table) == 1 and not result["ok"]
    assert "claims 8000 x 8000 pixels" in result["error"].reason and "max_pixels=10000000" in result["error"].reason
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a file that was not decoded"


def test_max_pixels_skips_a_large_dicom_and_png_with_the_reason_and_is_typed(tmp_path):
    import cv2

    src = tmp_path / "src"
    tiny_dicom(src / "small.dcm", rows=32, cols=32)
    tiny_dicom(src / "large.dcm", rows=64, cols=64)
    cv2.imwrite(str(src / "large.png"), np.zeros((64, 64), np.uint8))
    out = prepare_folder(src, tmp_path / "out", "on_error=skip", "max_pixels=2000")
    assert len(Prepared(out).meta) == 1
    reasons = skipped(out)
    assert set(reasons) == {"large.dcm", "large.png"}
    assert all("claims 64 x 64 pixels" in r and "max_pixels=2000" in r for r in reasons.values())
    with pytest.raises(SiimError, match="max_pixels"):
        prepare_folder(src, tmp_path / "out2", "max_pixels=0")


# ----------------------------------------------------------------------------- item 6: not a chest radiograph
@pytest.mark.parametrize(
    "tags,refused",
    [
        (("DX", "CHEST", "PA"), None),
        (("CR", "Tórax", "AP"), None),
        (("DX", "PORT CHEST", ""), None),
        (("dx", "thorax", "ap"), None),
        (("", "", ""), None),  # no tag says otherwise: passed, and images.csv says the tags are missing
        (("US", "ABDOMEN", ""), "Modality"),
        (("CT", "CHEST", ""), "Modality"),
        (("DX", "SKULL", "PA"), "BodyPartExamined"),
        (("DX", "CHEST", "LL"), "ViewPosition"),
        (("CR", "CHEST", "LATERAL"), "ViewPosition"),
    ],
)
def test_the_tags_that_say_an_image_is_no_frontal_chest_radiograph(tags, refused):
    problem = radiograph_problem(*tags)
    assert (problem is None) if refused is None else (refused in problem)


def test_a_non_chest_dicom_is_listed_not_prepared_unless_modality_check_is_off(tmp_path):
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    tiny_dicom(src / "bare.dcm", modality=None, body=None, view=None)
    tiny_dicom(src / "ultrasound.dcm", modality="US", body="ABDOMEN", view=None)
    tiny_dicom(src / "lateral.dcm", view="LL")
    out = prepare_folder(src, tmp_path / "out")  # on_error=raise: these are not broken, they are left out all the same
    meta = Prepared(out).meta.assign(file=lambda m: m.dicom)
    assert sorted(meta.file) == ["bare.dcm", "chest.dcm"]
    reasons = skipped(out)
    assert set(reasons) == {"ultrasound.dcm", "lateral.dcm"}
    assert "Modality 'US'" in reasons["ultrasound.dcm"] and "lateral" in reasons["lateral.dcm"]
    assert all("modality_check=false" in r for r in reasons.values())
    tags = pd.read_csv(out / "meta.csv", keep_default_na=False).set_index("dicom")
    assert tags.loc["chest.dcm", ["modality", "body_part", "view_position"]].tolist() == ["DX", "CHEST", "PA"]
    assert tags.loc["bare.dcm", ["modality", "body_part", "view_position"]].tolist() == ["", "", ""]

    everything = prepare_folder(src, tmp_path / "all", "modality_check=false")
    assert len(Prepared(everything).meta) == 4 and not (everything / "skipped.csv").exists()


def test_synthetic_data_passes_the_check_and_a_siim_root_keeps_every_test_image(tiny_root, tmp_path):
    problems = Problems("raise")
    table = folder_layout(tiny_root / "test", ["test"], problems)
    assert len(table) == len(list((tiny_root / "test").rglob("*.dcm"))) and not problems.items
    first = sorted((tiny_root / "test").rglob("*.dcm"))[0]  # a SIIM test image tagged as an ultrasound
    ds = pydicom.dcmread(first)
    ds.Modality = "US"
    ds.save_as(first)
    out = tmp_path / "siim"
    cli.main(["prepare", f"data={tiny_root}", "splits=test", f"out={out}", "sizes=32", "workers=1"])
    meta = Prepared(out).meta
    assert first.stem in set(meta.image_id) and len(meta) == len(table)  # a submission must cover every test image
    assert meta.set_index("image_id").modality[first.stem] == "US"


def test_images_csv_carries_the_tags_checked_and_says_which_are_missing(tmp_path):
    import cv2
    from test_view import fused_by_hand

    from siimcovid.predict.view import write_view
    from siimcovid.tables import PREDICTED_IMAGES

    src = tmp_path / "src"
    tiny_dicom(src / "a.dcm", view=None)
    cv2.imwrite(str(src / "b.png"), np.full((40, 30), 128, np.uint8))
    prepared = prepare_folder(src, tmp_path / "prepared")
    fused_by_hand(prepared, tmp_path / "predict" / "fuse")
    write_view(prepared, tmp_path / "predict" / "fuse", tmp_path / "predict")
    images = PREDICTED_IMAGES.read(tmp_path / "predict" / "images.csv").set_index("image_id")
    rows = {Path(f).name: r for f, (_, r) in zip(images.file, images.iterrows())}
    assert rows["a.dcm"][["modality", "body_part", "view_position"]].tolist() == ["DX", "CHEST", "missing"]
    assert rows["b.png"][["modality", "body_part", "view_position"]].tolist() == ["missing"] * 3


# ----------------------------------------------------------------------------- item 7: no tracebacks
def test_a_source_of_unreadable_files_is_one_line_and_leaves_no_prepared_folder(tmp_path):
    src = tmp_path / "src"
    for name in ("a.dcm", "b.dcm"):
        path = tiny_dicom(src / name)
        path.write_bytes(path.read_bytes()[:-1000])  # cut in the pixels: found when decoding
    out = tmp_path / "out"
    done = run_prepare(src, out)
    assert done.returncode == 2
    last = done.stderr.decode().strip().splitlines()[-1]
    assert last.startswith(f"siimcovid: error: no readable image in {src}: all 2 files skipped, see {out / 'skipped.csv'}")
    assert "Traceback" not in done.stderr.decode()
    assert set(skipped(out)) == {"a.dcm", "b.dcm"}
    assert not (out / "prepare.yaml").exists() and not (out / "meta.csv").exists() and not (out / "32").exists()

    with pytest.raises(DataError, match="a.dcm"):  # on_error=raise: the first one stops, and no prepare.yaml stays
        prepare_folder(src, tmp_path / "raised")
    assert not (tmp_path / "raised" / "prepare.yaml").exists()


def test_a_file_name_that_is_not_utf8_is_prepared_and_written_safely(tmp_path):
    src = tmp_path / "src"
    data = tiny_dicom(src / "tmp.dcm").read_bytes()
    (src / "tmp.dcm").unlink()
    for name, content in ((b"\xff.dcm", data), (b"notes \xfe.txt", b"not an image")):
        fd = os.open(os.path.join(os.fsencode(src), name), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, content)
        os.close(fd)
    out = prepare_folder(src, tmp_path / "out", "on_error=skip")
    meta = Prepared(out).meta
    assert meta.dicom.tolist() == ["\\xff.dcm"]  # the bytes that are not UTF-8, as \xNN
    assert Prepared(out).image_path(meta.image_id[0], "test", 32).is_file()
    assert list(skipped(out)) == ["notes \\xfe.txt"]
    shutil.rmtree(src)


def test_a_png_whose_name_is_not_utf8_is_prepared_in_a_process_that_survives(tmp_path):
    """OpenCV's imread crashes the whole process (a segfault, no error) on such a name: the picture is decoded from its
    bytes. A subprocess, so that a crash is a failed test and not a lost test run."""
    import cv2

    src = tmp_path / "src"
    src.mkdir()
    ok, png = cv2.imencode(".png", np.full((40, 50), 128, np.uint8))
    fd = os.open(os.path.join(os.fsencode(src), b"scan \xe9.png"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, png.tobytes())
    os.close(fd)
    done = run_prepare(src, tmp_path / "out")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert Prepared(tmp_path / "out").meta.dicom.tolist() == ["scan \\xe9.png"]


@pytest.mark.skipif(not os.access("/proc/kmsg", os.R_OK), reason="needs a readable /proc/kmsg (root on Linux)")
def test_a_link_to_a_file_that_says_0_bytes_but_blocks_is_never_read(tmp_path):
    """/proc/kmsg is a 'regular' file of 0 bytes whose read blocks until the kernel logs something."""
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    for name in ("kmsg.dcm", "kmsg.png", "kmsg"):
        (src / name).symlink_to("/proc/kmsg")
    done = run_prepare(src, tmp_path / "out", timeout=60)  # a hang fails the test (TimeoutExpired), not the suite
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert len(Prepared(tmp_path / "out").meta) == 1 and set(skipped(tmp_path / "out")) == {"kmsg.dcm", "kmsg.png", "kmsg"}


def test_a_path_setting_that_is_not_utf8_is_refused_at_load():
    from siimcovid.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"predict setting out=.*expected folder\? \(a path that is valid UTF-8 text"):
        load_config("predict", {"out": os.fsdecode(b"/tmp/out \xe9")})


# ----------------------------------------------------------------------------- item 3's rule for prepare's folder
def test_prepare_never_writes_into_nor_deletes_from_a_users_folder(tmp_path):
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    (mine / "skipped.csv").write_text("my own table\n")
    with pytest.raises(SiimError, match="holds files siimcovid did not write"):
        prepare_folder(src, mine)
    with pytest.raises(SiimError, match="skipped.csv is not a file siimcovid prepare wrote"):
        prepare_folder(src, mine, "overwrite=true")  # beside a user's files, never over them: stopped before any work
    assert sorted(p.name for p in mine.iterdir()) == ["skipped.csv", "thesis.txt"]
    assert (mine / "skipped.csv").read_text() == "my own table\n"

    (mine / "skipped.csv").unlink()
    prepare_folder(src, mine, "overwrite=true")  # on a clean source prepare removes skipped.csv: only its own
    assert (mine / "thesis.txt").read_text() == "years of work" and len(Prepared(mine).meta) == 1
    prepare_folder(src, mine)  # its own folder now: the re-run resumes
    assert (mine / "thesis.txt").read_text() == "years of work"


def test_a_users_data_yaml_of_the_same_name_is_never_replaced(tiny_root, tmp_path):
    yamls = tmp_path / "data_yaml"
    yamls.mkdir()
    (yamls / "tiny_fold0.yaml").write_text("path: /my/own/dataset\n")
    args = ["prepare", f"data={tiny_root}", "name=tiny", f"out={tmp_path / 'out'}", "sizes=32", "n_folds=2", "workers=1"]
    with pytest.raises(SiimError, match="tiny_fold0.yaml is not a data YAML siimcovid prepare wrote"):
        cli.main([*args, f"data_yaml_dir={yamls}"])
    assert (yamls / "tiny_fold0.yaml").read_text() == "path: /my/own/dataset\n" and not (tmp_path / "out").exists()
    (yamls / "tiny_fold0.yaml").unlink()
    cli.main([*args, f"data_yaml_dir={yamls}"])
    cli.main([*args, f"data_yaml_dir={yamls}"])  # its own YAMLs: replaced on the re-run
    assert (yamls / "tiny_fold0.yaml").read_text().startswith("# Generated by `siimcovid prepare`")


def test_a_folder_an_earlier_siimcovid_prepared_is_adopted_and_resumed(tmp_path):
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    out = prepare_folder(src, tmp_path / "out")
    (out / "prepare_files.yaml").unlink()  # as an earlier siimcovid left it: no record
    image = next(out.rglob("*.png"))
    stamp = image.stat().st_mtime_ns
    prepare_folder(src, out)
    assert image.stat().st_mtime_ns == stamp  # resumed, not refused nor converted again
    assert image.relative_to(out).as_posix() in (out / "prepare_files.yaml").read_text()


def test_adopting_an_earlier_folder_takes_only_prepares_own_files(tmp_path):
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    out = prepare_folder(src, tmp_path / "out")
    (out / "prepare_files.yaml").unlink()  # as an earlier siimcovid left it, and the user kept notes there
    (out / "notes.txt").write_text("mine")
    (out / "32" / "images" / "test" / "mine.txt").write_text("mine too")
    prepare_folder(src, out)
    record = (out / "prepare_files.yaml").read_text()
    assert "notes.txt" not in record and "mine.txt" not in record and (out / "notes.txt").read_text() == "mine"
    (out / "prepare_files.yaml").unlink()
    (out / "skipped.csv").write_text("file,why\nmine,kept for the paper\n")  # a user's table of prepare's name
    with pytest.raises(SiimError, match="skipped.csv is not a file siimcovid prepare wrote"):
        prepare_folder(src, out)
    assert (out / "skipped.csv").read_text() == "file,why\nmine,kept for the paper\n"


@pytest.mark.parametrize("where", ["inside", "same", "above"])
def test_an_out_at_or_around_the_data_is_refused(tmp_path, where):
    src = tmp_path / "src"
    tiny_dicom(src / "chest.dcm")
    out = {"inside": src / "prepared", "same": src, "above": tmp_path}[where]
    with pytest.raises(SiimError, match=f"out={out}"):
        prepare_folder(src, out, "overwrite=true")
    assert sorted(p.name for p in src.iterdir()) == ["chest.dcm"]


# ----------------------------------------------------------------------------- predict on a hostile folder (trains the tiny run)
@pytest.mark.slow
def test_predict_on_a_hostile_folder_predicts_the_chest_radiograph_and_lists_the_rest(tiny_run, tmp_path):
    base, result = tiny_run
    src = tmp_path / "src"
    src.mkdir()
    chest = sorted((base / "siim" / "test").rglob("*.dcm"))[0]
    shutil.copy(chest, src / "chest.dcm")
    ultrasound = pydicom.dcmread(chest)
    ultrasound.Modality, ultrasound.SOPInstanceUID = "US", generate_uid()
    ultrasound.save_as(src / "ultrasound.dcm")
    os.mkfifo(src / "pipe")
    (src / "zero").symlink_to("/dev/zero")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "siimcovid", "predict", f"bundle={result['bundle']}", f"source={src}", f"out={out}",
               "workers=0", "device=cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=300)  # a hang fails, not blocks
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    images = pd.read_csv(out / "images.csv", keep_default_na=False)
    assert [Path(f).name for f in images.file] == ["chest.dcm"]
    assert images.loc[0, "modality"] in ("CR", "DX") and images.loc[0, "body_part"] == "CHEST"
    assert images.loc[0, "view_position"] == "missing"  # synth writes no ViewPosition: said, not guessed
    reasons = skipped(out)
    assert set(reasons) == {"ultrasound.dcm", "pipe", "zero"} and "Modality 'US'" in reasons["ultrasound.dcm"]
    anyway = subprocess.run([*command[:-3], f"out={tmp_path / 'all'}", "modality_check=false", *command[-2:]], cwd=tmp_path,
                            env=env, capture_output=True, timeout=300)  # fmt: skip
    assert anyway.returncode == 0, anyway.stderr.decode()[-3000:]  # predict's own setting reaches its prepare
    predicted = pd.read_csv(tmp_path / "all" / "images.csv", keep_default_na=False)
    assert sorted(Path(f).name for f in predicted.file) == ["chest.dcm", "ultrasound.dcm"]

    for name in ("chest.dcm", "ultrasound.dcm", "pipe", "zero"):
        (src / name).unlink()
    (src / "cut.dcm").write_bytes(chest.read_bytes()[:-2000])
    done = subprocess.run([*command[:-3], f"out={tmp_path / 'none'}", *command[-2:]], cwd=tmp_path, env=env,
                          capture_output=True, timeout=300)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines()[-1].startswith(f"siimcovid: error: no readable image in {src}: all 1 files")
    assert "Traceback" not in done.stderr.decode() and not (tmp_path / "none").exists()


def test_predicts_input_checks_reach_prepare_typed():
    from siimcovid.config import load_config
    from siimcovid.predict.source import input_checks, prepare_settings
    from siimcovid.stages import stage_config

    cfg = load_config("predict", {"modality_check": False, "max_pixels": 5000})
    settings = prepare_settings({"sizes": [64], "ext": "png", "png_level": 0}, Path("src"), "folder", Path("out/prepared"),
                                0, "skip", **input_checks(cfg))  # fmt: skip
    prepare_cfg = stage_config("prepare", None, settings)
    assert (prepare_cfg.modality_check, prepare_cfg.max_pixels) == (False, 5000)
    defaults = stage_config("prepare", None, prepare_settings({"sizes": [64], "ext": "png", "png_level": 0}, Path("s"),
                                                              "folder", Path("o"), 0, "skip"))  # fmt: skip
    assert (defaults.modality_check, defaults.max_pixels) == (True, 100_000_000)
