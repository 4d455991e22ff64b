"""kill -9 of `siimcovid prepare`: its workers die with it, and a re-run finishes to the output of an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]; None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> dict[int, str]:
    """{child pid: its start time} of the live children of `pid`."""
    kids = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[1] == str(pid) and fields[0] not in "ZX":
            kids[int(entry.name)] = fields[19]
    return kids


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] not in "ZX"  # a zombie is dead; a new pid is not it


def _prepare_cmd(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "siimcovid",
        "prepare",
        f"data={root}",
        f"out={out}",
        "sizes=[32,64]",
        "n_folds=2",
        "workers=2",
        f"data_yaml_dir={out.parent / (out.name + '_yaml')}",
        *extra,
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_kill_9_of_prepare_kills_its_workers(tiny_root, tmp_path):
    # One DICOM is a named pipe: reading it blocks for ever, like a decode that takes long. Its worker stays busy,
    # the other one idle, waiting for work, and prepare waiting for both: then kill -9 prepare alone.
    dicoms = sorted(tiny_root.glob("train/*/*/*.dcm"))
    n_images = len(dicoms) + len(list(tiny_root.glob("test/*/*/*.dcm")))
    dicoms[0].unlink()
    os.mkfifo(dicoms[0])
    out = tmp_path / "out"
    proc = subprocess.Popen(_prepare_cmd(tiny_root, out), env=_env(), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(list((out / "64" / "images").rglob("*.png"))) < n_images - 1:  # every image but the blocked one
            assert proc.poll() is None, f"prepare ended with {proc.returncode} before the kill"
            assert time.monotonic() < deadline, "prepare did not convert the other images in 60 s"
            time.sleep(0.05)
        deadline = time.monotonic() + 10  # a loaded machine may show a spawned worker late in /proc
        while len(children := _children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) >= 2, children  # the two workers (and multiprocessing's resource tracker)
        os.kill(proc.pid, signal.SIGKILL)  # the main process only, not its group
        proc.wait()
        deadline = time.monotonic() + 5
        while (alive := [p for p, t in children.items() if _alive(p, t)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"processes of the killed prepare still alive after 5 s: {alive}"
        assert not (out / "meta.csv").exists()
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group of `proc` (none left: nothing to do)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_the_fallback_watchdog_ends_a_worker_whose_parent_died(tmp_path):
    # where prctl is missing (macOS, BSD) a worker polls its parent pid; here: a parent killed -9, its child polling
    child = (
        "import os; from siimcovid.data.convert import _watch_parent; "
        "p = os.getppid(); print('watching', flush=True); _watch_parent(p, 0.05)"
    )
    parent = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}]); print(p.pid, flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], env=_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = int(proc.stdout.readline())
        assert proc.stdout.readline() == "watching\n"
        started = _stat(pid)[19]
        assert _alive(pid, started)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while _alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid, started)
    finally:
        _kill_group(proc)


def _files(folder: Path) -> dict[str, Path]:
    """{relative path: path} of the files under `folder`, temporary ones (hidden names) left out."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}


def _written_since(folders: list[Path], start_ns: int) -> int:
    """Files under `folders` written (renamed into place) since `start_ns`."""

    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except FileNotFoundError:  # meta.csv set aside between the listing and now
            return 0

    return sum(mtime(p) >= start_ns for f in folders for p in _files(f).values())


def _same_bytes(path: Path, ref: Path, subs: dict[str, str]) -> bool:
    """Byte-identical, with the paths that name each output folder (the data YAMLs, prepare.yaml) substituted."""
    if path.suffix != ".yaml":
        return path.read_bytes() == ref.read_bytes()
    text = path.read_text()
    for mine, theirs in subs.items():
        text = text.replace(mine, theirs)
    return text == ref.read_text()


KILLS = 3  # kill -9 of the whole group, in a row, each run resuming the one before


def test_prepare_killed_anywhere_resumes_to_the_uninterrupted_output(tiny_root, tmp_path):
    import numpy as np

    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare

    ref, out = tmp_path / "ref", tmp_path / "out"
    ref_yaml, out_yaml = tmp_path / "ref_yaml", tmp_path / "out_yaml"
    prepare(load_config("prepare", dict(data=str(tiny_root), out=str(ref), sizes=[32, 64], n_folds=2, workers=2,
                                        data_yaml_dir=str(ref_yaml))))  # fmt: skip
    reference = {**_files(ref), **{f"yaml/{k}": p for k, p in _files(ref_yaml).items()}}
    subs = {str(out.resolve()): str(ref.resolve()), str(out): str(ref), str(out_yaml): str(ref_yaml)}
    rng = np.random.default_rng(2024)
    points = []
    n = len(reference)
    for kill in range(KILLS):
        # kill once this run has written `target` files: one point in each part of a run, the last part first
        # (a resumed run writes fewer files: no image already whole) then the middle, then the beginning
        lo, hi = n * (KILLS - 1 - kill) // KILLS + 1, n * (KILLS - kill) // KILLS
        target = int(rng.integers(lo, hi + 1))
        start = time.time_ns()
        proc = subprocess.Popen(_prepare_cmd(tiny_root, out), env=_env(), cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and _written_since([out, out_yaml], start) < target:
                assert time.monotonic() < deadline, "prepare neither finished nor wrote its files in 120 s"
                time.sleep(0.002)
            finished = proc.poll() is not None
            if not finished:
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            _kill_group(proc)
        points.append((target, "finished first" if finished else "killed"))
        if finished:
            assert proc.returncode == 0 and (out / "meta.csv").is_file()
        else:
            assert not (out / "meta.csv").exists(), f"kill {kill} (after {target} files): meta.csv of an unfinished run"
        # no file looks complete before it is: every file there is the reference's, byte for byte
        present = {**_files(out), **{f"yaml/{k}": p for k, p in _files(out_yaml).items()}}
        previous = present.pop("meta.previous.csv", None)  # a finished run's table, set aside by the run killed
        assert previous is None or previous.read_bytes() == reference["meta.csv"].read_bytes()
        assert set(present) <= set(reference), sorted(set(present) - set(reference))
        assert [k for k, p in present.items() if not _same_bytes(p, reference[k], subs)] == [], f"kill {kill}"
    assert any(p[1] == "killed" for p in points), points
    print(f"\nkill points (files written by the run when killed): {points}")

    subprocess.run(_prepare_cmd(tiny_root, out), env=_env(), cwd=tmp_path, check=True, capture_output=True)
    final = {**_files(out), **{f"yaml/{k}": p for k, p in _files(out_yaml).items()}}
    assert sorted(final) == sorted(reference)  # meta.csv, images, labels, masks, fold lists, test list, YAMLs
    assert [k for k, p in final.items() if not _same_bytes(p, reference[k], subs)] == []
