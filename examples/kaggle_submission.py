"""SIIM-FISABIO-RSNA COVID-19 Detection: an offline Kaggle submission with siimcovid.

A notebook-style script (paste it into one cell, or split it at the `# %%` marks) for the
competition's notebook, which runs with the internet OFF. Attach to the notebook (Add data):

    siim-covid19-detection      the competition's data (/kaggle/input/siim-covid19-detection)
    <your wheels dataset>       siimcovid and every dependency as wheels (see examples/README.md)
    <your bundle dataset>       the trained models: the folder `siimcovid export run=<name>` wrote

Set WHEELS and BUNDLE below to where Kaggle mounted them (the names you gave the datasets), pick a
GPU accelerator, and run: it installs siimcovid from the wheels (no index), runs
`siimcovid predict` on the competition's test images and writes /kaggle/working/submission.csv.
"""

# %% settings
import os
import shutil
import subprocess
import sys
from pathlib import Path

WHEELS = Path("/kaggle/input/siimcovid-wheels")  # the dataset of wheels (examples/README.md)
BUNDLE = Path("/kaggle/input/siimcovid-bundle")  # the bundle folder (manifest.yaml inside), or a .zip bundle file
DATA = Path("/kaggle/input/siim-covid19-detection")  # the competition: test/ and sample_submission.csv
WORK = Path("/kaggle/working")  # the notebook's writable folder; submission.csv must end up here
OUT = Path("/tmp/siimcovid-predict")  # predict's outputs (prepared images...): not the notebook's saved output
DEVICE = "0"  # the GPU; "cpu" to try the notebook without one

PREDICT_ARGS = [f"bundle={BUNDLE}", f"source={DATA}", f"out={OUT}", f"device={DEVICE}"]


def sh(*cmd: str) -> None:
    """Run a command, its output in the notebook; stop the notebook if it fails."""
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


# %% 1. install siimcovid and its dependencies from the attached wheels (no internet)
def install() -> None:
    sh(sys.executable, "-m", "pip", "install", "--no-index", f"--find-links={WHEELS}", "siimcovid")
    sh(sys.executable, "-m", "siimcovid", "help")  # the install works: the stages are listed


# %% 2. predict: convert the test DICOMs, every fold of every detector and classifier, fusion, submission
def predict() -> Path:
    # predict sets these itself; set here too so nothing imported in this notebook tries the network
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("SIIMCOVID_CACHE", "/tmp/siimcovid-bundles")  # where a .zip bundle is extracted (not saved)
    sh(sys.executable, "-m", "siimcovid", "predict", *PREDICT_ARGS)
    return OUT / "submission.csv"


# %% 3. the submission, checked against the competition's sample submission
def check_submission(path: Path) -> None:
    import pandas as pd

    sub = pd.read_csv(path, keep_default_na=False)
    sample = pd.read_csv(DATA / "sample_submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["id", "PredictionString"], f"columns {list(sub.columns)}"
    assert len(sub) == len(sample), f"{len(sub)} rows, the sample submission has {len(sample)}"
    assert set(sub.id) == set(sample.id), "the ids differ from sample_submission.csv"
    assert (sub.PredictionString.str.len() > 0).all(), "empty PredictionString"
    studies = sub.id.str.endswith("_study")
    print(f"{len(sub)} rows: {studies.sum()} studies, {(~studies).sum()} images")
    print(sub.head())


def main() -> None:
    install()
    submission = predict()
    shutil.copyfile(submission, WORK / "submission.csv")
    check_submission(WORK / "submission.csv")
    print("wrote", WORK / "submission.csv")


if __name__ == "__main__":
    main()
