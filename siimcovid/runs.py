"""`siimcovid runs`: list every run under runs/ as one table.

Columns: stage, name, model, imgsz, folds, settings (the knobs that matter for that stage),
cv (the out-of-fold score the stage saved), date (of its newest file). Reads only the small
files each stage writes (configs and score tables); never loads a model.

The stages and their folders come from the registry (`siimcovid.stages`); each stage describes
its own row (its `describe` function, e.g. `siimcovid.detect.summary.describe`) with the helpers
below. This module keeps the table mechanics: listing folders, sorting, formats. A run folder whose
files cannot be read (not UTF-8, not YAML, a FIFO where a file should be) is one row that says
`unreadable: <why>`, and the other runs are listed as usual.
"""

from __future__ import annotations

import io
import math
import os
from datetime import datetime
from pathlib import Path

import pandas as pd
import yaml

from siimcovid import stages as registry
from siimcovid.config import Config
from siimcovid.rundir import merge_run
from siimcovid.tables import COPIES, SCORES, Table
from siimcovid.utils import LOGGER, DataError, SiimError, as_list, read_text_input

COLUMNS = ["stage", "name", "model", "imgsz", "folds", "settings", "cv", "cv_value", "date"]
# what a damaged or hand-edited run folder raises in a describe function: unreadable files, values of the wrong type
DAMAGE = (SiimError, OSError, yaml.YAMLError, UnicodeError, ValueError, TypeError, KeyError, pd.errors.ParserError)
ROW_FIELDS = ["model", "imgsz", "folds", "settings", "cv", "cv_value"]  # what a stage's describe may fill


# ----------------------------------------------------------------------------- helpers of the describe functions
def quiet_yaml(path: Path) -> dict:
    """A run's small YAML file as a dict; {} when missing (a run may be unfinished) or not a mapping. One that is
    there but cannot be read (not UTF-8, not YAML, not a file) is a DataError: its run's row says so."""
    path = Path(path)
    if not os.path.lexists(path):
        return {}
    try:
        data = yaml.safe_load(read_text_input(path, what="YAML file"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(f"not valid YAML ({getattr(e, 'problem', None) or e})", path, mark.line + 1 if mark else None) from None
    return data if isinstance(data, dict) else {}


def quiet_csv(path: Path) -> pd.DataFrame | None:
    """A run's small CSV file, or None when missing or (with a warning) unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return pd.read_csv(io.StringIO(read_text_input(path, what="CSV")))
    except (SiimError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:  # a SiimError names the file itself
        LOGGER.warning(f"siimcovid runs: {e if isinstance(e, SiimError) else f'{path}: {e}'}")
        return None


def quiet_table(table: Table, path: Path) -> pd.DataFrame | None:
    """A run's table read through its contract; None when missing, or (with a warning) when invalid."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return table.read(path)
    except SiimError as e:  # one bad file must not hide the other runs: say so, show nothing of it
        LOGGER.warning(f"siimcovid runs: {e}")
        return None


def overall_scores(run: Path) -> dict:
    """The "all" row of the run's scores_oof.csv (tables.SCORES) as {column: value}; {} when absent or invalid."""
    table = quiet_table(SCORES, Path(run) / "scores_oof.csv")
    if table is None:
        return {}
    rows = table[table["fold"] == "all"]
    return rows.iloc[0].to_dict() if len(rows) else {}


def score(scores: dict, column: str) -> float:
    """A score of `overall_scores` (nan when the stage did not score that column)."""
    value = scores.get(column)
    return math.nan if value is None or pd.isna(value) else float(value)


def fmt(value) -> str:
    """A setting as short text: floats with %g, lists joined by commas."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(fmt(v) for v in value)
    return str(value)


def settings_text(cfg: dict, keys) -> str:
    """`key=value ...` of those keys the config sets (empty values left out)."""
    return " ".join(f"{k}={fmt(cfg[k])}" for k in keys if k in cfg and cfg[k] not in (None, [], {}))


def trained_on(cfg: dict, run: Path | None = None) -> str:
    """` init=<name> extra=<names> (N SIIM copies dropped) distill=<names> (weight w)` of a detect/classify run (the
    copies: extra='s dedup=drop lists, the run's copies_<folder>.csv), flagged LEAKY when an extra folder holds
    all-folds pseudo-labels (`siimcovid pseudo teacher=all`: the run's out-of-fold scores are optimistic). A distilled
    student is never LEAKY: its teachers of fold k never saw fold k's validation images (others refused)."""
    extra = [Path(str(p)) for p in (cfg.get("extra") or [])]
    text = (f" init={Path(str(cfg['init'])).name}" if cfg.get("init") else "") + (
        f" extra={','.join(p.name for p in extra)}" if extra else ""
    )
    copies = dropped_copies(run) if run is not None and extra else 0
    text += f" ({copies} SIIM copies dropped)" if copies else ""
    teachers = [Path(str(p)).name for p in cfg.get("distill") or []]
    text += f" distill={','.join(teachers)} (weight {fmt(cfg.get('distill_weight', ''))})" if teachers else ""
    return text + (" LEAKY (teacher=all pseudo-labels: optimistic OOF)" if leaky_extras(cfg) else "")


def dropped_copies(run: Path) -> int:
    """The external images extra= left out of a run as SIIM's own (its copies_<folder>.csv, tables.COPIES)."""
    tables = [quiet_table(COPIES, p) for p in sorted(Path(run).glob("copies_*.csv"))]
    return sum(len(t) for t in tables if t is not None)


def leaky_extras(cfg: dict) -> list[str]:
    """The extra= folders of a run's settings that hold all-folds pseudo-labels (their prepare.yaml says leaky)."""
    return [str(p) for p in cfg.get("extra") or [] if merge_run(quiet_yaml(Path(str(p)) / "prepare.yaml")).get("leaky")]


# ----------------------------------------------------------------------------- the table
def newest_date(run: Path) -> str:
    files = [p for p in run.rglob("*") if p.is_file()]
    return datetime.fromtimestamp(max(p.stat().st_mtime for p in files)).strftime("%Y-%m-%d %H:%M") if files else ""


def describe(stage: str, run: Path) -> dict | None:
    """One row for a run dir (the stage's own describe, plus name and date), or None if the folder is not a run of that stage.
    A folder whose files cannot be read is a row that says why (one bad folder must not hide the others)."""
    try:
        found = registry.load(registry.stage(stage).describe)(run)
    except DAMAGE as e:  # whatever damage one folder holds, the other rows are shown (a bug of ours still raises)
        reason = str(e) if isinstance(e, SiimError) else f"{run}: {type(e).__name__}: {e}"
        LOGGER.warning(f"siimcovid runs: unreadable run: {reason}")
        found = {"cv": "unreadable: " + reason.replace(f"{run}{os.sep}", "").replace(f"{run}: ", "")}
    if not found:
        return None
    unknown = set(found) - set(ROW_FIELDS)
    if unknown:
        raise SiimError(f"the describe function of stage {stage} returned unknown field(s) {sorted(unknown)}")
    row = {"stage": stage, "name": run.name, **dict.fromkeys(ROW_FIELDS, ""), "cv_value": math.nan}
    row.update(found)
    row["date"] = newest_date(run)
    return row


def chosen_stages(stages) -> list[str]:
    known = registry.with_runs()
    chosen = known if stages in (None, "all", ["all"]) else as_list(stages)
    bad = [s for s in chosen if s not in known]
    if bad:
        raise SiimError(f"stage must be all or among {known}, got {bad}")
    return chosen


def list_runs(project: str | Path = "runs", stages=None) -> pd.DataFrame:
    project = Path(project)
    rows = []
    for stage in chosen_stages(stages):
        folder = project / registry.stage(stage).folder
        for run in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
            row = describe(stage, run)
            if row:
                rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def main(cfg: Config) -> pd.DataFrame:
    table = list_runs(cfg.project, cfg.stage)
    table = table.sort_values(["stage", "cv_value" if cfg.sort == "cv" else "date"], na_position="first", kind="stable")
    if cfg.format == "csv":
        print(table.to_csv(index=False), end="")
    elif cfg.format == "json":
        print(table.to_json(orient="records", indent=1))
    elif table.empty:  # format=table
        print(f"no runs under {cfg.project}/")
    else:
        print(table.drop(columns=["cv_value"]).to_string(index=False, max_colwidth=60))
    return table
