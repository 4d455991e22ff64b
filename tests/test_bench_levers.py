"""benchmarks/bench_levers.py's pure helpers: the verdict rule, the summary's gains, the predict-cost ratios."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_levers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_levers", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_verdict_calls_a_gain_within_its_spread_no_gain(bench):
    assert bench.verdict(0.02, 0.03) == "no gain (within the spread)"
    assert bench.verdict(-0.02, 0.03) == "no gain (within the spread)"
    assert bench.verdict(0.05, 0.01) == "gain"
    assert bench.verdict(-0.05, 0.01) == "loss"
    assert bench.verdict(0.05, math.nan).startswith("n/a (one seed")
    assert bench.verdict(math.nan, math.nan) == "n/a"


def detect_rows() -> pd.DataFrame:
    """Two seeds of the detect group: crop gains 0.1 on the fused final each seed, frcnn +0.05 then -0.05 (no gain)."""
    nan = math.nan
    rows = []
    for seed, (base, crop, frcnn) in enumerate([(0.30, 0.40, 0.35), (0.50, 0.60, 0.45)]):
        rows += [
            {"seed": seed, "arm": "baseline", "det_opacity_ap": 0.2, "det2_opacity_ap": nan, "lung_ap": nan,
             "fused_opacity_ap": 0.2, "fused_final": base},
            {"seed": seed, "arm": "crop", "det_opacity_ap": 0.3, "det2_opacity_ap": nan, "lung_ap": 0.9 + 0.05 * seed,
             "fused_opacity_ap": 0.3, "fused_final": crop},
            {"seed": seed, "arm": "frcnn", "det_opacity_ap": 0.2, "det2_opacity_ap": 0.1, "lung_ap": nan,
             "fused_opacity_ap": 0.2, "fused_final": frcnn},
        ]  # fmt: skip
    return pd.DataFrame(rows)


def line_of(text: str, section: str, arm: str) -> str:
    part = text.split(section, 1)[1]
    return next(line for line in part.splitlines() if line.strip().startswith(arm))


def test_summary_gains_are_per_seed_and_columns_an_arm_lacks_are_left_out(bench):
    text = bench.summarise(detect_rows(), bench.DETECT_ARMS, bench.DETECT_COLUMNS)
    crop = line_of(text, "gain over the baseline", bench.DETECT_ARMS["crop"])
    assert "fused final (nested) +0.1000 +- 0.0000 (gain)" in crop
    frcnn = line_of(text, "gain over the baseline", bench.DETECT_ARMS["frcnn"])
    assert "fused final (nested) +0.0000 +- 0.0707 (no gain (within the spread))" in frcnn
    assert "lung detector" not in frcnn and "Faster R-CNN opacity AP" not in frcnn  # no baseline to gain over
    means = line_of(text, "mean +- std over seeds", bench.DETECT_ARMS["crop"])
    assert "lung detector AP@0.5 0.9250 +- 0.0354" in means
    assert "Faster R-CNN" not in line_of(text, "mean +- std over seeds", bench.DETECT_ARMS["baseline"])


def test_predict_costs_are_ratios_to_the_same_seeds_baseline(bench):
    costs = pd.DataFrame(
        [
            {"seed": 0, "arm": "baseline", "images": 10, "s_per_image": 0.1},
            {"seed": 0, "arm": "crop", "images": 10, "s_per_image": 0.3},
            {"seed": 1, "arm": "baseline", "images": 10, "s_per_image": 0.2},
            {"seed": 1, "arm": "crop", "images": 10, "s_per_image": 0.6},
        ]
    )
    text = bench.summarise_costs(costs)
    assert "x3.00 the baseline's" in line_of(text, "predict time", bench.DETECT_ARMS["crop"])
    assert "x1.00 the baseline's" in line_of(text, "predict time", bench.DETECT_ARMS["baseline"])
