"""`siimcovid detect train`: one Ultralytics YOLO training per fold into <project>/<name>/fold<k>/.

Each fold trains from the data YAML `siimcovid prepare` wrote (data_yaml/<name>_fold<k>.yaml)
with a hyperparameter preset (siimcovid/cfg/hyp/) under the command-line settings. Re-running
the same command skips folds that finished and resumes an interrupted fold from its last.pt
(Ultralytics resume), so folds can also go to different machines: `fold=k` on each.
`device=0,1` trains one fold with Ultralytics DDP over two GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import yaml
from ultralytics import YOLO
from ultralytics.models.yolo.detect import DetectionTrainer

from siimcovid.config import Config, runtime_keys
from siimcovid.data.prepared import Prepared
from siimcovid.detect.common import (
    RUN_CONFIG,
    TRAIN_KEYS,
    ULTRALYTICS_RUNTIME_KEYS,
    check_model,
    check_run_dataset,
    fold_state,
    load_hyp,
    resolve_data,
    select_folds,
    train_args,
)
from siimcovid.rundir import changed_settings, fold_dir, refuse_changed
from siimcovid.tables import read_csv
from siimcovid.utils import LOGGER

MAP50 = "metrics/mAP50(B)"
# What a resume passes on to Ultralytics (it lets a resume change these): the train keys that may differ between a
# run and its resume. The others, batch included, are refused by check_fold_settings when changed, so the
# resumed fold keeps them from its checkpoint.
RESUME_KEYS = tuple(k for k in TRAIN_KEYS if k in runtime_keys("detect"))


class Map50Trainer(DetectionTrainer):
    """Ultralytics ranks checkpoints by mAP50-95; the competition scores boxes at IoU 0.5.

    With this trainer best.pt, early stopping (patience) and the fitness in the checkpoint follow
    the validation mAP@0.5 instead.
    """

    def validate(self):
        best_before = self.best_fitness
        metrics, fitness = super().validate()
        if metrics and MAP50 in metrics:
            fitness = float(metrics[MAP50])
            self.best_fitness = fitness if best_before is None or fitness > best_before else best_before
        return metrics, fitness


TRAINERS = {"map50": Map50Trainer, "map50-95": DetectionTrainer}  # by detect.yaml's `fitness`, whose spec lists these


def check_fold_settings(folder: Path, cfg_args: dict, model: str) -> None:
    """Refuse to skip or resume a fold trained with other settings (its scores would be reported under the new ones)."""
    saved = folder / "args.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    changed = changed_settings(old, cfg_args, runtime_keys("detect") | ULTRALYTICS_RUNTIME_KEYS)
    if old.get("model") and Path(str(old["model"])).name != Path(model).name:
        changed.insert(0, ("model", old["model"], model))
    refuse_changed(folder, changed, f"use another name=, or delete {folder} to train it again")


def train_fold(
    cfg_args: dict,
    model: str,
    data_yaml: Path,
    run_dir: Path,
    fold: int,
    fitness: str,
    callbacks: dict[str, Callable] | None = None,
    state: str | None = None,
) -> str:
    """Train (or resume, or skip) one fold. Returns what happened: trained, resumed or skipped.

    `state`: the fold's fold_state when the caller has it (it loads last.pt, which is large).
    """
    folder = fold_dir(run_dir, fold)
    state = state or fold_state(folder)
    if state == "done":
        LOGGER.info(f"detect: {folder} is finished, skipping (delete it to train again)")
        return "skipped"
    trainer = TRAINERS[fitness]
    if state == "partial":
        LOGGER.info(f"detect: resuming {folder} from weights/last.pt")
        yolo = YOLO(str(folder / "weights" / "last.pt"))
        kwargs = {"resume": True, "data": str(data_yaml), **{k: cfg_args[k] for k in RESUME_KEYS if k in cfg_args}}
    else:
        LOGGER.info(f"detect: training fold {fold} -> {folder}")
        yolo = YOLO(model)
        kwargs = {**cfg_args, "data": str(data_yaml), "project": str(run_dir), "name": folder.name, "exist_ok": True}
    for event, fn in (callbacks or {}).items():
        yolo.add_callback(event, fn)
    yolo.train(trainer=trainer, **kwargs)
    return "resumed" if state == "partial" else "trained"


def fold_summary(run_dir: Path, folds: list[int]) -> pd.DataFrame:
    """Best validation mAP@0.5 and mAP50-95 per fold, from each fold's results.csv."""
    rows = []
    for k in folds:
        csv = fold_dir(run_dir, k) / "results.csv"
        if not csv.is_file():
            continue
        res = read_csv(csv, [], text=[])  # Ultralytics' numbers, inferred
        res.columns = [c.strip() for c in res.columns]
        best = res.loc[res[MAP50].idxmax()] if MAP50 in res and len(res) else None
        rows.append(
            {
                "fold": k,
                "epochs": len(res),
                "best_epoch": int(best["epoch"]) if best is not None else None,
                "mAP50": float(best[MAP50]) if best is not None else None,
                "mAP50-95": float(best["metrics/mAP50-95(B)"]) if best is not None and "metrics/mAP50-95(B)" in res else None,
            }
        )
    return pd.DataFrame(rows)


def train(cfg: Config, callbacks: dict[str, Callable] | None = None) -> Path:
    source = resolve_data(cfg.data, cfg.data_yaml_dir)
    folds = select_folds(cfg.fold, source)
    for k in folds:
        source.yaml(k)  # every YAML must exist before the first fold starts
    model = check_model(cfg.model)
    if isinstance(cfg.pretrained, str):
        check_model(cfg.pretrained)
    hyp = load_hyp(cfg.hyp)
    args = train_args(cfg, hyp)
    name = cfg.name or f"{source.name}-{Path(model).stem}"
    run_dir = (Path(cfg.project) / name).resolve()
    check_run_dataset(run_dir, source)
    saved = Config(
        cfg,
        mode="train",
        name=name,
        model=model,
        prepared=str(source.prepared),
        size=source.size,
        n_folds=source.n_folds,
        data_yamls={k: str(p.resolve()) for k, p in source.yamls.items()},
        hyp_values=hyp,
        folds_id=Prepared(source.prepared).folds_id,
    )
    states = {k: fold_state(fold_dir(run_dir, k)) for k in folds}
    for k in folds:  # before the run's settings are saved over those the folds were trained with
        if states[k] in ("done", "partial"):
            check_fold_settings(fold_dir(run_dir, k), args, model)
    saved.save(run_dir / RUN_CONFIG)

    done = {k: train_fold(args, model, source.yaml(k), run_dir, k, cfg.fitness, callbacks, states[k]) for k in folds}
    summary = fold_summary(run_dir, folds)
    LOGGER.info(f"detect train: {run_dir} ({', '.join(f'fold{k} {v}' for k, v in done.items())})")
    if len(summary):
        LOGGER.info(summary.to_string(index=False))
    return run_dir


def main(cfg: Config) -> Path:
    return train(cfg)
