"""`siimcovid runs`: list every run under runs/ as one table.

Columns: stage, name, model, imgsz, folds, settings (the knobs that matter for that stage),
cv (the out-of-fold score the stage saved), date (of its newest file). Reads only the small
files each stage writes (configs and score tables); never loads a model.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

from siimcovid.config import Config
from siimcovid.utils import SiimError

STAGES = ["prepare", "detect", "classify", "fuse", "run"]
COLUMNS = ["stage", "name", "model", "imgsz", "folds", "settings", "cv", "cv_value", "date"]


def _yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


def _fold_dirs(run: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in run.glob("fold*") if p.is_dir() and p.name[4:].isdigit())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    return str(value)


def _settings(cfg: dict, keys: list[str]) -> str:
    return " ".join(f"{k}={_fmt(cfg[k])}" for k in keys if k in cfg and cfg[k] not in (None, [], {}))


def _row_of(table: pd.DataFrame | None, column: str, where: dict) -> float:
    if table is None or column not in table:
        return math.nan
    sel = table
    for k, v in where.items():
        if k in sel:
            sel = sel[sel[k].astype(str) == str(v)]
    return float(sel[column].iloc[0]) if len(sel) else math.nan


def describe(stage: str, run: Path) -> dict | None:
    """One row for a run dir, or None if the folder is not a run of that stage."""
    row = {
        "stage": stage,
        "name": run.name,
        "model": "",
        "imgsz": "",
        "folds": "",
        "settings": "",
        "cv": "",
        "cv_value": math.nan,
    }
    if stage == "prepare":
        cfg = _yaml(run / "prepare.yaml")
        if not cfg:
            return None
        meta = _csv(run / "meta.csv")
        row.update(
            imgsz=_fmt(cfg.get("sizes", "")),
            folds=str(cfg.get("n_folds", "")),
            settings=_settings(cfg, ["ext", "seed", "yolo_exclude_none"]),
        )
        row["cv"] = f"{len(meta)} images" if meta is not None else "unfinished (no meta.csv)"
    elif stage == "detect":
        cfg = _yaml(run / "detect.yaml")
        if not cfg:
            return None
        folds = _fold_dirs(run)
        # what a fold really trained with (preset + overrides), as Ultralytics recorded it
        used = _yaml(run / f"fold{folds[0]}" / "args.yaml") if folds else {}
        used = used or cfg.get("hyp_values") or {}
        row.update(model=Path(str(cfg.get("model", ""))).name, imgsz=str(cfg.get("imgsz", "")), folds=_fmt(folds))
        row["settings"] = (
            _settings(cfg, ["hyp", "epochs", "batch"]) + " " + _settings(used, ["mosaic", "mixup", "optimizer", "lr0"])
        )
        row["cv_value"] = _row_of(_csv(run / "oof_ap.csv"), "opacity_ap", {"fold": "all"})
        row["cv"] = f"opacity AP {row['cv_value']:.4f}" if not math.isnan(row["cv_value"]) else ""
    elif stage == "classify":
        cfg = _yaml(run / "classify.yaml")
        if not cfg:
            return None
        row.update(
            model=str(cfg.get("model", "")),
            imgsz=str(cfg.get("imgsz", "")),
            folds=_fmt([k for k in _fold_dirs(run) if (run / f"fold{k}" / "done.json").exists()]),
        )
        row["settings"] = _settings(cfg, ["epochs", "lr", "fine_lr", "optimizer", "mask_weight", "ema", "mixup"])
        scores = _csv(run / "score_oof.csv")
        row["cv_value"] = _row_of(scores, "study_map", {"fold": "all"})
        none_ap = _row_of(scores, "none_ap", {"fold": "all"})
        if not math.isnan(row["cv_value"]):
            row["cv"] = f"study mAP {row['cv_value']:.4f}, AP(none) {none_ap:.4f}"
    elif stage == "fuse":
        cfg = _yaml(run / "fuse_oof.yaml") or _yaml(run / "fuse_test.yaml") or _yaml(run / "tune.yaml")
        if not cfg:
            return None
        row["model"] = f"{len(cfg.get('det') or [])} det + {len(cfg.get('cls') or [])} cls"
        row["settings"] = _settings(cfg, ["iou_thr", "conf_type", "none_cls_weight", "opacity_exponent"])
        try:
            scores = json.loads((run / "scores_oof.json").read_text())
            row["cv_value"] = float(scores["final"])
            row["cv"] = f"final {scores['final']:.4f} (study {scores['study_map']:.4f}, image {scores['image_map']:.4f})"
        except (OSError, KeyError, TypeError, ValueError):
            pass
        if (run / "submission.csv").exists():
            row["cv"] = (row["cv"] + "; " if row["cv"] else "") + "submission.csv"
    elif stage == "run":
        cfg = _yaml(run / "run.yaml")
        if not cfg:
            return None
        det, cls = cfg.get("detect") or {}, cfg.get("classify") or {}
        row.update(
            model=f"{Path(str(det.get('model', ''))).name} + {cls.get('model', '')}",
            imgsz=f"{det.get('imgsz', '')}/{cls.get('imgsz', '')}",
        )
        row["settings"] = f"data={cfg.get('data')} tune_trials={cfg.get('tune_trials')}"
        table = _csv(run / "cv_table.csv")
        if table is not None and len(table):
            row["cv_value"] = float(table.final.iloc[0])
            row["cv"] = (
                f"final {row['cv_value']:.4f} (best baseline {table[table.method.str.startswith('baseline')].final.max():.4f})"
            )
    files = [p for p in run.rglob("*") if p.is_file()]
    row["date"] = datetime.fromtimestamp(max(p.stat().st_mtime for p in files)).strftime("%Y-%m-%d %H:%M") if files else ""
    return row


def list_runs(project: str | Path = "runs", stages=None) -> pd.DataFrame:
    project = Path(project)
    stages = STAGES if stages in (None, "all", ["all"]) else ([stages] if isinstance(stages, str) else list(stages))
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SiimError(f"stage must be all or among {STAGES}, got {bad}")
    rows = []
    for stage in stages:
        folder = project / stage
        for run in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
            row = describe(stage, run)
            if row:
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def main(cfg: Config) -> pd.DataFrame:
    table = list_runs(cfg.project, cfg.stage)
    if cfg.sort not in ("date", "cv"):
        raise SiimError(f"sort must be date or cv, got {cfg.sort}")
    table = table.sort_values(["stage", "cv_value" if cfg.sort == "cv" else "date"], na_position="first", kind="stable")
    if cfg.format == "csv":
        print(table.to_csv(index=False), end="")
    elif cfg.format == "json":
        print(table.to_json(orient="records", indent=1))
    elif cfg.format == "table":
        if table.empty:
            print(f"no runs under {cfg.project}/")
        else:
            print(table.drop(columns=["cv_value"]).to_string(index=False, max_colwidth=60))
    else:
        raise SiimError(f"format must be table, csv or json, got {cfg.format}")
    return table
