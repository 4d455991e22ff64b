"""The row of a prepare run in `siimcovid runs` (light: yaml and pandas only)."""

from __future__ import annotations

from pathlib import Path

from siimcovid.rundir import merge_run
from siimcovid.runs import fmt, quiet_table, quiet_yaml, settings_text
from siimcovid.tables import META


def describe(run: Path) -> dict | None:
    """A prepared folder -> image sizes, folds, split settings and its number of images; None if not one."""
    cfg = merge_run(quiet_yaml(run / "prepare.yaml"))
    if not cfg:
        return None
    meta = quiet_table(META, run / "meta.csv")
    if meta is not None:
        images = f"{len(meta)} images"
    else:
        images = "invalid meta.csv" if (run / "meta.csv").is_file() else "unfinished (no meta.csv)"
    return {
        "imgsz": fmt(cfg.get("sizes", "")),
        "folds": str(cfg.get("n_folds", "")),
        "settings": settings_text(cfg, ["ext", "seed", "yolo_exclude_none"]),
        "cv": images,
    }
