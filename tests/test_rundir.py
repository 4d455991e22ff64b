"""siimcovid.rundir: fold folders, their checkpoints and the "has every fold finished?" check (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from siimcovid import rundir
from siimcovid.utils import SiimError


def fake_run(root: Path, checkpoints: dict[int, bool]) -> Path:
    """A run folder with fold<k>/best.pt for each k, and fold<k>/done for the finished ones."""
    run = root / "run"
    for k, done in checkpoints.items():
        folder = rundir.fold_dir(run, k)
        folder.mkdir(parents=True)
        (folder / "best.pt").write_text("weights")
        if done:
            (folder / "done").write_text("")
    (run / "fold9").mkdir()  # a fold folder without a checkpoint (a fold that never saved one)
    return run


def is_done(folder: Path) -> bool:
    return (folder / "done").is_file()


def test_fold_dir_is_the_one_spelling_of_a_fold_folder(tmp_path):
    assert rundir.fold_dir(tmp_path, 3) == tmp_path / "fold3"
    assert rundir.fold_dir(str(tmp_path), 0) == tmp_path / "fold0"  # a str run folder too
    rundir.fold_dir(tmp_path, 12).mkdir()
    assert rundir.fold_numbers(tmp_path) == [12]


def test_fold_checkpoints_of_finished_folds(tmp_path):
    run = fake_run(tmp_path, {0: True, 2: True})
    found = rundir.fold_checkpoints(run, "best.pt", is_done, False, "classify")
    assert found == {0: run / "fold0" / "best.pt", 2: run / "fold2" / "best.pt"}


def test_an_unfinished_fold_is_refused_unless_allowed(tmp_path):
    run = fake_run(tmp_path, {0: True, 1: False, 2: False})
    with pytest.raises(SiimError, match=r"folds \[1, 2\] have not finished training: re-run `siimcovid detect train`"):
        rundir.fold_checkpoints(run, "best.pt", is_done, False, "detect")
    assert list(rundir.fold_checkpoints(run, "best.pt", is_done, True, "detect")) == [0, 1, 2]


def test_no_checkpoint_is_an_error_naming_the_file_and_the_stage(tmp_path):
    run = fake_run(tmp_path, {0: True})
    with pytest.raises(SiimError, match=r"has no trained fold \(no fold<k>/last.pt\): run `siimcovid classify train` first"):
        rundir.fold_checkpoints(run, "last.pt", is_done, True, "classify")


def test_check_finished_asks_every_fold_even_when_unfinished_ones_are_allowed(tmp_path):
    # the predicate may itself fail (detect: a truncated last.pt); allow_unfinished does not hide that
    run = fake_run(tmp_path, {0: True, 1: False})
    asked = []

    def broken(folder: Path) -> bool:
        asked.append(folder.name)
        raise SiimError(f"{folder} cannot be read")

    with pytest.raises(SiimError, match="fold0 cannot be read"):
        rundir.check_finished(run, {0: run / "fold0" / "best.pt"}, broken, True, "detect")
    assert asked == ["fold0"]
    rundir.check_finished(run, {0: run / "fold0" / "best.pt"}, is_done, False, "detect")  # finished: no error


def test_a_run_settings_file_of_the_release_before_is_read_as_it_is(tmp_path):
    import yaml

    from siimcovid.config import load_config
    from siimcovid.rundir import is_run_config, read_run, write_run

    old = tmp_path / "old" / "classify.yaml"  # the release before: settings and what it recorded, at the top level
    old.parent.mkdir()
    old.write_text(yaml.safe_dump({"model": "resnet18", "imgsz": 64, "folds_id": "abc", "mode": "train"}))
    assert read_run(old) == {"model": "resnet18", "imgsz": 64, "folds_id": "abc", "mode": "train"} and is_run_config(old)
    again = load_config("classify", [f"cfg={old}"])  # still seeds the next run: what it recorded is left out
    assert again.model == "resnet18" and "folds_id" not in again and "mode" not in again
    flat = tmp_path / "prepare.yaml"
    flat.write_text(yaml.safe_dump({"sizes": [64], "n_folds": 3, "data_resolved": "/data/siim"}))
    assert load_config("prepare", [f"cfg={flat}"]).sizes == [64]

    new = write_run(tmp_path / "new" / "classify.yaml", "classify", {"model": "resnet18", "imgsz": 64}, {"folds_id": "abc"})
    assert yaml.safe_load(new.read_text()) == {"classify": {"model": "resnet18", "imgsz": 64}, "learned": {"folds_id": "abc"}}
    assert read_run(new) == {"model": "resnet18", "imgsz": 64, "folds_id": "abc"} and is_run_config(new)
    cfg = load_config("classify", [f"cfg={new}"])  # a valid cfg= as it is: the settings come back, not what it learned
    assert cfg.model == "resnet18" and cfg.imgsz == 64 and "folds_id" not in cfg
    mine = tmp_path / "mine.yaml"  # a user's settings file of that name: not a run's record
    mine.write_text(yaml.safe_dump({"classify": {"model": "resnet18"}, "learned": {"note": "mine"}}))
    assert not is_run_config(mine) and not is_run_config(tmp_path / "missing.yaml")
