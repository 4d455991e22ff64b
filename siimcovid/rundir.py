"""What every run folder shares: its fold folders, each fold's files, the "has every fold finished
training?" check before predicting, and the "were these folds trained with other settings?" check
that guards skip and resume in detect and classify.

A run of a per-fold stage is <project>/<name>/ with one folder fold<k>/ per trained fold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from siimcovid.utils import SiimError


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    """The folder of fold k of a run: <run_dir>/fold<k>."""
    return Path(run_dir) / f"fold{fold}"


def fold_numbers(run_dir: str | Path) -> list[int]:
    """The k of every fold<k>/ folder of a run, sorted."""
    return sorted(int(p.name[4:]) for p in Path(run_dir).glob("fold*") if p.is_dir() and p.name[4:].isdigit())


def fold_files(run_dir: str | Path, relative: str) -> dict[int, Path]:
    """{k: fold<k>/<relative>} for the folds where that file exists (e.g. relative="weights/best.pt")."""
    found = {k: fold_dir(run_dir, k) / relative for k in fold_numbers(run_dir)}
    return {k: p for k, p in found.items() if p.is_file()}


def check_finished(
    run_dir: str | Path, found: Mapping[int, Path], is_done: Callable[[Path], bool], allow_unfinished: bool, stage: str
) -> None:
    """Refuse to predict with folds still training (or killed), unless allow_unfinished.

    found: {k: checkpoint} of the folds to predict with; is_done(fold folder) says whether fold k finished;
    stage: the stage whose `train` finishes them (detect, classify).
    """
    unfinished = [k for k in found if not is_done(fold_dir(run_dir, k))]  # asked even when allowed: it may fail
    if unfinished and not allow_unfinished:
        raise SiimError(
            f"{run_dir}: folds {unfinished} have not finished training: re-run `siimcovid {stage} train` to finish them, "
            "or predict with their checkpoints so far with allow_unfinished=true"
        )


def fold_checkpoints(
    run_dir: str | Path, relative: str, is_done: Callable[[Path], bool], allow_unfinished: bool, stage: str
) -> dict[int, Path]:
    """{k: fold<k>/<relative>} of every fold that has that checkpoint (e.g. "weights/best.pt"): an error when
    no fold has one, or when one of them has not finished training and allow_unfinished is false."""
    found = fold_files(run_dir, relative)
    if not found:
        raise SiimError(f"{run_dir} has no trained fold (no fold<k>/{relative}): run `siimcovid {stage} train` first")
    check_finished(run_dir, found, is_done, allow_unfinished, stage)
    return found


def same_value(a: Any, b: Any) -> bool:
    """Equal as settings: numbers within rounding (1e-3 == 0.001), everything else as text."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def changed_settings(old: Mapping, new: Mapping, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of the settings both hold that differ, but for `ignore`."""
    ignore = set(ignore)
    return [(k, old[k], v) for k, v in new.items() if k in old and k not in ignore and not same_value(old[k], v)]


def refuse_changed(where: str | Path, changed: list[tuple[str, Any, Any]], advice: str) -> None:
    """Stop before skipping or resuming folds trained with other settings: their scores would be
    reported under settings they never saw."""
    if changed:
        diff = ", ".join(f"{k}={a} (now {b})" for k, a, b in changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise SiimError(f"{where} was trained with {diff}: {advice}")


PREDICT_SETTINGS = "predict.yaml"  # <run>/predict.yaml: the settings of the run's latest own predictions


def save_predict_settings(run_dir: str | Path, settings: Mapping[str, Any]) -> Path:
    """Record the settings that made the prediction tables now in the run folder (what `export` packs)."""
    import yaml

    from siimcovid.utils import atomic_write_text

    return atomic_write_text(Path(run_dir) / PREDICT_SETTINGS, yaml.safe_dump(dict(settings), sort_keys=False))


def saved_predict_settings(run_dir: str | Path) -> dict:
    """The settings save_predict_settings recorded; {} when the run's predict saved none (older runs)."""
    import yaml

    path = Path(run_dir) / PREDICT_SETTINGS
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def refuse_init_on_same_folds(init: Any, init_run: Path, folds_id: str | None, config_name: str) -> None:
    """init= a run trained on these very folds: fold k would start from a model that trained on fold k's validation
    images (every fold from fold init_fold's), and its out-of-fold scores would be optimistic. Refused."""
    import yaml

    saved = Path(init_run) / config_name
    recorded = (yaml.safe_load(saved.read_text()) or {}).get("folds_id") if saved.is_file() else None
    if folds_id and recorded == folds_id:
        raise SiimError(
            f"init={init} was trained on the same folds as this run's data: every fold would start from a model that "
            "saw that fold's validation images (an optimistic out-of-fold score). init= a pretraining run (another data set)"
        )
