"""kill -9 `detect train` anywhere: the re-run resumes (any number of times) to a fold like an uninterrupted one.

The slow test starts `python -m siimcovid detect train` (through HOOK, which can kill it in the middle of writing
last.pt) in its own process group and kills the group at seeded random moments; the fast ones check the pieces
without training: the settings check of a resumed fold, the atomic checkpoint writes, the trimming of results.csv.

What is identical to an uninterrupted run: the epochs in results.csv (1..epochs, each once), the rows of the epochs
trained before the first kill (but for Ultralytics' `time` column), the settings in args.yaml (but model=, which a
resume sets to the fold's last.pt: args_start.yaml keeps the first), and the finished state. What is not: the
weights and the metrics of the epochs after a resume. Ultralytics does not save its random state in last.pt, so a
resumed epoch draws other batches and augmentations (two uninterrupted runs are identical to the last bit).
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from siimcovid import cli
from siimcovid.detect import train as train_module
from siimcovid.detect.common import fold_state
from siimcovid.utils import SiimError

ROOT = Path(__file__).parents[1]
EPOCHS = 4
TINY = ["model=yolov5n.yaml", "pretrained=false", "imgsz=64", "batch=8", "workers=0", "device=cpu", "plots=false"]

# `python -m siimcovid` that, with KILL_AT_SAVE=n, kills its own process group in the middle of the n-th write of
# last.pt (half of the bytes written): the moment an in-place write leaves a truncated checkpoint.
HOOK = """
import os, pathlib, signal
n, seen, write = int(os.environ.get("KILL_AT_SAVE", "0")), [], pathlib.Path.write_bytes
def write_bytes(self, data):
    if self.name == "last.pt" or self.name.startswith(".last."):  # in place, or the temporary file of an atomic write
        seen.append(self)
        if len(seen) == n:
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
            os.killpg(os.getpgid(0), signal.SIGKILL)
    return write(self, data)
pathlib.Path.write_bytes = write_bytes
from siimcovid.cli import entrypoint
entrypoint()
"""


def start(args: list[str], log: Path, kill_at_save: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_AT_SAVE": str(kill_at_save)}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", HOOK, *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < end, f"no {what} after {timeout} s"
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its kill"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def rows(csv: Path) -> int:
    """Whole rows of results.csv (a row is whole once its newline is written)."""
    return max(csv.read_text().count("\n") - 1, 0) if csv.is_file() else 0


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_nothing_looks_finished_early(fold: Path) -> str:
    """After a kill: every checkpoint reads whole, and the fold looks done only once every epoch was trained."""
    state = fold_state(fold)  # raises on a truncated last.pt
    for name in ("last.pt", "best.pt"):
        if (fold / "weights" / name).is_file():
            checkpoint(fold / "weights" / name)
    if state != "new":
        epoch = checkpoint(fold / "weights" / "last.pt")["epoch"]
        done_epochs = EPOCHS if epoch < 0 else epoch + 1
        assert rows(fold / "results.csv") >= done_epochs  # its row is written before its checkpoint
        assert (state == "done") == (done_epochs == EPOCHS)
    return state


@pytest.mark.slow
def test_detect_train_killed_anywhere_resumes_to_a_finished_fold(prepared, tmp_path, monkeypatch):
    rng = random.Random(10)
    common = ["detect", "train", f"data={prepared}", "fold=0", f"epochs={EPOCHS}", *TINY, f"project={tmp_path}"]
    killed = [*common, "name=killed"]
    fold = tmp_path / "killed" / "fold0"
    csv, last = fold / "results.csv", fold / "weights" / "last.pt"
    reference = start([*common, "name=reference"], tmp_path / "reference.log")  # uninterrupted, alongside

    # kill 1: in the middle of writing epoch 2's last.pt (what truncated it before the writes were atomic)
    run = start(killed, tmp_path / "kill1.log", kill_at_save=2)
    assert run.wait(timeout=300) == -signal.SIGKILL
    half_written = list((fold / "weights").glob(".last.*.tmp.pt"))
    assert half_written  # the half-written temporary file: the kill was mid-write
    assert assert_nothing_looks_finished_early(fold) == "partial"
    assert checkpoint(last)["epoch"] == 0  # epoch 1 is safe; epoch 2 is the one lost
    assert rows(csv) == 2  # epoch 2's row came before its checkpoint: the resume drops it

    # kill 2: at a seeded random moment after the resumed run finished epoch 3's row (its checkpoint may be next)
    run = start(killed, tmp_path / "kill2.log")
    wait_for(run, lambda: rows(csv) >= 3, "epoch 3")
    time.sleep(rng.uniform(0, 0.5))
    kill(run)
    assert not any(p.exists() for p in half_written)  # the resume cleared kill 1's (kill 2 may have left its own)
    assert "resuming" in (tmp_path / "kill2.log").read_text()
    assert assert_nothing_looks_finished_early(fold) == "partial"

    # kill 3: at a seeded random moment of the next resume's setup (args.yaml rewritten, dataset, results.csv trimmed)
    run = start(killed, tmp_path / "kill3.log")
    wait_for(run, lambda: "resuming" in (tmp_path / "kill3.log").read_text(), "the resume")
    time.sleep(rng.uniform(0, 2.0))
    kill(run)
    assert assert_nothing_looks_finished_early(fold) == "partial"

    # the same command to completion (here, to spare a start of Python): a third resume, not a new start
    trained = pd.read_csv(csv)
    trained = trained[trained.epoch <= checkpoint(last)["epoch"] + 1]
    cli.main(killed)
    pd.testing.assert_frame_equal(pd.read_csv(csv).iloc[: len(trained)], trained)  # rows of its epochs so far, kept
    assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-2000:]
    ref_fold = tmp_path / "reference" / "fold0"

    # like the uninterrupted fold: a finished state, each epoch once, the same settings
    assert fold_state(fold) == fold_state(ref_fold) == "done"
    ours, theirs = pd.read_csv(csv), pd.read_csv(ref_fold / "results.csv")
    assert list(ours.epoch) == list(theirs.epoch) == list(range(1, EPOCHS + 1))
    # epoch 1 was trained before the first kill: its row is the reference's (but for the seconds it took)
    pd.testing.assert_series_equal(ours.iloc[0].drop("time"), theirs.iloc[0].drop("time"))
    ckpt, ref_ckpt = checkpoint(last), checkpoint(ref_fold / "weights" / "last.pt")
    assert ckpt["epoch"] == ref_ckpt["epoch"] == -1 and ckpt["optimizer"] is None
    paths = {"model", "resume", "project", "name", "save_dir"}
    started = yaml.safe_load((fold / "args_start.yaml").read_text())
    now = yaml.safe_load((fold / "args.yaml").read_text())
    ref_args = yaml.safe_load((ref_fold / "args.yaml").read_text())
    assert started["model"] == ref_args["model"] == "yolov5n.yaml" and Path(now["model"]) == last
    assert {k: v for k, v in now.items() if k not in paths} == {k: v for k, v in ref_args.items() if k not in paths}

    # re-running the finished command (after three resumes) skips it: nothing is trained, nothing refused
    from ultralytics.engine.model import Model

    monkeypatch.setattr(Model, "train", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    before = last.stat().st_mtime_ns
    cli.main(killed)
    assert last.stat().st_mtime_ns == before
    monkeypatch.undo()

    predicted = cli.main(["detect", "predict", f"run={tmp_path / 'killed'}", "device=cpu", "predict_imgsz=64", "split=oof"])
    assert predicted and (tmp_path / "killed" / "pred_oof.csv").is_file()
    assert set(pd.read_csv(tmp_path / "killed" / "pred_oof.csv").fold) <= {0}


# --- without training -------------------------------------------------------------------------------------


def fake_fold(tmp_path: Path, **args) -> Path:
    folder = tmp_path / "run" / "fold0"
    (folder / "weights").mkdir(parents=True)
    started = {"model": "yolov5n.yaml", "epochs": 4, "imgsz": 64, "batch": 8, "mosaic": 1.0, **args}
    (folder / "args.yaml").write_text(yaml.safe_dump(started))
    return folder


def test_a_resumed_fold_is_checked_against_the_settings_it_started_with(tmp_path, monkeypatch):
    folder = fake_fold(tmp_path)
    settings = {"epochs": 4, "imgsz": 64, "batch": 8, "mosaic": 1.0, "device": "cpu"}

    class ResumingYOLO:  # what Ultralytics' resume does to args.yaml
        def __init__(self, weights):
            self.weights = weights

        def train(self, **kwargs):
            args = yaml.safe_load((folder / "args.yaml").read_text())
            (folder / "args.yaml").write_text(yaml.safe_dump({**args, "model": str(self.weights), "resume": str(self.weights)}))

    monkeypatch.setattr(train_module, "YOLO", ResumingYOLO)
    stale = folder / "weights" / ".last.k3j2x.tmp.pt"  # left by a kill in the middle of a save
    stale.write_bytes(b"half")
    from siimcovid.config import load_config
    from siimcovid.detect.family import YoloFamily
    from siimcovid.engine.family import Job
    from siimcovid.engine.folds import run_fold

    family = YoloFamily(load_config("detect", {"device": "cpu"}))  # what the fold engine hands one fold
    family.args, family.model, family.yamls = settings, "yolov5n.yaml", {0: tmp_path / "d.yaml"}
    for _ in range(3):  # resumed three times (the second one used to be refused)
        train_module.check_fold_settings(folder, settings, "yolov5n.yaml")
        run_fold(family, Job(0, folder, tmp_path / "run", "partial", {}, "cpu"))
        assert not stale.exists()  # the fold engine removed what the kill left before resuming
    assert Path(yaml.safe_load((folder / "args.yaml").read_text())["model"]) == folder / "weights" / "last.pt"
    assert yaml.safe_load((folder / "args_start.yaml").read_text())["model"] == "yolov5n.yaml"  # kept from the first
    train_module.check_fold_settings(folder, settings, "yolov5n.yaml")  # finished: the plain re-run skips it
    with pytest.raises(SiimError, match=r"fold0 was trained with model=yolov5n.yaml \(now yolov5s.yaml\)"):
        train_module.check_fold_settings(folder, settings, "yolov5s.yaml")
    with pytest.raises(SiimError, match=r"fold0 was trained with epochs=4 \(now 5\)"):
        train_module.check_fold_settings(folder, {**settings, "epochs": 5}, "yolov5n.yaml")

    # weights deleted: the fold starts again, under settings of its own
    train_module.train_fold(settings, "yolov5s.yaml", tmp_path / "d.yaml", tmp_path / "run", 0, "map50", state="new")
    assert not (folder / "args_start.yaml").exists()


def test_a_fold_resumed_before_args_start_existed_goes_unchecked_in_its_model_only(tmp_path):
    # its only record of the model is the last.pt the resume put there (maybe from before the run moved)
    folder = fake_fold(tmp_path, model="/elsewhere/run/fold0/weights/last.pt")
    train_module.check_fold_settings(folder, {"epochs": 4}, "yolov5s.yaml")
    with pytest.raises(SiimError, match=r"epochs=4 \(now 3\)"):
        train_module.check_fold_settings(folder, {"epochs": 3}, "yolov5s.yaml")
    other = fake_fold(tmp_path / "b", model="/elsewhere/run/fold1/weights/last.pt")  # another fold's weights are a model
    with pytest.raises(SiimError, match=r"model=/elsewhere/run/fold1/weights/last.pt \(now yolov5s.yaml\)"):
        train_module.check_fold_settings(other, {"epochs": 4}, "yolov5s.yaml")


class Died(BaseException):
    """Stands for a kill: nothing after it runs (but a SIGKILL would not even clean up the temporary file)."""


def test_a_kill_while_saving_leaves_the_previous_checkpoints_whole(tmp_path, monkeypatch):
    from ultralytics.engine.trainer import BaseTrainer

    def ultralytics_save_model(self):  # how BaseTrainer.save_model writes (in place, last.pt first)
        self.wdir.mkdir(parents=True, exist_ok=True)
        self.last.write_bytes(self.data)
        self.best.write_bytes(self.data)
        (self.wdir / f"epoch{self.epoch}.pt").write_bytes(self.data)
        return True

    monkeypatch.setattr(BaseTrainer, "save_model", ultralytics_save_model)
    trainer = object.__new__(train_module.Map50Trainer)  # no training: only its save
    trainer.wdir = tmp_path / "fold0" / "weights"
    trainer.last, trainer.best = trainer.wdir / "last.pt", trainer.wdir / "best.pt"
    replaced = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst).name), replace(src, dst)))

    def save(epoch: int) -> None:
        trainer.epoch, trainer.data = epoch, pickled({"epoch": epoch})
        assert trainer.save_model() is True

    save(1)
    assert replaced == ["best.pt", "epoch1.pt", "last.pt"]  # last.pt last: it says the epoch is done
    assert trainer.last == tmp_path / "fold0" / "weights" / "last.pt" and type(trainer.last) is type(Path())
    umask = os.umask(0)
    os.umask(umask)
    assert {(p.stat().st_mode & 0o777) for p in trainer.wdir.iterdir()} == {0o666 & ~umask}  # as a plain write

    write = pathlib.Path.write_bytes

    def dies_half_way(self, data):
        if self.name.startswith(".last."):
            write(self, data[: len(data) // 2])
            raise Died
        return write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", dies_half_way)
    with pytest.raises(Died):
        save(2)
    assert checkpoint(trainer.last) == {"epoch": 1}  # the previous epoch's, whole
    assert checkpoint(trainer.best) == {"epoch": 2}  # written before: as of an epoch last.pt does not have yet
    assert sorted(p.name for p in trainer.wdir.iterdir()) == ["best.pt", "epoch1.pt", "epoch2.pt", "last.pt"]


def pickled(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_the_final_strip_of_the_optimizer_is_atomic(tmp_path, monkeypatch):
    import ultralytics.utils.torch_utils as torch_utils

    last = tmp_path / "last.pt"
    torch.save({"model": torch.nn.Linear(2, 2), "ema": None, "optimizer": {"lr": 0.1}, "epoch": 3, "train_args": {}}, last)
    before = last.read_bytes()
    save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise Died

    monkeypatch.setattr(torch_utils.torch, "save", dies_half_way)
    with pytest.raises(Died):
        train_module.strip_optimizer_atomically(last)
    assert last.read_bytes() == before and list(tmp_path.iterdir()) == [last]
    monkeypatch.setattr(torch_utils.torch, "save", save)
    stripped = train_module.strip_optimizer_atomically(last)
    assert stripped["epoch"] == checkpoint(last)["epoch"] == -1 and checkpoint(last)["optimizer"] is None
    other = tmp_path / "not_a_checkpoint.pt"
    other.write_bytes(b"text")
    assert train_module.strip_optimizer_atomically(other) == {} and other.read_bytes() == b"text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "not_a_checkpoint.pt"]


def test_a_resume_keeps_the_rows_of_results_csv_its_checkpoint_holds(tmp_path):
    csv = tmp_path / "results.csv"
    text = "epoch,time,loss\n1,0.5,0.9\n2,1.1,0.8\n3,1.6,0.7\n4,2.2,0."  # 3 after the checkpoint, 4 half-written
    csv.write_text(text)
    train_module.keep_epochs(csv, 3)
    assert csv.read_text() == "epoch,time,loss\n1,0.5,0.9\n2,1.1,0.8\n3,1.6,0.7\n"
    train_module.keep_epochs(csv, 3)  # nothing to trim: untouched
    assert csv.read_text() == "epoch,time,loss\n1,0.5,0.9\n2,1.1,0.8\n3,1.6,0.7\n"
    train_module.keep_epochs(csv, 2)
    assert csv.read_text() == "epoch,time,loss\n1,0.5,0.9\n2,1.1,0.8\n"
    train_module.keep_epochs(csv, 0)  # a new start after a kill before the first checkpoint
    assert not csv.exists()
    train_module.keep_epochs(csv, 0)  # and no file: nothing to do
    assert not csv.exists()
