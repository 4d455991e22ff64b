"""family=torchvision killed and resumed: `detect train` killed (SIGKILL of its process group) once its first epoch's
last.pt is written, then the same command resumes the fold from that epoch, to the fold of a run never killed.

On the CPU the torchvision fold is deterministic (the batches and flips seeded per epoch, torch's random state, which
the RPN's and ROI heads' samplers draw from, in last.pt), so the resumed fold is the uninterrupted one to the last bit:
the same rows in results.csv (but the seconds), the same best and last weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from siimcovid import cli
from siimcovid.config import load_config
from siimcovid.detect.torchvision_train import load_own
from siimcovid.engine.family import create

ROOT = Path(__file__).parents[1]
EPOCHS = 2
TINY = ["family=torchvision", "arch=fasterrcnn_mobilenet_v3_large_fpn", "pretrained=false", f"epochs={EPOCHS}", "imgsz=64"]
TINY += ["batch=4", "workers=0", "device=cpu", "fold=0"]
TIMES = ["time_s", "train_img_s"]  # what differs between two identical runs


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m siimcovid <args>` in a process group of its own, with this process's number of threads (the CPU's
    float sums are then in the same order)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "siimcovid", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its kill: {log.read_text()[-2000:]}"
        assert time.monotonic() < end, f"no checkpoint after {timeout} s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def same_weights(a: Path, b: Path) -> bool:
    one, two = load_own(a)["model"], load_own(b)["model"]
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.slow
def test_a_torchvision_fold_killed_after_an_epoch_resumes_to_the_uninterrupted_fold(prepared_small, tmp_path, caplog):
    common = ["detect", "train", f"data={prepared_small}", *TINY, f"project={tmp_path}"]
    fold = tmp_path / "killed" / "fold0"
    run = start([*common, "name=killed"], tmp_path / "killed.log")
    kill_when(run, (fold / "last.pt").is_file, tmp_path / "killed.log")

    family = create(load_config("detect", {"family": "torchvision"}), "detect", "yolo")
    assert family.fold_state(fold) == "partial"
    saved = load_own(fold / "last.pt")
    killed_at = saved["epoch"]
    assert 1 <= killed_at < EPOCHS and saved["optimizer"] is not None and "rng" in saved
    assert not (fold / "done.json").exists()

    with caplog.at_level("INFO", logger="siimcovid"):
        cli.main([*common, "name=killed"])  # the same command: resumes
    assert f"resumes at epoch {killed_at + 1} of {EPOCHS}" in caplog.text
    cli.main([*common, "name=reference"])  # never killed
    ref = tmp_path / "reference" / "fold0"

    assert family.fold_state(fold) == family.fold_state(ref) == "done"
    ours, theirs = pd.read_csv(fold / "results.csv"), pd.read_csv(ref / "results.csv")
    assert list(ours.epoch) == list(range(1, EPOCHS + 1))  # each epoch once: none again, none lost
    # the epochs before the kill kept as they were, those after it trained as the uninterrupted run trained them
    pd.testing.assert_frame_equal(ours.drop(columns=TIMES), theirs.drop(columns=TIMES))
    assert same_weights(fold / "best.pt", ref / "best.pt") and same_weights(fold / "last.pt", ref / "last.pt")
    done, ref_done = (pd.read_json(f / "done.json", typ="series") for f in (fold, ref))
    pd.testing.assert_series_equal(done, ref_done)
    assert load_own(fold / "last.pt").get("optimizer") is None  # finished: nothing left to resume

    before = (fold / "last.pt").stat().st_mtime_ns
    cli.main([*common, "name=killed"])  # finished: skipped
    assert (fold / "last.pt").stat().st_mtime_ns == before


def test_a_resume_restores_the_random_state_and_amp_stays_off_on_the_cpu(tmp_path):
    """The random state the samplers draw from comes back with last.pt (at 64 px every anchor is sampled, so the slow
    test above cannot tell); amp=true trains without autocast and loss scaling on the CPU."""
    from types import SimpleNamespace

    from siimcovid.detect.torchvision_family import FILES
    from siimcovid.detect.torchvision_train import FoldTrainer, rng_state, save_torch

    hp = {"epochs": 3, "optimizer": "SGD", "lr0": 0.01, "momentum": 0.9, "weight_decay": 0.0, "amp": True, "batch": 2}
    family = SimpleNamespace(files=FILES, description=lambda: {"arch": "x"})
    job = SimpleNamespace(folder=tmp_path, fold=0, callbacks={})
    cpu = torch.device("cpu")
    net = torch.nn.Linear(2, 2)
    trainer = FoldTrainer(family, job, None, net, hp, cpu)
    assert not trainer.amp and not trainer.scaler.is_enabled()

    torch.manual_seed(5)
    state = rng_state(cpu)
    expected = torch.rand(8)  # what epoch 2 would draw first
    last = {"model": net.state_dict(), "optimizer": trainer.opt.state_dict(), "scaler": trainer.scaler.state_dict()}
    last.update(rng=state, epoch=1, best={"score": 0.1, "epoch": 1}, rows=[{"epoch": 1}])
    save_torch(last, tmp_path / "last.pt")
    torch.manual_seed(99)  # what a new process's build leaves
    trainer.resume()
    assert torch.equal(torch.rand(8), expected) and trainer.start == 2
    assert load_own(tmp_path / "best.pt")["epoch"] == 1  # killed between last.pt and best.pt: best.pt made to agree
