"""detect evolve engine=ray: Ray Tune trials with ASHA on a local cluster, the results table, the exported preset.

The slow test runs a real local Ray cluster on the loopback interface (2 CPUs, no GPU) with yolov5n from scratch
at 64 px; the others use fake trial results.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

from siimcovid import cli
from siimcovid.detect import ray_tune
from siimcovid.detect.common import load_hyp
from siimcovid.detect.evolve import load_space, write_preset
from siimcovid.rundir import read_run
from siimcovid.utils import SiimError

TINY = ["model=yolov5n.yaml", "pretrained=false", "imgsz=64", "batch=8", "workers=0", "device=cpu", "plots=false"]


def detect(mode: str, *args: str):
    return cli.main(["detect", mode, *map(str, args)])


def test_search_space_is_siimcovids_space_as_uniform_ranges():
    tune = pytest.importorskip("ray.tune")
    space = load_space({"mosaic": [0.5, 1.0], "box": [3, 12, 0.5], "mixup": [0.2, 0.2]})
    converted = ray_tune.search_space(space, tune)
    assert isinstance(converted["mosaic"], tune.search.sample.Float)
    assert (converted["mosaic"].lower, converted["mosaic"].upper) == (0.5, 1.0)
    assert (converted["box"].lower, converted["box"].upper) == (3.0, 12.0)  # the serial Tuner's gain has no use here
    assert converted["mixup"] == 0.2  # min == max: a constant
    samples = [converted["mosaic"].sample() for _ in range(200)]
    assert 0.5 <= min(samples) and max(samples) <= 1.0 and max(samples) - min(samples) > 0.3

    from ultralytics.cfg import DEFAULT_CFG_DICT

    # the first trial is the preset, clipped into the space; keys the preset lacks take Ultralytics' defaults
    point = ray_tune.first_point(space, {"mosaic": 0.3, "mixup": 0.2})
    assert point == {"mosaic": 0.5, "mixup": 0.2, "box": min(max(float(DEFAULT_CFG_DICT["box"]), 3.0), 12.0)}


def fake_results() -> list[dict]:
    values = lambda m: {"mosaic": m, "mixup": 0.1}
    return [
        {"trial": "ab_00002", "config": values(0.7), "metrics": {"epoch": 1, "fitness": 0.2}, "error": None},
        {"trial": "ab_00000", "config": values(1.0), "metrics": {"epoch": 3, "fitness": 0.3}, "error": None},
        {"trial": "ab_00003", "config": values(0.9), "metrics": {"epoch": 2, "fitness": 0.9}, "error": RuntimeError("node lost")},
        {"trial": "ab_00001", "config": values(0.6), "metrics": {"epoch": 3, "fitness": 0.5}, "error": None},
        {"trial": "ab_00004", "config": values(0.8), "metrics": {}, "error": RuntimeError("died at once")},
    ]


def test_results_table_statuses_and_best_trial(tmp_path):
    table = ray_tune.trial_rows(fake_results(), ["mosaic", "mixup"], epochs=3)
    assert list(table.columns) == ["trial", "status", "epochs", "fitness", "mosaic", "mixup"]
    assert list(table.trial) == ["ab_00000", "ab_00001", "ab_00002", "ab_00003", "ab_00004"]
    assert list(table.status) == ["finished", "finished", "stopped early", "failed", "failed"]
    assert list(table.epochs) == [3, 3, 1, 2, 0]
    assert math.isnan(table.fitness.iloc[4])
    assert ray_tune.summary(table) == "5 trials: 2 finished, 1 stopped early, 2 failed"
    best = ray_tune.best_trial(table)  # the failed trial's higher fitness does not count
    assert best.trial == "ab_00001" and best.mosaic == 0.6

    written = ray_tune.write_table(table, tmp_path / "ray_trials.csv")
    pd.testing.assert_frame_equal(pd.read_csv(written), table)  # full precision, no index

    # the best trial's values, exported over the starting preset, are a preset `detect train hyp=` loads
    start = load_hyp("yolov5x-mosaic")
    out = write_preset(
        {"mosaic": float(best.mosaic), "mixup": float(best.mixup)},
        ["Best fitness=0.5"],
        start,
        "yolov5x-mosaic",
        tmp_path / "hyp_evolved.yaml",
    )
    preset = load_hyp(str(out))
    assert preset == {**start, "mosaic": 0.6, "mixup": 0.1}
    assert out.read_text().startswith("# siimcovid hyperparameter preset evolved from `yolov5x-mosaic`")

    with pytest.raises(SiimError, match="no Ray Tune trial reported a validated epoch"):
        ray_tune.best_trial(table[table.status == "failed"])


def test_grid_results_reads_ray_results():
    grid = [
        SimpleNamespace(
            metrics={"trial_id": "ab_00000", "epoch": 2, "fitness": 0.4}, config={"mosaic": 0.9}, error=None, path="/x/ab_00000"
        ),
        SimpleNamespace(metrics=None, config={"mosaic": 0.7}, error=RuntimeError("lost"), path="/x/ab_00001"),
    ]
    records = ray_tune.grid_results(grid)
    assert [r["trial"] for r in records] == ["ab_00000", "ab_00001"]  # a trial that never reported: its folder's name
    table = ray_tune.trial_rows(records, ["mosaic"], epochs=2)
    assert list(table.status) == ["finished", "failed"] and list(table.mosaic) == [0.9, 0.7]


def test_gpus_per_trial():
    def cfg(gpu_per_trial=None, device=None):
        return SimpleNamespace(gpus_per_trial=gpu_per_trial, device=device)

    gpu_cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, "GPU": 8.0})
    cpu_cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    assert ray_tune.gpus_per_trial(cfg(), gpu_cluster) == 1
    assert ray_tune.gpus_per_trial(cfg(device="cpu"), gpu_cluster) == 0
    assert ray_tune.gpus_per_trial(cfg(), cpu_cluster) == 0
    assert ray_tune.gpus_per_trial(cfg(0.5), gpu_cluster) == 0.5
    with pytest.raises(SiimError, match="one GPU at most"):
        ray_tune.gpus_per_trial(cfg(2), gpu_cluster)
    with pytest.raises(SiimError, match="has no GPU: gpus_per_trial=0"):
        ray_tune.gpus_per_trial(cfg(1), cpu_cluster)


def test_engine_ray_without_ray_says_how_to_install(prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(SiimError) as err:
        detect("evolve", f"data={prepared}", *TINY, "epochs=1", f"project={tmp_path}", "name=evo", "fold=1", "engine=ray")
    assert str(err.value) == "engine=ray needs Ray, which is not installed: pip install siimcovid[ray]"
    assert "\n" not in str(err.value)
    assert not (tmp_path / "evo").exists()  # nothing written


@pytest.mark.slow
def test_evolve_on_a_local_ray_cluster(prepared, tmp_path):
    ray = pytest.importorskip("ray")
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        args = [f"data={prepared}", *TINY, "epochs=2", f"project={tmp_path}", "name=evo", "fold=1", "hyp=yolov5x-mosaic"]
        args += ["engine=ray", "iterations=4", "grace_period=1"]
        out = detect("evolve", *args)
        run = tmp_path / "evo"
        table = pd.read_csv(run / "ray_trials.csv")
        assert len(table) == 4 and table.trial.is_unique
        assert set(table.status) <= {"finished", "stopped early"}  # nothing failed
        assert table.epochs.between(1, 2).all() and table.fitness.notna().all()
        space = read_run(run / "detect.yaml")["ranges"]
        assert list(table.columns) == ["trial", "status", "epochs", "fitness", *space]
        start = load_hyp("yolov5x-mosaic")
        assert table.mosaic.iloc[0] == start["mosaic"] and table.mixup.iloc[0] == 0.0  # the first trial is the preset
        assert table.mosaic.nunique() > 1  # the others sampled the space
        for row in table.itertuples():
            for key, (lo, hi) in space.items():
                assert lo <= getattr(row, key) <= hi
            trial = run / "trials" / row.trial
            trained = yaml.safe_load((trial / "args.yaml").read_text())
            assert trained["mosaic"] == row.mosaic and trained["lr0"] == row.lr0  # the values reached the training
            assert Path(trained["data"]).is_absolute() and trained["device"] == "cpu"
            assert len(pd.read_csv(trial / "results.csv")) == row.epochs

        preset = load_hyp(str(out))  # what `detect train hyp=<out>` does
        best = table.loc[table.fitness.idxmax()]
        assert out == run / "hyp_evolved.yaml"
        assert {k: preset[k] for k in space} == {k: best[k] for k in space}
        assert preset["optimizer"] == start["optimizer"] and preset["close_mosaic"] == start["close_mosaic"]
        get_cfg(DEFAULT_CFG_DICT, preset)  # and a valid plain Ultralytics cfg
        assert f"trial {best.trial}" in out.read_text().splitlines()[1]

        # the same command again restores the finished experiment: nothing retrains, the same outputs
        stamps = {p: p.stat().st_mtime_ns for p in (run / "trials").glob("*/results.csv")}
        before = (run / "ray_trials.csv").read_bytes(), out.read_bytes()
        detect("evolve", *args)
        assert {p: p.stat().st_mtime_ns for p in (run / "trials").glob("*/results.csv")} == stamps
        assert ((run / "ray_trials.csv").read_bytes(), out.read_bytes()) == before
        # as on the serial path, the experiment continues only under the settings its trials were trained with
        with pytest.raises(SiimError, match=r"evo was trained with epochs=2 \(now 3\): use another name=, or delete .*ray_tune"):
            detect("evolve", *[a for a in args if not a.startswith("epochs=")], "epochs=3")
    finally:
        ray.shutdown()
