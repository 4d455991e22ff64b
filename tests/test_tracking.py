"""Experiment tracking (siimcovid.engine.tracking) driven by a stand-in trainer over a few epochs, then read back:
TensorBoard event files with TensorBoard's own reader, MLflow runs with the MlflowClient (local store only)."""

from __future__ import annotations

import importlib.util
import math
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from siimcovid.engine import tracking
from siimcovid.engine.tracking import TB_SUFFIX, tracking_callbacks
from siimcovid.utils import SiimError

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install mlflow)")
# MLflow 3.17's SQL store on SQLAlchemy 2.1 warns about its own use of `noload`; nothing siimcovid can change
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

SETTINGS = {"model": "tf_efficientnet_b3_ns", "epochs": 3, "lr": 1e-3, "fine_lr": [1e-4], "init": None,
            "space": {"lr0": [1e-5, 0.1]}, "amp": True}


def rows(epochs=range(1, 4)) -> list[dict]:
    """results.csv rows as the engine passes them: numbers (numpy ones too), a NaN, the `best` flag, a text column."""
    return [{"epoch": e, "lr": 1e-3 / e, "train_loss": np.float64(2.0 - 0.5 * e), "val_map": 0.1 * e,
             "val_none_auc": math.nan if e == 2 else 0.5, "metrics/mAP50(B)": np.float32(0.25 * e), "wave": 0,
             "best": e != 2, "note": "text"} for e in epochs]


def fold(project: Path, name="b3", fold_k=0, stage="classify", family="timm", is_main=True) -> SimpleNamespace:
    run_dir = project / name
    folder = run_dir / f"fold{fold_k}"
    folder.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(stage=stage, family=family, fold=fold_k, dir=folder, run_dir=run_dir, project=project,
                           settings=dict(SETTINGS), epoch=0, is_main=is_main)


def drive(callbacks, trainer, epochs=range(1, 4), start=True, end=True, summary=None) -> None:
    """The engine's order of events for one fold: start, then per epoch the row, then the end."""
    def run(event, *args):
        for fn in callbacks.get(event, []):
            fn(trainer, *args)

    if start:
        run("on_train_start")
    for row in rows(epochs):
        trainer.epoch = row["epoch"]
        run("on_train_epoch_start")
        run("on_fit_epoch_end", row)
        run("on_model_save")
    if end:
        run("on_train_end", summary or {"fold": trainer.fold, "best_score": 0.3, "best_epoch": 3, "epochs": 3})


def fold_files(folder: Path) -> None:
    """What a classify fold folder holds when it ends: small files, weights at the top and in a sub-folder."""
    (folder / "results.csv").write_text("epoch,val_map\n1,0.1\n")
    (folder / "classify.yaml").write_text(yaml.safe_dump(SETTINGS))
    (folder / "best.pt").write_bytes(b"weights")
    (folder / "weights").mkdir()
    (folder / "weights" / "last.pt").write_bytes(b"weights")


def read_tb(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))  # a folder: every event file in it, as `tensorboard --logdir` reads a run
    acc.Reload()
    return acc


def curve(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)]


def test_tensorboard_writes_one_scalar_per_number_of_the_row_at_its_epoch(tmp_path):
    trainer = fold(tmp_path / "runs" / "classify")
    drive(tracking_callbacks("tensorboard"), trainer)
    events = sorted(trainer.dir.iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents.") and events[0].name.endswith(TB_SUFFIX)
    acc = read_tb(trainer.dir)
    tags = set(acc.Tags()["scalars"])
    assert tags == {"lr", "train_loss", "val_map", "val_none_auc", "metrics/mAP50(B)", "wave",
                    "summary/best_score", "summary/best_epoch", "summary/epochs"}  # not epoch, best, note, fold
    assert curve(acc, "train_loss") == [(1, 1.5), (2, 1.0), (3, 0.5)]
    assert curve(acc, "metrics/mAP50(B)") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert curve(acc, "val_none_auc") == [(1, 0.5), (3, 0.5)]  # the NaN epoch left out
    assert curve(acc, "summary/best_score") == [(3, 0.3)]
    settings = acc.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(settings.replace("\n    ", "\n").strip()) == SETTINGS


def test_tensorboard_a_resumed_fold_adds_a_file_and_the_curve_goes_on(tmp_path):
    trainer = fold(tmp_path / "runs" / "classify")
    drive(tracking_callbacks("tensorboard"), trainer, epochs=range(1, 3), end=False)  # killed after epoch 2
    drive(tracking_callbacks("tensorboard"), trainer, epochs=range(3, 5))  # a new process resumes at epoch 3
    assert len(list(trainer.dir.glob(f"events.out.tfevents.*{TB_SUFFIX}"))) == 2
    assert [s for s, _ in curve(read_tb(trainer.dir), "val_map")] == [1, 2, 3, 4]


def test_tensorboard_shows_detect_and_classify_folds_side_by_side(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = tmp_path / "runs"
    for stage, family, name in (("detect", "yolo", "v5m"), ("classify", "timm", "b3")):
        for k in (0, 1):
            drive(tracking_callbacks("tensorboard"), fold(runs / stage, name, k, stage, family))
    mux = EventMultiplexer().AddRunsFromDirectory(str(runs))  # what `tensorboard --logdir runs` does
    mux.Reload()
    assert sorted(mux.Runs()) == ["classify/b3/fold0", "classify/b3/fold1", "detect/v5m/fold0", "detect/v5m/fold1"]
    assert all("val_map" in mux.Runs()[run]["scalars"] for run in mux.Runs())


def test_other_ddp_ranks_write_nothing(tmp_path):
    trainer = fold(tmp_path / "runs" / "classify", is_main=False)
    drive(tracking_callbacks("tensorboard"), trainer)
    assert list(trainer.dir.iterdir()) == []


def test_callbacks_pickle_without_their_open_writers(tmp_path):
    """Ray sends the callbacks to each fold task; an open SummaryWriter does not travel, the tracker starts afresh."""
    callbacks = tracking_callbacks("tensorboard")
    trainer = fold(tmp_path / "runs" / "classify")
    callbacks["on_train_start"][0](trainer)
    copy = pickle.loads(pickle.dumps(callbacks))
    assert copy["on_train_start"][0].fn.__self__.open == {}
    drive(copy, fold(tmp_path / "runs" / "classify", fold_k=1))
    assert curve(read_tb(tmp_path / "runs" / "classify" / "b3" / "fold1"), "wave") == [(1, 0), (2, 0), (3, 0)]


def test_none_tracks_nothing_and_a_wrong_name_is_one_clear_error(tmp_path):
    assert tracking_callbacks("none") == {}
    with pytest.raises(SiimError, match=r"callback='wandb': expected one of tensorboard, mlflow, none"):
        tracking_callbacks("wandb")


def test_mlflow_not_installed_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(SiimError, match=r"^tracking=mlflow needs the mlflow package.*: pip install mlflow"):
        tracking_callbacks("mlflow")


def test_mlflow_names_and_params_fit_what_mlflow_accepts():
    assert tracking.mlflow_name("metrics/mAP50(B)") == "metrics/mAP50B"
    assert tracking.mlflow_name("/a//b:c/") == "a/bc"
    if not HAS_MLFLOW:
        pytest.skip("mlflow is not installed (pip install mlflow)")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    params = tracking.flat_params({"space": {"lr0": [1e-05, 0.1]}, "init": None, "amp": True, "long": "x" * 10**5})
    assert params == {"space.lr0": "[1e-05, 0.1]", "init": "null", "amp": "true", "long": "x" * MAX_PARAM_VAL_LENGTH}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One runs folder (one local MLflow store, created once) for the MLflow tests; each uses its own run name."""
    return tmp_path_factory.mktemp("mlflow") / "runs"


def client_of(runs: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")


def fold_run(client, experiment: str, k: int):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    found = client.search_runs([experiment_id], f"tags.`siimcovid.fold` = '{k}'")
    assert len(found) == 1, found
    return found[0]


@needs_mlflow
def test_mlflow_logs_a_run_per_fold_into_the_local_store_under_runs(runs):
    trainer = fold(runs / "classify", name="b3_mlflow")
    fold_files(trainer.dir)
    drive(tracking_callbacks("mlflow"), trainer, summary={"fold": 0, "best_score": 0.47, "best_epoch": 3, "epochs": 3})
    assert (runs / "mlflow.db").is_file()
    client = client_of(runs)
    run = fold_run(client, "classify/b3_mlflow", 0)
    assert run.info.status == "FINISHED" and run.info.run_name == "fold0"
    assert run.data.tags["siimcovid.family"] == "timm" and run.data.tags["siimcovid.dir"] == str(trainer.dir.resolve())
    assert run.data.params["model"] == "tf_efficientnet_b3_ns" and run.data.params["space.lr0"] == "[1e-05, 0.1]"
    assert run.data.params["fine_lr"] == "[0.0001]" and run.data.params["init"] == "null"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 1.0), (3, 0.5)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_none_auc")] == [1, 3]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "metrics/mAP50B")] == [0.25, 0.5, 0.75]
    assert run.data.metrics["summary/best_score"] == 0.47 and "summary/fold" not in run.data.metrics
    assert "best" not in run.data.metrics and "epoch" not in run.data.metrics
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["classify.yaml", "results.csv"]
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to((runs / "mlruns").resolve())


@needs_mlflow
def test_mlflow_a_resumed_fold_continues_its_run(runs):
    trainer = fold(runs / "classify", name="b3_resume")
    drive(tracking_callbacks("mlflow"), trainer, epochs=range(1, 3), end=False)  # killed after epoch 2
    client = client_of(runs)
    first = fold_run(client, "classify/b3_resume", 0)
    assert first.info.status == "RUNNING"
    trainer.settings = {**SETTINGS, "amp": False, "workers": 4}  # runtime settings may change on a resume
    drive(tracking_callbacks("mlflow"), trainer, epochs=range(3, 5))
    run = fold_run(client, "classify/b3_resume", 0)
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_map")] == [1, 2, 3, 4]
    assert run.data.params["amp"] == "true" and run.data.params["workers"] == "4"  # a param is kept; new keys added
    trainer.fold, trainer.dir = 1, trainer.run_dir / "fold1"
    trainer.dir.mkdir()
    drive(tracking_callbacks("mlflow"), trainer)  # the next fold: a run of its own in the same experiment
    assert fold_run(client, "classify/b3_resume", 1).info.run_id != run.info.run_id


@needs_mlflow
def test_mlflow_uri_names_another_store(tmp_path, runs):
    store = f"sqlite:///{tmp_path / 'team.db'}"
    trainer = fold(runs / "detect", name="v5m_uri", stage="detect", family="yolo")
    drive(tracking_callbacks("mlflow", uri=store), trainer)
    from mlflow import MlflowClient

    assert fold_run(MlflowClient(tracking_uri=store), "detect/v5m_uri", 0).info.status == "FINISHED"
    assert client_of(runs).get_experiment_by_name("detect/v5m_uri") is None


@needs_mlflow
def test_mlflow_a_store_failing_mid_training_costs_the_fold_its_tracking_not_its_training(runs, monkeypatch):
    from mlflow import MlflowClient

    trainer = fold(runs / "classify", name="b3_outage")
    callbacks = tracking_callbacks("mlflow")
    drive(callbacks, trainer, epochs=range(1, 2), end=False)
    warned = []
    monkeypatch.setattr(tracking.LOGGER, "warning", warned.append)

    def down(*args, **kwargs):
        raise ConnectionError("server gone")

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    drive(callbacks, trainer, epochs=range(2, 4), start=False)  # epochs 2, 3 and the end: no exception
    assert len(warned) == 1 and "server gone" in warned[0] and "not tracking the rest of this fold" in warned[0]
    monkeypatch.undo()
    run = fold_run(client_of(runs), "classify/b3_outage", 0)
    assert run.info.status == "RUNNING" and run.data.metrics["val_map"] == pytest.approx(0.1)


FOLD_PROCESS = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_tracking import drive, fold, tracking_callbacks
drive(tracking_callbacks("mlflow"), fold(Path({project!r}), name="par", fold_k=int(sys.argv[1])))
"""


@needs_mlflow
@pytest.mark.slow
def test_mlflow_folds_that_start_together_share_a_new_store(tmp_path):
    """engine=ray starts folds at once: the first use of a new SQLite store must not race (MLflow's own does)."""
    project = tmp_path / "runs" / "classify"
    code = FOLD_PROCESS.format(tests=str(Path(__file__).parent), project=str(project))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    errors = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    client = client_of(tmp_path / "runs")
    assert sorted(fold_run(client, "classify/par", k).info.status for k in range(3)) == ["FINISHED"] * 3
