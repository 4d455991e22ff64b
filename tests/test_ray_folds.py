"""engine=ray for `detect train` and `classify train`: each fold a Ray task on a local Ray cluster (CPU only, 2 CPUs,
on the loopback interface), compared with the serial run; a fold task killed mid-way is run again and resumes.

Tiny settings as in test_detect.py / test_classify.py (yolov5n from scratch and timm's test_efficientnet, 64 px).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_classify import TINY

from siimcovid import cli
from siimcovid.config import load_config, runtime_keys
from siimcovid.detect.common import fold_state
from siimcovid.engine.devices import check_ray, in_ray_task
from siimcovid.rundir import read_run
from siimcovid.utils import SiimError

DETECT_TINY = ["model=yolov5n.yaml", "pretrained=false", "epochs=1", "imgsz=64", "batch=8", "workers=0", "device=cpu"]
DETECT_TINY += ["plots=false"]
CLASSIFY_TINY = {**TINY, "epochs": 1, "fine_epochs": 0, "fold": [0, 1]}  # test_classify's tiny model, 2 folds
RAY_CPU = ["engine=ray", "gpus_per_fold=0", "cpus_per_fold=1"]
TIMING = ["train_img_s", "loader_wait", "time_s"]  # results.csv columns that measure time, not training


def files(run: Path) -> list[str]:
    def named(p: Path) -> str:  # a TensorBoard file's name holds its time and process
        tensorboard = p.name.startswith("events.out.tfevents.")
        return str(p.parent.relative_to(run) / "events.out.tfevents") if tensorboard else str(p.relative_to(run))

    return sorted(named(p) for p in run.rglob("*") if p.is_file())


# ---------------------------------------------------------------- without a cluster


def test_engine_ray_without_ray_says_how_to_install_it(prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(SiimError, match=r"^engine=ray needs Ray, which is not installed: pip install siimcovid\[ray\]$"):
        cli.main(["detect", "train", f"data={prepared}", *DETECT_TINY, f"project={tmp_path}", "name=d", *RAY_CPU])
    cfg = load_config("classify", {**CLASSIFY_TINY, "data": str(prepared), "project": str(tmp_path), "name": "c"})
    cfg.update(engine="ray", gpus_per_fold=0)
    from siimcovid.classify.train import main

    with pytest.raises(SiimError, match=r"pip install siimcovid\[ray\]$"):
        main(cfg)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_engine_settings_are_runtime_settings():
    for stage in ("detect", "classify"):
        cfg = load_config(stage, {})
        assert (cfg.engine, cfg.ray_address, cfg.gpus_per_fold, cfg.cpus_per_fold) == ("serial", None, 1, 1)
        assert {"engine", "ray_address", "gpus_per_fold", "cpus_per_fold"} <= runtime_keys(stage)


def test_detect_devices_and_gpus_per_fold_combine_or_say_why_not():
    for device, gpus in [("cpu", 0), (None, 0), (None, 1), (None, 0.5), (0, 1), (3, 0.25)]:
        check_ray(device, gpus)
    for device, gpus, message in [
        ("cpu", 1, "trains on the CPU; set gpus_per_fold=0"),
        (0, 0, "gpus_per_fold must be more than 0 and at most 1"),
        (0, 2, "at most one GPU"),
        ("0,1", 1, "DDP inside a fold and engine=ray do not combine"),
        ("0,1", 2, "DDP inside a fold and engine=ray do not combine"),
        (None, 2, "at most one GPU"),
    ]:
        with pytest.raises(SiimError, match=message):
            check_ray(device, gpus)
    # inside a task: the GPUs Ray gave it, whatever numbers the command named
    assert in_ray_task(0, ["5"]) == "5" and in_ray_task(None, ["5"]) == "5"
    assert in_ray_task(None, []) == "cpu" and in_ray_task("cpu", []) == "cpu"


def test_classify_ray_refuses_ddp_and_more_than_one_gpu_per_fold(prepared, tmp_path):
    pytest.importorskip("ray")
    check_ray("cpu", 0)  # the same check as detect's (siimcovid.engine.devices): one reading of device
    with pytest.raises(SiimError, match="under torchrun"):
        check_ray("cpu", 0, world=2)
    cases = [("cpu", 1, "set gpus_per_fold=0"), ("cuda", 2, "at most one GPU"), ("cuda:0", 0, "more than 0")]
    for device, gpus, message in cases:
        with pytest.raises(SiimError, match=message):
            check_ray(device, gpus)


# ---------------------------------------------------------------- on a local Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs on 127.0.0.1 for the module, started as ray_address=null starts one; the runs
    below find it joined and use it (and leave it running)."""
    pytest.importorskip("ray")
    from siimcovid.ray_engine import cluster

    with cluster(None, num_cpus=2) as ray:
        # the test functions' callbacks travel to the tasks by value (the workers cannot import this test module)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield ray
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_local_cluster_listens_on_the_loopback_only(ray_cluster):
    nodes = ray_cluster.nodes()
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray_cluster.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert ray_cluster.cluster_resources()["CPU"] == 2


@pytest.mark.slow
def test_detect_folds_in_parallel_write_the_serial_run_folder(ray_cluster, prepared, tmp_path):
    common = [f"data={prepared}", *DETECT_TINY, "fold=0,1", "name=tiny2"]
    serial = cli.main(["detect", "train", *common, f"project={tmp_path / 'serial'}"])
    parallel = cli.main(["detect", "train", *common, f"project={tmp_path / 'ray'}", *RAY_CPU])
    assert files(parallel) == files(serial)
    assert all(fold_state(parallel / f"fold{k}") == "done" for k in (0, 1))
    for k in (0, 1):
        assert len(pd.read_csv(parallel / f"fold{k}" / "results.csv")) == 1

    def settings(run):
        saved = read_run(run / "detect.yaml")
        return {k: v for k, v in saved.items() if k not in runtime_keys("detect")}

    assert settings(parallel) == settings(serial)
    saved = read_run(parallel / "detect.yaml")
    assert saved["engine"] == "ray" and saved["gpus_per_fold"] == 0
    # finished folds are skipped by the driver (no task), as the serial path skips them
    assert cli.main(["detect", "train", *common, f"project={tmp_path / 'ray'}", *RAY_CPU]) == parallel
    assert files(parallel) == files(serial)


def kill_once_after_first_epoch(trainer):
    """on_model_save: SIGKILL this task's own process once, right after epoch 1's checkpoint (marker: kill.txt)."""
    import os
    import signal
    from pathlib import Path

    marker = Path(trainer.save_dir).parent / "kill.txt"
    if trainer.epoch == 1 and not marker.exists():  # siimcovid's events count epochs from 1
        marker.write_text(f"{os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_detect_fold_task_killed_midway_is_run_again_and_resumes(ray_cluster, prepared, tmp_path):
    from siimcovid.detect.train import train

    args = [f"data={prepared}", *DETECT_TINY, *RAY_CPU, "fold=2", "epochs=2", f"project={tmp_path}", "name=killed"]
    _, cfg, _ = cli.resolve(["detect", "train", *args])
    run = train(cfg, callbacks={"on_model_save": kill_once_after_first_epoch})
    fold = run / "fold2"
    assert (run / "kill.txt").is_file()  # the task's process was killed after epoch 1
    assert (fold / "args_start.yaml").is_file()  # written by a resume only: Ray's second attempt resumed the fold
    assert fold_state(fold) == "done"
    log = pd.read_csv(fold / "results.csv")
    assert [int(e) for e in log["epoch"]] == [1, 2]  # epoch 1 once (the resume trims what the kill left), then epoch 2
    ckpt = torch.load(fold / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == -1 and ckpt["train_args"]["epochs"] == 2  # finished (optimizer stripped) after 2 epochs


@pytest.mark.slow
def test_classify_folds_in_parallel_equal_the_serial_run(ray_cluster, prepared, tmp_path):
    from siimcovid.classify.train import main

    def run(project, **kw):
        main(load_config("classify", {**CLASSIFY_TINY, "data": str(prepared), "project": str(project), "name": "b", **kw}))
        return project / "b"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a task of cpus_per_fold=1 (Ray sets OMP_NUM_THREADS=1): the same sums, bit for bit
    try:
        serial = run(tmp_path / "serial")
    finally:
        torch.set_num_threads(threads)
    parallel = run(tmp_path / "ray", engine="ray", gpus_per_fold=0, cpus_per_fold=1)
    assert files(parallel) == files(serial)
    for k in (0, 1):
        a, b = (pd.read_csv(r / f"fold{k}" / "results.csv").drop(columns=TIMING) for r in (serial, parallel))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        pred = [(r / f"fold{k}" / "val_pred_image.csv").read_bytes() for r in (serial, parallel)]
        assert pred[0] == pred[1]
        assert (parallel / f"fold{k}" / "done.json").is_file()
