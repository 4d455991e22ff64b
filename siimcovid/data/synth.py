"""`siimcovid synth`: a synthetic dataset in exactly the SIIM download layout (`kind=rsna|chestxray14|chexpert|pool`:
an external set in its own layout, drawn by this generator: siimcovid/data/synth_external.py).

What it draws, so that a model can learn it but not trivially:

* a chest: body, two darker lung fields, mediastinum and heart, clavicles, faint ribs,
  per-image anatomy jitter, exposure, gamma and noise;
* opacities as soft, textured bright blobs inside the lungs at the labelled boxes, the
  study class shaping the pattern: typical = bilateral, peripheral, lower zones, 2 (1-4)
  boxes; indeterminate = one (or two) fainter box; atypical = central/perihilar or upper
  lobar, denser; negative = none. Some positive studies have no boxes (faint unlabelled
  findings), and studies with a second image label it `none`, like the real duplicates;
* real DICOM variety: CR and DX, MONOCHROME1 and 2, BitsStored 10 to 16, Window
  Center/Width or a VOI LUT Sequence on some files, uncompressed (explicit and implicit VR)
  and compressed (RLE Lossless, JPEG 2000 Lossless, JPEG-LS Lossless, as the installed
  encoders allow), patients with several studies, studies with several images.

Deterministic for a given seed (same CSVs, same pixels).

A dataset is written into <out>.partial and appears only complete. Its marker (.siimcovid-synth) lists the entries of
`out` synth wrote: overwrite=true replaces those only; a user's file or folder beside them (notes, a prepared folder
made inside the dataset) stays, and is named. out= a link: the dataset goes where it points.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from tqdm import tqdm

from siimcovid import registry
from siimcovid.config import Config, worker_processes
from siimcovid.data.convert import init_worker
from siimcovid.data.lungs import write_lung_files
from siimcovid.outputs import check_place
from siimcovid.tables import (
    IMAGE_CSV,
    IMAGE_LEVEL,
    IMAGE_SUFFIX,
    SAMPLE,
    SAMPLE_SUBMISSION,
    STUDY_CLASSES,
    STUDY_COLUMNS,
    STUDY_CSV,
    STUDY_LEVEL,
    STUDY_SUFFIX,
)
from siimcovid.utils import LOGGER, SiimError, atomic_write_text

SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def available_compressions() -> list:
    """Compressed transfer syntaxes whose encoder is installed."""
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder, RLELosslessEncoder

    encoders = [
        (RLELossless, RLELosslessEncoder),
        (JPEG2000Lossless, JPEG2000LosslessEncoder),
        (JPEGLSLossless, JPEGLSLosslessEncoder),
    ]
    return [uid for uid, enc in encoders if enc.is_available]


# ----------------------------------------------------------------------------- layout
@dataclass
class ImageSpec:
    image_id: str
    series_id: str
    rows: int
    cols: int
    boxes: list  # [[x1, y1, x2, y2]] in pixels, the labelled ones
    findings: list  # [(box, amplitude, kind)] drawn, labelled or not
    seed: int
    geo: dict  # lung geometry the findings were placed in
    dicom: dict = field(default_factory=dict)  # photometric, bits, voi, transfer syntax, modality


@dataclass
class StudySpec:
    study_id: str
    patient_id: str
    split: str
    label: str  # one of STUDY_CLASSES ("" for test is never used: test has labels too, hidden)
    images: list


def _hex(rng: np.random.Generator, used: set) -> str:
    while True:
        value = "".join(rng.choice(list("0123456789abcdef"), 12))
        if value not in used:
            used.add(value)
            return value


def _lung_geometry(rng: np.random.Generator) -> dict:
    """Fractions of the image: lung centres and semi-axes, shared by drawing and box placement."""
    cy = 0.47 + rng.uniform(-0.03, 0.03)
    gap = 0.21 + rng.uniform(-0.02, 0.02)
    return {
        "left": (0.5 - gap, cy),  # image left (patient's right lung)
        "right": (0.5 + gap, cy),
        "ax": 0.15 + rng.uniform(-0.015, 0.015),
        "ay": 0.29 + rng.uniform(-0.03, 0.03),
    }


def lung_box(spec: ImageSpec) -> list[float]:
    """One box around both lung fields as draw_chest draws them, in original pixels: the 1st place's lung boxes."""
    geo = spec.geo
    (left, cy), (right, _), ax, ay = geo["left"], geo["right"], geo["ax"], geo["ay"]
    return [(left - ax) * spec.cols, (cy - ay) * spec.rows, (right + ax) * spec.cols, (cy + ay) * spec.rows]


LUNG_BOXES_DIR = "lung_boxes"  # <root>/lung_boxes/<image_id>.xml and .txt of the train images (prepare lung_boxes=)


def write_lung_boxes(studies: list[StudySpec], folder: Path) -> None:
    """Each train image's lung box in both formats the 1st place published (siimcovid.data.lungs)."""
    for st in studies:
        for im in st.images if st.split == "train" else []:
            write_lung_files(folder, im.image_id, lung_box(im), im.rows, im.cols)


def _place_box(rng, geo, side: str, zone: str, rows: int, cols: int, scale: float = 1.0) -> list:
    """A box inside one lung: zone in {peripheral_lower, any, central, upper}."""
    cx, cy = geo[side]
    ax, ay = geo["ax"], geo["ay"]
    outward = -1 if side == "left" else 1
    if zone == "peripheral_lower":
        fx, fy = cx + outward * ax * rng.uniform(0.25, 0.55), cy + ay * rng.uniform(0.05, 0.5)
    elif zone == "central":
        fx, fy = cx - outward * ax * rng.uniform(0.35, 0.6), cy + ay * rng.uniform(-0.25, 0.2)
    elif zone == "upper":
        fx, fy = cx + outward * ax * rng.uniform(-0.3, 0.3), cy - ay * rng.uniform(0.35, 0.6)
    else:
        fx, fy = cx + ax * rng.uniform(-0.5, 0.5), cy + ay * rng.uniform(-0.5, 0.5)
    w = cols * ax * rng.uniform(0.6, 1.0) * scale
    h = rows * ay * rng.uniform(0.55, 1.0) * scale
    x, y = fx * cols, fy * rows
    return [x - w / 2, y - h / 2, x + w / 2, y + h / 2]


def _findings(rng, label: str, geo: dict, rows: int, cols: int) -> list:
    """(box, amplitude, kind) of each opacity the class pattern draws."""
    out = []
    if label == "typical":
        n = rng.choice([1, 2, 3, 4], p=[0.1, 0.7, 0.15, 0.05])
        sides = ["left", "right"] if n >= 2 else [rng.choice(["left", "right"])]
        sides += [rng.choice(["left", "right"]) for _ in range(n - len(sides))]
        for side in sides:
            out.append((_place_box(rng, geo, side, "peripheral_lower", rows, cols), rng.uniform(0.22, 0.4), "ggo"))
    elif label == "indeterminate":
        n = rng.choice([1, 2], p=[0.6, 0.4])
        for side in rng.choice(["left", "right"], size=n, replace=False):
            out.append((_place_box(rng, geo, side, "any", rows, cols, 0.9), rng.uniform(0.14, 0.28), "ggo"))
    elif label == "atypical":
        n = rng.choice([1, 2], p=[0.7, 0.3])
        for side in rng.choice(["left", "right"], size=n, replace=False):
            zone = rng.choice(["central", "upper"])
            out.append((_place_box(rng, geo, side, zone, rows, cols, 0.8), rng.uniform(0.3, 0.5), "dense"))
    return out


def plan_dataset(cfg: Config) -> list[StudySpec]:
    """Decide every patient, study, image, box and DICOM flavour (cheap; drawing comes later)."""
    rng = np.random.default_rng(cfg.seed)
    used: set = set()
    mix = np.asarray(cfg.class_mix, dtype=float)
    if mix.shape != (4,) or mix.sum() <= 0:  # each weight is >= 0 (cfg/synth.yaml)
        raise SiimError(
            f"class_mix needs 4 non-negative weights (negative, typical, indeterminate, atypical), got {cfg.class_mix}"
        )
    mix = mix / mix.sum()
    compressions = available_compressions()
    studies: list[StudySpec] = []
    for split, n_studies in (("train", cfg.train_studies), ("test", cfg.test_studies)):
        made = 0
        while made < n_studies:
            patient = _hex(rng, used)
            n_for_patient = 1
            if rng.random() < cfg.multi_study_patients:
                n_for_patient = int(rng.choice([2, 3], p=[0.8, 0.2]))
            for _ in range(min(n_for_patient, n_studies - made)):
                label = str(rng.choice(STUDY_CLASSES, p=mix))
                n_images = 1 + int(rng.random() < cfg.multi_image_studies)
                images = []
                for k in range(n_images):
                    rows = int(cfg.rows * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter))
                    cols = int(cfg.cols * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter))
                    geo = _lung_geometry(rng)
                    findings = _findings(rng, label, geo, rows, cols)
                    labelled = k == 0  # a study's extra images are labelled none, like the real duplicates
                    if findings and labelled and rng.random() < cfg.positive_without_boxes:
                        labelled = False
                        findings = [(b, a * 0.6, kind) for b, a, kind in findings[:1]]
                    boxes = [b for b, _, _ in findings] if labelled else []
                    compressed = compressions and rng.random() < cfg.compressed
                    if compressed:
                        tsyntax = compressions[int(rng.integers(len(compressions)))]
                    else:
                        tsyntax = ImplicitVRLittleEndian if rng.random() < 0.15 else ExplicitVRLittleEndian
                    voi = ""
                    if rng.random() < cfg.voi:
                        voi = "lut" if rng.random() < 0.35 else "window"
                    dicom = {
                        "modality": str(rng.choice(["CR", "DX"])),
                        "photometric": "MONOCHROME1" if rng.random() < cfg.monochrome1 else "MONOCHROME2",
                        "bits": int(rng.choice([10, 12, 14, 16], p=[0.1, 0.5, 0.25, 0.15])),
                        "voi": voi,
                        "tsyntax": str(tsyntax),
                    }
                    images.append(
                        ImageSpec(
                            _hex(rng, used), _hex(rng, used), rows, cols, boxes, findings, int(rng.integers(2**31)), geo, dicom
                        )
                    )
                studies.append(StudySpec(_hex(rng, used), patient, split, label, images))
                made += 1
    return studies


# ----------------------------------------------------------------------------- drawing
def _ellipse(shape, center, axes, blur: float) -> np.ndarray:
    m = np.zeros(shape, np.float32)
    cv2.ellipse(m, (int(center[0]), int(center[1])), (max(1, int(axes[0])), max(1, int(axes[1]))), 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(m, (0, 0), blur) if blur > 0 else m


def draw_chest(spec: ImageSpec) -> np.ndarray:
    """Float image in [0, 1] of shape (rows, cols): the chest with its opacities."""
    rng = np.random.default_rng(spec.seed)
    rows, cols = spec.rows, spec.cols
    # Draw on a canvas of ~256 px, then upsample: cheap at any original size.
    k = 256 / max(rows, cols)
    h, w = max(32, int(rows * k)), max(32, int(cols * k))
    sx, sy = w / cols, h / rows
    geo = spec.geo
    img = np.full((h, w), 0.04, np.float32)
    img += 0.42 * _ellipse((h, w), (w * 0.5, h * 0.55), (w * 0.46, h * 0.6), 6)  # body
    for side in ("left", "right"):
        cx, cy = geo[side]
        lung = _ellipse((h, w), (cx * w, cy * h), (geo["ax"] * w, geo["ay"] * h), 5)
        ribs = 0.5 + 0.5 * np.sin(np.linspace(0, rng.uniform(14, 18) * np.pi, h))[:, None] * np.ones((1, w))
        img -= lung * (0.3 - 0.06 * ribs.astype(np.float32))
    img += 0.3 * _ellipse((h, w), (w * 0.5, h * 0.5), (w * 0.07, h * 0.45), 4)  # mediastinum / spine
    img += 0.22 * _ellipse((h, w), (w * (0.56 + rng.uniform(-0.02, 0.02)), h * 0.66), (w * 0.13, h * 0.12), 6)  # heart
    for sign in (-1, 1):  # clavicles
        cv2.line(img, (int(w * 0.5), int(h * 0.18)), (int(w * (0.5 + sign * 0.33)), int(h * 0.13)), 0.25, max(1, w // 50))
    for (x1, y1, x2, y2), amp, kind in spec.findings:
        cx, cy = (x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy
        ax, ay = (x2 - x1) / 2 * sx, (y2 - y1) / 2 * sy
        blob = _ellipse((h, w), (cx, cy), (ax * 0.8, ay * 0.8), max(ax, ay) * (0.25 if kind == "dense" else 0.4))
        texture = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0)
        texture = 0.6 + 0.8 * (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
        img += amp * blob * (texture if kind == "ggo" else 1.0)
    img = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_CUBIC)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img += rng.normal(0, rng.uniform(0.01, 0.025), img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    return img.astype(np.float32)


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["siimcovid-synth", *parts])


def make_dicom(spec: ImageSpec, study: StudySpec, pixels: np.ndarray) -> Dataset:
    """Wrap a [0, 1] float image as a DICOM with the spec's flavour."""
    d = spec.dicom
    bits = d["bits"]
    top = 2**bits - 1
    # Raw detector values rarely span the full range: use a random sub-range.
    rng = np.random.default_rng(spec.seed + 2)
    lo = rng.uniform(0.0, 0.1) * top
    hi = rng.uniform(0.75, 1.0) * top
    stored = lo + pixels * (hi - lo)
    if d["photometric"] == "MONOCHROME1":
        stored = top - stored
    stored = np.clip(np.rint(stored), 0, top).astype(np.uint16)

    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[d["modality"]]
    meta.MediaStorageSOPInstanceUID = _uid(spec.image_id)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(study.study_id)
    ds.SeriesInstanceUID = _uid(spec.series_id)
    ds.PatientID = study.patient_id
    ds.PatientName = "Synthetic^" + study.patient_id[:6]
    ds.Modality = d["modality"]
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = d["photometric"]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if d["voi"] == "window":
        # A window around the body's values, a little narrower than their range.
        body = stored[stored.shape[0] // 4 : -stored.shape[0] // 4, stored.shape[1] // 4 : -stored.shape[1] // 4]
        p1, p99 = np.percentile(body, [1, 99])
        ds.WindowCenter = f"{(p1 + p99) / 2:.1f}"
        ds.WindowWidth = f"{max(p99 - p1, 2) * 1.1:.1f}"
    elif d["voi"] == "lut":
        # A gamma-shaped VOI LUT with one 16-bit entry per stored value.
        n = top + 1
        table = (65535 * np.linspace(0, 1, n) ** 0.7).astype("<u2")
        item = Dataset()
        item.LUTDescriptor = [n % 65536, 0, 16]  # 0 entries means 65536
        item.LUTExplanation = "synthetic gamma"
        item.add_new(0x00283006, "OW", table.tobytes())  # LUTData
        ds.VOILUTSequence = Sequence([item])
    ds.PixelData = stored.tobytes()
    if d["tsyntax"] == str(ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif d["tsyntax"] != str(ExplicitVRLittleEndian):
        ds.compress(d["tsyntax"], generate_instance_uid=False)  # keep the SOP Instance UID: same seed, same bytes
    return ds


def _write_image(job) -> None:
    spec, study, path = job
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = make_dicom(spec, study, draw_chest(spec))
    implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)


# ----------------------------------------------------------------------------- CSVs
def _boxes_cell(boxes: list) -> str:
    if not boxes:
        return ""
    return str([{"x": x1, "y": y1, "width": round(x2 - x1, 5), "height": round(y2 - y1, 5)} for x1, y1, x2, y2 in boxes])


def _label_cell(boxes: list) -> str:
    if not boxes:
        return "none 1 0 0 1 1"
    return " ".join(f"opacity 1 {x1} {y1} {x2} {y2}" for x1, y1, x2, y2 in boxes)


def _round_boxes(studies: list[StudySpec]) -> None:
    """Round labelled boxes to 5 decimals like the real CSVs (a box may cross the border, as there)."""
    for st in studies:
        for im in st.images:
            im.boxes = [[round(float(v), 5) for v in box] for box in im.boxes]


def write_label_csvs(studies: list[StudySpec], folder: Path) -> None:
    """train_image_level.csv and train_study_level.csv of these studies (contracts IMAGE_LEVEL, STUDY_LEVEL)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_rows = [
        {
            "id": f"{im.image_id}{IMAGE_SUFFIX}",
            "boxes": _boxes_cell(im.boxes),
            "label": _label_cell(im.boxes),
            "StudyInstanceUID": st.study_id,
        }
        for st in studies
        for im in st.images
    ]
    IMAGE_LEVEL.write(pd.DataFrame(image_rows, columns=IMAGE_LEVEL.names), folder / IMAGE_CSV)
    study_rows = [
        {"id": f"{st.study_id}{STUDY_SUFFIX}", **{STUDY_COLUMNS[c]: int(c == st.label) for c in STUDY_CLASSES}} for st in studies
    ]
    STUDY_LEVEL.write(pd.DataFrame(study_rows, columns=STUDY_LEVEL.names), folder / STUDY_CSV)


def write_csvs(studies: list[StudySpec], out: Path) -> None:
    test = [s for s in studies if s.split == "test"]
    write_label_csvs([s for s in studies if s.split == "train"], out)
    sub = [{"id": f"{st.study_id}{STUDY_SUFFIX}", "PredictionString": "negative 1 0 0 1 1"} for st in test]
    sub += [{"id": f"{im.image_id}{IMAGE_SUFFIX}", "PredictionString": "none 1 0 0 1 1"} for st in test for im in st.images]
    SAMPLE.write(pd.DataFrame(sub, columns=SAMPLE.names), out / SAMPLE_SUBMISSION)
    # The hidden test truth, outside the SIIM layout, so the test split can be scored too.
    write_label_csvs(test, out / "test_truth")


MARKER = ".siimcovid-synth"  # written first into every partial, so into every dataset: only such a folder is replaced


def is_synthetic(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def marker_text(note: str, entries) -> str:
    """The marker: a line saying what wrote the dataset, then the entries of the folder synth wrote (its record)."""
    return f"# {note}\n" + yaml.safe_dump({"entries": sorted(entries)})


def synth_entries(folder: Path) -> set[str]:
    """The entries of `folder` its marker says synth wrote; none for the marker of a release that listed none."""
    try:
        data = yaml.safe_load((folder / MARKER).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    listed = data.get("entries") if isinstance(data, dict) else None
    return {e for e in listed or [] if isinstance(e, str) and e and "/" not in e and e not in (".", "..", MARKER)}


def dataset_folder(out) -> Path:
    """out= as the folder to write: a link is followed (the dataset goes where it points, the link stays)."""
    out = Path(out)
    if out.is_symlink():
        target = out.resolve()
        LOGGER.info(f"synth: out={out} is a link: writing the dataset into {target}")
        return target
    return out


def start_partial(out: Path, done_file: Path, overwrite: bool) -> Path | None:
    """The <out>.partial folder a dataset is written into (renamed to `out` by finish_partial), holding only the
    marker; None when `done_file` says `out` is already written and overwrite is off."""
    check_place(out)  # never the root or the home folder, whatever is in it
    if out.exists() and done_file.exists() and not overwrite:
        LOGGER.info(f"synth: {out} already exists; pass overwrite=True to regenerate")
        return None
    if out.exists() and any(out.iterdir()) and not is_synthetic(out):
        # a real download still unzipping, or any other folder: never delete it
        raise SiimError(f"synth: {out} exists and is not a synthetic dataset written by `siimcovid synth`: choose another out=")
    partial = out.with_name(out.name + ".partial")
    if partial.is_symlink() or (partial.exists() and not is_synthetic(partial)):  # not one synth started: never delete it
        raise SiimError(f"synth: {partial} exists and was not started by `siimcovid synth` (no {MARKER} in it): move it away")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted synth's
    partial.mkdir(parents=True)
    (partial / MARKER).write_text("being written by siimcovid synth\n")
    return partial


def write_all(jobs: list, write, workers: int, desc: str) -> None:
    """write(job) for every job, in a pool of `workers` processes (0 or 1: here), with a progress bar."""
    if workers <= 1:
        for job in tqdm(jobs, desc=desc, unit="img"):
            write(job)
    else:
        with mp.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
            for _ in tqdm(pool.imap_unordered(write, jobs, chunksize=1), total=len(jobs), desc=desc, unit="img"):
                pass


def finish_partial(partial: Path, out: Path, note: str, done_file: Path) -> None:
    """Mark the written dataset synthetic (its marker lists what it holds) and put it in place: it appears only once
    complete. An earlier dataset in `out` loses only the entries its marker lists (module docstring)."""
    entries = sorted(e for e in os.listdir(partial) if e != MARKER)
    (partial / MARKER).write_text(marker_text(note, entries))
    if not out.exists():
        os.replace(partial, out)
        return
    old = synth_entries(out) or set(entries)  # a marker that lists nothing (an earlier release): the names written now
    others = sorted(set(os.listdir(out)) - old - {MARKER})
    clash = [e for e in others if e in entries]
    if clash:
        raise SiimError(f"synth: {out / clash[0]} was not written by synth, and the new dataset writes that name: move it away")
    # until the end the marker lists both (a kill in between leaves a folder the re-run still replaces); the done file's
    # entry goes first and comes back last, so that an interrupted replacement is never taken for a finished dataset
    atomic_write_text(out / MARKER, marker_text("being replaced by siimcovid synth", old | set(entries)))
    first = Path(os.path.relpath(done_file, out)).parts[0]
    for name in sorted(old, key=lambda e: e != first):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
    for name in sorted(entries, key=lambda e: e == first):
        os.replace(partial / name, out / name)
    os.replace(partial / MARKER, out / MARKER)
    partial.rmdir()
    if others:
        LOGGER.info(f"synth: kept {len(others)} entries of {out} that synth did not write: {', '.join(others[:5])}")


def generate(cfg: Config) -> Path:
    if cfg.kind != "siim":  # an external set in its own layout, registered by siimcovid/data/synth_external.py
        return registry.get("synth", cfg.kind)(cfg)
    out = dataset_folder(cfg.out)
    partial = start_partial(out, out / IMAGE_CSV, cfg.overwrite)
    if partial is None:
        return out
    studies = plan_dataset(cfg)
    _round_boxes(studies)
    jobs = [
        (im, st, partial / st.split / st.study_id / im.series_id / f"{im.image_id}.dcm") for st in studies for im in st.images
    ]
    write_all(jobs, _write_image, worker_processes(cfg.workers), f"synth {len(jobs)} DICOMs")
    write_csvs(studies, partial)
    write_lung_boxes(studies, partial / LUNG_BOXES_DIR)
    finish_partial(partial, out, f"written by siimcovid synth, seed {cfg.seed}", out / IMAGE_CSV)
    n_train = sum(len(s.images) for s in studies if s.split == "train")
    n_test = sum(len(s.images) for s in studies if s.split == "test")
    LOGGER.info(f"synth: wrote {n_train} train and {n_test} test DICOMs in {len(studies)} studies to {out}")
    return out


def main(cfg: Config) -> Path:
    return generate(cfg)
