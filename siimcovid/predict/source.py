"""What `siimcovid predict` reads: a SIIM root or any DICOM tree (or one file), prepared as the bundle's models were trained.

A SIIM root (a `test/` folder and `sample_submission.csv`) is prepared with `layout=siim` and its
sample submission fixes the submission's rows; anything else goes through `layout=folder` (every
file looked at, DICOMs grouped into studies by StudyInstanceUID) and the sample submission is
written from what prepare found: every study and image of the test split.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from siimcovid.bundle.files import PREPARE_FILE
from siimcovid.tables import IMAGE_CSV, IMAGE_SUFFIX, SAMPLE, SAMPLE_SUBMISSION, STUDY_CSV, STUDY_SUFFIX
from siimcovid.utils import SiimError

PREPARE_KEYS = tuple(PREPARE_FILE.names)  # the bundle's conversion settings (its prepare.yaml, declared there)
INPUT_CHECKS = ("max_pixels", "modality_check")  # predict's own settings that prepare applies to the source


def input_checks(cfg) -> dict:
    """predict's settings of the input checks (INPUT_CHECKS), for prepare_settings(..., **input_checks(cfg)); one left
    null is prepare's default (cfg/prepare.yaml: the one place of those defaults)."""
    return {k: cfg[k] for k in INPUT_CHECKS if cfg[k] is not None}


def source_layout(source: str | os.PathLike) -> str:
    """'siim' for a SIIM root (test/ and sample_submission.csv), else 'folder' (a DICOM tree or one file)."""
    path = Path(source)
    if not path.exists():
        raise SiimError(f"source not found: {path} (a SIIM root, a folder of DICOMs, or one DICOM file)")
    if path.is_dir() and (path / "test").is_dir() and (path / SAMPLE_SUBMISSION).is_file():
        return "siim"
    if path.is_dir() and (path / "test").is_dir() and any((path / f).exists() for f in (IMAGE_CSV, STUDY_CSV, SAMPLE_SUBMISSION)):
        raise SiimError(
            f"source={path} looks like a SIIM root (test/, the competition's CSVs) but has no readable {SAMPLE_SUBMISSION}: "
            f"give it back to write a submission, or source={path / 'test'} to predict its DICOMs as a folder"
        )
    return "folder"


def prepare_settings(
    conversion: dict,
    source: Path,
    layout: str,
    out: Path,
    workers: int | None,
    on_error: str,
    overwrite: bool = False,
    **checks,
) -> dict:
    """`siimcovid prepare` settings for the source: the bundle's conversion settings, the test split only.
    overwrite: predict's, for <out>/prepared as for <out> (write beside a user's files there, never over them);
    checks: predict's input checks, passed on as they are (INPUT_CHECKS: max_pixels, modality_check); one not
    given keeps prepare's default."""
    missing = [k for k in PREPARE_KEYS if k not in conversion and k != "resize_from"]  # an older bundle has no resize_from
    if missing:
        raise SiimError(f"the bundle's prepare settings lack {missing}: export the bundle again")
    return {
        **{k: conversion.get(k) for k in PREPARE_KEYS},
        **{k: v for k, v in checks.items() if v is not None},
        "data": str(source),
        "layout": layout,
        "name": "predict",
        "out": str(out),
        "splits": ["test"],
        "on_error": on_error,
        "overwrite": overwrite,
        "workers": pool_workers(workers),
        "data_yaml_dir": str(out / "data_yaml"),  # test-only: prepare writes none, but never into the current folder
    }


def pool_workers(workers: int | None) -> int | None:
    """predict's workers -> prepare's and fuse's: the same meaning (cfg/shared.yaml: null = every core, 0 = none
    besides this process)."""
    return workers


def loader_workers(workers: int | None) -> int:
    """predict's workers -> a DataLoader's: null = every core, at most 8; 0 = read in this process."""
    return min(os.cpu_count() or 1, 8) if workers is None else workers


def sample_from_meta(test: pd.DataFrame) -> pd.DataFrame:
    """A sample submission (tables.SAMPLE) of prepared test images: every study (in order of first image), then every image."""
    studies = list(dict.fromkeys(test["study_id"]))
    rows = [(f"{s}{STUDY_SUFFIX}", "negative 1 0 0 1 1") for s in studies]
    rows += [(f"{i}{IMAGE_SUFFIX}", "none 1 0 0 1 1") for i in test["image_id"]]
    return pd.DataFrame(rows, columns=SAMPLE.names)


def write_sample(test: pd.DataFrame, path: Path) -> Path:
    if test.empty:
        raise SiimError("no readable image in the source: nothing to predict (see skipped.csv)")
    return SAMPLE.write(sample_from_meta(test), path)
