"""`prepare layout=folder`: loose DICOMs in any tree, any names, or one file (siimcovid.data.folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from siimcovid.data.folder import folder_layout, unique_ids
from siimcovid.data.siim import Problems
from siimcovid.utils import DataError


def source_dicoms(root: Path) -> list[Path]:
    return sorted((root / "test").rglob("*.dcm")) + sorted((root / "train").rglob("*.dcm"))


def make_messy_tree(src: Path, out: Path) -> dict:
    """A tree of DICOMs as people keep them: nested folders, names without .dcm, a copy of one file, a text
    file, a DICOM truncated in its header and one truncated in its pixels. Returns what was put where."""
    dicoms = source_dicoms(src)
    placed = {
        out / "2021" / "ward a" / "patient 1" / "IMG0001": dicoms[0],
        out / "2021" / "ward a" / "x-ray.dcm": dicoms[1],
        out / "scan": dicoms[2],
        out / "copies" / "scan (copy)": dicoms[2],  # the same SOPInstanceUID twice
    }
    for dst, s in placed.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s, dst)
    (out / "notes.txt").write_text("not an image\n")
    (out / ".DS_Store").write_bytes(b"\0" * 64)  # dot-files are not inputs
    data = dicoms[3].read_bytes()
    (out / "copies" / "header_cut.dcm").write_bytes(data[:200])
    (out / "pixels_cut").write_bytes(data[: len(data) - 2000])
    return {"placed": placed, "pixels_cut": dicoms[3]}


@pytest.fixture
def messy(_tiny_source, tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "messy"
    return root, make_messy_tree(_tiny_source, root)


def test_dicoms_are_found_by_content_and_grouped_by_study_uid(messy):
    root, made = messy
    problems = Problems("skip")
    table = folder_layout(root, ["test"], problems)
    readable = [p for p in made["placed"]] + [root / "pixels_cut"]  # a cut in the pixels shows when decoding
    assert sorted(table.path) == sorted(str(p) for p in readable)
    for row in table.itertuples():
        ds = pydicom.dcmread(row.path, stop_before_pixels=True)
        assert row.study_id == ds.StudyInstanceUID and row.series_id == ds.SeriesInstanceUID
        assert row.image_id.startswith(ds.SOPInstanceUID)
    assert table.image_id.is_unique
    copies = table[table.path.str.contains("scan")].sort_values("path")
    assert list(copies.image_id) == [copies.image_id.iloc[0], copies.image_id.iloc[0] + "_2"]  # path order: copies/ first
    assert set(table.split) == {"test"} and set(table.study_label) == {""} and all(b == [] for b in table.boxes)
    listed = problems.table()
    assert sorted(Path(f).name for f in listed.file) == ["header_cut.dcm", "notes.txt"]


def test_on_error_raise_stops_at_the_first_file_that_is_not_an_image(messy):
    root, _ = messy
    with pytest.raises(DataError, match="header_cut.dcm"):
        folder_layout(root, ["test"], Problems("raise"))


def test_pictures_are_listed_with_their_folder_as_study(tmp_path):
    (tmp_path / "study 7").mkdir()
    for name in ("a.png", "b.JPG", "c.jpeg"):
        (tmp_path / "study 7" / name).write_bytes(b"")  # listed by name: their decoding is prepare's business
    table = folder_layout(tmp_path, ["test"], Problems("raise"))
    assert sorted(table.image_id) == ["a", "b", "c"] and set(table.study_id) == {"study_7"} and set(table.series_id) == {""}


def test_folders_of_one_name_in_two_places_are_two_studies(tmp_path):
    for patient in ("p1", "p2"):
        (tmp_path / patient / "DICOM").mkdir(parents=True)
        (tmp_path / patient / "DICOM" / f"{patient}.png").write_bytes(b"")
    (tmp_path / "loose.png").write_bytes(b"")
    table = folder_layout(tmp_path, ["test"], Problems("raise")).set_index("image_id")
    assert table.study_id.to_dict() == {"loose": tmp_path.name, "p1": "p1_DICOM", "p2": "p2_DICOM"}


def test_ids_made_unique_never_take_another_files_id():
    assert unique_ids(["a", "a", "a_2", "b", "a"]) == ["a", "a_3", "a_2", "b", "a_4"]


def test_train_split_is_refused(tmp_path):
    with pytest.raises(Exception, match="splits=test"):
        folder_layout(tmp_path, ["train"], Problems("raise"))


def test_prepare_a_messy_folder_end_to_end(messy, tmp_path):
    from siimcovid import cli
    from siimcovid.data.prepared import Prepared

    root, made = messy
    out = tmp_path / "prepared"
    args = ["prepare", f"data={root}", "layout=folder", "splits=test", "on_error=skip", f"out={out}", "sizes=64", "workers=1"]
    cli.main(args)
    prepared = Prepared(out)
    meta = prepared.meta
    assert len(meta) == len(made["placed"]) and set(meta.split) == {"test"}
    for row in meta.itertuples():
        source = root / row.dicom
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        assert (row.rows, row.cols, row.study_id) == (ds.Rows, ds.Columns, ds.StudyInstanceUID)
        assert prepared.image_path(row.image_id, "test", 64).is_file()
    skipped = sorted(Path(f).name for f in prepared.skipped().file)
    assert skipped == ["header_cut.dcm", "notes.txt", "pixels_cut"]


def test_prepare_one_dicom_file(_tiny_source, tmp_path):
    from siimcovid import cli
    from siimcovid.data.prepared import Prepared

    dicom = source_dicoms(_tiny_source)[0]
    out = tmp_path / "one"
    cli.main(["prepare", f"data={dicom}", "layout=folder", "splits=test", f"out={out}", "sizes=64", "workers=1"])
    meta = Prepared(out).meta
    assert len(meta) == 1 and meta.image_id[0] == pydicom.dcmread(dicom, stop_before_pixels=True).SOPInstanceUID
