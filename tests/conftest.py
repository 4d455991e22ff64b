"""Shared fixtures: one small synthetic dataset and its prepared folder, and one tiny trained `siimcovid run` (with
its bundle), for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest


def make_synth(out: Path, **settings) -> Path:
    """A synthetic SIIM root written in this process (workers=1) with the given synth settings."""
    from siimcovid.config import load_config
    from siimcovid.data.synth import generate

    return generate(load_config("synth", {"out": str(out), "workers": 1, **settings}))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic SIIM-layout dataset (about 50 train + 10 test images, ~256 px)."""
    out = tmp_path_factory.mktemp("synth") / "siim-synth"
    return make_synth(out, train_studies=48, test_studies=8, rows=256, cols=300, seed=7)


def make_prepared(root: Path, base: Path, name: str, **settings) -> Path:
    """`root` prepared in this process (workers=1) into base/<name>, its data YAMLs in base/data_yaml/."""
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare

    given = {"data": str(root), "name": name, "out": str(base / name), "workers": 1, "data_yaml_dir": str(base / "data_yaml")}
    return prepare(load_config("prepare", {**given, **settings}))


@pytest.fixture(scope="session")
def prepared(synth_root, tmp_path_factory) -> Path:
    """synth_root prepared at 64 and 128 px, 3 folds; data YAMLs in a temp data_yaml/."""
    return make_prepared(synth_root, tmp_path_factory.mktemp("prepared"), "tiny", sizes=[64, 128], n_folds=3)


@pytest.fixture(scope="session")
def prepared_small(_tiny_source, tmp_path_factory) -> Path:
    """The 10-study tiny root prepared at 64 px, 3 folds: for tests of a slow model's mechanics (torchvision's Faster
    R-CNN resuming, averaging, predicting: ~0.1 s per training image on the CPU at any size), not of what it learns."""
    return make_prepared(_tiny_source, tmp_path_factory.mktemp("prepared_small"), "small", sizes=[64], n_folds=3)


@pytest.fixture(scope="session")
def _tiny_source(tmp_path_factory) -> Path:
    return make_synth(tmp_path_factory.mktemp("tiny") / "root", train_studies=10, test_studies=2, rows=160, cols=180, seed=3)


@pytest.fixture
def tiny_root(_tiny_source, tmp_path) -> Path:
    """A fresh copy of a 10-study synthetic root that a test may damage."""
    import shutil

    return Path(shutil.copytree(_tiny_source, tmp_path / "root"))


# The smallest `siimcovid run`: 2 folds, 1 epoch, 64 px, CPU. Predict's batch (16, the default) is the run's predict batch.
TINY_RUN = {
    "synth": {"train_studies": 24, "test_studies": 4, "rows": 160, "cols": 192, "workers": 1, "seed": 11},
    "prepare": {"sizes": [64], "n_folds": 2, "workers": 1},
    "detect": {"model": "yolov5n.yaml", "pretrained": False, "epochs": 1, "imgsz": 64, "batch": 8, "device": "cpu"}
    | {"workers": 0, "plots": False},
    "detect_predict": {"tta": False},
    "classify": {"model": "resnet10t", "pretrained": False, "imgsz": 64, "epochs": 1, "fine_lr": [], "batch": 8}
    | {"workers": 0, "device": "cpu"},
    "classify_predict": {"tta": True, "workers": 0},
    "tune_trials": 3,
    "nested_tuning": False,
    "report": False,
}


def tiny_run_call(base: Path, name: str = "e2e", **overrides) -> dict:
    """`siimcovid run` with TINY_RUN (sections replaced by `overrides`) on a synthetic root under `base`."""
    from siimcovid.cli import call

    settings = {**TINY_RUN, **overrides}
    settings["prepare"] = {**settings["prepare"], "data_yaml_dir": str(base / "data_yaml")}
    return call("run", name=name, data=str(base / "siim"), project=str(base / "runs"), **settings)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    """(base folder, what `siimcovid run` returned): trained once for the session; it ends with its bundle
    (runs/bundle/e2e). Tests read it and must not change it (re-run or damage a copy)."""
    base = tmp_path_factory.mktemp("tiny_run")
    return base, tiny_run_call(base)


def pytest_collection_modifyitems(session, config, items):
    """tests/test_engines.py last: after OpenVINO and ONNX Runtime have run in the pytest process, a later test of
    this suite that waits on a subprocess (test_external's synth of the release before `kind=`) was killed by a
    kernel SIGSEGV (si_code SI_KERNEL, in waitpid), not yet understood; each alone passes, and `siimcovid predict`
    loads an engine in a process of its own. Ordering them last keeps every other test out of that state."""
    items.sort(key=lambda item: item.path.name == "test_engines.py")  # stable: the order within each part is kept
