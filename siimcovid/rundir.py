"""What every run folder shares: its fold folders, each fold's files, the "has every fold finished
training?" check before predicting, and the "were these folds trained with other settings?" check
that guards skip and resume in detect and classify.

A run of a per-fold stage is <project>/<name>/ with one folder fold<k>/ per trained fold.

The outputs rule (siimcovid.outputs) for run folders: a run folder's record is its run config (classify.yaml,
detect.yaml: is_run_config), a fold folder's the stage's own trace in it (classify: fold<k>/classify.yaml;
detect: the args.yaml Ultralytics wrote for fold<k>). A training writes only into a run folder that is new, empty or
its own (check_run_dir), and into fold folders that are new, hold only empty folders, or are its own (check_fold_dir);
overwrite=true lets it write beside other files, never over them (refuse_existing). A fold started again loses only
the stage's own files (remove_fold_files).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from siimcovid.utils import SiimError, atomic_temporaries


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


def trained_any(run_dir: str | Path, checkpoint: str) -> bool:
    """Whether some fold of the run trained an epoch (holds its `checkpoint`, e.g. "last.pt"): before that, the run's
    saved settings describe nothing trained, and a corrected command may replace them (a check that stopped the
    first start must not hold the name to its settings)."""
    return bool(fold_files(run_dir, checkpoint))


RUN_FOLDER = "project/name"  # the settings that name a run folder, as its messages name them


LEARNED = "learned"  # the section of a run's settings file that holds what the run learned (write_run)


def write_run(path: str | Path, stage: str, settings: Mapping, learned: Mapping) -> Path:
    """A run's settings file: {<stage>: the settings, learned: what the run learned from its data (the mode, the fold
    fingerprint folds_id, resolved inputs, ...)}. The file is a valid cfg= as it is (cfg= reads a file's <stage>
    section), and its `learned` section makes it the record of a run folder (is_run_config)."""
    from siimcovid.config import Config

    return Config({stage: dict(settings), LEARNED: dict(learned)}).save(path)


def read_run(path: str | Path) -> dict:
    """A run's settings and what it learned, as one mapping (write_run); an earlier release's file held both at its
    top level, and is read as it is. {} when there is no such mapping."""
    from siimcovid.outputs import read_mapping

    return merge_run(read_mapping(path) or {})


def merge_run(data: Mapping) -> dict:
    """A run's settings file's mapping (write_run) -> its settings and what it learned as one mapping."""
    sections = [v for k, v in data.items() if k != LEARNED and isinstance(v, Mapping)]
    if isinstance(data.get(LEARNED), Mapping) and len(sections) == 1 and len(data) == 2:
        return {**sections[0], **data[LEARNED]}
    return dict(data)


def is_run_config(path: str | Path) -> bool:
    """Whether `path` holds a run's settings as `classify train` / `detect train` saved them (the record of a run
    folder): a mapping whose learned section records the folds' fingerprint (folds_id, which only a training records;
    an earlier release recorded it at the top level). A user's file of that name (a cfg= of their own, another tool's
    settings) is not one."""
    return "folds_id" in read_run(path)


def check_run_dir(run_dir: str | Path, config_name: str, overwrite: bool, sources: Iterable = ()) -> bool:
    """The outputs rule for a run folder, before anything is written there (module docstring); True when it is the
    stage's own run. Never the root, the home folder or a folder holding an input; a `config_name` there that no
    training saved is refused even with overwrite=true (the run would save its settings over it)."""
    from siimcovid.outputs import check_out, check_place

    config = Path(run_dir) / config_name
    if os.path.lexists(config):
        if not is_run_config(config):
            raise SiimError(f"{config} is not a run's settings file siimcovid wrote: move it away or choose another name=")
        check_place(run_dir, sources, RUN_FOLDER)
        return True
    check_out(run_dir, config_name, overwrite, sources, RUN_FOLDER)
    return False


def first_file(folder: str | Path) -> str | None:
    """The relative path of a file (or link) under `folder`, or None when it holds only empty folders (a kill can leave
    a fold's folders before its first file)."""
    for top, dirs, files in os.walk(folder):  # links to folders are listed, never followed
        dirs.sort()
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        for name in sorted(files) + links:
            return Path(os.path.relpath(os.path.join(top, name), folder)).as_posix()
    return None


def refuse_existing(folder: str | Path, outputs: Iterable[str], stage: str) -> None:
    """Refuse `folder` when it holds one of the `outputs` a training writes (names or glob patterns, relative to it) and
    that the stage's record does not make its own: siimcovid writes beside a user's files, never over them."""
    folder = Path(folder)
    for pattern in outputs:
        for path in sorted(folder.glob(pattern)):
            raise SiimError(
                f"{path} is not a file siimcovid {stage} wrote, and training writes that name: move it away or choose "
                "another name="
            )


def check_fold_dir(folder: str | Path, own: bool, outputs: Iterable[str], overwrite: bool, stage: str) -> None:
    """The outputs rule for a fold folder a training will write into (module docstring): `own` when the stage's record
    says it made it; another folder holding files is refused unless overwrite=true, and then where it holds one of
    the `outputs` (refuse_existing)."""
    folder = Path(folder)
    if own or not os.path.lexists(folder):
        return
    if not folder.is_dir() or folder.is_symlink():
        raise SiimError(f"{folder} is a file or a link, not a fold folder siimcovid made: move it away or choose another name=")
    found = first_file(folder)
    if found is None:
        return
    if not overwrite:
        raise SiimError(
            f"{folder} holds files siimcovid did not write (e.g. {found}): choose another name=, or give overwrite=true "
            "to train beside them"
        )
    refuse_existing(folder, outputs, stage)


def remove_fold_files(folder: str | Path, names: Iterable[str], temporaries_only: bool = False) -> list[str]:
    """A fold started again: the stage's own files (`names`) and their temporaries removed, nothing else (a user's
    file beside them stays); temporaries_only: those of a kill, before a resume. The names removed."""
    import glob

    names, folder = list(names), Path(folder)
    plain = [n for n in names if not glob.has_magic(n)]
    temporaries = [t for n in plain for t in atomic_temporaries(folder / n)]  # as large as a checkpoint each
    own = [folder / n for n in plain] + [p for n in names if glob.has_magic(n) for p in sorted(folder.glob(n))]
    found = temporaries + ([] if temporaries_only else own)  # a pattern (events.out.tfevents.*): its files, never a folder
    gone = [p for p in found if p.is_file() or p.is_symlink()]
    for path in gone:
        path.unlink()
    return [p.name for p in gone]


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
    recorded = read_run(Path(init_run) / config_name).get("folds_id")
    if folds_id and recorded == folds_id:
        raise SiimError(
            f"init={init} was trained on the same folds as this run's data: every fold would start from a model that "
            "saw that fold's validation images (an optimistic out-of-fold score). init= a pretraining run (another data set)"
        )
