"""The row of a detect run in `siimcovid runs` (light: yaml and pandas only, never Ultralytics)."""

from __future__ import annotations

import math
from pathlib import Path

from siimcovid.detect.files import FILES
from siimcovid.rundir import fold_dir, fold_numbers, merge_run
from siimcovid.runs import fmt, overall_scores, quiet_yaml, score, settings_text, trained_on

SETTINGS = ["hyp", "epochs", "batch"]  # of detect.yaml
TRAINED_WITH = ["mosaic", "mixup", "optimizer", "lr0"]  # as Ultralytics recorded them (preset + overrides)


def describe(run: Path) -> dict | None:
    """A detect run -> model, image size, folds, the settings that matter, and its OOF AP (opacity; lung for a lung
    detector); None if not one."""
    cfg = merge_run(quiet_yaml(run / FILES.settings))  # an unreadable one: its row says so
    if not cfg:
        return None
    folds = fold_numbers(run)
    # what a fold really trained with (preset + overrides), as Ultralytics recorded it
    used = quiet_yaml(fold_dir(run, folds[0]) / "args.yaml") if folds else {}
    used = used or cfg.get("hyp_values") or {}
    task = "lung" if cfg.get("task") == "lung" else "opacity"
    ap = score(overall_scores(run), task)
    return {
        "model": Path(str(cfg.get("model", ""))).name,
        "imgsz": str(cfg.get("imgsz", "")),
        "folds": fmt(folds),
        "settings": settings_text(cfg, SETTINGS) + " " + settings_text(used, TRAINED_WITH) + trained_on(cfg, run),
        "cv_value": ap,
        "cv": "" if math.isnan(ap) else f"{task} AP {ap:.4f}",
    }
