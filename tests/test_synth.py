"""`siimcovid synth`: the SIIM layout, DICOM variety, determinism."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pandas as pd
import pydicom
import pytest

from siimcovid.config import load_config
from siimcovid.data.siim import IMAGE_CSV, SAMPLE_SUBMISSION, STUDY_CSV, Problems, find_dicoms, load_test, load_train
from siimcovid.data.synth import generate
from siimcovid.utils import SiimError


def test_layout_and_csvs_parse_cleanly(synth_root):
    assert {p.name for p in synth_root.iterdir()} >= {"train", "test", IMAGE_CSV, STUDY_CSV, SAMPLE_SUBMISSION}
    train = load_train(synth_root, Problems())  # raises on any inconsistency
    test = load_test(synth_root, Problems())
    assert len(train) >= 48 and len(test) >= 8
    for path in find_dicoms(synth_root / "train").path:
        parts = path.split("/")[-4:]
        assert parts[0] == "train" and len(parts[1]) == 12 and parts[3].endswith(".dcm")
    sub = pd.read_csv(synth_root / SAMPLE_SUBMISSION)
    assert sub.id.str.endswith("_study").sum() == 8 and sub.id.str.endswith("_image").sum() == len(test)


def test_study_structure_like_the_real_data(synth_root):
    train = load_train(synth_root, Problems())
    headers = {r.image_id: pydicom.dcmread(r.path, stop_before_pixels=True) for r in train.itertuples()}
    train["patient"] = [headers[i].PatientID for i in train.image_id]
    assert train.groupby("patient").study_id.nunique().max() >= 2  # patients with several studies
    per_study = train.groupby("study_id").image_id.count()
    assert per_study.max() >= 2  # studies with several images
    multi = train[train.study_id.isin(per_study[per_study > 1].index)]
    assert (multi.groupby("study_id").boxes.apply(lambda b: sum(len(x) == 0 for x in b)) >= 1).all()
    negatives = train[train.study_label == "negative"]
    assert all(len(b) == 0 for b in negatives.boxes)
    typical = train[(train.study_label == "typical") & (train.boxes.map(len) > 0)]
    assert typical.boxes.map(len).mean() > 1.5  # bilateral


def test_dicom_variety(synth_root):
    seen = Counter()
    for path in find_dicoms(synth_root / "train").path:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seen[ds.PhotometricInterpretation] += 1
        seen[ds.file_meta.TransferSyntaxUID.name] += 1
        seen[f"bits{ds.BitsStored}"] += 1
        seen["window"] += "WindowCenter" in ds
        seen["lut"] += "VOILUTSequence" in ds
        seen[ds.Modality] += 1
    assert seen["MONOCHROME1"] and seen["MONOCHROME2"] and seen["CR"] and seen["DX"]
    assert seen["window"] and seen["lut"]
    compressed = [k for k in seen if "Lossless" in k or "RLE" in k]
    assert len(compressed) >= 2 and seen["Explicit VR Little Endian"]
    assert len([k for k in seen if k.startswith("bits")]) >= 3


def _digest(root):
    h = hashlib.sha256()
    for name in (IMAGE_CSV, STUDY_CSV, SAMPLE_SUBMISSION):
        h.update((root / name).read_bytes())
    for path in sorted(find_dicoms(root / "train").path):
        h.update(pydicom.dcmread(path).pixel_array.tobytes())
    return h.hexdigest()


def test_deterministic_per_seed(tmp_path):
    def make(name, seed):
        cfg = load_config(
            "synth",
            {
                "out": str(tmp_path / name),
                "train_studies": 6,
                "test_studies": 1,
                "rows": 96,
                "cols": 112,
                "workers": 1,
                "seed": seed,
            },
        )
        return generate(cfg)

    a, b, c = make("a", 5), make("b", 5), make("c", 6)
    assert _digest(a) == _digest(b) != _digest(c)


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    cfg = load_config(
        "synth", {"out": str(tmp_path / "d"), "train_studies": 3, "test_studies": 1, "rows": 64, "cols": 64, "workers": 1}
    )
    out = generate(cfg)
    (out / IMAGE_CSV).write_text("damaged")
    generate(cfg)
    assert (out / IMAGE_CSV).read_text() == "damaged"  # kept: no overwrite
    cfg["overwrite"] = True
    generate(cfg)
    assert (out / IMAGE_CSV).read_text() != "damaged" and not (tmp_path / "d.partial").exists()


def test_never_replaces_a_folder_it_did_not_write(tmp_path):
    # `run data=/data/siim` while the real download is still unzipping must not delete it
    real = tmp_path / "siim"
    (real / "train").mkdir(parents=True)
    (real / "train" / "keep.dcm").write_bytes(b"real data")
    settings = {"out": str(real), "train_studies": 3, "test_studies": 1, "rows": 64, "cols": 64, "workers": 1}
    for overwrite in (False, True):
        with pytest.raises(SiimError, match="not a synthetic dataset"):
            generate(load_config("synth", {**settings, "overwrite": overwrite}))
    assert (real / "train" / "keep.dcm").read_bytes() == b"real data"
    from siimcovid.cli import call

    with pytest.raises(SiimError, match="holds other files: not touching it"):
        call("run", data=str(real), project=str(tmp_path / "runs"))
    assert (real / "train" / "keep.dcm").read_bytes() == b"real data"


def test_class_mix_follows_the_parameter(tmp_path):
    cfg = load_config(
        "synth",
        {
            "out": str(tmp_path / "m"),
            "train_studies": 80,
            "test_studies": 0,
            "rows": 48,
            "cols": 48,
            "workers": 1,
            "class_mix": [0, 1, 0, 1],
            "multi_image_studies": 0,
        },
    )
    studies = pd.read_csv(generate(cfg) / STUDY_CSV)
    counts = studies.drop(columns="id").sum()
    assert counts["Negative for Pneumonia"] == 0 and counts["Indeterminate Appearance"] == 0
    assert 25 < counts["Typical Appearance"] < 55 and np.isclose(counts.sum(), 80)
