"""`siimcovid detect evolve`: hyperparameter evolution on one fold, serially with Ultralytics' Tuner or on Ray.

    siimcovid detect evolve data=runs/prepare/siim model=yolov5mu.pt hyp=yolov5m fold=0 iterations=30 epochs=10
    siimcovid detect evolve ... engine=ray [ray_address=head:6379] [grace_period=3] [gpus_per_trial=1]

engine=serial (the default): the first iteration trains with the starting preset (hyp=); each later one
mutates the best so far inside `ranges` (detect.yaml: mosaic, mixup, scale, translate, hsv_v, lr0, ...), one
after another in this process. Fitness is Ultralytics' (validation mAP50-95 of each short run). Everything
stays in <project>/<name>/ (default name <dataset>-<model stem>-evolve):

    tune/tune_results.ndjson          every iteration: fitness and hyperparameters (Ultralytics)
    tune/best_hyperparameters.yaml    the best iteration's values of the `ranges` keys (Ultralytics)
    tune/tune_scatter_plots.png, tune/weights/   plots and the best iteration's weights
    multitrain*/                      the iterations' training runs (Ultralytics keeps the best)
    hyp_evolved.yaml                  the starting preset updated with the best values: a preset that
                                      `siimcovid detect train hyp=<that path>` (and `yolo ... cfg=`) accepts

Re-running the same command continues from the last finished iteration up to `iterations`
(`iterations`, `export` and the runtime settings may change; any other setting is refused: the
iterations so far were trained under it).

engine=ray (siimcovid.detect.ray_tune; `pip install siimcovid[ray]`): `iterations` Ray Tune trials (max_samples)
on the cluster `ray_address` reaches (null: a local one on 127.0.0.1), as many at once as the cluster has
`cpus_per_trial` CPUs and `gpus_per_trial` GPUs for. The first trial is the preset, the others sample `ranges`
uniformly (tune.uniform(min, max)); every trial reports each validated epoch, and ASHA stops the worse ones
after `grace_period` epochs. Fitness is detect.yaml's `fitness` (map50 by default: the best validation
mAP@0.5 of the trial). A trial that dies is restarted up to `max_failures` times (from its last.pt), then
reported as failed. It writes ray_tune/ (Ray's experiment; re-running restores it and runs what is left),
trials/<trial id>/ (each trial's Ultralytics run), ray_trials.csv (trial, status: finished / stopped early /
failed, epochs, fitness, the values) and the same hyp_evolved.yaml, from the best trial.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from siimcovid.config import Config, default_name, read_yaml, runtime_keys
from siimcovid.detect.common import (
    RUN_CONFIG,
    ULTRALYTICS_RUNTIME_KEYS,
    check_model,
    check_run_dataset,
    load_hyp,
    resolve_data,
    select_folds,
    train_args,
    ultralytics_keys,
)
from siimcovid.rundir import changed_settings, read_run, refuse_changed, write_run
from siimcovid.utils import LOGGER, SiimError, atomic_write_text

RESULTS = "tune_results.ndjson"  # Ultralytics' record of the iterations so far: its presence means resume
CONTINUE_KEYS = frozenset({"iterations", "export"})  # a resumed tuning may run longer, or export elsewhere


def load_space(ranges: Any) -> dict[str, tuple]:
    """The `ranges` setting, {key: [min, max] or [min, max, gain]} (or a YAML path holding it) -> the Tuner's space."""
    if isinstance(ranges, (str, Path)):
        ranges = read_yaml(ranges)
    if not isinstance(ranges, dict) or not ranges:
        raise SiimError(f"ranges must map Ultralytics settings to [min, max], got {ranges!r}")
    valid = ultralytics_keys()
    out = {}
    for key, bounds in ranges.items():
        if key not in valid:
            raise SiimError(f"ranges: '{key}' is not an Ultralytics setting")
        if not isinstance(bounds, (list, tuple)) or len(bounds) not in (2, 3) or float(bounds[0]) > float(bounds[1]):
            raise SiimError(f"ranges: {key} needs [min, max] (or [min, max, gain]) with min <= max, got {bounds!r}")
        out[key] = tuple(float(b) for b in bounds)
    return out


def evolve_fold(fold: Any, folds: list[int]) -> int:
    if isinstance(fold, list) and len(folds) > 1:
        raise SiimError(f"evolve tunes on one fold; got fold={fold}")
    return folds[0]


def check_tuning_settings(run_dir: Path, tune_dir: Path, saved: Config) -> None:
    """Refuse to continue a tuning run under other settings than its iterations so far were trained with
    (before its detect.yaml is saved over). `tune_dir`: the Tuner's folder, or Ray Tune's experiment."""
    old_file = run_dir / RUN_CONFIG
    if not (tune_dir / RESULTS).is_file() and not (tune_dir / "tuner.pkl").is_file() or not old_file.is_file():
        return
    new = yaml.safe_load(saved.to_yaml())  # as it would be saved: plain values, like the old file's
    old = read_run(old_file)
    if "space" in old and "ranges" not in old:  # written before `space` was called `ranges`
        old["ranges"] = old.pop("space")
    changed = changed_settings(old, new, runtime_keys("detect") | ULTRALYTICS_RUNTIME_KEYS | CONTINUE_KEYS)
    refuse_changed(run_dir, changed, f"use another name=, or delete {tune_dir} to tune again")


def export_preset(best_file: Path, start: dict, hyp_name: str | None, out: Path) -> Path:
    """Starting preset + the best iteration's values (Ultralytics' best_hyperparameters.yaml) -> a preset YAML
    for `detect train hyp=`."""
    header = [line[2:] for line in best_file.read_text().splitlines() if line.startswith("# ")]
    header = [line for line in header if line.startswith("Best fitness=") or "iterations" in line]
    return write_preset(read_yaml(best_file), header, start, hyp_name, out)


def write_preset(best: dict, header: list[str], start: dict, hyp_name: str | None, out: Path) -> Path:
    """Starting preset updated with `best` -> the preset YAML, with `header` as comments."""
    preset = {**start, **best}
    text = f"# siimcovid hyperparameter preset evolved from `{hyp_name}` by `siimcovid detect evolve`.\n"
    text += "".join(f"# {line}\n" for line in header)
    text += "# Use: siimcovid detect train hyp=<this file> ...   or   yolo detect train cfg=<this file> ...\n"
    text += yaml.safe_dump(preset, sort_keys=False)
    return atomic_write_text(out, text)


def evolve(cfg: Config) -> Path:
    source = resolve_data(cfg.data, cfg.data_yaml_dir, cfg.task)  # task=lung evolves the lung detector's preset
    fold = evolve_fold(cfg.fold, select_folds(cfg.fold, source))
    data_yaml = source.yaml(fold)
    model = check_model(cfg.model)
    if isinstance(cfg.pretrained, str):
        check_model(cfg.pretrained, "pretrained")
    hyp = load_hyp(cfg.hyp)
    space = load_space(cfg.ranges)
    args = train_args(cfg, hyp)
    name = cfg.name or default_name("detect", f"{source.name}-{Path(model).stem}-evolve", "the dataset and the model")
    run_dir = (Path(cfg.project) / name).resolve()
    check_run_dataset(run_dir, source)
    tune_dir = run_dir / "tune"
    ranges = {k: list(v) for k, v in space.items()}
    settings = Config({k: v for k, v in cfg.items() if k != "mode"}, name=name, fold=fold, ranges=ranges)
    learned = {"mode": "evolve", "model": model, "prepared": str(source.prepared), "size": source.size}
    learned.update(data_yaml=str(data_yaml.resolve()), hyp_values=hyp)  # apart: the settings stay a valid cfg=
    use_ray = cfg.engine == "ray"
    if use_ray:
        from siimcovid.detect import ray_tune
        from siimcovid.ray_engine import import_ray

        import_ray()  # the install hint before anything is written
        tune_dir = run_dir / ray_tune.EXPERIMENT
    check_tuning_settings(run_dir, tune_dir, Config(settings, **learned))
    write_run(run_dir / RUN_CONFIG, "detect", settings, learned)
    out = Path(cfg.export) if cfg.export else run_dir / "hyp_evolved.yaml"
    job = {"model": model, "data_yaml": data_yaml, "hyp": hyp, "space": space, "args": args, "run_dir": run_dir}
    out = evolve_on_ray(cfg, job, out) if use_ray else evolve_here(cfg, job, tune_dir, fold, out)
    LOGGER.info(f"detect evolve: best hyperparameters -> {out}\n  train with: siimcovid detect train hyp={out} ...")
    return out


def evolve_on_ray(cfg: Config, job: dict, out: Path) -> Path:
    """engine=ray: the trials on Ray Tune (siimcovid.detect.ray_tune); the preset of the best trial, written to out."""
    from siimcovid.detect import ray_tune

    run_dir, space = job["run_dir"], job["space"]
    best, table = ray_tune.evolve_ray(cfg, **job)
    header = [
        f"Best fitness={best.fitness:g} ({cfg.fitness}, best epoch) observed in trial {best.trial} "
        f"({best.status}, {best.epochs} epochs) of {len(table)} Ray Tune trials ({ray_tune.summary(table)})",
        f"Trials: {run_dir / ray_tune.TABLE}",
    ]
    return write_preset({k: float(best[k]) for k in space}, header, job["hyp"], cfg.hyp, out)


def evolve_here(cfg: Config, job: dict, tune_dir: Path, fold: int, out: Path) -> Path:
    """engine=serial: Ultralytics' Tuner in this process; the preset of its best iteration, written to out."""
    from ultralytics import YOLO

    LOGGER.info(f"detect evolve: {cfg.iterations} iterations on fold {fold} ({job['data_yaml']}) -> {tune_dir}")
    YOLO(job["model"]).tune(
        data=str(job["data_yaml"]),
        iterations=cfg.iterations,
        space=job["space"],
        project=str(job["run_dir"]),
        name=tune_dir.name,
        resume=(tune_dir / RESULTS).is_file(),
        **job["args"],
    )
    best_file = tune_dir / "best_hyperparameters.yaml"
    if not best_file.is_file():
        raise SiimError(f"no tuning iteration produced metrics; see the log and {tune_dir}")
    return export_preset(best_file, job["hyp"], cfg.hyp, out)


def main(cfg: Config) -> Path:
    return evolve(cfg)
