"""`siimcovid predict dicom=sr,gsps,sc` (siimcovid.predict.dicom): every object read back by readers siimcovid did not
write (pydicom, highdicom's SR parser, and where installed dcmtk's dsrdump and dcmp2pgm and dicom3tools' dciodvfy),
on the tiny synthetic set's test DICOMs and fuse tables built by hand (test_view.fused_by_hand)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID
from test_view import fused_by_hand, is_red, loose_prepared  # noqa: F401 (a fixture)

from siimcovid.outputs import Written
from siimcovid.predict.dicom import DICOM_CSV, KINDS, Source, write_results
from siimcovid.predict.record import RECORD
from siimcovid.predict.view import MIN_CONF, write_view
from siimcovid.tables import DICOM_RESULTS, PREDICTED_BOXES, PREDICTED_IMAGES, PREDICTED_STUDIES, STUDY_CLASSES

ALGORITHM = {"version": "0.1.0", "bundle": "demo", "bundle_sha256": "ab" * 32}
MIN_SR_CONF = 0.05  # the faint box of fused_by_hand (conf 0.05) is in the SR, not on the presentation state


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def results_in(out: Path, kinds=KINDS):
    return write_results(out, Written(out, RECORD, "predict"), kinds, ALGORITHM, MIN_SR_CONF)


@pytest.fixture(scope="module")
def results(loose_prepared, tmp_path_factory):  # noqa: F811 (the fixture)
    """(out, dicom.csv, the tables, the sources' sha256 before): predict's view and DICOM results of the tiny set."""
    out = tmp_path_factory.mktemp("dicom") / "out"
    fused_by_hand(loose_prepared, out / "fuse")
    write_view(loose_prepared, out / "fuse", out)
    images = PREDICTED_IMAGES.read(out / "images.csv")
    before = {f: sha(f) for f in images.file}
    table = DICOM_RESULTS.read(results_in(out))
    tables = {
        "images": images,
        "studies": PREDICTED_STUDIES.read(out / "studies.csv"),
        "boxes": PREDICTED_BOXES.read(out / "boxes.csv"),
    }
    return out, table, tables, before


def header(path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def objects(results, kind):
    out, table, *_ = results
    return [(row, pydicom.dcmread(out / row.file)) for row in table[table.kind == kind].itertuples(index=False)]


def test_one_sr_per_study_and_one_presentation_state_and_capture_per_image_with_new_valid_uids(results):
    out, table, tables, _ = results
    counts = table.kind.value_counts().to_dict()
    assert counts == {"sr": tables["studies"].study_id.nunique(), "gsps": len(tables["images"]), "sc": len(tables["images"])}
    assert table.sop_instance_uid.is_unique and all(UID(u).is_valid for u in table.sop_instance_uid)
    sources = {header(f).SOPInstanceUID for f in tables["images"].file}
    assert not sources & set(table.sop_instance_uid) and not sources & set(table.series_instance_uid)
    for row in table.itertuples(index=False):
        ds = header(out / row.file)
        assert (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID) == (
            row.sop_instance_uid,
            row.series_instance_uid,
            row.study_instance_uid,
        )
    assert (out / DICOM_CSV).is_file() and Written(out, RECORD, "predict").owns(out / DICOM_CSV)


def test_the_sr_says_what_the_tables_say_and_references_the_images_it_read(results):
    _, _, tables, _ = results
    images, studies, boxes = tables["images"], tables["studies"].set_index("study_id"), tables["boxes"]
    for row, ds in objects(results, "sr"):
        assert ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and "PixelData" not in ds
        mine = images[images.study_id == row.study_id]
        first = header(mine.file.iloc[0])
        for key in ("PatientID", "PatientName", "StudyInstanceUID"):
            assert ds.get(key) == first.get(key), key
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        groups = sr.content.get_image_measurement_groups()
        study = {m.name.meaning: m.value for m in groups[0].get_measurements()}
        for c in STUDY_CLASSES:
            assert study[f"Probability of {_meaning(c)}"] == pytest.approx(studies.loc[row.study_id, c])
        predicted = [item for item in ds.ContentSequence[-1].ContentSequence[0].ContentSequence if item.ValueType == "CODE"]
        assert studies.loc[row.study_id, "predicted"] in {i.ConceptCodeSequence[0].CodeValue for i in predicted}
        uid_of = {Path(f).resolve(): header(f).SOPInstanceUID for f in mine.file}
        nones = {g.source_images[0].referenced_sop_instance_uid: g.get_measurements()[0].value for g in groups[1:]}
        assert nones == pytest.approx({uid_of[Path(f).resolve()]: n for f, n in zip(mine.file, mine["none"])})
        rois = sr.content.get_planar_roi_measurement_groups()
        found = sorted(
            (
                g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                *g.roi.value[[0, 2]].ravel().round(2),
                g.get_measurements()[0].value,
            )
            for g in rois
        )
        want = boxes[boxes.image_id.isin(mine.image_id) & (boxes.conf >= MIN_SR_CONF)]
        by_id = dict(zip(mine.image_id, (uid_of[Path(f).resolve()] for f in mine.file)))
        expected = sorted(
            (by_id[b.image_id], *np.float32([b.x_min, b.y_min, b.x_max, b.y_max]).round(2), b.conf) for b in want.itertuples()
        )
        assert len(found) == len(expected) and all(
            f[0] == e[0] and np.allclose(f[1:], e[1:], atol=1e-2) for f, e in zip(found, expected)
        )
    assert len(boxes[boxes.conf >= MIN_SR_CONF]) == 2  # both of fused_by_hand's boxes are in some SR: the test saw them


def _meaning(c: str) -> str:
    from siimcovid.tables import STUDY_COLUMNS

    return STUDY_COLUMNS[c]


def test_a_presentation_state_draws_the_pictures_boxes_over_its_untouched_source(results):
    _, _, tables, before = results
    images, boxes = tables["images"].set_index("image_id"), tables["boxes"]
    drawn = 0
    for row, ds in objects(results, "gsps"):
        image_id = Path(row.file).stem.removeprefix("gsps_")
        source = header(images.loc[image_id, "file"])
        ref = ds.ReferencedSeriesSequence[0]
        assert (ref.SeriesInstanceUID, ref.ReferencedImageSequence[0].ReferencedSOPInstanceUID) == (
            source.SeriesInstanceUID,
            source.SOPInstanceUID,
        )
        assert ds.PresentationLUTShape == ("INVERSE" if source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY")
        annotation = ds.GraphicAnnotationSequence[0]
        polylines = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2) for g in annotation.get("GraphicObjectSequence", [])]
        shown = boxes[(boxes.image_id == image_id) & (boxes.conf >= MIN_CONF)]
        assert len(polylines) == len(shown)
        for line, b in zip(polylines, shown.itertuples()):
            assert np.allclose(line[[0, 2]].ravel(), [b.x_min, b.y_min, b.x_max, b.y_max], atol=1e-2)
            assert np.allclose(line[0], line[-1])  # closed
            drawn += 1
        texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
        assert any(t.startswith("siimcovid: ") for t in texts)
    assert drawn == 1  # fused_by_hand's one confident box
    assert {f: sha(f) for f in before} == before  # no source byte changed


UNCOMPRESSED = (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian)  # what dcmp2pgm decodes


def as_monochrome1(path: Path, to: Path) -> Path:
    """The same picture stored as MONOCHROME1 (values and window inverted): a viewer must show it as before."""
    ds = pydicom.dcmread(path)
    top = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = (top - ds.pixel_array.astype(np.int64)).astype(ds.pixel_array.dtype).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    if "WindowCenter" in ds:
        ds.WindowCenter = top - float(
            ds.WindowCenter if not isinstance(ds.WindowCenter, pydicom.multival.MultiValue) else ds.WindowCenter[0]
        )
    ds.save_as(to)
    return to


@pytest.mark.parametrize("stored", ["as given", "MONOCHROME1"])
def test_dcmtk_renders_a_presentation_state_as_siimcovid_shows_its_image(results, stored, tmp_path):
    """dcmp2pgm applies the presentation state's VOI and presentation LUT (not its graphics) to the source: the
    picture must be the one prepare and the pictures show (the right window, the right polarity)."""
    if shutil.which("dcmp2pgm") is None:
        pytest.skip("dcmtk's dcmp2pgm is not installed (apt-get install dcmtk)")
    out, _, tables, _ = results
    images = tables["images"].copy()
    plain = [i for i, f in enumerate(images.file) if header(f).file_meta.TransferSyntaxUID in UNCOMPRESSED]
    if not plain:
        pytest.skip("no uncompressed source in the tiny set")
    if stored == "MONOCHROME1":
        out = Path(shutil.copytree(out, tmp_path / "out"))
        for i in plain:
            images.loc[i, "file"] = str(as_monochrome1(Path(images.file[i]), tmp_path / f"{i}.dcm"))
        PREDICTED_IMAGES.write(images, out / "images.csv")
        results_in(out, ("gsps",))
    for i in plain:
        image = images.iloc[i]
        state = out / "dicom" / image.study_id / f"gsps_{image.image_id}.dcm"
        assert header(state).PresentationLUTShape == ("INVERSE" if stored == "MONOCHROME1" else "IDENTITY")
        pgm = tmp_path / f"{i}.pgm"
        subprocess.run(["dcmp2pgm", "-p", str(state), image.file, str(pgm)], check=True, capture_output=True)
        shown = cv2.imread(str(pgm), cv2.IMREAD_GRAYSCALE).astype(float)
        ours = Source(image).display.astype(float)  # as prepare shows it (MONOCHROME1: inverted back)
        assert shown.shape == ours.shape and np.corrcoef(shown.ravel(), ours.ravel())[0, 1] > 0.98


def test_a_secondary_capture_has_the_boxes_burned_in_and_says_what_it_is(results):
    _, _, tables, _ = results
    images, boxes = tables["images"].set_index("image_id"), tables["boxes"]
    for row, ds in objects(results, "sc"):
        image_id = Path(row.file).stem.removeprefix("sc_")
        image = images.loc[image_id]
        source = header(image.file)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert (list(ds.ImageType)[:2], ds.BurnedInAnnotation) == (["DERIVED", "SECONDARY"], "YES")
        assert "not for diagnosis" in ds.ImageComments
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        pixels = ds.pixel_array
        assert pixels.shape == (image.rows, image.cols, 3)
        display = Source(image).display
        for b in boxes[(boxes.image_id == image_id) & (boxes.conf >= MIN_CONF)].itertuples():
            y = round((b.y_min + b.y_max) / 2)
            assert is_red(pixels[y, round(b.x_min)][::-1])  # (is_red reads BGR)
        centre = pixels[image.rows // 2 - 2 : image.rows // 2 + 2, image.cols - 6 : image.cols - 2]  # right edge, no box
        if not len(boxes[(boxes.image_id == image_id)]):
            assert (centre == display[image.rows // 2 - 2 : image.rows // 2 + 2, image.cols - 6 : image.cols - 2, None]).all()


def test_independent_validators_find_no_error(results):
    """dicom3tools' dciodvfy checks each object against its IOD; dcmtk's dsrdump reads every SR."""
    out, table, *_ = results
    validators = [t for t in ("dciodvfy", "dsrdump") if shutil.which(t)]
    if not validators:
        pytest.skip("neither dciodvfy (apt-get install dicom3tools) nor dsrdump (apt-get install dcmtk) is installed")
    for row in table.itertuples(index=False):
        if "dciodvfy" in validators:
            run = subprocess.run(["dciodvfy", str(out / row.file)], capture_output=True, text=True)
            errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
            assert not errors, (row.file, errors)
        if "dsrdump" in validators and row.kind == "sr":
            run = subprocess.run(["dsrdump", str(out / row.file)], capture_output=True, text=True)
            assert (
                run.returncode == 0 and "Imaging Measurement Report" in run.stdout and "Probability of no opacity" in run.stdout
            )


def test_the_same_prediction_gives_the_same_uids_and_another_prediction_new_ones(results, tmp_path):
    out, table, *_ = results
    again = Path(shutil.copytree(out, tmp_path / "again"))
    same = DICOM_RESULTS.read(results_in(again))
    assert list(same.sop_instance_uid) == list(table.sop_instance_uid)
    boxes = PREDICTED_BOXES.read(again / "boxes.csv")
    boxes.loc[boxes.conf.idxmax(), "conf"] = 0.5  # another prediction of one box
    PREDICTED_BOXES.write(boxes, again / "boxes.csv")
    moved = DICOM_RESULTS.read(results_in(again)).set_index("file").sop_instance_uid
    changed = {f for f, u in table.set_index("file").sop_instance_uid.items() if moved[f] != u}
    study = PREDICTED_IMAGES.read(again / "images.csv").set_index("image_id").study_id[boxes.loc[boxes.conf.idxmax(), "image_id"]]
    assert changed == set(table[table.study_id == study].file)  # that study's results, and only those


def test_an_image_no_longer_what_was_predicted_is_left_out_by_name_and_the_rest_written(results, tmp_path, caplog):
    out, table, tables, _ = results
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    images = tables["images"].copy()
    changed, text = tmp_path / "changed.dcm", tmp_path / "notes.dcm"
    other = pydicom.dcmread(images.file.iloc[1])
    other.save_as(changed)  # a DICOM of another size in place of the first image
    text.write_text("not a DICOM")
    images.loc[0, "file"], images.loc[1, "file"] = str(changed), str(text)
    PREDICTED_IMAGES.write(images, copy / "images.csv")
    if (images.rows[0], images.cols[0]) == (other.Rows, other.Columns):
        pytest.skip("the tiny set's first two images have one size")
    written = DICOM_RESULTS.read(results_in(copy))
    assert str(changed) in caplog.text and "not the same image" in caplog.text and str(text) in caplog.text
    left = set(images.image_id[:2])
    assert not any(left & {Path(f).stem.split("_", 1)[1]} for f in written.file if "_" in Path(f).stem)
    assert len(written[written.kind == "gsps"]) == len(images) - 2
    assert not any((copy / f).exists() for f in set(table.file) - set(written.file))  # the earlier results of those: gone


def test_without_dicom_a_rerun_removes_its_results_and_only_those(results, tmp_path):
    out, table, *_ = results
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    mine = copy / "dicom" / table.study_id.iloc[0] / "my_notes.txt"
    mine.write_text("a user's file")
    assert results_in(copy, kinds=()) is None
    assert not (copy / DICOM_CSV).exists() and not any((copy / f).exists() for f in table.file)
    assert mine.read_text() == "a user's file"


@pytest.mark.slow
def test_predict_dicom_writes_results_for_the_bundles_prediction(tiny_run, tmp_path):
    from siimcovid.cli import call

    base, result = tiny_run
    out = tmp_path / "out"
    done = call(
        "predict", bundle=str(result["bundle"]), source=str(base / "siim" / "test"), out=str(out), workers=0, dicom=["sr", "sc"]
    )
    table = DICOM_RESULTS.read(done["dicom"])
    images = PREDICTED_IMAGES.read(out / "images.csv")
    assert set(table.kind) == {"sr", "sc"} and len(table[table.kind == "sc"]) == len(images)
    assert set(" ".join(table.references).split()) == {header(f).SOPInstanceUID for f in images.file}
    assert "dicom" in done["seconds"]


def test_a_header_with_a_date_dicom_cannot_read_and_a_utf8_name_still_gets_its_results(results, tmp_path, caplog):
    """Real headers hold values their VR forbids: the result says the date is unknown and keeps the patient's name."""
    out, _, tables, _ = results
    copy = Path(shutil.copytree(out, tmp_path / "copy"))
    images = tables["images"].copy()
    ds = pydicom.dcmread(images.file[0])
    ds.SpecificCharacterSet, ds.PatientName, ds.PatientBirthDate = "ISO_IR 192", "Müller^Jürgen", "notadate"
    ds.save_as(tmp_path / "odd.dcm")
    images.loc[0, "file"] = str(tmp_path / "odd.dcm")
    PREDICTED_IMAGES.write(images, copy / "images.csv")
    written = DICOM_RESULTS.read(results_in(copy))
    mine = written[written.study_id == images.study_id[0]]
    assert set(mine.kind) == set(KINDS)
    for f in mine.file:
        result = pydicom.dcmread(copy / f)
        assert (str(result.PatientName), result.PatientBirthDate) == ("Müller^Jürgen", "")
    assert "odd.dcm: PatientBirthDate 'notadate' is no DICOM DA" in caplog.text
