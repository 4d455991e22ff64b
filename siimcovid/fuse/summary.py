"""The row of a fuse run in `siimcovid runs` (light: yaml and pandas only)."""

from __future__ import annotations

import math
from pathlib import Path

from siimcovid.config import default_config_path, fusion_keys, read_yaml
from siimcovid.rundir import changed_settings
from siimcovid.runs import fmt, overall_scores, quiet_yaml, score

RUN_CONFIGS = ["fuse_oof.yaml", "fuse_test.yaml", "tune.yaml"]  # the first one a fuse run folder has


def fusion_changes(cfg: dict) -> str:
    """`key=value` of the fusion parameters that differ from fuse.yaml's defaults."""
    defaults = read_yaml(default_config_path("fuse"))
    used = {k: cfg[k] for k in fusion_keys() if k in cfg}
    changed = changed_settings({k: defaults.get(k) for k in used}, used)
    return " ".join(f"{k}={fmt(v)}" for k, _, v in changed) or "default fusion"


def describe(run: Path) -> dict | None:
    """A fuse run -> its members, the fusion parameters it changed, its OOF final score, its submission; None if not one."""
    cfg = next((c for c in (quiet_yaml(run / name) for name in RUN_CONFIGS) if c), {})
    if not cfg:
        return None
    scores = overall_scores(run)
    final = score(scores, "final")
    cv = (
        ""
        if math.isnan(final)
        else (f"final {final:.4f} (study {score(scores, 'study_map'):.4f}, image {score(scores, 'image_map'):.4f})")
    )
    if (run / "submission.csv").exists():
        cv = (cv + "; " if cv else "") + "submission.csv"
    nones = len(cfg.get("none_cls") or [])  # binary none models (fuse none_cls=)
    return {
        "model": f"{len(cfg.get('det') or [])} det + {len(cfg.get('cls') or [])} cls" + (f" + {nones} none" if nones else ""),
        "settings": fusion_changes(cfg),
        "cv_value": final,
        "cv": cv,
    }
