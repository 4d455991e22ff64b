"""predict's runtime plan: before the long work, each member's time measured on this machine and projected to every
image of the source; `budget=<hours>` stops there when the projection is over it, with the cuts that fit.

Per detector and classifier member (the lung members have run: their boxes are what crop=lung members crop with), one
fold predicts the first image and then the first plan_images images of the prepared source, with the member's TTA and
again without it (where it has one). The difference of the two calls is the cost per image and fold (its load and
set-up: the rest), so

    member = folds x (load + images x per image)

and the projection is prepare (measured: it ran) + every member + fuse and view (not timed: about 0.05 s per image
in all by benchmarks/bench_predict.py, small beside the models). The cuts, each with its saving measured this way:
tta=none for every member (a predict setting); backend=auto where the bundle holds exported engines (timed in bf16
where the CPU computes it: siimcovid.bundle.engines), with precision=int8 where it holds int8 engines (`export int8=`);
precision=bf16 where the CPU computes bf16 (a predict setting; timed only then); one fold fewer of a member (export has
no fold selector yet); a member left out (`export` again without it; never the only detector or classifier). The plan costs
about 3 x plan_images images of one fold per member, twice with TTA (a first untimed call warms each member up); it is
skipped when the source has no more than 2 x plan_images images (the run itself is then about as short).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace

from siimcovid.bundle.engines import INT8
from siimcovid.utils import LOGGER, SiimError

FEWER = "one fold fewer (a bundle of fewer folds: export has no fold selector yet)"
LEFT_OUT = "left out (export the bundle again without it)"


@dataclass
class Cost:
    """One member's measured cost: per fold, its load and set-up (s) and seconds per image, with its TTA and without."""

    key: str
    folds: int
    load: float
    per_image: float
    per_image_no_tta: float | None  # None: its TTA is already off
    per_image_bf16: float | None = None  # timed only when bf16 would be a cut (an fp32 run on a bf16 CPU)
    per_image_engine: float | None = None  # timed only when the engine cut changes what the member runs (plan's engine)
    group: str = ""  # what may be left out only beside another of it: detect, classify, none (default: the key's kind)
    load_engine: float | None = None  # the engine's load and compile per fold (with per_image_engine)

    def seconds(self, n: int, per_image: float | None = None, folds: int | None = None, load: float | None = None) -> float:
        load = self.load if load is None else load
        return (self.folds if folds is None else folds) * (load + n * (self.per_image if per_image is None else per_image))


def first_images(prepared, n: int):
    """The prepared folder, seen with its first n test images only (a shallow copy: the same files)."""
    view = copy.copy(prepared)
    test = prepared.meta[prepared.meta.split == "test"].head(n)
    view.meta = test.reset_index(drop=True)
    return view


def span(seconds: float) -> str:
    """A duration as a person reads it: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(member, prepared, hw, tta, lungs, n: int, predict_member, warm: bool = False) -> tuple[float, float]:
    """(load, per image) of one fold of a member: the first image, then the first n (module docstring); warm: one
    untimed call first (imports and first-call set-up happen once per process, not once per fold)."""
    fold = min(member.weights)
    one = replace(member, weights={fold: member.weights[fold]})
    small, large = first_images(prepared, 1), first_images(prepared, n)
    if warm:
        predict_member(one, small, hw, tta, lungs)
    t1 = timed(lambda: predict_member(one, small, hw, tta, lungs))
    tn = timed(lambda: predict_member(one, large, hw, tta, lungs))
    per = max(tn - t1, 0.0) / max(n - 1, 1)
    return max(t1 - per, 0.0), per


def member_cost(member, prepared, hw, tta, lungs, n: int, predict_member, bf16: bool, engine=None) -> Cost:
    """engine: the Hardware of the backend cut (backend=auto, maybe in bf16), timed where the member has an engine."""
    from siimcovid.classify.tta import tta_name
    from siimcovid.predict.members import member_engine

    key = f"{member.kind}/{member.name}"
    load, per = measure(member, prepared, hw, tta, lungs, n, predict_member, warm=True)
    has_tta = (tta_name(tta, key) != "none") if member.kind == "classify" else bool(tta)
    no_tta = None
    if has_tta:
        off = "none" if member.kind == "classify" else False
        no_tta = measure(member, prepared, hw, off, lungs, n, predict_member)[1]
    in_bf16 = measure(member, prepared, replace(hw, precision="bf16"), tta, lungs, n, predict_member)[1] if bf16 else None
    on_engine = None  # (load, per image) on an exported engine: only where the cut would run another one for this member
    if engine is not None and member.engines and (
        engine.precision != hw.precision or member_engine(member, engine) != member_engine(member, hw)
    ):
        on_engine = measure(member, prepared, engine, tta, lungs, n, predict_member, warm=True)
    group = "none" if member.kind == "classify" and member.settings.get("task") == "none" else member.kind
    engine_load, engine_per = on_engine or (None, None)
    return Cost(key, len(member.weights), load, per, no_tta, in_bf16, engine_per, group, engine_load)


def cuts(costs: list[Cost], n: int, engine: str = "backend=auto") -> list[tuple[str, float]]:
    """(what to do, seconds it saves) of each cut, largest saving first; engine: the backend cut's settings."""
    out = []
    fast = sum(
        c.seconds(n) - c.seconds(n, c.per_image_engine, load=c.load_engine) for c in costs if c.per_image_engine is not None
    )
    if fast > 0:
        out.append((f"{engine} (the bundle's exported engines)", fast))
    tta = sum(c.seconds(n) - c.seconds(n, c.per_image_no_tta) for c in costs if c.per_image_no_tta is not None)
    if tta > 0:
        out.append(("tta=none (every member)", tta))
    bf16 = sum(c.seconds(n) - c.seconds(n, c.per_image_bf16) for c in costs if c.per_image_bf16 is not None)
    if bf16 > 0:
        out.append(("precision=bf16 (this CPU computes it)", bf16))
    kinds = [c.group or c.key.split("/")[0] for c in costs]
    for c, kind in zip(costs, kinds):
        if c.folds > 1:
            out.append((f"{c.key}: {FEWER}", c.load + n * c.per_image))
        if kinds.count(kind) > 1:  # a bundle keeps a detector and a classifier
            out.append((f"{c.key} {LEFT_OUT}", c.seconds(n)))
    return sorted(out, key=lambda t: -t[1])


def fitting(total: float, budget: float, options: list[tuple[str, float]], done: float = 0.0) -> list[str]:
    """The single cuts that alone fit the budget (the smallest saving first), else the fewest of the largest that do
    together: the settings and one fold fewer of each member, never a member left out in a combination; [] when none
    fits. Together, each cut saves its share of what the models still take (tta=none and bf16 each halve the time:
    both leave a quarter, not nothing): a guide, measured one cut at a time."""
    alone = [what for what, saved in options if total - saved <= budget]
    if alone:
        return alone[-1:] + [f"(or: {w})" for w in alone[:-1]]
    models = max(total - done, 1e-9)
    chosen, left = [], models
    for what, saved in options:  # largest first
        if what.endswith(LEFT_OUT):
            continue
        chosen.append(what)
        left *= 1 - min(saved / models, 1.0)
        if done + left <= budget:
            return chosen
    return []


def engine_cut(hw, engine) -> str:
    """The settings of the engine cut (plan's `engine` Hardware) that differ from predict's: backend=auto, precision=."""
    if engine is None:
        return ""
    changed = ["backend=auto"] if engine.backend != hw.backend else []
    if engine.int8 and not hw.int8:
        changed.append("precision=int8")
    elif engine.precision != hw.precision:
        changed.append(f"precision={engine.precision}")
    return " ".join(changed)


def plan(bundle, prepared, hw, cfg, lungs, seconds: dict, predict_member) -> dict | None:
    """Measure every detector and classifier member, log the projection, and stop when it is over budget= (hours).
    Returns the plan for predict.yaml, or None when skipped (plan=false, or too few images)."""
    from siimcovid.engine.devices import cpu_has_bf16
    from siimcovid.predict.members import member_tta

    n = len(prepared.split("test"))
    k = int(cfg.plan_images)
    if not cfg.plan or n <= 2 * k:
        if cfg.get("budget"):
            LOGGER.info(f"predict: {n} images, no more than the plan would time (2 x plan_images={k}): no plan, no budget check")
        return None
    bf16 = hw.device.type == "cpu" and hw.precision == "fp32" and cpu_has_bf16()
    # the engine cut, on the CPU: a torch run of a bundle with exported engines (backend=auto, in bf16 where the CPU
    # computes it), and int8 engines not asked for (precision=int8)
    engine, members, cpu = None, [*bundle.detectors, *bundle.classifiers], hw.device.type == "cpu"
    int8 = cpu and hw.backend != "onnx" and not hw.int8 and any(INT8 in m.engines for m in members)
    if cpu and (int8 or (hw.backend == "torch" and any(m.engines for m in members))):
        backend = "auto" if hw.backend == "torch" else hw.backend
        engine = replace(hw, backend=backend, precision="bf16" if cpu_has_bf16() else hw.precision, int8=int8 or hw.int8)
    costs = []
    for member in [*bundle.detectors, *bundle.classifiers]:
        tta = member_tta(member, cfg.tta)
        costs.append(member_cost(member, prepared, hw, tta, lungs, k, predict_member, bf16, engine))
    done = sum(seconds.values())  # prepare and the lung members: measured, they ran
    total = done + sum(c.seconds(n) for c in costs)
    lines = [
        f"  {c.key:<32} {c.folds} folds x ({c.load:.3g} s + {n} x {c.per_image:.3g} s) = {span(c.seconds(n))}" for c in costs
    ]
    LOGGER.info(
        f"predict: plan for {n} images on this machine ({hw.device}, {hw.precision}), one fold of each member timed "
        f"on {k} images:\n" + "\n".join(lines) + f"\n  {'done (prepare, lung members)':<32} {span(done)}"
        f"\n  {'projected total':<32} {span(total)} (fuse and view not included: about 0.05 s per image)"
    )
    options = cuts(costs, n, engine_cut(hw, engine))
    record = {"images": n, "timed_images": k, "projected_hours": round(total / 3600, 4), "members": {}}
    for c in costs:
        record["members"][c.key] = {"folds": c.folds, "load_s": round(c.load, 4), "s_per_image": round(c.per_image, 6)}
    record["cuts"] = {what: round(saved / 3600, 4) for what, saved in options}
    budget = cfg.get("budget")
    if budget and total > budget * 3600:
        fit = fitting(total, budget * 3600, options, done)
        shown = "\n".join(f"  {what}: saves {span(saved)}" for what, saved in options)
        advice = ("these cuts fit it: " + "; ".join(fit)) if fit else "no cut measured here fits it"
        raise SiimError(
            f"predict: the projection is {span(total)} for {n} images, over budget={budget:g} h; {advice}. "
            f"Each cut, measured on this machine:\n{shown}"
        )
    return record
