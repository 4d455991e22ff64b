"""The row of a classify run in `siimcovid runs` (light: yaml and pandas only, never torch)."""

from __future__ import annotations

import math
from pathlib import Path

from siimcovid.classify.files import FILES
from siimcovid.rundir import fold_files, merge_run
from siimcovid.runs import fmt, overall_scores, quiet_yaml, score, settings_text, trained_on

SETTINGS = ["epochs", "lr", "fine_lr", "optimizer", "mask_weight", "ema", "mixup"]


def describe(run: Path) -> dict | None:
    """A classify run -> model, image size, finished folds, the settings that matter, its OOF study mAP; None if not one."""
    cfg = merge_run(quiet_yaml(run / FILES.settings))  # an unreadable one: its row says so
    if not cfg:
        return None
    scores = overall_scores(run)
    study_map, none_ap = score(scores, "study_map"), score(scores, "none")
    task = "task=none " if (cfg.get("task") or "study") == "none" else ""  # a none model: scored on AP(none) alone
    cv = "" if math.isnan(study_map) else f"study mAP {study_map:.4f}, AP(none) {none_ap:.4f}"
    if task:
        cv = "" if math.isnan(none_ap) else f"AP(none) {none_ap:.4f} (none model)"
    return {
        "model": str(cfg.get("model", "")),
        "imgsz": str(cfg.get("imgsz", "")),
        "folds": fmt(sorted(fold_files(run, FILES.done))),
        "settings": pretraining(cfg) + task + settings_text(cfg, SETTINGS) + trained_on(cfg, run),
        "cv_value": none_ap if task else study_map,
        "cv": cv,
    }


def pretraining(cfg: dict) -> str:
    """'multi-label on <set> (N labels) ' for a pretraining run on an external set, else ''."""
    labels = cfg.get("label_names") or []
    return f"multi-label on {Path(str(cfg.get('data', ''))).name} ({len(labels)} labels) " if labels else ""


