"""kill -9 of `siimcovid fuse tune` at seeded moments, then re-run: the files of an uninterrupted tune, and a
best.yaml only ever beside the files of a finished tune.

The run folder first holds a finished tune with another seed (the "previous" run). The same tune with seed 0
then runs as a subprocess in its own process group and is killed twice in a row:
1. a seeded random 0.1-1.0 s after its start (loading the inputs or searching): the previous tune's files
   must be untouched;
2. in the re-run, as soon as the first file of the write phase (tune.yaml) changes: best.yaml must be gone,
   since the files beside it are no longer one tune's.
A last re-run finishes; its tune.yaml, trials.csv, tune_compare.csv and best.yaml are byte for byte those of an
uninterrupted tune written at the same path.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_fuse import classifier, noisy_detections, truth_images

from siimcovid import cli

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tune.yaml", "trials.csv", "tune_compare.csv", "best.yaml")
SEED = 10


def snapshot(out: Path) -> dict[str, bytes | None]:
    return {name: (out / name).read_bytes() if (out / name).exists() else None for name in FILES}


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def which(state: dict, prev: dict, ref: dict) -> str:
    """Where a kill left the folder: a finished tune's files (previous or new), or an unfinished one without best.yaml."""
    if state == prev:
        return "the previous tune's files, untouched"
    if state == ref:
        return "the new tune's files, finished"
    assert state["best.yaml"] is None, f"best.yaml beside files of another tune: {[k for k in FILES if state[k] != prev[k]]}"
    return "no best.yaml; new: " + ",".join(k for k in FILES if state[k] is not None and state[k] != prev[k])


@pytest.mark.slow
def test_kill_fuse_tune_anywhere_then_rerun(prepared, tmp_path):
    images = truth_images(prepared, "oof")
    noisy_detections(images).to_csv(tmp_path / "det.csv", index=False)
    classifier(images, seed=1, signal=1.0).to_csv(tmp_path / "cls.csv", index=False)
    args = ["fuse", "tune", f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "split=oof"]
    args += ["trials=16", f"project={tmp_path / 'runs'}", "name=t", "workers=1"]
    out, log = tmp_path / "runs" / "t", tmp_path / "tune.log"
    # the uninterrupted tune (seed 0), then the previous finished one (seed 1) where the killed runs will write
    t0 = time.monotonic()
    cli.main([*args, "seed=0"])
    whole_s = time.monotonic() - t0
    ref = snapshot(out)
    shutil.rmtree(out)
    cli.main([*args, "seed=1"])
    prev = snapshot(out)
    assert all(ref.values()) and all(prev.values()) and ref["trials.csv"] != prev["trials.csv"]

    cmd = [sys.executable, "-m", "siimcovid", *args, "seed=0"]
    rng = random.Random(SEED)
    landed = []
    # 1: a seeded random moment while it loads its inputs or searches
    proc, delay = start(cmd, log), rng.uniform(0.1, 1.0)
    time.sleep(delay)
    assert proc.poll() is None, f"the tune ended within {delay:.2f} s: more trials needed\n{log.read_text()[-2000:]}"
    kill(proc)
    state = snapshot(out)
    landed.append(f"after {delay:.2f} s: {which(state, prev, ref)}")
    assert state == prev, landed[-1]  # killed before its search ended: the previous tune's files are all there
    # 2: the re-run, killed as soon as it starts writing (its tune.yaml is in place)
    proc, before, t_end = start(cmd, log), mtime(out / "tune.yaml"), time.monotonic() + 120
    while mtime(out / "tune.yaml") == before:
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < t_end, "the re-run wrote nothing in 120 s"
        time.sleep(0.0005)
    kill(proc)
    state = snapshot(out)
    landed.append(f"writing: {which(state, prev, ref)}")
    assert state["best.yaml"] is None or state == ref, landed[-1]
    # the last re-run finishes: the uninterrupted tune's files
    final = start(cmd, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert snapshot(out) == ref
    assert not list(out.glob(".*.tmp*"))  # no temporary of an interrupted write is left
    print(f"\nfuse tune kill points: {landed}; the uninterrupted tune {whole_s:.1f} s, in all {time.monotonic() - t0:.1f} s")
