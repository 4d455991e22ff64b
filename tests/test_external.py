"""External data: `prepare layout=rsna|csv`, PNG/JPEG inputs, `synth kind=rsna|chestxray14|chexpert|pool`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
from conftest import make_synth

from siimcovid.config import load_config
from siimcovid.data.convert import convert_one, picture_to_uint8
from siimcovid.data.prepare import prepare
from siimcovid.data.prepared import Prepared
from siimcovid.data.synth import MARKER
from siimcovid.tables import EXTERNAL_LABELS, SKIPPED
from siimcovid.utils import DataError

REPO = Path(__file__).resolve().parents[1]
BEFORE_KINDS = "26bffe883b72a5ee4bfaa1b3ae10ffba605ca403"  # main before `synth kind=`: kind=siim must write what it wrote
TINY = {"train_studies": 12, "rows": 128, "cols": 160, "seed": 5}


def run_prepare(root: Path, out: Path, **settings) -> Path:
    cfg = {"data": str(root), "out": str(out), "sizes": [32], "n_folds": 3, "workers": 1}
    cfg["data_yaml_dir"] = str(out.parent / "data_yaml")
    return prepare(load_config("prepare", {**cfg, **settings}))


@pytest.fixture(scope="session")
def sets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("external")
    out = {}
    for kind in ("rsna", "chestxray14", "chexpert", "pool"):
        out[kind] = make_synth(base / kind, kind=kind, multi_study_patients=0.6, **TINY)
    return out


@pytest.fixture
def rsna(sets, tmp_path) -> Path:
    return Path(shutil.copytree(sets["rsna"], tmp_path / "rsna"))


CHEXPERT = {"layout": "csv", "csv": "CheXpert-v1.0-small/train.csv", "patient_pattern": r"(patient\d+)"}
NIH = {"layout": "csv", "csv": "Data_Entry_2017.csv", "path_column": "Image Index", "patient_column": "Patient ID"}
NIH |= {"label_format": "pipe"}


# ----------------------------------------------------------------------------- rsna
def test_rsna_boxes_labels_and_folds(sets, tmp_path):
    out = run_prepare(sets["rsna"], tmp_path / "rsna", layout="rsna")
    data = Prepared(out)
    assert data.cfg["layout"] == "rsna" and data.cfg["label_names"] == ["opacity"]
    rows = pd.read_csv(sets["rsna"] / "stage_2_train_labels.csv")
    assert set(data.meta.image_id) == set(rows.patientId) and (data.meta.split == "train").all()
    labels = EXTERNAL_LABELS.read(out / "labels.csv").set_index("image_id")
    target = rows.groupby("patientId").Target.first()
    assert (labels.opacity.loc[target.index] == target.astype(float)).all()
    for m in data.meta.itertuples():
        mine = rows[(rows.patientId == m.image_id) & (rows.Target == 1)]
        want = np.array([[x, y, x + w, y + h] for x, y, w, h in zip(mine.x, mine.y, mine.width, mine.height)]).reshape(-1, 4)
        want[:, [0, 2]], want[:, [1, 3]] = want[:, [0, 2]].clip(0, m.cols), want[:, [1, 3]].clip(0, m.rows)
        assert np.allclose(np.array(m.boxes).reshape(-1, 4), want, atol=0.01)
        assert len(data.label_path(m.image_id, 32).read_text().splitlines()) == len(want)
        assert (cv2.imread(str(data.mask_path(m.image_id, 32)), cv2.IMREAD_GRAYSCALE).max() > 0) == (len(want) > 0)
        assert m.study_label == "" and m.patient_id == m.image_id
    assert data.meta.fold.between(0, 2).all() and data.meta.fold.nunique() == 3


def _edit_csv(path: Path, row: int, **values) -> int:
    """Set cells of one data row of a CSV (read as text); returns its file line."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for k, v in values.items():
        df.loc[row, k] = v
    df.to_csv(path, index=False)
    return row + 2


def _first(rows: pd.DataFrame, target: int) -> int:
    return int(np.flatnonzero(rows.Target.to_numpy() == target)[0])


def _missing_dicom(root, rows):
    (root / "stage_2_train_images" / f"{rows.patientId[0]}.dcm").unlink()
    return "stage_2_train_labels.csv", 2, "missing DICOM"


def _bad_number(root, rows):
    i = _first(rows, 1)
    return "stage_2_train_labels.csv", _edit_csv(root / "stage_2_train_labels.csv", i, x="abc"), "not a number"


def _outside(root, rows):
    i = _first(rows, 1)
    line = _edit_csv(root / "stage_2_train_labels.csv", i, x="5000")
    first = int(np.flatnonzero(rows.patientId.to_numpy() == rows.patientId[i])[0]) + 2  # the patient's first line
    return "stage_2_train_labels.csv", min(line, first), "outside"


def _no_box(root, rows):
    i = _first(rows, 1)
    return (
        "stage_2_train_labels.csv",
        _edit_csv(root / "stage_2_train_labels.csv", i, x="", y="", width="", height=""),
        "without a box",
    )


def _classes_disagree(root, rows):
    i = _first(rows, 1)
    return (
        "stage_2_detailed_class_info.csv",
        _edit_csv(root / "stage_2_detailed_class_info.csv", i, **{"class": "Normal"}),
        "disagree",
    )


@pytest.mark.parametrize("damage", [_missing_dicom, _bad_number, _outside, _no_box, _classes_disagree])
def test_rsna_bad_input_names_file_and_line_or_is_skipped(rsna, tmp_path, damage):
    rows = pd.read_csv(rsna / "stage_2_train_labels.csv")
    name, line, words = damage(rsna, rows)
    with pytest.raises(DataError, match=words) as err:
        run_prepare(rsna, tmp_path / "raise", layout="rsna")
    assert Path(err.value.file).name == name and err.value.row == line
    out = run_prepare(rsna, tmp_path / "skip", layout="rsna", on_error="skip")
    skipped = SKIPPED.read(out / "skipped.csv")
    assert len(skipped) >= 1 and skipped.line.iloc[0] == line and Path(skipped.file.iloc[0]).name == name
    assert len(Prepared(out).meta) == rows.patientId.nunique() - 1
    assert len(EXTERNAL_LABELS.read(out / "labels.csv")) == len(Prepared(out).meta)


# ----------------------------------------------------------------------------- csv: ChestX-ray14, CheXpert
def test_chestxray14_pipe_labels_and_patient_folds(sets, tmp_path):
    out = run_prepare(sets["chestxray14"], tmp_path / "nih", **NIH)
    data, entry = Prepared(out), pd.read_csv(sets["chestxray14"] / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    names = data.cfg["label_names"]
    assert "No Finding" not in names and names == sorted(names)
    labels = EXTERNAL_LABELS.read(out / "labels.csv").set_index("image_id")
    assert list(labels.columns) == names
    for rec in entry.itertuples():
        image_id = rec[1][: -len(".png")]
        assert labels.loc[image_id].tolist() == [float(n in rec[2].split("|")) for n in names]
    meta = data.meta.merge(entry.rename(columns={"Patient ID": "pid"}).assign(image_id=lambda d: d["Image Index"].str[:-4]))
    assert (meta.patient_id == meta.pid).all() and meta.groupby("pid").fold.nunique().max() == 1
    assert meta.pid.value_counts().max() > 1  # a patient with follow-ups: the grouping was tested
    assert (meta.bits_stored == 8).all() and (meta.transfer_syntax == "").all()


@pytest.mark.parametrize("uncertain,blank", [("ones", "zeros"), ("zeros", "ignore"), ("ignore", "zeros")])
def test_chexpert_uncertain_and_blank_policies(sets, tmp_path, uncertain, blank):
    out = run_prepare(sets["chexpert"], tmp_path / "chx", uncertain=uncertain, blank=blank, **CHEXPERT)
    data = Prepared(out)
    train = pd.read_csv(sets["chexpert"] / CHEXPERT["csv"], dtype=str, keep_default_na=False)
    labels = EXTERNAL_LABELS.read(out / "labels.csv")
    assert list(labels.columns[1:]) == data.cfg["label_names"] and "Age" not in labels.columns
    policy = {"1.0": 1.0, "0.0": 0.0, "-1.0": {"ones": 1.0, "zeros": 0.0}.get(uncertain, np.nan)}
    policy[""] = 0.0 if blank == "zeros" else np.nan
    want = np.array([[policy[v] for v in train[c]] for c in data.cfg["label_names"]]).T
    assert np.array_equal(labels.iloc[:, 1:].to_numpy(), want, equal_nan=True)
    assert labels.image_id.iloc[0] == "patient00001_study1_view1_frontal"
    meta = data.meta.assign(patient=train.Path.str.extract(r"(patient\d+)")[0].to_numpy())
    assert (meta.patient_id == meta.patient).all() and meta.groupby("patient").fold.nunique().max() == 1


def _csv_root(sets, tmp_path) -> Path:
    root = Path(shutil.copytree(sets["chexpert"], tmp_path / "chx"))
    return root


def _missing_image(root):
    df = pd.read_csv(root / CHEXPERT["csv"], dtype=str, keep_default_na=False)
    (root / df.Path[3]).unlink()
    return {}, 5, "not found"


def _unknown_column(root):
    return {"labels": ["Lung Opacity", "Nope"]}, 1, "unknown label column"


def _bad_value(root):
    return {}, _edit_csv(root / CHEXPERT["csv"], 4, **{"Lung Opacity": "2"}), "not 1, 0, -1 or blank"


def _listed_twice(root):
    df = pd.read_csv(root / CHEXPERT["csv"], dtype=str, keep_default_na=False)
    return {}, _edit_csv(root / CHEXPERT["csv"], 6, Path=df.Path[2]), "listed twice"


@pytest.mark.parametrize("damage", [_missing_image, _unknown_column, _bad_value, _listed_twice])
def test_csv_bad_input_names_file_and_line_or_is_skipped(sets, tmp_path, damage):
    root = _csv_root(sets, tmp_path)
    settings, line, words = damage(root)
    with pytest.raises(DataError, match=words) as err:
        run_prepare(root, tmp_path / "raise", **CHEXPERT, **settings)
    assert Path(err.value.file).name == "train.csv" and err.value.row == line
    if damage is _unknown_column:
        return  # the whole file is wrong: nothing to skip
    out = run_prepare(root, tmp_path / "skip", on_error="skip", **CHEXPERT, **settings)
    assert SKIPPED.read(out / "skipped.csv").line.tolist() == [line]
    n_rows = len(pd.read_csv(root / CHEXPERT["csv"]))
    assert len(Prepared(out).meta) == len(EXTERNAL_LABELS.read(out / "labels.csv")) == n_rows - 1


# ----------------------------------------------------------------------------- PNG / JPEG inputs
def _chest(rows=90, cols=120) -> np.ndarray:
    y, x = np.mgrid[0:rows, 0:cols]
    return ((np.sin(x / 7.0) + np.cos(y / 5.0) + 2) / 4).astype(np.float32)


@pytest.mark.parametrize("kind", ["png8", "png16", "jpg8", "rgb"])
def test_png_and_jpeg_inputs_convert_like_an_area_resize(tmp_path, kind):
    img = _chest()
    path = tmp_path / f"x.{'jpg' if kind == 'jpg8' else 'png'}"
    if kind == "png16":
        values = (1000 + img * 30000).astype(np.uint16)
        cv2.imwrite(str(path), values)
        want = (values.astype(np.float32) - values.min()) * 255 / (values.max() - values.min())
    else:
        values = np.rint(img * 255).astype(np.uint8)
        cv2.imwrite(str(path), cv2.cvtColor(values, cv2.COLOR_GRAY2BGR) if kind == "rgb" else values)
        want = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    images, info = picture_to_uint8(path, [64, 32])
    assert (info["rows"], info["cols"], info["bits_stored"]) == (90, 120, 16 if kind == "png16" else 8)
    for size in (64, 32):
        reference = cv2.resize(want, (size, size), interpolation=cv2.INTER_AREA)
        assert images[size].shape == (size, size) and images[size].dtype == np.uint8
        assert np.abs(images[size].astype(float) - reference).mean() < 2.0


def test_csv_of_mixed_dicom_png_jpeg_prepares_and_resumes(sets, tmp_path):
    root = tmp_path / "mixed"
    (root / "img").mkdir(parents=True)
    dicoms = sorted((sets["rsna"] / "stage_2_train_images").glob("*.dcm"))[:6]
    rows = []
    for k, d in enumerate(dicoms):
        pixels = pydicom.dcmread(d).pixel_array.astype(np.uint8)
        name = ["a.dcm", "b.png", "c.jpg", "d.jpeg", "e16.png", "f.png"][k]
        if name.endswith(".dcm"):
            shutil.copy(d, root / "img" / name)
        elif name == "e16.png":
            cv2.imwrite(str(root / "img" / name), pixels.astype(np.uint16) * 257)
        else:
            cv2.imwrite(str(root / "img" / name), pixels)
        rows.append({"file": f"img/{name}" if k % 2 else str(root / "img" / name), "sick": str(k % 2), "patient": str(k // 2)})
    pd.DataFrame(rows).to_csv(root / "list.csv", index=False)
    settings = {"layout": "csv", "csv": "list.csv", "path_column": "file", "patient_column": "patient"}
    out = run_prepare(root, tmp_path / "p", **settings)
    meta = Prepared(out).meta
    assert len(meta) == 6 and meta.groupby("patient_id").fold.nunique().max() == 1
    assert meta.set_index("image_id").loc["b", "rows"] == pydicom.dcmread(dicoms[1]).Rows
    labels = EXTERNAL_LABELS.read(out / "labels.csv")
    assert labels.sick.tolist() == [float(k % 2) for k in range(6)]
    first = {p: p.stat().st_mtime_ns for p in (out / "32" / "images" / "train").iterdir()}
    again = Prepared(run_prepare(root, tmp_path / "p", **settings)).meta
    assert {p: p.stat().st_mtime_ns for p in first} == first  # resumed: headers read, nothing decoded again
    assert again[["image_id", "rows", "cols", "bits_stored"]].equals(meta[["image_id", "rows", "cols", "bits_stored"]])


def test_unreadable_picture_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    job = {"out": str(tmp_path), "sizes": [32], "ext": "png", "image_id": "bad", "split": "test", "path": str(bad)}
    res = convert_one({**job, "boxes": [], "line": None, "csv": ""})
    assert not res["ok"] and "bad.png" in str(res["error"])


# ----------------------------------------------------------------------------- synth
def test_external_sets_are_in_their_real_layouts_and_never_siim_images(sets):
    rsna = pd.read_csv(sets["rsna"] / "stage_2_train_labels.csv")
    classes = pd.read_csv(sets["rsna"] / "stage_2_detailed_class_info.csv")
    assert len(rsna) == len(classes) and (rsna.Target == 1).any() and (rsna.Target == 0).any()
    assert rsna[rsna.Target == 0][["x", "y", "width", "height"]].isna().all().all()
    assert ((classes["class"] == "Lung Opacity") == (rsna.Target == 1)).all()
    ds = pydicom.dcmread(next((sets["rsna"] / "stage_2_train_images").glob("*.dcm")))
    assert ds.PatientID in set(rsna.patientId) and ds.BitsStored == 8
    header = (sets["chestxray14"] / "Data_Entry_2017.csv").read_text().splitlines()[0]
    assert header.startswith("Image Index,Finding Labels,Follow-up #,Patient ID") and header.endswith(",")
    pool = [p for p in sets["pool"].rglob("*") if p.is_file() and ".truth" not in p.parts and not p.name.startswith(".")]
    assert any(p.suffix == "" for p in pool) and len({p.parent for p in pool}) > 2
    truth = pd.read_csv(sets["pool"] / ".truth" / "train_image_level.csv")
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) + "_image" for p in pool} == set(truth.id)
    siim = make_synth(sets["rsna"].parent / "siim", train_studies=12, test_studies=0, rows=128, cols=160, seed=5)
    siim_pixels = {pydicom.dcmread(p).pixel_array.tobytes() for p in siim.rglob("*.dcm")}
    assert not siim_pixels & {pydicom.dcmread(p).pixel_array.tobytes() for p in pool}


def test_labels_follow_what_the_generator_drew(tmp_path):
    """The synthetic labels carry the signal pretraining needs: opacity labels go with brighter lungs."""
    root = make_synth(tmp_path / "nih", kind="chestxray14", train_studies=40, rows=96, cols=112, seed=2)
    entry = pd.read_csv(root / "Data_Entry_2017.csv", dtype=str, keep_default_na=False)
    sick = entry["Finding Labels"].str.contains("Infiltration|Consolidation")
    bright = [cv2.imread(str(root / "images" / n), cv2.IMREAD_GRAYSCALE)[20:80, 10:100].mean() for n in entry["Image Index"]]
    bright = np.array(bright)
    assert 0 < sick.sum() < len(entry) and bright[sick.to_numpy()].mean() > bright[~sick.to_numpy()].mean()


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _dicom_without_uids(path: Path) -> tuple:
    ds = pydicom.dcmread(path)
    for tag in ("SOPInstanceUID",):
        del ds[tag]
    del ds.file_meta["MediaStorageSOPInstanceUID"]
    return ds.pixel_array.tobytes(), str(ds.file_meta.TransferSyntaxUID), repr(ds.to_json_dict(bulk_data_threshold=0))


def test_synth_siim_writes_what_it_wrote_before_kinds_existed(tmp_path):
    """kind=siim (the default) writes the files main wrote before `kind=` existed: the demo's numbers depend on it.
    Only compressed DICOMs differ, in one header value: pydicom's compress() gave them a RANDOM SOP Instance UID
    (so even main did not repeat itself); now they keep the image's own, and the same seed gives the same bytes."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", BEFORE_KINDS]).returncode:
        pytest.skip("needs the git history of the repository")
    before_src = tmp_path / "before_src"
    before_src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_KINDS, "siimcovid"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive.stdout, check=True)
    settings = {"train_studies": 10, "test_studies": 3, "rows": 96, "cols": 120, "seed": 4, "compressed": 0.5}
    code = "import sys; from tests.conftest import make_synth; make_synth(sys.argv[1], **eval(sys.argv[2]))"
    env = {**os.environ, "PYTHONPATH": f"{before_src}{os.pathsep}{REPO}"}  # the old siimcovid, this conftest
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "before"), repr(settings)], env=env, check=True, cwd=tmp_path)
    runs = {"before": _digest(tmp_path / "before")}
    for name in ("after", "again"):
        runs[name] = _digest(make_synth(tmp_path / name, **settings))
    for run in runs.values():
        run.pop(MARKER)  # synth's record of the folder (since issue 17 it lists the entries synth wrote), not the data
    lungs = [f for f in runs["after"] if f.startswith("lung_boxes/")]  # new since: the lung boxes (issue 19)
    assert lungs and not any(f.startswith("lung_boxes/") for f in runs["before"])
    for run in ("after", "again"):
        for f in lungs:
            runs[run].pop(f)
    assert runs["after"] == runs["again"]
    assert runs["before"].keys() == runs["after"].keys()
    differ = [f for f in runs["after"] if runs["before"][f] != runs["after"][f]]
    assert differ, "the old code gave compressed DICOMs random SOP Instance UIDs: did the old code run?"
    for f in differ:
        assert f.endswith(".dcm") and pydicom.dcmread(tmp_path / "after" / f).file_meta.TransferSyntaxUID.is_compressed
        assert _dicom_without_uids(tmp_path / "before" / f) == _dicom_without_uids(tmp_path / "after" / f)
    assert len(differ) < len([f for f in runs["after"] if f.endswith(".dcm")])  # the uncompressed ones: same bytes
