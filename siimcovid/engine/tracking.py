"""Experiment tracking: one callback set for every model family, chosen by the settings `tracking` and `tracking_uri`.

    tracking_callbacks(tracking, uri=None) -> {event: [fn, ...]}   for engine.events.merge / a trainer's callbacks

The names are registered under the registry kind "callback" (`siimcovid help` lists them); each is a factory
`(uri) -> {event: [fn]}`. Every function does nothing on a trainer whose `is_main` is False (other DDP ranks). What
each logs, per fold (the trainer's `dir`), from the events on_train_start, on_fit_epoch_end(row) and
on_train_end(summary):

tensorboard (the default): TensorBoard event files in the fold folder, named
    events.out.tfevents.<10-digit unix time>.<host>.<pid>.<n>.siimcovid
(torch.utils.tensorboard.SummaryWriter(log_dir=<fold folder>, filename_suffix=".siimcovid")); one file per start, so
a resumed fold adds a file beside the old ones and TensorBoard joins them into the fold's run. They hold:
    settings          text: the run's settings as YAML (step 0)
    <column>          scalar: every number of the epoch's results.csv row at step = epoch (1-based), under the
                      column's name (train_loss, val_map, metrics/mAP50(B), ...); the epoch column itself, flags
                      (bools such as `best`) and NaN / inf are left out
    summary/<key>     scalar: every number of the fold's summary (best_score = the out-of-fold score, best_epoch,
                      epochs, ...) at step = the last epoch
`tensorboard --logdir runs` shows every stage's folds side by side: runs named <stage>/<run name>/fold<k>.
Ultralytics' own TensorBoard integration (off unless `yolo settings tensorboard=True`) writes its files
(events.out.tfevents.<time>.<host>.<pid>.<n>, no suffix) into the detector's fold folders as well.

mlflow (needs `pip install mlflow`): a tracking store, by default the local one under the stage's runs folder:
    <project>/../mlflow.db    the SQLite store (`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`)
    <project>/../mlruns/      the artifacts (<experiment id>/<run id>/artifacts/...)
or `uri` (tracking_uri=, e.g. http://mlflow.team:5000, or any store URI MLflow takes). An experiment per stage run,
named "<stage>/<run name>" (classify/b3_512), an MLflow run per fold, named fold<k>, tagged siimcovid.stage,
siimcovid.family, siimcovid.fold and siimcovid.dir (the fold folder). It logs:
    params     the settings, nested maps flattened to a.b, values as JSON (strings as they are), cut to MLflow's
               value length limit; a resumed fold logs only the keys its MLflow run lacks (a param cannot change)
    metrics    the epoch's row as for TensorBoard, at step = epoch, names reduced to what MLflow accepts
               (metrics/mAP50(B) -> metrics/mAP50B, as Ultralytics' own MLflow callback does); then summary/<key>
    artifacts  the fold folder's small files when the fold ends (ARTIFACT_SUFFIXES, at most ARTIFACT_MAX_BYTES each,
               the folder itself only: never the weights)
A resumed fold (its newest MLflow run not FINISHED) continues that run; a fold that ends marks it FINISHED. A store
that cannot be reached when a fold starts is an error; one that fails later is a warning and the fold trains on
untracked. Ultralytics' own MLflow callback (on by default once mlflow is installed: `yolo settings mlflow=False`)
logs the detector separately, to MLFLOW_TRACKING_URI or MLflow's default store in the working folder.

none: nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from siimcovid import registry
from siimcovid.utils import LOGGER, SiimError

TB_SUFFIX = ".siimcovid"  # the end of siimcovid's event file names (Ultralytics' own have none)
ARTIFACT_SUFFIXES = (".csv", ".png", ".jpg", ".yaml", ".json", ".txt")
ARTIFACT_MAX_BYTES = 10 * 2**20
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlruns"


def tracking_callbacks(tracking: str = "tensorboard", uri: str | None = None) -> dict[str, list[Callable]]:
    """The callback set of `tracking` (a name registered under "callback"); `uri` is for tracking=mlflow only."""
    return registry.get("callback", tracking)(uri)


def scalars(values: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite numbers of a results row or a summary (bools are flags, not curves; NaN = not measured)."""
    out = {}
    for key, value in values.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(value := float(value)):
            out[str(key)] = value
    return out


def small_files(folder: Path) -> list[Path]:
    """The files worth keeping beside the metrics: the fold folder's tables, plots and settings, never its weights."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in ARTIFACT_SUFFIXES and p.stat().st_size <= ARTIFACT_MAX_BYTES
    )


class OnMain:
    """A callback that runs on the main process only (a picklable wrapper: Ray sends callbacks to its fold tasks)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, trainer, *args):
        return self.fn(trainer, *args) if getattr(trainer, "is_main", True) else None


class Tracker:
    """What a tracker keeps per fold folder: open handles, dropped when pickled (a Ray task gets a fresh one)."""

    def __init__(self, uri: str | None = None):
        self.uri = uri
        self.open: dict[Path, Any] = {}

    def __getstate__(self):
        return {"uri": self.uri, "open": {}}

    def callbacks(self) -> dict[str, list[Callable]]:
        events = {"on_train_start": self.start, "on_fit_epoch_end": self.epoch, "on_train_end": self.end}
        return {event: [OnMain(fn)] for event, fn in events.items()}


class TensorBoard(Tracker):
    def writer(self, trainer):
        key = Path(trainer.dir)
        if key not in self.open:
            from torch.utils.tensorboard import SummaryWriter

            self.open[key] = SummaryWriter(log_dir=str(key), filename_suffix=TB_SUFFIX)
        return self.open[key]

    def start(self, trainer) -> None:
        settings = yaml.safe_dump(json.loads(json.dumps(dict(trainer.settings), default=str)), sort_keys=False)
        self.writer(trainer).add_text("settings", "    " + settings.replace("\n", "\n    "), 0)  # a code block

    def epoch(self, trainer, row: Mapping) -> None:
        writer = self.writer(trainer)
        for tag, value in scalars(row, skip=("epoch",)).items():
            writer.add_scalar(tag, value, trainer.epoch)
        writer.flush()  # a fold killed later keeps its curves so far

    def end(self, trainer, summary: Mapping) -> None:
        writer = self.writer(trainer)
        for key, value in scalars(summary, skip=("fold",)).items():
            writer.add_scalar(f"summary/{key}", value, trainer.epoch)
        writer.close()
        self.open.pop(Path(trainer.dir))


def mlflow_name(key: str) -> str:
    """A metric or param name MLflow accepts: only word characters, / . - and space, no leading or double /."""
    return re.sub(r"/+", "/", re.sub(r"[^\w./\- ]", "", key)).strip("/") or "_"


def flat_params(settings: Mapping, prefix: str = "") -> dict[str, str]:
    """{a: {b: 1}, c: [1, 2]} -> {"a.b": "1", "c": "[1, 2]"}: MLflow's params are flat strings of limited length."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH

    out = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, name + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[mlflow_name(name)[:MAX_ENTITY_KEY_LENGTH]] = text[:MAX_PARAM_VAL_LENGTH]
    return out


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a folder: folds that start together (engine=ray) create the SQLite store once."""
    import fcntl  # POSIX: siimcovid's Ray clusters and GPU machines are Linux

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class MLflow(Tracker):
    def store(self, trainer) -> tuple[str, str | None, Path | None]:
        """(tracking URI, artifact location of a new experiment, folder to lock); the local store without `uri`."""
        if self.uri:
            return self.uri, None, None
        root = Path(trainer.project).resolve().parent
        return f"sqlite:///{root / MLFLOW_DB}", (root / MLFLOW_ARTIFACTS).as_uri(), root

    def experiment(self, client, name: str, artifacts: str | None) -> str:
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found else client.create_experiment(name, artifact_location=artifacts)

    def start(self, trainer) -> None:
        from mlflow import MlflowClient

        uri, artifacts, root = self.store(trainer)
        with folder_lock(root) if root else contextlib.nullcontext():
            client = MlflowClient(tracking_uri=uri)
            experiment = self.experiment(client, f"{trainer.stage}/{Path(trainer.run_dir).name}", artifacts)
        folder = str(Path(trainer.dir).resolve())
        earlier = client.search_runs([experiment], f"tags.`siimcovid.fold` = '{trainer.fold}'",
                                     order_by=["attributes.start_time DESC"], max_results=20)
        earlier = [r for r in earlier if r.data.tags.get("siimcovid.dir") == folder]
        if earlier and earlier[0].info.status != "FINISHED":  # a resumed fold continues its run
            run, logged = earlier[0].info.run_id, earlier[0].data.params
            client.update_run(run, status="RUNNING")
        else:
            tags = {"siimcovid.stage": trainer.stage, "siimcovid.family": trainer.family,
                    "siimcovid.fold": str(trainer.fold), "siimcovid.dir": folder}
            run, logged = client.create_run(experiment, run_name=f"fold{trainer.fold}", tags=tags).info.run_id, {}
        self.open[Path(trainer.dir)] = (client, run)
        self.log_params(client, run, {k: v for k, v in flat_params(trainer.settings).items() if k not in logged})

    def log_params(self, client, run: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run, params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    @contextlib.contextmanager
    def logging(self, trainer) -> Iterator[tuple[Any, str] | None]:
        """The fold's (client, run id), or None once its logging failed: a store that goes away mid-training (a team
        server restarting) costs the fold its tracking, with one warning, never the training."""
        key = Path(trainer.dir)
        if key not in self.open:  # a trainer that skipped on_train_start
            self.start(trainer)
        if self.open[key] is None:
            yield None
            return
        try:
            yield self.open[key]
        except Exception as e:  # noqa: BLE001 - whatever the store raises (network, database, permissions)
            self.open[key] = None
            LOGGER.warning(f"tracking=mlflow: logging {key} failed, not tracking the rest of this fold: {e}")

    def log_metrics(self, trainer, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        with self.logging(trainer) as handle:
            if handle:
                now = int(time.time() * 1000)
                metrics = [Metric(mlflow_name(k), v, now, trainer.epoch) for k, v in values.items()]
                handle[0].log_batch(handle[1], metrics=metrics)

    def epoch(self, trainer, row: Mapping) -> None:
        self.log_metrics(trainer, scalars(row, skip=("epoch",)))

    def end(self, trainer, summary: Mapping) -> None:
        self.log_metrics(trainer, {f"summary/{k}": v for k, v in scalars(summary, skip=("fold",)).items()})
        with self.logging(trainer) as handle:
            if handle:
                for path in small_files(trainer.dir):
                    handle[0].log_artifact(handle[1], str(path))
                handle[0].set_terminated(handle[1], "FINISHED")
        self.open.pop(Path(trainer.dir))


def _needs(module: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SiimError(f"tracking={module} needs the {module} package, which is not installed: pip install {install}")


@registry.register("callback", "tensorboard")
def tensorboard_callbacks(uri: str | None = None) -> dict[str, list[Callable]]:
    """TensorBoard event files in every fold folder (`uri` is not used)."""
    _needs("tensorboard", "tensorboard")
    return TensorBoard().callbacks()


def check_store(uri: str) -> None:
    """tracking_uri=, checked before any training: a store MLflow opens (a server that answers, a database it can
    create or read). A plain folder or file path is not one: one line saying what to give instead."""
    import os

    from mlflow import MlflowClient

    if "://" not in uri and ":" not in uri.split("/")[0]:
        raise SiimError(
            f"tracking_uri={uri}: not a tracking store; give a server (http://host:5000) or a database "
            f"(sqlite:///{Path(uri).expanduser().resolve() / MLFLOW_DB})"
        )
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a server that is not there: one answer, not minutes of retries
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SiimError(f"tracking_uri={uri}: the MLflow store cannot be opened ({type(e).__name__}: {first})") from None
    finally:
        if retries is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries


@registry.register("callback", "mlflow")
def mlflow_callbacks(uri: str | None = None) -> dict[str, list[Callable]]:
    """An MLflow run per fold in the local store under runs/, or in `uri` (checked here, before any training)."""
    _needs("mlflow", "mlflow (or siimcovid[tracking])")
    if uri:
        check_store(uri)
    return MLflow(uri).callbacks()


@registry.register("callback", "none")
def no_callbacks(uri: str | None = None) -> dict[str, list[Callable]]:
    """No tracking."""
    return {}
