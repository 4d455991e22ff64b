"""The fold engine: `train(family)` and `predict(family, ...)` for every model family (siimcovid.engine.family).

train, for the folds of `fold=`:
1. the family opens its data and checks its settings; `extra=` folders and `init=` (a run of the same family: its
   fold init_fold's best checkpoint, or a checkpoint file) are resolved, and an init= run trained on these very folds
   is refused (its out-of-fold scores would be optimistic); engine=ray's device settings are checked;
2. the run folder and each fold folder follow the outputs rule (siimcovid.rundir) before anything is written;
3. folds trained before are skipped (done) or resumed (partial) only when the settings that change what a fold learns
   are the ones they were trained with (else one error naming them); resume=false trains them again from scratch,
   removing only the family's own files (FoldFiles.fold_files); the temporaries a kill left are removed first;
4. the run's settings are saved (the record that makes the folder ours), then each fold trains, here one after the
   other (engine=serial) or each as a Ray task (engine=ray, siimcovid.ray_engine) running the same per-fold function,
   so skip and resume are the same on both; the family's done marker is the last file of the fold's training (the
   on_train_end event after it writes only tracking: a TensorBoard summary, MLflow's copies).

predict: every trained fold's model on its own held-out images (oof) and on the test images (test), the family's
table per fold joined by the family (e.g. the test mean over folds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from siimcovid import rundir
from siimcovid.engine import devices
from siimcovid.engine.events import merge
from siimcovid.engine.family import Family, FoldData, Job
from siimcovid.utils import LOGGER, SiimError


def resolve_init(family: Family, init: Any, init_fold: int) -> Path:
    """init=: a run folder of the family's stage (its fold init_fold's best checkpoint) or a checkpoint file."""
    path = Path(str(init))
    files = family.files
    if path.is_dir():
        if not (path / files.settings).is_file():
            raise SiimError(
                f"init={init}: not a {family.stage} run dir (no {files.settings}) and not a {Path(files.best).suffix} file"
            )
        path = files.checkpoint(rundir.fold_dir(path, init_fold))
    if not path.is_file():
        raise SiimError(f"init={init}: {path} not found (train that run's fold {init_fold} first, or give init_fold=)")
    return path.resolve()


def init_run(path: Path, family: Family) -> Path:
    """The run folder an init= checkpoint belongs to (<run>/fold<k>/<best>)."""
    return Path(path).parents[len(Path(family.files.best).parts)]


def check_engine(family: Family) -> None:
    cfg = family.cfg
    if cfg.get("engine") == "ray":
        from siimcovid.ray_engine import import_ray

        import_ray()
        devices.check_ray(cfg.device, cfg.gpus_per_fold, family.world.world)


def resolve_inputs(family: Family, data: FoldData) -> None:
    """extra= and init= as resolved paths (in the settings: a re-run from elsewhere compares what was trained)."""
    from siimcovid.data.extra import extra_roots

    cfg = family.cfg
    cfg.extra = [str(p) for p in extra_roots(cfg.extra)]
    if cfg.get("init"):
        path = resolve_init(family, cfg.init, cfg.init_fold)
        rundir.refuse_init_on_same_folds(cfg.init, init_run(path, family), data.folds_id, family.files.settings)
        family.check_init(path)
        family.init_path, cfg.init = path, str(Path(cfg.init).resolve())
    data.sources += [*cfg.extra, cfg.get("init")]


def check_folders(family: Family, run_dir: Path, data: FoldData) -> None:
    """The outputs rule for the run folder and each fold folder it trains, before anything is written."""
    files, cfg = family.files, family.cfg
    own = rundir.check_run_dir(run_dir, files.settings, cfg.overwrite, data.sources)
    if not own:
        rundir.refuse_existing(run_dir, files.run, family.stage)
    for k in data.folds:
        folder = rundir.fold_dir(run_dir, k)
        rundir.check_fold_dir(folder, family.own_fold(folder, own), files.fold_files, cfg.overwrite, family.stage)


def same_init(family: Family, old, old_fold) -> bool:
    """Whether a recorded init= names the checkpoint this run's init= resolved to (a run folder or its checkpoint: the
    release before recorded detect's as the checkpoint file)."""
    try:
        return resolve_init(family, old, old_fold) == family.init_path
    except SiimError:
        return False


def check_changed(family: Family, run_dir: Path, data: FoldData, states: dict[int, str]) -> None:
    """Refuse to skip or resume folds trained with other settings (their scores would be reported under settings they
    never saw): once a fold trained, every setting but the runtime ones, and what the run learned (its family, its fold
    fingerprint, ...), must be what the run folder recorded. resume=false trains them again: nothing to refuse."""
    from siimcovid.config import runtime_keys
    from siimcovid.engine.distill import same_teachers

    files, cfg = family.files, family.cfg
    if not cfg.get("resume", True) or (all(s == "new" for s in states.values()) and not rundir.trained_any(run_dir, files.last)):
        return
    old = rundir.read_run(run_dir / files.settings)
    if old.get("init") and cfg.get("init") and same_init(family, old["init"], old.get("init_fold", cfg.get("init_fold"))):
        # the same checkpoint, named another way (the release before recorded detect's init= as its checkpoint file,
        # and as its `pretrained`)
        old = {k: v for k, v in old.items() if k != "init" and not (k == "pretrained" and v == old["init"])}
    new = {**settings(family), **family.learned(data)}
    # fold= picks which folds this command trains (one fold per job, each its own command): never a change
    ignore = runtime_keys(family.stage) | {"mode", "fold", "distill_teachers", *family.derived}
    changed = rundir.changed_settings(old, new, ignore=ignore)
    teachers = old.get("distill_teachers"), new.get("distill_teachers")
    if "distill_teachers" in old and "distill_teachers" in new and not same_teachers(*teachers):
        changed.append(("distill_teachers", *teachers))  # a teacher's fold finished since is no change
    note = " (folds_id: the prepared folds changed since)" if any(k == "folds_id" for k, _, _ in changed) else ""
    again = "resume=false, " if "resume" in cfg else ""
    rundir.refuse_changed(run_dir, changed, f"use another name=, {again}or delete {run_dir} to train it again{note}")


def fold_states(family: Family, run_dir: Path, folds: list[int]) -> dict[int, str]:
    """Each fold's state; resume=false: every fold "new" (trained again from scratch)."""
    if not family.cfg.get("resume", True):
        return dict.fromkeys(folds, "new")
    return {k: family.fold_state(rundir.fold_dir(run_dir, k)) for k in folds}


def run_fold(family: Family, job: Job) -> Any:
    """One fold: skipped when done, else its temporaries removed (resume=false: its own files too), then trained."""
    files, world = family.files, family.world
    if job.state == "done":
        if world.is_main:
            LOGGER.info(f"{family.stage}: {job.folder} is finished, skipping (delete it to train again)")
        return family.skipped(job)
    if world.is_main:  # a kill's temporaries (a checkpoint each); resume=false: the fold's own files too
        rundir.remove_fold_files(job.folder, files.fold_files, temporaries_only=family.cfg.get("resume", True))
    world.barrier()
    if world.is_main and files.copy_settings and job.record is not None:  # the fold folder's trace: ours
        job.folder.mkdir(parents=True, exist_ok=True)
        rundir.write_run(job.folder / files.settings, family.stage, *job.record)
    world.barrier()
    return family.train_fold(job)


def ray_fold(family: Family, job: Job) -> Any:
    """One fold as a Ray task: run_fold on the task's GPUs. The state is read here, not taken from the driver: a
    task run again after its process died resumes what the dead one left."""
    from siimcovid.ray_engine import task_gpus

    job.device = family.task_device(task_gpus())
    family.start_task(job.device)
    try:
        job.state = family.fold_state(job.folder)
        return run_fold(family, job)
    finally:
        family.stop()


def dispatch(family: Family, jobs: dict[int, Job]) -> dict[int, Any]:
    """Every fold's run_fold: one after another here, or (engine=ray) the finished ones here, the others as tasks."""
    cfg = family.cfg
    if cfg.get("engine") != "ray":
        return {k: run_fold(family, job) for k, job in jobs.items()}
    from siimcovid.ray_engine import run_folds

    done = {k: run_fold(family, job) for k, job in jobs.items() if job.state == "done"}
    if not cfg.get("resume", True):  # cleared here once, so that a task Ray runs again resumes, not restarts
        for job in jobs.values():
            rundir.remove_fold_files(job.folder, family.files.fold_files)
    todo = {k: (family.for_task(), job) for k, job in jobs.items() if k not in done}
    if todo:
        done.update(run_folds(ray_fold, todo, cfg.ray_address, cfg.gpus_per_fold, cfg.cpus_per_fold, family.stage))
    return {k: done[k] for k in jobs}


def settings(family: Family) -> dict:
    """The settings a run saves: a valid cfg= (the mode the command line adds is what the run learned)."""
    return {k: v for k, v in family.cfg.items() if k != "mode"}


def save_settings(family: Family, run_dir: Path, data: FoldData) -> None:
    """The run's settings and what it learned, the record that makes the folder ours (main process only)."""
    if family.world.is_main:
        rundir.write_run(run_dir / family.files.settings, family.stage, settings(family), family.learned(data))


def train(family: Family, callbacks: dict[str, Callable | list] | None = None) -> dict[int, Any]:
    """Train the family's folds (module docstring); callbacks: {event: fn or [fn, ...]} added to every fold."""
    family.start()
    try:
        data = family.open_data()
        resolve_inputs(family, data)
        family.check(data)
        lungs = family.lung_boxes(data.folds_id)  # crop=lung: its lung run read and checked before anything is written
        if lungs is not None and lungs.oof_sha256:  # what the training crops come from: a resume must crop with the same
            data.learned["lung_oof_sha256"] = lungs.oof_sha256
        check_engine(family)
        cfg = family.cfg
        tracking = family.tracking()  # a tracking store that cannot be opened stops here, before anything is written
        cfg.name = cfg.name or data.name
        run_dir = (Path(cfg.project) / cfg.name).resolve() if family.resolve_run_dir else Path(cfg.project) / cfg.name
        check_folders(family, run_dir, data)
        states = fold_states(family, run_dir, data.folds)
        family.check_resume(run_dir, data, states)
        check_changed(family, run_dir, data, states)
        save_settings(family, run_dir, data)  # the record first: a kill in what follows leaves a folder ours
        data.learned.update(family.before_folds(run_dir, data, data.folds))
        save_settings(family, run_dir, data)
        hooks = merge(family.callbacks(data), tracking, callbacks)
        folder = lambda k: rundir.fold_dir(run_dir, k)  # noqa: E731
        record = settings(family), family.learned(data)
        jobs = {k: Job(k, folder(k), run_dir, states[k], hooks, cfg.device, record) for k in data.folds}
        results = dispatch(family, jobs)
        family.report(run_dir, data, results)
        return results
    finally:
        family.stop()


def load_packed(family: Family, path: Path, device):
    """A fold of a bundle's member: its safetensors (the sha256 open_bundle checked) -> family.from_state."""
    from siimcovid import weights

    desc, sha256 = family.packed[path]
    return family.from_state(weights.load_state(Path(path), f"{family.stage}/{Path(path).name}", sha256), desc, device)


def predict(family: Family, data, checkpoints: dict[int, Path], splits: list[str], device) -> dict[str, Any]:
    """Each fold's model (loaded once) on its held-out images (oof) and the test images; {split: joined table}.

    data: what the family predicts on (it gives `oof_ids(fold)` and `test_ids()`); checkpoints: {fold: file}.
    """
    family.lung_boxes(None)  # crop=lung: read (or refused for a family without views) before the first fold
    parts: dict[str, list] = {s: [] for s in splits}
    test_ids = family.test_ids(data) if "test" in splits else []
    for k, path in checkpoints.items():
        model = load_packed(family, path, device) if path in family.packed else family.load_fold(data, k, path, device)
        if "oof" in splits:
            parts["oof"].append(family.predict_images(model, data, k, family.oof_ids(data, k), "train"))
        if "test" in splits:
            parts["test"].append(family.predict_images(model, data, k, test_ids, "test"))
    return {s: family.join(data, p, s) for s, p in parts.items()}


def predict_run(family: Family, run_dir: Path, split: str, device, source=None, allow_unfinished=False, weights="best"):
    """A finished run of the family on oof or test (source: another prepared folder's test split): the split's table
    through `predict`, its `model` column the run's name; folds still training refused unless allow_unfinished."""
    from siimcovid.data.prepared import Prepared

    record = rundir.read_run(Path(run_dir) / family.files.settings)
    prep = Prepared(source or record.get("data") or record["prepared"])
    if split == "oof":
        prep.check_folds(record.get("folds_id"), str(run_dir))
    done = lambda folder: family.fold_state(folder) == "done"  # noqa: E731
    relative = family.files.checkpoint(Path(), weights).as_posix()
    found = rundir.fold_checkpoints(run_dir, relative, done, allow_unfinished, family.stage)
    return predict(family, prep, found, [split], device)[split].assign(model=Path(run_dir).name)
