"""`siimcovid detect evolve engine=ray`: the evolve trials as Ray Tune trials, on any Ray cluster.

Ray Tune directly, with siimcovid's own training as the trainable, rather than Ultralytics' integration
(`YOLO.tune(use_ray=True)`, ultralytics/utils/tuner.py), which cannot take what this needs: it always
optimises mAP50-95, has no FailureConfig (a trial on a lost node is not retried), samples Ultralytics'
default space unless given one and starts with no known point, and its requirement check tries to
pip-install `pydantic<2.12` at run time. What is kept from it: the ASHA scheduler on the `epoch` a trial
reports after each validation (`time_attr="epoch"`, `max_t=epochs`, reduction factor 3).

    <run>/ray_tune/              Ray Tune's experiment (restored when the same command runs again)
    <run>/trials/<trial id>/     each trial's Ultralytics run (weights/best.pt, results.csv)
    <run>/ray_trials.csv         one row per trial: trial, status, epochs, fitness, the space's values
    <run>/hyp_evolved.yaml       written by evolve.py from the best trial, as on the serial path

Trials see absolute paths only (the fold's data YAML, the model, the run folder): Ray runs them in
other working directories, and on a cluster on other machines, so the run folder must be on storage
every node sees. siimcovid (and Ray) must be installed on every node.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from siimcovid.config import Config
from siimcovid.engine import devices
from siimcovid.utils import LOGGER, SiimError, atomic_path

EXPERIMENT = "ray_tune"  # Ray Tune's folder in the run folder
TRIALS = "trials"  # the trials' Ultralytics runs: <run>/trials/<trial id>/
TABLE = "ray_trials.csv"
FIXED_COLUMNS = ["trial", "status", "epochs", "fitness"]
STATUSES = ("finished", "stopped early", "failed")
METRICS = {"map50": "metrics/mAP50(B)", "map50-95": "metrics/mAP50-95(B)"}  # Ultralytics' names, by detect.yaml's fitness


def search_space(space: dict[str, tuple], tune) -> dict[str, Any]:
    """detect's `ranges` {key: (min, max[, gain])} -> Ray Tune's {key: tune.uniform(min, max)} (the gain, which
    scales the serial Tuner's mutations, has no use here; min == max is that constant)."""
    return {k: tune.uniform(float(b[0]), float(b[1])) if b[1] > b[0] else float(b[0]) for k, b in space.items()}


def first_point(space: dict[str, tuple], hyp: dict[str, Any]) -> dict[str, float]:
    """The first trial: the starting preset's values of the space keys (Ultralytics' defaults for the others),
    clipped into the space; as the serial Tuner's first iteration is the preset."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    point = {}
    for key, (lo, hi, *_) in space.items():
        value = hyp.get(key, DEFAULT_CFG_DICT.get(key))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            point[key] = min(max(float(value), lo), hi)
    return point


def gpus_per_trial(cfg: Config, ray) -> float:
    """The gpus_per_trial setting, or (null) one GPU per trial on a cluster that has GPUs unless device=cpu."""
    have = float(ray.cluster_resources().get("GPU", 0))
    if cfg.gpus_per_trial is None:
        gpus = 0.0 if devices.parse(cfg.device).count == 0 or have < 1 else 1.0
    else:
        gpus = float(cfg.gpus_per_trial)
    if gpus > 1:
        raise SiimError(
            f"gpus_per_trial={cfg.gpus_per_trial}: a Ray trial trains on one GPU at most (DDP inside a trial does not "
            "report its epochs to Ray Tune); run more trials at once instead"
        )
    if gpus > 0 and have == 0:
        raise SiimError(f"gpus_per_trial={gpus:g} but the Ray cluster has no GPU: gpus_per_trial=0 trains on its CPUs")
    return gpus


class Reporter:
    """Ultralytics callbacks that report each validated epoch to Ray Tune: `epoch` (ASHA's time) and `fitness`,
    the best value so far of detect.yaml's fitness metric (what the trial's best.pt holds)."""

    def __init__(self, metric: str):
        self.metric, self.best, self.stopped = metric, -math.inf, False

    def start(self, trainer) -> None:
        from ultralytics.utils.callbacks import raytune

        hooks = trainer.callbacks["on_fit_epoch_end"]  # Ultralytics' own reporter would report every epoch twice
        hooks[:] = [h for h in hooks if h is not raytune.on_fit_epoch_end]

    def epoch(self, trainer) -> None:
        from ray import tune

        if self.stopped:  # Ultralytics' final validation calls on_fit_epoch_end once more, after the last epoch
            return
        self.stopped = bool(trainer.stop)
        metrics = trainer.metrics or {}
        self.best = max(self.best, float(metrics.get(self.metric, 0.0)))
        tune.report(
            {
                "epoch": trainer.epoch + 1,
                "fitness": self.best,
                "map50": float(metrics.get(METRICS["map50"], 0.0)),
                "map50_95": float(metrics.get(METRICS["map50-95"], 0.0)),
            }
        )


def run_trial(config: dict, job: dict) -> None:
    """One trial (in a Ray worker, anywhere on the cluster): train `job`'s model on the fold with the sampled values.

    A trial Ray restarts after a failure resumes its own last.pt when it has one."""
    from ray import tune
    from ultralytics import YOLO

    from siimcovid.detect.common import fold_state
    from siimcovid.detect.train import TRAINERS
    from siimcovid.ray_engine import task_gpus

    os.chdir(job["cwd"])
    job = {**job, "args": {**job["args"], "device": devices.in_ray_task(job["args"]["device"], task_gpus())}}
    trial = tune.get_context().get_trial_id()
    folder = Path(job["trials_dir"]) / trial
    state = fold_state(folder)
    if state == "partial":
        yolo = YOLO(str(folder / "weights" / "last.pt"))
        kwargs = {"resume": True, "data": job["data"], "device": job["args"]["device"], "workers": job["args"]["workers"]}
    else:
        shutil.rmtree(folder, ignore_errors=True)  # what an earlier attempt left before its first checkpoint
        yolo = YOLO(job["model"])
        values = {k: float(v) for k, v in config.items()}
        kwargs = {**job["args"], **values, "data": job["data"], "project": job["trials_dir"], "name": trial, "exist_ok": True}
    reporter = Reporter(METRICS[job["fitness"]])
    yolo.add_callback("on_pretrain_routine_start", reporter.start)
    yolo.add_callback("on_fit_epoch_end", reporter.epoch)
    yolo.train(trainer=TRAINERS[job["fitness"]], **kwargs)


def trial_rows(results: list[dict], keys: list[str], epochs: int) -> pd.DataFrame:
    """[{trial, config, metrics (the last report or {}), error}] -> the results table, one row per trial in trial order.

    status: failed (it raised, after its retries), stopped early (fewer epochs than `epochs`: ASHA stopped it, or
    Ultralytics' patience), finished. fitness: the best reported (empty when it never reported)."""
    rows = []
    for r in sorted(results, key=lambda r: r["trial"]):
        metrics = r.get("metrics") or {}
        ran = int(metrics.get("epoch", 0) or 0)
        status = "failed" if r.get("error") else "finished" if ran >= epochs else "stopped early"
        fitness = metrics.get("fitness")
        rows.append(
            {
                "trial": r["trial"],
                "status": status,
                "epochs": ran,
                "fitness": float(fitness) if fitness is not None else float("nan"),
                **{k: float(r["config"][k]) if k in r.get("config", {}) else float("nan") for k in keys},
            }
        )
    return pd.DataFrame(rows, columns=FIXED_COLUMNS + list(keys))


def write_table(table: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def best_trial(table: pd.DataFrame) -> pd.Series:
    """The trial with the highest fitness among those that did not fail (the first of equals)."""
    ok = table[(table.status != "failed") & table.fitness.notna()]
    if not len(ok):
        raise SiimError(f"no Ray Tune trial reported a validated epoch ({len(table)} trials, see {TABLE} and the log)")
    return ok.loc[ok.fitness.idxmax()]


def summary(table: pd.DataFrame) -> str:
    counts = table.status.value_counts()
    return f"{len(table)} trials: " + ", ".join(f"{int(counts.get(s, 0))} {s}" for s in STATUSES)


def grid_results(grid) -> list[dict]:
    """Ray Tune's ResultGrid -> the plain records trial_rows reads."""
    out = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial = metrics.get("trial_id") or Path(result.path).name
        out.append({"trial": trial, "config": dict(result.config or {}), "metrics": metrics, "error": result.error})
    return out


def trial_model(model: str) -> str:
    """The model as every trial loads it: a .pt downloaded once, here (a trial runs in its own folder), as an absolute
    path; an Ultralytics model YAML name as it is."""
    if Path(model).suffix == ".pt" and not Path(model).is_file():
        from ultralytics.utils.downloads import attempt_download_asset

        model = attempt_download_asset(model)
    return str(Path(model).resolve()) if Path(model).is_file() else model


def make_tuner(cfg: Config, trainable, space: dict[str, tuple], hyp: dict, args: dict, run_dir: Path):
    """The Ray Tune experiment in <run>/ray_tune: restored (its unfinished and failed trials run), else a new one."""
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator
    from ultralytics.cfg import DEFAULT_CFG_DICT

    experiment = run_dir / EXPERIMENT
    if tune.Tuner.can_restore(str(experiment)):
        LOGGER.info(f"detect evolve: restoring the Ray Tune experiment {experiment} (its unfinished and failed trials run)")
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
    epochs = int(cfg.epochs)
    asha = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(cfg.grace_period, epochs), reduction_factor=3)
    search = BasicVariantGenerator(
        points_to_evaluate=[first_point(space, hyp)], random_state=int(args.get("seed", DEFAULT_CFG_DICT["seed"]))
    )
    return tune.Tuner(
        trainable,
        param_space=search_space(space, tune),
        tune_config=TuneConfig(
            metric="fitness",
            mode="max",
            num_samples=cfg.iterations,
            scheduler=asha,
            search_alg=search,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=RunConfig(
            storage_path=str(run_dir),
            name=EXPERIMENT,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            verbose=1,
        ),
    )


def evolve_ray(
    cfg: Config, *, model: str, data_yaml: Path, hyp: dict, space: dict[str, tuple], args: dict, run_dir: Path
) -> tuple[pd.Series, pd.DataFrame]:
    """Run (or restore and finish) the Ray Tune experiment; write ray_trials.csv. Returns the best trial's row and the table."""
    from siimcovid.ray_engine import check_fits, cluster, import_ray

    import_ray()  # the one-line install hint, before any work
    from ray import tune

    model = trial_model(model)
    with cluster(cfg.ray_address) as ray:  # a local one stays on 127.0.0.1 (siimcovid.ray_engine)
        gpus = gpus_per_trial(cfg, ray)
        check_fits(ray, gpus, cfg.cpus_per_trial, "detect evolve engine=ray")  # Ray Tune would wait forever
        job = {
            "model": model,
            "data": str(Path(data_yaml).resolve()),
            "trials_dir": str(run_dir / TRIALS),
            "fitness": cfg.fitness,
            "args": {**args, "device": None if gpus > 0 else "cpu"},  # a trial trains on the GPU Ray gave it (run_trial)
            "cwd": os.getcwd(),  # Ray starts a trial in its own folder: relative paths (pretrained=...) are the command's
        }
        trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), {"cpu": cfg.cpus_per_trial, "gpu": gpus})
        tuner = make_tuner(cfg, trainable, space, hyp, args, run_dir)
        LOGGER.info(
            f"detect evolve: {cfg.iterations} Ray Tune trials on {data_yaml} ({cfg.cpus_per_trial} CPU, {gpus:g} GPU each; "
            f"ASHA after {cfg.grace_period} epochs; fitness {cfg.fitness}) -> {run_dir / EXPERIMENT}"
        )
        table = trial_rows(grid_results(tuner.fit()), list(space), int(cfg.epochs))
    write_table(table, run_dir / TABLE)
    LOGGER.info(f"detect evolve: {summary(table)} -> {run_dir / TABLE}")
    if len(table) != cfg.iterations:
        LOGGER.warning(
            f"detect evolve: the Ray Tune experiment in {run_dir / EXPERIMENT} has {len(table)} trials "
            f"(iterations={cfg.iterations}): a restored experiment keeps its own number; use another name= for more"
        )
    failed = table[table.status == "failed"]
    if len(failed):
        LOGGER.warning(f"detect evolve: {len(failed)} trials failed after {cfg.max_failures} retries: {', '.join(failed.trial)}")
    return best_trial(table), table
