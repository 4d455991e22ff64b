"""`siimcovid synth kind=rsna|chestxray14|chexpert|pool`: external sets in their REAL download layouts, drawn by
the SIIM generator (siimcovid.data.synth), so that pretraining and pseudo-labelling run offline and in tests.

Every set is planned by `synth.plan_dataset` (a seed of its own, derived from `seed` and the kind: never the
SIIM set's images) and drawn by `synth.draw_chest`; its labels are functions of what was drawn, the same
latent variables SIIM's labels come from, so that what a model learns on them can transfer:

* rsna: stage_2_train_labels.csv (one row per box; boxes = the labelled opacities), stage_2_detailed_class_info.csv
  ("Lung Opacity" with boxes; "No Lung Opacity / Not Normal" for a drawn finding without boxes; "Normal"),
  stage_2_train_images/<patientId>.dcm (one image per patient, 8-bit MONOCHROME2 like the real set);
* chestxray14: Data_Entry_2017.csv (its real header) + images/<patient>_<follow-up>.png (8-bit grey, a few RGB):
  Finding Labels from the drawing (textured ground glass -> Infiltration, dense -> Consolidation, a bilateral
  typical pattern -> Pneumonia; nothing -> "No Finding"), plus Effusion / Nodule at random, unrelated to
  anything drawn (real labels are noisy too: a model cannot learn those);
* chexpert: CheXpert-v1.0-small/train.csv + CheXpert-v1.0-small/train/patientNNNNN/studyM/viewK_frontal.jpg, the 14
  finding columns with 1 / 0 / -1 (uncertain: faint findings, the indeterminate pattern) / blank (not mentioned);
  Edema, Support Devices and the others at random, unrelated to the drawing;
* pool: an unlabelled folder of DICOMs (SIIM's DICOM variety) under varied names and nesting, some without
  a .dcm suffix; studies are told apart by their StudyInstanceUID tag only. The hidden `.truth/` folder holds
  their SIIM-style labels (ids: SOPInstanceUID_image, StudyInstanceUID_study), to measure pseudo-labels against.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from siimcovid.config import Config, worker_processes
from siimcovid.data.synth import (
    StudySpec,
    dataset_folder,
    draw_chest,
    finish_partial,
    make_dicom,
    plan_dataset,
    start_partial,
    write_all,
    write_label_csvs,
)
from siimcovid.registry import register
from siimcovid.tables import IMAGE_CSV, write_csv
from siimcovid.utils import LOGGER, SiimError

KIND_SALT = {"rsna": 1, "chestxray14": 2, "chexpert": 3, "pool": 4}  # each kind's own images, never SIIM's
MAIN_FILE = {  # the file whose presence means "already written"
    "rsna": "stage_2_train_labels.csv",
    "chestxray14": "Data_Entry_2017.csv",
    "chexpert": "CheXpert-v1.0-small/train.csv",
    "pool": ".truth/" + IMAGE_CSV,
}
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)  # the real file's header, its odd commas (and empty last column) included
CHEXPERT_FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
RSNA_FLAVOUR = {"modality": "CR", "photometric": "MONOCHROME2", "bits": 8, "voi": "", "tsyntax": str(ExplicitVRLittleEndian)}


def plan(cfg: Config) -> list[StudySpec]:
    """The kind's studies: SIIM's generator with a seed of the kind's own, train split only."""
    seed = int(np.random.SeedSequence([cfg.seed, KIND_SALT[cfg.kind]]).generate_state(1)[0])
    return plan_dataset(Config(cfg, seed=seed, test_studies=0))


def drawn(image) -> dict:
    """What the generator drew on an image: finding kinds, their strongest amplitude, how many."""
    return {
        "kinds": {kind for _, _, kind in image.findings},
        "amp": max((a for _, a, _ in image.findings), default=0.0),
        "n": len(image.findings),
    }


def nih_labels(study: StudySpec, image) -> str:
    """ChestX-ray14 Finding Labels from the drawing, plus two findings at random (unrelated to the pixels)."""
    d, rng = drawn(image), np.random.default_rng(image.seed + 7)
    labels = []
    if "ggo" in d["kinds"]:
        labels.append("Infiltration")
    if "dense" in d["kinds"]:
        labels.append("Consolidation")
    if study.label == "typical" and d["n"] >= 2:
        labels.append("Pneumonia")
    labels += [name for name, p in (("Effusion", 0.12), ("Nodule", 0.08)) if rng.random() < p]
    return "|".join(sorted(labels)) or "No Finding"


def chexpert_labels(study: StudySpec, image) -> dict[str, str]:
    """CheXpert's 14 columns: 1 / 0 / -1 (uncertain) / '' (not mentioned); the opacity columns from the drawing."""
    d, rng = drawn(image), np.random.default_rng(image.seed + 11)
    out = dict.fromkeys(CHEXPERT_FINDINGS, "")
    noise = lambda p1, pu, p0: str(rng.choice(["1.0", "-1.0", "0.0", ""], p=[p1, pu, p0, 1 - p1 - pu - p0]))  # noqa: E731
    for name in ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Atelectasis", "Pneumothorax",
                 "Pleural Effusion", "Pleural Other", "Fracture"):  # fmt: skip
        out[name] = noise(0.04, 0.03, 0.05)
    out["Edema"], out["Support Devices"] = noise(0.1, 0.05, 0.1), noise(0.2, 0.0, 0.05)
    if d["n"]:
        out["Lung Opacity"] = "1.0" if d["amp"] >= 0.2 else "-1.0"  # a faint finding: the report hedges
        out["Consolidation"] = "1.0" if "dense" in d["kinds"] else ""
        out["Pneumonia"] = {"typical": "1.0", "indeterminate": "-1.0"}.get(study.label, "")
    else:
        out["Lung Opacity"] = "0.0" if rng.random() < 0.3 else ""
        if not any(out[c] == "1.0" for c in CHEXPERT_FINDINGS[1:]):
            out["No Finding"] = "1.0"
    return out


# ----------------------------------------------------------------------------- one image (a worker)
def write_one(job: tuple) -> None:
    """Draw one image and write it as the kind's file (DICOM, PNG or JPEG)."""
    kind, image, study, path, variant = job
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = draw_chest(image)
    if kind in ("rsna", "pool"):
        ds = make_dicom(image, study, pixels)
        implicit = ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
        return
    grey = np.rint(pixels * 255).astype(np.uint8)
    if variant == "rgb":  # a few real ChestX-ray14 PNGs are colour
        grey = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix == ".jpg" else []
    if not cv2.imwrite(str(path), grey, params):
        raise SiimError(f"could not write {path}")


def dicom_ids(image, study: StudySpec) -> tuple[str, str]:
    """(SOPInstanceUID, StudyInstanceUID) the image's DICOM carries (make_dicom's, without drawing it)."""
    ds = make_dicom(replace(image, rows=1, cols=1, dicom={**image.dicom, "tsyntax": str(ExplicitVRLittleEndian), "voi": ""}),
                    study, np.zeros((1, 1), np.float32))  # fmt: skip
    return str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


# ----------------------------------------------------------------------------- the four layouts
def rsna_set(studies: list[StudySpec], out: Path) -> list[tuple]:
    rng = np.random.default_rng(len(studies))
    labels, classes, jobs = [], [], []
    for st in studies:
        pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        image = replace(st.images[0], dicom=RSNA_FLAVOUR)  # one image per patient, like the real set
        name = "Lung Opacity" if image.boxes else ("No Lung Opacity / Not Normal" if image.findings else "Normal")
        for b in image.boxes or [None]:
            box = (
                {}
                if b is None
                else {"x": round(b[0], 1), "y": round(b[1], 1), "width": round(b[2] - b[0], 1), "height": round(b[3] - b[1], 1)}
            )
            labels.append({"patientId": pid, **box, "Target": int(bool(image.boxes))})
            classes.append({"patientId": pid, "class": name})
        jobs.append(("rsna", image, replace(st, patient_id=pid), out / "stage_2_train_images" / f"{pid}.dcm", ""))
    write_csv(pd.DataFrame(labels, columns=["patientId", "x", "y", "width", "height", "Target"]), out / MAIN_FILE["rsna"])
    write_csv(pd.DataFrame(classes, columns=["patientId", "class"]), out / "stage_2_detailed_class_info.csv")
    return jobs


def chestxray14_set(studies: list[StudySpec], out: Path) -> list[tuple]:
    patients, followups, rows, jobs = {}, {}, [], []
    for st in studies:
        pid = patients.setdefault(st.patient_id, len(patients) + 1)
        rng = np.random.default_rng(pid)
        age, sex = int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))
        for image in st.images:
            followup = followups[pid] = followups.get(pid, -1) + 1
            name = f"{pid:08d}_{followup:03d}.png"
            view = "AP" if np.random.default_rng(image.seed).random() < 0.4 else "PA"
            rows.append([name, nih_labels(st, image), followup, pid, age, sex, view, image.cols, image.rows, 0.143, 0.143, ""])
            variant = "rgb" if np.random.default_rng(image.seed + 3).random() < 0.1 else ""
            jobs.append(("chestxray14", image, st, out / "images" / name, variant))
    text = NIH_HEADER + "\n" + pd.DataFrame(rows).to_csv(index=False, header=False)
    (out / MAIN_FILE["chestxray14"]).write_text(text)
    return jobs


def chexpert_set(studies: list[StudySpec], out: Path) -> list[tuple]:
    patients, n_studies, rows, jobs = {}, {}, [], []
    for st in studies:
        pid = patients.setdefault(st.patient_id, len(patients) + 1)
        n_studies[pid] = n_studies.get(pid, 0) + 1
        rng = np.random.default_rng(pid + 100_000)
        sex, age = str(rng.choice(["Female", "Male"])), int(rng.integers(18, 90))
        for v, image in enumerate(st.images, start=1):
            rel = f"CheXpert-v1.0-small/train/patient{pid:05d}/study{n_studies[pid]}/view{v}_frontal.jpg"
            ap = "AP" if np.random.default_rng(image.seed).random() < 0.7 else "PA"
            rows.append(
                {"Path": rel, "Sex": sex, "Age": age, "Frontal/Lateral": "Frontal", "AP/PA": ap, **chexpert_labels(st, image)}
            )
            jobs.append(("chexpert", image, st, out / rel, ""))
    columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    write_csv(pd.DataFrame(rows, columns=columns), out / MAIN_FILE["chexpert"])
    return jobs


def pool_path(out: Path, k: int, image, study: StudySpec) -> Path:
    """Varied names and nesting, as a hospital export or a public archive has them."""
    style = k % 4
    if style == 0:
        return out / study.patient_id / study.study_id / image.series_id / f"{image.image_id}.dcm"
    if style == 1:
        return out / "export" / f"IM{k:06d}"  # no suffix
    if style == 2:
        return out / f"case_{study.study_id[:6]}" / f"IMG_{k}.DCM"
    return out / f"batch{k % 3}" / "nested" / f"{image.image_id[:8]}.dcm"


def pool_set(studies: list[StudySpec], out: Path) -> list[tuple]:
    jobs, image_rows, study_rows = [], [], []
    for st in studies:
        study_uid = ""
        for image in st.images:
            jobs.append(("pool", image, st, pool_path(out, len(jobs), image, st), ""))
            sop, study_uid = dicom_ids(image, st)
            image_rows.append(replace(image, image_id=sop, boxes=[[round(float(v), 5) for v in b] for b in image.boxes]))
        study_rows.append(replace(st, study_id=study_uid, images=image_rows[-len(st.images) :]))
    write_label_csvs(study_rows, out / ".truth")
    return jobs


SETS = {"rsna": rsna_set, "chestxray14": chestxray14_set, "chexpert": chexpert_set, "pool": pool_set}


@register("synth", *SETS)
def generate_external(cfg: Config) -> Path:
    """Write the kind's set to `out` (all at once: it appears only complete)."""
    out = dataset_folder(cfg.out)
    partial = start_partial(out, out / MAIN_FILE[cfg.kind], cfg.overwrite)
    if partial is None:
        return out
    studies = plan(cfg)
    jobs = SETS[cfg.kind](studies, partial)
    write_all(jobs, write_one, worker_processes(cfg.workers), f"synth {cfg.kind}: {len(jobs)} images")
    finish_partial(partial, out, f"written by siimcovid synth kind={cfg.kind}, seed {cfg.seed}", out / MAIN_FILE[cfg.kind])
    LOGGER.info(f"synth: wrote a {cfg.kind} set of {len(jobs)} images ({len(studies)} studies) to {out}")
    return out
