"""`siimcovid predict` never touches the network (a Kaggle notebook runs with the internet off).

A guard replaces the socket calls that reach out (connect, connect_ex, create_connection, getaddrinfo): each
attempt is recorded and refused. Local IPC (AF_UNIX sockets) passes. The fast test runs in a fresh process,
so that the imports happen under the guard: importing predict, opening a bundle, loading its models. The
slow ones run `siimcovid predict` end to end under the guard, and show that the guard does catch what
Ultralytics tries when it is not told to stay offline.

The bundles come from the fixtures of tests/test_bundle.py (hand-built run folders with real checkpoints,
exported by `siimcovid export`: the fast test) and tests/test_predict.py (`trained`: a tiny `siimcovid run`,
exported: the slow test); without them (branches bundle and predict not merged) those tests skip.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from siimcovid.cli import call

try:  # bundle fixtures: hand-built runs of small real checkpoints, exported (fast); a tiny trained run, exported (slow)
    from test_bundle import bundle, runs, yolo_checkpoint  # noqa: F401
    from test_predict import trained  # noqa: F401

    HAVE_BUNDLE = True
except ImportError:  # branches bundle and predict not merged
    HAVE_BUNDLE = False

needs_bundle = pytest.mark.skipif(not HAVE_BUNDLE, reason="needs tests/test_bundle.py (branch bundle: siimcovid export)")
OFFLINE_ENV = ("HF_HUB_OFFLINE", "YOLO_OFFLINE")
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def guard(attempts: list, setattr_=setattr) -> None:
    """Refuse and record every network attempt of this process (setattr_: monkeypatch.setattr in a test)."""

    def refuse(name: str, real=None):
        def blocked(*args, **kwargs):
            if real is not None and getattr(args[0], "family", None) == getattr(socket, "AF_UNIX", None):
                return real(*args, **kwargs)  # local IPC, not the network
            attempts.append(f"{name}{args[1:] if real else args}"[:200])
            raise OSError(f"network blocked by the test ({name})")

        return blocked

    setattr_(socket.socket, "connect", refuse("connect", socket.socket.connect))
    setattr_(socket.socket, "connect_ex", refuse("connect_ex", socket.socket.connect_ex))
    setattr_(socket, "create_connection", refuse("create_connection"))
    setattr_(socket, "getaddrinfo", refuse("getaddrinfo"))


@pytest.fixture
def no_network(monkeypatch) -> list:
    """The network blocked in this process (the attempts are returned) and the libraries told to stay offline."""
    attempts: list = []
    guard(attempts, monkeypatch.setattr)
    for key in OFFLINE_ENV:
        monkeypatch.setenv(key, "1")
    return attempts


def run_guarded(code: str, env: dict | None = None) -> list:
    """Run `code` in a fresh Python under the guard (before any import); returns its network attempts."""
    guard_source = "import json, socket\n" + inspect.getsource(guard) + "attempts = []\nguard(attempts)\n"
    script = f"{guard_source}{code}\nprint('ATTEMPTS=' + json.dumps(attempts))\n"
    base = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}  # the code under test must set them itself
    env = {**base, "PYTHONPATH": os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("ATTEMPTS=")][-1]
    return json.loads(line[len("ATTEMPTS=") :])


def test_the_guard_records_and_refuses_connections(no_network):
    import urllib.request

    with pytest.raises(OSError):
        socket.create_connection(("example.com", 443), timeout=1)
    with pytest.raises(OSError):
        urllib.request.urlopen("https://huggingface.co", timeout=1)
    assert len(no_network) >= 2 and os.environ["HF_HUB_OFFLINE"] == "1"
    if hasattr(socket, "AF_UNIX"):  # local IPC still works
        a, b = socket.socketpair()
        a.sendall(b"x")
        assert b.recv(1) == b"x"
        a.close(), b.close()


PREDICT_IMPORTS = """
import siimcovid.predict.stage as stage
stage.offline()  # what predict() does first
import siimcovid.predict.members, siimcovid.detect.predict, siimcovid.classify.predict, ultralytics, timm
"""

LOAD_BUNDLE = """
import torch
from siimcovid import weights
from siimcovid.bundle import open_bundle
b = open_bundle({path!r})
for m in b.detectors:
    [weights.detector(m.model, p, str(p)) for p in m.weights.values()]
for m in b.classifiers:
    [weights.classifier(m.model, p, str(p), torch.device("cpu")) for p in m.weights.values()]
"""


def test_importing_predict_and_opening_a_bundle_tries_no_connection(request):
    """One fresh process (the imports are what is tested: ~10 s of torch, Ultralytics and timm imports)."""
    code = PREDICT_IMPORTS
    if HAVE_BUNDLE:  # else the imports alone (branch bundle not merged)
        code += LOAD_BUNDLE.format(path=str(request.getfixturevalue("bundle")))
    assert run_guarded(code) == []


EXPORT_ENGINES = """
from siimcovid.bundle import engines, open_bundle
from siimcovid.cli import call
out = call("export", project={project!r}, pipeline="x", out={out!r}, formats=["openvino", "onnx"], int8=["detect"], calibration=2)
b = open_bundle(out)
for m in b.detectors + b.classifiers:
    for engine, folds in m.engines.items():
        for k, first in folds.items():
            precision = "int8" if engine == engines.INT8 else "fp32"
            engines.Net(engine, engines.engine_paths(first.parent, k, engine), m.engine_digests, precision, "test")
"""


@needs_bundle
def test_exporting_and_loading_the_engines_tries_no_connection(request, tmp_path):
    """OpenVINO's conversion tools and NNCF send usage telemetry by default; siimcovid.bundle.engines uses neither
    (torch.onnx, ONNX Runtime's quantiser for int8, then OpenVINO's runtime): its export and both runtimes' loading,
    under the guard in a fresh process."""
    pytest.importorskip("openvino"), pytest.importorskip("onnxruntime"), pytest.importorskip("onnx")
    code = PREDICT_IMPORTS + EXPORT_ENGINES.format(project=str(request.getfixturevalue("runs")), out=str(tmp_path / "b"))
    assert run_guarded(code) == []
    assert (tmp_path / "b" / "detect" / "x" / "fold0.xml").is_file()
    assert (tmp_path / "b" / "detect" / "x" / "fold0.int8.xml").is_file()


@pytest.mark.slow
def test_the_guard_catches_ultralytics_when_it_is_not_told_to_stay_offline():
    """Without YOLO_OFFLINE Ultralytics looks up hosts to see if it is online: the guard must see that,
    else the tests above would prove nothing."""
    attempts = run_guarded("from ultralytics import YOLO\nYOLO('yolov5n.yaml')\n")
    assert attempts and all(a.startswith(("getaddrinfo", "connect", "create_connection")) for a in attempts)


def loose_folder(siim_root: Path, out: Path) -> Path:
    """The SIIM root's test DICOMs in another tree, other names, plus a file that is not an image."""
    for k, dicom in enumerate(sorted((siim_root / "test").rglob("*.dcm"))):
        dst = out / f"patient{k % 2}" / f"IMG{k:04d}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dicom, dst)
    (out / "README.txt").write_text("exported from the PACS\n")
    return out


@pytest.mark.slow
@needs_bundle
def test_predict_end_to_end_with_the_network_blocked(trained, no_network, tmp_path):
    from siimcovid.submission import read_submission
    from siimcovid.tables import PREDICTED_IMAGES, SAMPLE, SAMPLE_SUBMISSION

    _, root, run_submission, bundle = trained  # trained before the guard: only predict runs under it
    settings = {"bundle": str(bundle), "device": "cpu", "workers": 0}
    result = call("predict", source=str(root), out=str(tmp_path / "siim"), **settings)
    sample = SAMPLE.read(root / SAMPLE_SUBMISSION)
    assert len(read_submission(result["submission"], sample=root / SAMPLE_SUBMISSION)) == len(sample)
    assert result["submission"].read_bytes() == run_submission.read_bytes()

    source = loose_folder(root, tmp_path / "loose")
    out = call("predict", source=str(source), out=str(tmp_path / "loose_out"), **settings)["out"]
    images = PREDICTED_IMAGES.read(out / "images.csv")
    assert len(images) == len(list((root / "test").rglob("*.dcm")))
    assert all((out / p).is_file() for p in images.picture) and (out / "index.html").is_file()
    assert "README.txt" in (out / "skipped.csv").read_text()
    assert no_network == []


# ----------------------------------------------------------------------------- the Kaggle example
def test_the_kaggle_example_compiles_and_its_predict_command_line_parses():
    import importlib.util
    import py_compile

    from siimcovid.stages import stage_config

    path = REPO / "examples" / "kaggle_submission.py"
    py_compile.compile(str(path), doraise=True)
    spec = importlib.util.spec_from_file_location("kaggle_submission", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the settings and steps; main() runs only as a script
    cfg = stage_config("predict", None, module.PREDICT_ARGS)  # as `siimcovid predict ...` would read them
    assert (cfg.bundle, cfg.source, cfg.device) == (str(module.BUNDLE), str(module.DATA), 0)
    assert not str(cfg.out).startswith("/kaggle/input")  # read-only there; /tmp keeps the prepared images out of the saved output
