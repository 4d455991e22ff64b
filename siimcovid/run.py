"""`siimcovid run`: the whole pipeline on one dataset, ending with the CV table and a report.

Every step is the same stage a user runs by hand (this module only chains them), so each one
skips work already done: re-running `siimcovid run` after an interruption resumes.

Outputs in <project>/run/<name>/:
    run.yaml         the resolved settings
    cv_table.csv     out-of-fold AP per class, study mAP, image mAP and final, one row per method:
                     fused (the pipeline), fused with the default fusion settings, and the baselines
                     priors (train class frequencies, the train share of none, no boxes), detector alone
                     (none = 1 - max conf, study = priors) and classifier alone (no boxes)
    report.md        the table, where every file came from, and the plots:
    pr_curves.png    precision-recall per class of the fused OOF predictions
    confusion.png    true study class x argmax of the fused study probabilities
    samples.png      out-of-fold images with ground-truth (green) and fused (red) boxes
The submission is <project>/fuse/<name>/submission.csv.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from siimcovid import metrics
from siimcovid.cli import call
from siimcovid.config import Config, default_config_path, read_yaml
from siimcovid.data.siim import IMAGE_CSV, STUDY_CLASSES
from siimcovid.data.synth import is_synthetic
from siimcovid.metrics import CLASSES
from siimcovid.tables import write_csv
from siimcovid.utils import LOGGER, SiimError, atomic_write_text

COLUMNS = [*CLASSES, "study_map", "image_map", "final"]


def _row(method: str, result: dict) -> dict:
    s = result["score"]
    return {
        "method": method,
        **{c: s.ap.get(c) for c in CLASSES},
        "study_map": s.study_map,
        "image_map": s.image_map,
        "final": s.final,
    }


def _section(cfg, section: str, **fixed) -> dict:
    """A stage's settings from its section, plus the ones `run` sets itself (which it must own)."""
    settings = dict(cfg[section] or {})
    clash = sorted(set(settings) & set(fixed))
    if clash:
        raise SiimError(
            f"run sets {clash} of `{section}` itself (name=, data=, project= and the splits are the run's): remove them"
        )
    return {**settings, **fixed}


def nested_tuning(prepared: Path, fuse, inputs: dict, trials: int) -> dict:
    """Out-of-fold CV of the tuned fusion that is not scored on the data it was tuned on:
    for each fold k, tune on the other folds' OOF predictions, fuse fold k with those settings;
    then score all folds' fused predictions together."""
    from siimcovid.data.prepared import Prepared

    n_folds = Prepared(prepared).n_folds
    parts = []
    for k in range(n_folds):
        others = [f for f in range(n_folds) if f != k]
        tag = f"-nested/fold{k}"  # runs/fuse/<name>-nested/fold<k>/
        result = fuse(tag, "oof", *inputs["oof"], mode="tune", trials=trials, folds=others)
        best = read_yaml(Path(result["dir"]) / "best.yaml")
        parts.append(fuse(tag, "oof", *inputs["oof"], folds=[k], **best)["fused"])
    images = pd.concat([p.images for p in parts], ignore_index=True)
    pred = pd.concat([p.pred() for p in parts], ignore_index=True)
    return {"score": metrics.score(_truth(prepared, images.image_id), pred)}


def _step(title: str):
    LOGGER.info(f"\n===== siimcovid run: {title} =====")
    return time.perf_counter()


def run(cfg: Config) -> dict:
    name, project = str(cfg.name), Path(cfg.project)
    out = project / "run" / name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("cv_table.csv", "report.md"):  # results of an earlier run under other settings
        (out / stale).unlink(missing_ok=True)
    cfg.save(out / "run.yaml")
    timings = {}

    root = Path(cfg.data)
    if not (root / IMAGE_CSV).exists():
        if cfg.synth is None:
            raise SiimError(f"no SIIM data at {root} ({IMAGE_CSV} missing), and synth is off")
        if root.exists() and any(root.iterdir()) and not is_synthetic(root):
            # e.g. a download still unzipping: never write synthetic data over it
            raise SiimError(f"no SIIM data at {root} ({IMAGE_CSV} missing), and the folder holds other files: not touching it")
        if root != Path(read_yaml(default_config_path("run"))["data"]):
            LOGGER.warning(f"run: {root} holds no SIIM data: writing a SYNTHETIC dataset there (synth settings)")
        t = _step(f"synth -> {root}")
        call("synth", None, **_section(cfg, "synth", out=str(root)))
        timings["synth"] = time.perf_counter() - t

    t = _step("prepare")
    prepared = call("prepare", None, **_section(cfg, "prepare", data=str(root), name=name, out=str(project / "prepare" / name)))
    timings["prepare"] = time.perf_counter() - t

    t = _step("detect train")
    det_project = project / "detect"
    call("detect", "train", **_section(cfg, "detect", data=str(prepared), name=name, project=str(det_project)))
    det_dir = det_project / name
    inherited = {k: v for k, v in (cfg.detect or {}).items() if k in ("device", "workers")}
    predict = {**inherited, **(cfg.detect_predict or {})}
    call("detect", "predict", **_section({"detect_predict": predict}, "detect_predict", run=str(det_dir), split=["oof", "test"]))
    timings["detect"] = time.perf_counter() - t

    t = _step("classify train")
    cls_project = project / "classify"
    call("classify", "train", **_section(cfg, "classify", data=str(prepared), name=name, project=str(cls_project)))
    cls_dir = cls_project / name
    inherited = {k: v for k, v in (cfg.classify or {}).items() if k in ("device",)}
    predict = {**inherited, **(cfg.classify_predict or {})}
    fixed = {"run": str(cls_dir), "project": str(cls_project), "split": ["oof", "test"]}
    call("classify", "predict", **_section({"classify_predict": predict}, "classify_predict", **fixed))
    timings["classify"] = time.perf_counter() - t

    t = _step("fuse")
    det = {s: str(det_dir / f"pred_{s}.csv") for s in ("oof", "test")}
    cls = {s: str(cls_dir / f"pred_{s}_image.csv") for s in ("oof", "test")}
    fuse_settings = dict(cfg.fuse or {})

    def fuse(tag: str, split: str, det_files: list, cls_files: list, mode=None, **extra) -> dict:
        fixed = {"data": str(prepared), "project": str(project / "fuse"), "name": f"{name}{tag}", "split": split}
        settings = {**fuse_settings, **extra}
        return call("fuse", mode, **_section({"fuse": settings}, "fuse", det=det_files, cls=cls_files, **fixed))

    both = {"oof": ([det["oof"]], [cls["oof"]]), "test": ([det["test"]], [cls["test"]])}
    rows = [_row("fused, default fusion settings", fuse("-default", "oof", *both["oof"]))]
    tuned = {}
    if int(cfg.tune_trials) > 0:
        trials = int(cfg.tune_trials)
        if cfg.nested_tuning:
            rows.insert(
                0,
                _row("fused, tuned on the other folds (nested: an honest CV)", nested_tuning(prepared, fuse, both, trials)),
            )
        result = fuse("", "oof", *both["oof"], mode="tune", trials=trials)
        tuned = read_yaml(Path(result["dir"]) / "best.yaml")  # the tuned fusion settings, for OOF and test
    fused = fuse("", "oof", *both["oof"], **tuned)
    label = "fused, tuned on all OOF (optimistic: scored where tuned; makes the submission)" if tuned else "fused"
    rows.insert(1 if cfg.nested_tuning and tuned else 0, _row(label, fused))
    test = fuse("", "test", *both["test"], **tuned)
    rows.append(_row("baseline: class priors, no boxes", {"score": priors_baseline(prepared, fused["fused"].images.image_id)}))
    rows.append(
        _row(
            "baseline: detector alone (none = 1 - max conf)",
            fuse("-baseline-detector", "oof", [det["oof"]], [], none_det="max", none_cls_weight=0.0),
        )
    )
    rows.append(_row("baseline: classifier alone (no boxes)", fuse("-baseline-classifier", "oof", [], [cls["oof"]])))
    timings["fuse"] = time.perf_counter() - t

    table = pd.DataFrame(rows, columns=["method", *COLUMNS])
    write_csv(table, out / "cv_table.csv", float_format="%.4f")
    LOGGER.info(
        f"\n===== siimcovid run: out-of-fold CV ({name}) =====\n"
        + table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    )
    baselines = table[table.method.str.startswith("baseline")]
    margin = float(table.final[0] - baselines.final.max())
    LOGGER.info(f"fused final CV {table.final[0]:.4f}: {margin:+.4f} over the best baseline ({baselines.final.max():.4f})")
    LOGGER.info(f"submission: {test['files']['submission']}")

    result = {"dir": out, "table": table, "submission": test["files"]["submission"], "timings": timings, "margin": margin}
    if cfg.report:
        t = time.perf_counter()
        result["report"] = write_report(out, cfg, table, fused, prepared, det_dir, cls_dir, test["files"]["submission"], timings)
        timings["report"] = time.perf_counter() - t
    return result


def write_report(
    out: Path,
    cfg: Config,
    table: pd.DataFrame,
    fused: dict,
    prepared: Path,
    det_dir: Path,
    cls_dir: Path,
    submission: Path,
    timings: dict,
) -> Path:
    """report.md with the CV table and the plots."""
    from siimcovid import report
    from siimcovid.data.prepared import Prepared

    prep = Prepared(prepared)
    pred = pd.read_csv(fused["files"]["pred"])
    truth = _truth(prepared, fused["fused"].images.image_id)
    report.plot_pr_curves(truth, pred, out / "pr_curves.png", title=f"{cfg.name}: fused out-of-fold predictions")
    studies = fused["fused"].studies
    labels = prep.split("train").drop_duplicates("study_id").set_index("study_id").study_label
    confusion = report.confusion_matrix(labels.loc[studies.study_id].to_numpy(), studies)
    report.plot_confusion(confusion, out / "confusion.png", title="study classes, out-of-fold")
    report.plot_samples(prep, fused["fused"].boxes, fused["fused"].images, out / "samples.png")
    fmt = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
    head = "| method | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + r.method + " | " + " | ".join(fmt(getattr(r, c)) for c in COLUMNS) + " |\n" for r in table.itertuples())
    text = f"""# siimcovid run: {cfg.name}

Data: `{cfg.data}`, prepared in `{prepared}`. Detector: `{det_dir}`. Classifier: `{cls_dir}`.
Submission (test split): `{submission}`.

## Out-of-fold CV (the competition metric)

{head}{body}
Each AP is the competition's (VOC 2010, IoU > 0.5) over all out-of-fold images; final = mean over
the six classes. Tuning the fusion on out-of-fold predictions and scoring it there flatters it:
the "nested" row tunes on the other folds and scores each fold with those settings (an honest
estimate); "tuned on all OOF" uses the settings the submission was made with, scored where they
were tuned (`siimcovid fuse tune` never returns settings below the defaults on the data it tunes on).

## Plots

Precision-recall per class (grey: raw, blue: the interpolated envelope whose area is the AP):

![PR curves](pr_curves.png)

Study classes, true against argmax of the fused probabilities (the metric ranks all four, so this
only shows where the mass goes):

![confusion](confusion.png)

{confusion.to_markdown() if _has_tabulate() else confusion.to_string()}

Out-of-fold images, ground truth in green, fused boxes in red:

![samples](samples.png)

## Time per step (seconds)

{chr(10).join(f"- {k}: {v:.0f}" for k, v in timings.items())}
"""
    return atomic_write_text(out / "report.md", text)


def priors_baseline(prepared: Path, image_ids) -> metrics.Score:
    """Every study gets the train class frequencies, every image the train share of `none`, no boxes."""
    from siimcovid.data.prepared import Prepared

    meta = Prepared(prepared).split("train")
    meta = meta[meta.image_id.isin(set(image_ids))]
    studies = meta.drop_duplicates("study_id")
    freq = studies.study_label.value_counts(normalize=True)
    probs = pd.DataFrame({"study_id": studies.study_id, **{c: float(freq.get(c, 0.0)) for c in STUDY_CLASSES}})
    none = pd.DataFrame({"image_id": meta.image_id, "none": float((meta.n_boxes == 0).mean())})
    pred = pd.concat([metrics.study_pred(probs), metrics.image_pred(None, none)], ignore_index=True)
    return metrics.score(_truth(prepared, meta.image_id), pred)


def _truth(prepared: Path, image_ids) -> pd.DataFrame:
    """The metric's truth rows of these out-of-fold images and their studies."""
    from siimcovid.data.truth import oof_truth

    return oof_truth(prepared, image_ids)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


def main(cfg: Config) -> dict:
    return run(cfg)
