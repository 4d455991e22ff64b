"""`siimcovid fuse tune`: search the fusion parameters on out-of-fold predictions.

    siimcovid fuse tune split=oof data=runs/prepare/siim det=... cls=... trials=60 seed=0

Trial 0 is the config's own parameters (the defaults unless overridden). Then `trials` random
draws from `space` (seeded; duplicates skipped), then one refinement pass: each parameter in turn
tries every value of its list with the others held at the best so far. The best trial is the
highest final score; ties keep the earlier trial, so the result never scores below trial 0 on the
data it was tuned on. Last, each changed parameter is put back to its starting value when that
scores as well (phase "simplify"): a parameter that does not move the score stays as it was.
Per-member settings are lists, one value per file, and refine one member at a time: det_weights,
cls_weights and none_model_weights are relative (the first file stays 1); det_scale, each detection file's confidence factor,
is drawn for every file (absolute confidences count: the none formulas see them).

WBF is the cost (its clustering is pure Python: ~10 s per 250,000 boxes on one core); the
formulas and the metric are vectorised (~0.4 s a trial on 6,334 images). So the random trials
share `wbf_pool` WBF settings (iou_thr, skip_box_thr, conf_type, det_weights, det_scale; trial 0's first),
each drawn once, while the formula parameters are drawn afresh per trial; trials run grouped by
WBF setting. The refinement pass costs one WBF per value of a WBF parameter.

Outputs in <project>/<name>/:
    tune.yaml          the resolved config of the search
    trials.csv         one row per trial: trial, phase (default | random | refine | simplify), the parameters,
                       AP per class, study_map, image_map, final
    tune_compare.csv   class, default, best, change (the per-class table printed at the end)
    best.yaml          the best parameters (FUSION_KEYS): `siimcovid fuse cfg=best.yaml split=test ...`
    fusion.yaml        its `tune` entry (siimcovid.fuse.record), written last: the member order, the input files
                       and their sha256, the data, the folds and the best parameters
    fuse_files.yaml    the record fuse and tune keep of what they wrote here (siimcovid.fuse.stage.open_run_dir:
                       they replace or remove only those files; a folder of other files needs overwrite=true)

A tune does not resume: a re-run searches again (same inputs + seed = the same files). best.yaml
marks a finished tune: the files are written only once the search is over, best.yaml removed first
and written last. So after a kill -9, either best.yaml is absent (the files beside it may be
partly the new run's), or every file is one finished tune's: the previous one's, untouched, when
the kill came before the search ended.

Tuning on OOF is the point (never on the leaderboard), but a small OOF set can be overfitted by
many trials: compare the per-fold scores of the best with the defaults (scores_oof.csv of
`fuse cfg=best.yaml split=oof`) before trusting a gain of a few thousandths.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from siimcovid.config import Config, read_yaml
from siimcovid.fuse.inputs import FuseInputs, load_inputs
from siimcovid.fuse.pipeline import (
    FUSION_KEYS,
    WbfCache,
    check_param,
    describe_inputs,
    fuse_split,
    fusion_params,
    score_fused,
)
from siimcovid.fuse.record import forget, make_entry, remember
from siimcovid.fuse.stage import TUNE_OUTPUTS as OUTPUTS
from siimcovid.fuse.stage import open_run_dir, run_dir
from siimcovid.outputs import Written
from siimcovid.tables import SCORE_COLUMNS, write_csv
from siimcovid.utils import LOGGER, SiimError, as_list, atomic_temporaries, atomic_write_text

# relative: the first member stays 1
MEMBER_WEIGHT_KEYS = {"det_weights": "det_files", "cls_weights": "member_files", "none_model_weights": "none_files"}
# det_scale is searched for every member, none held at 1: WBF's order sees only the ratios, but skip_box_thr, the clip
# at 1 and the detector's none (prod(1 - conf), 1 - max(conf)) see absolute confidences (one detector alone too)
MEMBER_SCALE_KEYS = {"det_scale": "det_files"}
MEMBER_KEYS = MEMBER_WEIGHT_KEYS | MEMBER_SCALE_KEYS  # per-member lists: one value per file
WBF_KEYS = ("iou_thr", "skip_box_thr", "conf_type", "det_weights", "det_scale")  # what changes the WBF result


def load_space(space) -> dict[str, list]:
    """The search space: a mapping {parameter: [values]} or a YAML path holding one."""
    if isinstance(space, (str, Path)):
        space = read_yaml(space)
    if not isinstance(space, dict) or not space:
        raise SiimError("space must be a mapping {parameter: [values, ...]} (or a YAML file holding one)")
    bad = [k for k in space if k not in FUSION_KEYS]
    if bad:
        raise SiimError(f"space: unknown parameter(s) {bad}; tunable: {', '.join(FUSION_KEYS)}")
    out = {}
    for k, values in space.items():
        values = as_list(values)
        if not values:
            raise SiimError(f"space: {k} has no values")
        out[k] = values
    return out


def canonical(params: dict) -> dict:
    """Member weights that are all equal mean the same as none given ([]): only their ratios count; so do member
    scales that are all 1."""
    out = dict(params)
    for k in MEMBER_WEIGHT_KEYS:
        w = out.get(k)
        if isinstance(w, list) and len({float(v) for v in w}) <= 1:
            out[k] = []
    for k in MEMBER_SCALE_KEYS:
        w = out.get(k)
        if isinstance(w, list) and all(float(v) == 1.0 for v in w):
            out[k] = []
    return out


def _key(params: dict) -> str:
    return yaml.safe_dump({k: params[k] for k in FUSION_KEYS}, sort_keys=True)


class Search:
    """Evaluate parameter sets on fixed inputs, remembering every trial and sharing the WBF cache."""

    def __init__(self, inputs: FuseInputs, workers: int):
        self.inputs, self.workers = inputs, workers
        self.cache = WbfCache()
        self.rows: list[dict] = []
        self.seen: dict[str, int] = {}
        self.best: tuple[float, dict] | None = None

    def evaluate(self, params: dict, phase: str) -> float:
        params = canonical(params)
        key = _key(params)
        if key in self.seen:
            return self.rows[self.seen[key]]["final"]
        fused = fuse_split(self.inputs, params, self.workers, self.cache)  # every value checked: config load, check_space
        result = score_fused(self.inputs, fused)
        final = result.final
        row = {"trial": len(self.rows), "phase": phase, **{k: _flat(params[k]) for k in FUSION_KEYS}, **result.row()}
        self.seen[key] = len(self.rows)
        self.rows.append(row)
        if self.best is None or (not math.isnan(final) and final > self.best[0]):  # ties keep the earlier trial
            self.best = (final, dict(params))
        return final


def _flat(value):
    """Lists and mappings as short text in trials.csv."""
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def _draw(rng: np.random.Generator, base: dict, space: dict, n_members: dict[str, int]) -> dict:
    params = dict(base)
    for k, values in space.items():
        if k in MEMBER_KEYS:
            n, first = n_members[k], int(k in MEMBER_WEIGHT_KEYS)  # relative weights: the first member stays 1
            if n > first and not isinstance(base.get(k), dict):
                params[k] = [1.0] * first + [float(values[rng.integers(len(values))]) for _ in range(n - first)]
        else:
            params[k] = values[int(rng.integers(len(values)))]
    return params


def _neighbours(best: dict, key: str, values: list, n_members: dict[str, int]) -> list[dict]:
    if key not in MEMBER_KEYS:
        return [{**best, key: v} for v in values]
    n, first = n_members[key], int(key in MEMBER_WEIGHT_KEYS)
    if n <= first or isinstance(best.get(key), dict):
        return []
    current = [float(w) for w in (best.get(key) or [1.0] * n)]
    return [{**best, key: current[:i] + [float(v)] + current[i + 1 :]} for i in range(first, n) for v in values]


def check_space(space: dict) -> None:
    """Every candidate value of the space against its spec in cfg/fuse.yaml (a member's weight or scale as a
    one-member list), before reading large files: the trials are built of these values."""
    for key, values in space.items():
        for v in values:
            try:
                check_param(key, [v] if key in MEMBER_KEYS else v)
            except SiimError as e:
                raise SiimError(f"space: {key}: {e}") from None


def wbf_pool(rng: np.random.Generator, base: dict, space: dict, n_members: dict[str, int], size: int) -> list[dict]:
    """Up to `size` distinct WBF settings (base's first) that the random trials share: a random trial
    costs one WBF only when it brings a new setting."""
    wbf_space = {k: v for k, v in space.items() if k in WBF_KEYS}
    pool = [{k: base[k] for k in WBF_KEYS}]
    for _ in range(size * 20):
        if len(pool) >= size:
            break
        setting = {k: v for k, v in canonical(_draw(rng, base, wbf_space, n_members)).items() if k in WBF_KEYS}
        if all(_key({**base, **setting}) != _key({**base, **p}) for p in pool):
            pool.append(setting)
    return pool


def random_draws(
    rng: np.random.Generator, base: dict, space: dict, pool: list[dict], n_members: dict[str, int], n: int
) -> list[dict]:
    """n distinct random parameter sets (a WBF setting of the pool, formula parameters drawn afresh),
    grouped by WBF setting so that the WBF cache holds."""
    formula_space = {k: v for k, v in space.items() if k not in WBF_KEYS}
    draws, seen = [], {_key(base)}
    for _ in range(n * 20):  # duplicates are skipped: bounded attempts for small spaces
        if len(draws) == n:
            break
        which = int(rng.integers(len(pool)))
        params = canonical({**_draw(rng, base, formula_space, n_members), **pool[which]})
        if _key(params) not in seen:
            seen.add(_key(params))
            draws.append((which, len(draws), params))
    return [params for _, _, params in sorted(draws, key=lambda d: (d[0], d[1]))]


def simplify(search: Search, base: dict) -> tuple[float, dict]:
    """Put back the starting value of every changed parameter that does not earn its place (same
    score or better without it), so best.yaml changes only what matters."""
    best_score, best = search.best
    for key in FUSION_KEYS:
        if _key({**best, key: base[key]}) == _key(best):
            continue
        candidate = canonical({**best, key: base[key]})
        score_without = search.evaluate(candidate, "simplify")
        if score_without >= best_score:
            best_score, best = score_without, candidate
    return best_score, best


def search_space(cfg: Config, inputs: FuseInputs, base: dict, space: dict) -> tuple[Search, int]:
    """Trial 0 (base), the random trials, the refinement pass; returns the search and the number of random trials."""
    n_members = {k: len(getattr(inputs, files)) for k, files in MEMBER_KEYS.items()}
    search = Search(inputs, cfg.workers)
    rng = np.random.default_rng(cfg.seed)
    search.evaluate(base, "default")
    pool = wbf_pool(rng, base, space, n_members, min(cfg.wbf_pool, cfg.trials + 1))
    draws = random_draws(rng, base, space, pool, n_members, cfg.trials)
    for params in tqdm(draws, desc="fuse tune: random", leave=False):
        search.evaluate(params, "random")
    for key in tqdm(list(space), desc="fuse tune: refine", leave=False):
        for params in _neighbours(search.best[1], key, space[key], n_members):
            search.evaluate(params, "refine")
    return search, len(draws)


def write_results(
    cfg: Config, written: Written, search: Search, base: dict, best: dict, best_score: float, n_images: int
) -> dict:
    """tune.yaml, trials.csv, tune_compare.csv and best.yaml in the run dir (claimed by tune: its own to replace);
    returns their paths and tables."""
    out = written.folder
    for name in OUTPUTS:  # temporaries of writes a kill -9 interrupted
        for tmp in atomic_temporaries(out / name):
            tmp.unlink(missing_ok=True)
    # best.yaml (and the record's entry) go first and come back last: present, they always stand beside the files
    # of a finished tune
    forget(out, "tune")
    (out / "best.yaml").unlink(missing_ok=True)
    cfg.save(out / "tune.yaml")
    trials = pd.DataFrame(search.rows)
    write_csv(trials, out / "trials.csv", float_format="%.6g")
    default_row, best_row = search.rows[0], search.rows[search.seen[_key(best)]]
    classes = [c for c in SCORE_COLUMNS if c in default_row]
    compare = pd.DataFrame(
        {"class": classes, "default": [default_row[c] for c in classes], "best": [best_row[c] for c in classes]}
    )
    compare["change"] = compare["best"] - compare["default"]
    write_csv(compare, out / "tune_compare.csv", float_format="%.6g")
    header = (
        f"# siimcovid fuse tune: best of {len(search.rows)} trials on {n_images} out-of-fold images "
        f"(seed {cfg.seed}); final {best_score:.6f} vs {default_row['final']:.6f} with the starting parameters.\n"
        f"# Use: siimcovid fuse cfg={out / 'best.yaml'} split=test data=... det=<test files> cls=<test files>\n"
    )
    body = Config({k: best[k] for k in FUSION_KEYS}).to_yaml()
    best_file = atomic_write_text(out / "best.yaml", header + body)
    remember(out, "tune", make_entry(cfg, search.inputs.files, best))
    return {"dir": out, "trials": trials, "compare": compare, "best_file": best_file}


def tune(cfg: Config) -> dict:
    """Run the search (see the module docstring) and write its files.

    Returns {"best": the best parameters (FUSION_KEYS), "best_score", "default_score", "dir",
    "trials" (the trials table), "compare" (per class, start vs best), "best_file" (best.yaml)}."""
    if cfg.split != "oof":
        raise SiimError("fuse tune searches on out-of-fold predictions: use split=oof (never tune on the test split)")
    space = load_space(cfg.space)
    base = canonical(fusion_params(cfg))  # cfg: typed and checked at load
    check_space(space)
    written = open_run_dir(cfg, [run_dir(cfg) / name for name in OUTPUTS])  # a user's best.yaml stops it before the search
    inputs = load_inputs(cfg)
    describe_inputs(inputs)
    if not inputs.none_files:  # without none_cls= files the none models' weight changes nothing: no trial spent on it
        space.pop("none_model_weight", None)
    search, n_random = search_space(cfg, inputs, base, space)
    default_score = search.rows[0]["final"]
    best_score, best = simplify(search, base)
    files = write_results(cfg, written, search, base, best, best_score, len(inputs.images))
    changed = {k: best[k] for k in FUSION_KEYS if _key({**base, k: best[k]}) != _key(base)}
    LOGGER.info(
        f"fuse tune: {len(search.rows)} trials ({n_random} random, then refine and simplify), "
        f"{search.cache.runs} WBF runs\n"
        + files["compare"].to_string(index=False, float_format=lambda v: f"{v:.4f}")
        + "\nchanged: "
        + (", ".join(f"{k}={_flat(v)}" for k, v in changed.items()) or "nothing (the starting parameters are best)")
        + f"\nfuse tune: {files['best_file']}; trials in {files['dir'] / 'trials.csv'}"
    )
    return {"best": best, "best_score": best_score, "default_score": default_score, **files}


def main(cfg: Config) -> dict:
    return tune(cfg)
