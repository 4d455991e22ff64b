"""kill -9 of `siimcovid classify train` at seeded moments, then resumed: the fold ends as an uninterrupted run's.

A tiny fold (test_efficientnet, 64 px, one fold, 2 epochs + a 1-epoch second wave, workers=0, cpu) runs
as a subprocess in its own process group and is killed twice in a row:
1. while epoch 2's last.pt is being written (its temporary file exists): the epoch in progress is lost;
2. in the re-run, which resumed from epoch 1, as soon as its n-th last.pt is in place (n seeded: 1, or
   2 = the last epoch's): between last.pt and the files that follow it (best.pt, val_pred_image.csv,
   results.csv, then done.json), which the next resume writes again from last.pt.
Each kill is followed by a re-run of the same command, which resumes; the last one finishes. Every output
is then compared with an uninterrupted run of the same settings: results.csv identical but for its timing
columns, best.pt and last.pt equal tensor by tensor, val_pred_image.csv and done.json byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from test_classify import TINY, tiny_cfg  # noqa: E402

from siimcovid.tables import CLASSIFIER_IMAGES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"name": "kill", "fold": 0, "epochs": 2, "fine_lr": [1e-4], "fine_epochs": 1}  # two waves, 3 epochs
EPOCHS = 3
TIMING = ["train_img_s", "loader_wait", "time_s"]
SEED = 11


def command(prepared, project) -> list[str]:
    settings = {**TINY, **SETTINGS, "data": prepared, "project": project}
    args = [
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in settings.items()
    ]
    return [sys.executable, "-m", "siimcovid", "classify", "train", *args]


def start(cmd, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def writing_last(fold: Path) -> bool:
    """last.pt's temporary file (utils.atomic_path: .last.<random>.tmp.pt) exists: torch.save is writing it."""
    return any(fold.glob(".last.*.tmp.pt"))


def wait_and_kill(proc: subprocess.Popen, fold: Path, kind: str, n: int, delay: float, timeout: float = 120) -> str:
    """Kill the process group at the moment `kind` names; returns where the kill landed (for the report).

    in_write: while the n-th last.pt of this run is being written (if that write is too quick to be seen,
    just after it); after_commit: `delay` seconds after the n-th last.pt of this run is in place."""
    last, log = fold / "last.pt", fold / "results.csv"
    writes, before = 0, mtime(last)
    t_end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the {kind} kill")
        if time.monotonic() > t_end:
            pytest.fail(f"no {kind} moment within {timeout} s")
        if kind == "in_write" and writes == n - 1 and writing_last(fold):
            break
        now = mtime(last)
        if now != before:  # an epoch's last.pt was put in place
            before, writes = now, writes + 1
            if writes >= n:
                time.sleep(delay)
                break
        time.sleep(0.0005)
    in_write = writing_last(fold)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load(last)["epoch"] if last.exists() else None
    logged = len(pd.read_csv(log)) if log.exists() else 0
    return f"{kind}: last.pt of epoch {state}, results.csv of {logged}{', the next last.pt being written' if in_write else ''}"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a, b, where: str) -> None:
    """Every tensor of two nested checkpoints equal (state dicts, optimizer state); other values equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")


def assert_nothing_looks_finished(fold: Path, log: Path) -> None:
    """After a kill: no done.json; every file there is whole (atomic writes) and none runs ahead of last.pt,
    the record of the epochs done (results.csv and best.pt follow it, so they may lag one epoch behind)."""
    assert not (fold / "done.json").exists(), log.read_text()[-3000:]
    last = load(fold / "last.pt")["epoch"] if (fold / "last.pt").exists() else 0
    if (fold / "best.pt").exists():
        assert load(fold / "best.pt")["epoch"] <= last
    if (fold / "results.csv").exists():
        assert len(pd.read_csv(fold / "results.csv")) <= last
    if (fold / "val_pred_image.csv").exists():
        CLASSIFIER_IMAGES.read(fold / "val_pred_image.csv")


@pytest.mark.slow
def test_kill_classify_train_anywhere_then_resume(prepared, tmp_path):
    from siimcovid.classify.train import main

    rng = random.Random(SEED)
    # the seeded plan: during epoch 2's last.pt write, then just after the resumed run's 1st or 2nd (last) epoch
    plan = [("in_write", 2, 0.0), ("after_commit", rng.choice([1, 2]), 0.0)]
    cmd = command(prepared, tmp_path / "killed")
    fold, log = tmp_path / "killed" / "kill" / "fold0", tmp_path / "killed.log"
    t0 = time.monotonic()
    landed = []
    for kind, n, delay in plan:
        done = load(fold / "last.pt")["epoch"] if (fold / "last.pt").exists() else 0
        n = min(n, EPOCHS - done)  # (if epoch 2's write was too quick to catch, the re-run has one epoch left)
        landed.append(wait_and_kill(start(cmd, log), fold, kind, n, delay))
        assert_nothing_looks_finished(fold, log)
    final = start(cmd, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    killed_s = time.monotonic() - t0
    text = log.read_text()
    assert text.count("resuming after epoch") == 2, text[-3000:]  # both re-runs resumed from last.pt
    print(f"\nkill points: {landed}; killed + resumed runs {killed_s:.1f} s")

    main(tiny_cfg(prepared, tmp_path / "whole", **SETTINGS))  # the uninterrupted run (same settings, same name)
    whole = tmp_path / "whole" / "kill" / "fold0"

    ours, theirs = (pd.read_csv(f / "results.csv", dtype=str) for f in (fold, whole))
    assert ours.epoch.tolist() == ["1", "2", "3"]
    pd.testing.assert_frame_equal(ours.drop(columns=TIMING), theirs.drop(columns=TIMING))
    for name in ("best.pt", "last.pt"):
        a, b = load(fold / name), load(whole / name)
        assert a["epoch"] == b["epoch"] and a.get("wave") == b.get("wave")
        for key in ("model", "ema", "optimizer", "scheduler"):
            if key in b:
                assert_same_tensors(a[key], b[key], f"{name}:{key}")
    assert load(fold / "last.pt")["epoch"] == EPOCHS
    for name in ("val_pred_image.csv", "done.json"):
        assert (fold / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((fold / "done.json").read_text())["epochs"] == EPOCHS
    assert not list(fold.glob(".*.tmp*"))  # the temporaries of interrupted writes were cleared
