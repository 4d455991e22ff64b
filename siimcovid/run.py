"""`siimcovid run`: the whole pipeline on one dataset, ending with the CV table and a report.

Every step is the same stage a user runs by hand: this module builds each stage's config
(`siimcovid.config.load_config`, typed and checked as on the command line) and calls the
stage's Python function, so each one skips work already done: re-running `siimcovid run` after
an interruption resumes. The run's sections (detect, classify_predict, ...) were checked against
their stage's settings when the run's own config loaded (run.yaml's `settings[<stage>]` specs):
here they are plain mappings of checked values. Stages are imported when their step runs (this module stays light:
`siimcovid runs` imports it for its `describe`).

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

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from siimcovid import metrics, stages
from siimcovid.config import Config, default_config_path, read_yaml, schema
from siimcovid.data.siim import IMAGE_CSV
from siimcovid.runs import quiet_csv, quiet_yaml
from siimcovid.stages import SECOND, detector_names
from siimcovid.tables import SCORE_COLUMNS, write_csv
from siimcovid.utils import LOGGER, SiimError, atomic_write_text, check_name

NESTED = "fused, tuned on the other folds (nested: an honest CV)"
TUNED = "fused, tuned on all OOF (optimistic: scored where tuned; makes the submission)"


# ----------------------------------------------------------------------------- calling a stage
def section_settings(settings: dict, section: str, **fixed) -> dict:
    """A stage's settings (those of the run's `section`, or made from it), plus the ones `run` sets itself (which it
    must own)."""
    clash = sorted(set(settings) & set(fixed))
    if clash:
        raise SiimError(
            f"run sets {clash} of `{section}` itself (name=, data=, project= and the splits are the run's): remove them"
        )
    return {**settings, **fixed}


def predict_settings(cfg, stage: str, section: str | None = None) -> dict:
    """The `<stage>_predict` section, over the train section's runtime settings (those tagged
    `runtime` in cfg/<stage>.yaml: the machine's, e.g. device and workers), so that predict runs
    where train ran unless the predict section says otherwise. section: the train section (default the stage's; the
    detector sections lung_detect and detect2 share detect_predict)."""
    runtime = schema(stage).keys("runtime")
    inherited = {k: v for k, v in cfg[section or stage].items() if k in runtime}
    return {**inherited, **cfg[f"{stage}_predict"]}


def stage_dir(project: Path, stage: str) -> Path:
    """<project>/<the stage's folder>: where that stage's runs go."""
    return Path(project) / stages.stage(stage).folder


@contextmanager
def step(title: str, key: str, timings: dict):
    """Log a step's title; record its seconds in timings[key] when it ends."""
    LOGGER.info(f"\n===== siimcovid run: {title} =====")
    start = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - start


# ----------------------------------------------------------------------------- the steps
def ensure_data(cfg: Config, timings: dict) -> Path:
    """The SIIM root of the run; a synthetic dataset is written there when it holds no SIIM data."""
    root = Path(cfg.data)
    if (root / IMAGE_CSV).exists():
        return root
    from siimcovid.data.synth import generate, is_synthetic

    if cfg.synth is None:
        raise SiimError(f"no SIIM data at {root} ({IMAGE_CSV} missing), and synth is off")
    if root.exists() and any(root.iterdir()) and not is_synthetic(root):
        # e.g. a download still unzipping: never write synthetic data over it
        raise SiimError(f"no SIIM data at {root} ({IMAGE_CSV} missing), and the folder holds other files: not touching it")
    if root != Path(read_yaml(default_config_path("run"))["data"]):
        LOGGER.warning(f"run: {root} holds no SIIM data: writing a SYNTHETIC dataset there (synth settings)")
    with step(f"synth -> {root}", "synth", timings):
        generate(stages.stage_config("synth", None, section_settings(cfg.synth, "synth", out=str(root))))
    return root


def prepare_data(cfg: Config, root: Path, project: Path) -> Path:
    """`siimcovid prepare` of the run's data into <project>/prepare/<name>; the prepared dir."""
    from siimcovid.data.prepare import prepare

    out = stage_dir(project, "prepare") / cfg.name
    settings = section_settings(cfg.prepare, "prepare", data=str(root), name=cfg.name, out=str(out), **lung_boxes(cfg, root))
    return prepare(stages.stage_config("prepare", None, settings))


def lung_boxes(cfg: Config, root: Path) -> dict:
    """crop=lung: prepare's lung_boxes= (the prepare section's, else <data>/lung_boxes, which `siimcovid synth` writes)."""
    if cfg.crop != "lung" or cfg.prepare.get("lung_boxes"):
        return {}
    found = Path(root) / "lung_boxes"
    if not found.is_dir() and Path(root).exists():
        raise SiimError(f"crop=lung: the lung detector needs lung boxes: prepare.lung_boxes=<folder> ({found} does not exist)")
    return {"lung_boxes": str(found)}


LUNG = "lung_detect"  # run.yaml's section of the lung detector (crop=lung); SECOND (detect2): stages.py's, with export


def lung_name(cfg) -> str:
    """The run name of the pipeline's lung detector (crop=lung): <name>-lung."""
    return f"{cfg['name']}-lung"


def crop_views(cfg, lung_dir: Path | None) -> dict:
    """The settings run gives every model's train and predict for its views: crop=lung and the run's lung detector."""
    return {"crop": "lung", "lung": str(lung_dir)} if lung_dir is not None else {}


def view_shape(section: dict, views: dict) -> dict:
    """A model's own crop_margin and lung_conf (its run.yaml section's), for its predict: it crops as it trained."""
    return {k: v for k, v in section.items() if k in ("crop_margin", "lung_conf")} if views else {}


def detect_configs(
    cfg: Config, prepared: Path, project: Path, name: str | None = None, section: str = "detect", views: dict | None = None,
    **extra,
) -> tuple[Config, Config]:
    """The `detect train` and `detect predict` configs of the run (typed and checked as on the command line): of its
    `section` (detect; lung: task=lung; detect2), with the views run gives train and predict (crop=lung, lung=)."""
    det_project, name, views = stage_dir(project, "detect"), name or cfg.name, views or {}
    fixed = {"data": str(prepared), "name": name, "project": str(det_project), **views, **extra}
    if section == LUNG:
        fixed["task"] = "lung"
    train = stages.stage_config("detect", "train", section_settings(cfg[section], section, **fixed))
    predict = {**view_shape(cfg[section], views), **predict_settings(cfg, "detect", section)}
    if section != "detect":  # another detector's own predict settings (e.g. its family's tta) are its section's
        predict.update({k: v for k, v in cfg[section].items() if k in schema("detect").keys("predict")})
    settings = section_settings(predict, "detect_predict", run=str(det_project / name), split=["oof", "test"], **views)
    return train, stages.stage_config("detect", "predict", settings)


def detect(
    cfg: Config, prepared: Path, project: Path, name: str | None = None, section: str = "detect", views: dict | None = None,
    **extra,
) -> tuple[Path, dict[str, Path]]:
    """`siimcovid detect train`, then `detect predict` of the OOF and test splits; the detect run dir and the files
    detect predict wrote ({"oof": pred_oof.csv, "test": pred_test.csv, "scores": ...}). name: the run's name (default
    the run's); section: run.yaml's (detect, lung, detect2); views: crop=lung's settings (crop_views); extra: settings
    run sets itself (e.g. extra=<pseudo folder>)."""
    from siimcovid.detect.predict import predict
    from siimcovid.detect.train import train

    train_cfg, predict_cfg = detect_configs(cfg, prepared, project, name, section, views, **extra)
    train(train_cfg)
    det_dir = Path(train_cfg.project) / train_cfg.name
    written = predict(predict_cfg)  # {run name: {split: file}}
    return det_dir, written[det_dir.name]


def classify_configs(
    cfg: Config, prepared: Path, project: Path, name: str | None = None, views: dict | None = None, **extra
) -> tuple[Config, Config]:
    """The `classify train` and `classify predict` configs of the run (typed and checked as on the command line), with
    the views run gives train and predict (crop=lung, lung=); predict crops as train did (the classify section's
    crop_margin and lung_conf, unless classify_predict says otherwise)."""
    cls_project, name, views = stage_dir(project, "classify"), name or cfg.name, views or {}
    fixed = {"data": str(prepared), "name": name, "project": str(cls_project), **views, **extra}
    train = stages.stage_config("classify", "train", section_settings(cfg.classify, "classify", **fixed))
    fixed = {"run": str(cls_project / name), "project": str(cls_project), "split": ["oof", "test"], **views}
    predict = {**view_shape(cfg.classify, views), **predict_settings(cfg, "classify")}
    settings = section_settings(predict, "classify_predict", **fixed)
    return train, stages.stage_config("classify", "predict", settings)


def classify(
    cfg: Config, prepared: Path, project: Path, name: str | None = None, views: dict | None = None, **extra
) -> tuple[Path, dict[str, Path]]:
    """`siimcovid classify train`, then `classify predict` of the OOF and test splits; the classify
    run dir and its per-image tables ({"oof": pred_oof_image.csv, "test": pred_test_image.csv}).
    name, views, extra: as for detect (crop=lung: train with crop_train's crops, predict whole + crop)."""
    from siimcovid.classify import predict, train

    train_cfg, predict_cfg = classify_configs(cfg, prepared, project, name, views, **extra)
    train.main(train_cfg)  # main: sets up (and tears down) the device group
    cls_dir = Path(train_cfg.project) / train_cfg.name
    written = predict.main(predict_cfg)[cls_dir.name]
    return cls_dir, {s: written[s] for s in ("oof", "test")}


def check_sections(cfg: Config, root: Path, project: Path) -> None:
    """Every stage's section typed and checked as the stage will check it, before the first stage runs: a bad value
    in the classify section must not wait for hours of detector training to be found."""
    if cfg.get("demo_range") and (len(cfg.demo_range) != 2 or cfg.demo_range[0] > cfg.demo_range[1]):
        raise SiimError(f"run setting demo_range={cfg.demo_range}: expected [low, high] with low <= high, or null")
    prepared = stage_dir(project, "prepare") / cfg.name
    fixed = {"data": str(root), "name": cfg.name, "out": str(prepared), **lung_boxes(cfg, root)}
    stages.stage_config("prepare", None, section_settings(cfg.prepare, "prepare", **fixed))
    views = crop_views(cfg, stage_dir(project, "detect") / lung_name(cfg)) if cfg.crop == "lung" else {}
    if views:
        detect_configs(cfg, prepared, project, lung_name(cfg), LUNG)
    for name, section in zip(detector_names(cfg), ("detect", SECOND)):
        detect_configs(cfg, prepared, project, name, section, views)
    classify_configs(cfg, prepared, project, views=views)
    fusion, files = Fusion(cfg, prepared, project), [str(prepared / "checked.csv")]
    fusion.config("", "oof", files, files)
    fusion.config("", "oof", files, files, mode="tune")
    if cfg.pseudo.get("rounds", 0):
        out = stage_dir(project, "pseudo") / f"{cfg.name}-pseudo1"
        stages.stage_config("pseudo", None, pseudo_settings(cfg, prepared, prepared, prepared, out))


# ----------------------------------------------------------------------------- fusion
def tuned_params(result: dict) -> dict:
    """The best fusion parameters of what `fuse tune` returned."""
    return dict(result["best"])


class Fusion:
    """`siimcovid fuse` and `fuse tune` on this run's predictions; a call with tag t writes <project>/fuse/<name><t>/."""

    def __init__(self, cfg: Config, prepared: Path, project: Path, name: str | None = None):
        self.name, self.settings = name or cfg.name, dict(cfg.fuse)
        self.data, self.project = str(prepared), str(stage_dir(project, "fuse"))

    def config(self, tag: str, split: str, det: list, cls: list, mode: str | None = None, **extra) -> Config:
        fixed = {"data": self.data, "project": self.project, "name": f"{self.name}{tag}", "split": split}
        settings = section_settings({**self.settings, **extra}, "fuse", det=det, cls=cls, **fixed)
        return stages.stage_config("fuse", mode, settings)

    def within(self, folder: str) -> Fusion:
        """This fusion writing <project>/fuse/<folder>/<tag>/ instead: a fuse name is one folder name, so nested
        tuning's fold<k>/ are runs of a project of their own."""
        inner = copy.copy(self)
        inner.project, inner.name = str(Path(self.project) / check_name(folder, "fusion folder")), ""
        return inner

    def fuse(self, tag: str, split: str, det: list, cls: list, **extra) -> dict:
        """Fuse one split: {"dir", "files", "fused", "score" (oof)}."""
        from siimcovid.fuse.stage import fuse

        return fuse(self.config(tag, split, det, cls, **extra))

    def tune(self, tag: str, det: list, cls: list, **extra) -> dict:
        """Tune the fusion on the OOF predictions; the best fusion parameters."""
        from siimcovid.fuse.tune import tune

        return tuned_params(tune(self.config(tag, "oof", det, cls, mode="tune", **extra)))


def nested_tuning(prepared: Path, fusion: Fusion, oof: tuple[list, list], trials: int) -> dict:
    """Out-of-fold CV of the tuned fusion that is not scored on the data it was tuned on:
    for each fold k, tune on the other folds' OOF predictions, fuse fold k with those settings;
    then score all folds' fused predictions together."""
    from siimcovid.data.prepared import Prepared
    from siimcovid.data.truth import oof_truth

    n_folds = Prepared(prepared).n_folds
    nested = fusion.within(f"{fusion.name}-nested")  # runs/fuse/<name>-nested/fold<k>/
    parts = []
    for k in range(n_folds):
        others = [f for f in range(n_folds) if f != k]
        best = nested.tune(f"fold{k}", *oof, trials=trials, folds=others)
        parts.append(nested.fuse(f"fold{k}", "oof", *oof, folds=[k], **best)["fused"])
    images = pd.concat([p.images for p in parts], ignore_index=True)
    pred = pd.concat([p.pred() for p in parts], ignore_index=True)
    return {"score": metrics.score(oof_truth(prepared, images.image_id), pred)}


def fusion_rows(cfg: Config, fusion: Fusion, det: list[dict], cls: dict, prepared: Path) -> tuple[list[dict], dict, dict]:
    """The CV rows of the fusion (tuned when tune_trials > 0) and of the baselines; the fused OOF and test results.
    det: each detector's {split: its boxes}; cls: the classifier's {split: its table}."""
    both = {s: ([d[s] for d in det], [cls[s]]) for s in ("oof", "test")}
    rows = [cv_row("fused, default fusion settings", fusion.fuse("-default", "oof", *both["oof"]))]
    tuned = {}
    if cfg.tune_trials > 0:
        if cfg.nested_tuning:
            rows.insert(0, cv_row(NESTED, nested_tuning(prepared, fusion, both["oof"], cfg.tune_trials)))
        tuned = fusion.tune("", *both["oof"], trials=cfg.tune_trials)  # the tuned fusion settings, for OOF and test
    fused = fusion.fuse("", "oof", *both["oof"], **tuned)
    rows.insert(1 if cfg.nested_tuning and tuned else 0, cv_row(TUNED if tuned else "fused", fused))
    test = fusion.fuse("", "test", *both["test"], **tuned)
    return rows + baseline_rows(fusion, det, cls, prepared, fused), fused, test


def baseline_rows(fusion: Fusion, det: list[dict], cls: dict, prepared: Path, fused: dict) -> list[dict]:
    """The baselines on the images the fusion scored: class priors, the detector alone (the first: the pipeline's
    YOLO), the classifier alone."""
    priors = {"score": priors_baseline(scored_truth(prepared, fused))}
    detector = fusion.fuse("-baseline-detector", "oof", [det[0]["oof"]], [], none_det="max", none_cls_weight=0.0)
    classifier = fusion.fuse("-baseline-classifier", "oof", [], [cls["oof"]])
    return [
        cv_row("baseline: class priors, no boxes", priors),
        cv_row("baseline: detector alone (none = 1 - max conf)", detector),
        cv_row("baseline: classifier alone (no boxes)", classifier),
    ]


def scored_truth(prepared: Path, fused: dict) -> pd.DataFrame:
    """The truth per image (siimcovid.data.truth.oof_images) of the out-of-fold images fused, in their order."""
    from siimcovid.data.truth import oof_images

    ids = fused["fused"].images.image_id
    return oof_images(prepared, ids).set_index("image_id").loc[ids].reset_index()


def priors_baseline(images: pd.DataFrame) -> metrics.Score:
    """Every study gets the class frequencies of these images' studies, every image their share of
    `none`, no boxes (images: the truth per image, scored_truth)."""
    from siimcovid.data.truth import truth_rows

    studies = images.drop_duplicates("study_id")
    probs = pd.DataFrame({"study_id": studies.study_id, **metrics.class_priors(studies)})
    none = pd.DataFrame({"image_id": images.image_id, "none": float((images.boxes.map(len) == 0).mean())})
    pred = pd.concat([metrics.study_pred(probs), metrics.image_pred(None, none)], ignore_index=True)
    return metrics.score(truth_rows(images), pred)


# ----------------------------------------------------------------------------- pseudo-label rounds
PSEUDO_ROUND = "pseudo round {r}: "  # the prefix of a round's rows in the CV table


def pseudo_settings(cfg: Config, teacher_det: Path, teacher_cls: Path, prepared: Path, out: Path) -> dict:
    """`siimcovid pseudo` settings of a round: the pseudo section (less `rounds`), the teachers' predict TTA and
    machine where it does not say otherwise, and the teachers, data and folder, which run sets itself."""
    settings = {k: v for k, v in cfg.pseudo.items() if k != "rounds"}
    det_tta, cls_tta = cfg.detect_predict.get("tta"), cfg.classify_predict.get("tta")
    machine = {k: v for k, v in cfg.classify.items() if k in ("device", "workers")}
    inherited = {"det_tta": det_tta, "cls_tta": cls_tta, **machine}
    settings = {**{k: v for k, v in inherited.items() if v is not None}, **settings}
    fixed = {"teacher_det": str(teacher_det), "teacher_cls": str(teacher_cls), "data": str(prepared), "out": str(out)}
    return section_settings(settings, "pseudo", **fixed)


def student_extra(cfg: Config, section: str, folder: Path) -> list[str]:
    """A student's extra training data: its section's own extra= (e.g. RSNA boxes), then the round's pseudo-labels."""
    return [*cfg[section].get("extra", []), str(folder)]


def students_config(cfg: Config) -> Config:
    """The run's settings with extra= left to student_extra (run sets it for the students)."""
    drop = lambda section: {k: v for k, v in cfg[section].items() if k != "extra"}  # noqa: E731
    return Config(cfg, detect=drop("detect"), classify=drop("classify"))


def pseudo_rounds(
    cfg: Config, prepared: Path, project: Path, det_dir: Path, cls_dir: Path, timings: dict, views: dict | None = None
) -> list[dict]:
    """`pseudo.rounds` rounds: round r pseudo-labels the unlabelled pool (the run's test split, or pseudo.source) with
    the previous round's models, trains <name>-pseudo<r> students on the train split plus those labels (extra=),
    predicts and fuses them; the round's CV rows, prefixed "pseudo round r: " (none when rounds is 0). The students
    see the views the first models saw (crop=lung); the teachers label whole images (the pool has no lung boxes)."""
    from siimcovid.pseudo import pseudo

    rows = []
    for r in range(1, cfg.pseudo.get("rounds", 0) + 1):
        name = f"{cfg.name}-pseudo{r}"
        with step(f"pseudo round {r}: labels from {det_dir.name} + {cls_dir.name}", f"pseudo{r}", timings):
            settings = pseudo_settings(cfg, det_dir, cls_dir, prepared, stage_dir(project, "pseudo") / name)
            folder = pseudo(stages.stage_config("pseudo", None, settings))
        with step(f"pseudo round {r}: students {name}", f"pseudo{r} students", timings):
            students = students_config(cfg)
            det_extra = student_extra(cfg, "detect", folder)
            det_dir, det_files = detect(students, prepared, project, name=name, views=views, extra=det_extra)
            cls_extra = student_extra(cfg, "classify", folder)
            cls_dir, cls_files = classify(students, prepared, project, name=name, views=views, extra=cls_extra)
            det = [{s: str(det_files[s]) for s in ("oof", "test")}]
            cls = {s: str(cls_files[s]) for s in ("oof", "test")}
            found, _, _ = fusion_rows(cfg, Fusion(cfg, prepared, project, name=name), det, cls, prepared)
        leaky = " [LEAKY: teacher=all]" if settings.get("teacher") == "all" else ""
        prefix = PSEUDO_ROUND.format(r=r)
        rows += [{**row, "method": prefix + row["method"] + leaky} for row in found if "priors" not in row["method"]]
    return rows


# ----------------------------------------------------------------------------- the CV table
def cv_row(method: str, result: dict) -> dict:
    return {"method": method, **result["score"].row()}


def cv_table(rows: list[dict], out: Path, name: str) -> tuple[pd.DataFrame, float]:
    """Write cv_table.csv and log it; the table and the margin of the first row over the best baseline."""
    table = pd.DataFrame(rows, columns=["method", *SCORE_COLUMNS])
    write_csv(table, out / "cv_table.csv", float_format="%.4f")
    LOGGER.info(
        f"\n===== siimcovid run: out-of-fold CV ({name}) =====\n"
        + table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
    )
    baselines = table[table.method.str.startswith("baseline")]
    margin = float(table.final[0] - baselines.final.max())
    LOGGER.info(f"fused final CV {table.final[0]:.4f}: {margin:+.4f} over the best baseline ({baselines.final.max():.4f})")
    return table, margin


# ----------------------------------------------------------------------------- the demo's measured range
SPREAD = {"detect": {"seed"}, "classify": {"seed"}}  # what demo_range spans: a run at other training seeds is the demo
OFF_CV = frozenset({"demo_range", "export", "report"})  # run settings that never move the CV
MOVES_CV = frozenset({"precision"})  # tagged runtime (a run may resume under another), yet bf16 inference moves the CV


def unused_sections(cfg: Config) -> set[str]:
    """The run's sections that this run's settings leave unused (a lung detector with crop=none, pseudo without rounds)."""
    unused = set() if cfg.get("crop") == "lung" else {"lung_detect"}
    return unused | (set() if (cfg.get("pseudo") or {}).get("rounds", 0) else {"pseudo"})


def demo_differences(cfg: Config) -> list[str]:
    """This run's settings that may move its CV and differ from the demo's (run.yaml's defaults), as `section.key`
    names; [] = the demo at other training seeds. A section is compared as its stage will run it (the stage's default
    where the section gives no value); runtime settings (device, workers, name...) do not count, nor unused sections."""
    demo, run_schema = stages.stage_config("run", None, {}), schema("run")
    differ, unused = [], unused_sections(cfg) & unused_sections(demo)
    for key, setting in run_schema.settings.items():
        if key in OFF_CV or key in unused or "runtime" in setting.tags:
            continue
        mine, theirs, section = cfg.get(key), demo.get(key), run_schema.section(key)
        if section and isinstance(mine, dict) and isinstance(theirs, dict):
            stage_schema = schema(section.word)
            defaults = stage_schema.defaults()
            mine, theirs = {**defaults, **mine}, {**defaults, **theirs}
            skip = (stage_schema.keys("runtime") - MOVES_CV) | SPREAD.get(key, set())
            differ += [f"{key}.{k}" for k in sorted((mine.keys() | theirs.keys()) - skip) if mine.get(k) != theirs.get(k)]
        elif key == "data" and mine and theirs:
            differ += [] if Path(mine).resolve() == Path(theirs).resolve() else [key]
        elif mine != theirs:
            differ.append(key)
    return differ


def compare_with_demo(cfg: Config, final: float) -> str | None:
    """One line: the run's final CV inside or outside the demo's measured range (demo_range), or why there is no range
    to compare with. None when demo_range is null."""
    if not cfg.get("demo_range"):
        return None
    lo, hi = cfg.demo_range
    differ = demo_differences(cfg)
    if differ:
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        return f"not the demo's settings ({shown}): the demo's range ({lo:.3f}-{hi:.3f}, demo_range) does not apply"
    where = f"the demo's range {lo:.3f}-{hi:.3f} (its spread over seeds, demo_range)"
    if lo <= final <= hi:
        return f"final CV {final:.4f} is inside {where}: a difference from the README's table is training noise"
    side = "below" if final < lo else "above"
    return (
        f"final CV {final:.4f} is {side} {where}: not noise seen so far; compare `pip list` with the packages of the "
        "table (docs/get-started/demo.md) and the code's commit"
    )


# ----------------------------------------------------------------------------- the pipeline
def run(cfg: Config) -> dict:
    project = Path(cfg.project)
    check_sections(cfg, Path(cfg.data), project)  # before anything is written or trained
    out = stage_dir(project, "run") / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("cv_table.csv", "report.md"):  # results of an earlier run under other settings
        (out / stale).unlink(missing_ok=True)
    cfg.save(out / "run.yaml")
    timings = {}

    root = ensure_data(cfg, timings)
    with step("prepare", "prepare", timings):
        prepared = prepare_data(cfg, root, project)
    lung_dir = None
    if cfg.crop == "lung":
        with step("lung detector train", "lung", timings):
            lung_dir, _ = detect(cfg, prepared, project, name=lung_name(cfg), section=LUNG)
    views = crop_views(cfg, lung_dir)
    det = []
    for name, section in zip(detector_names(cfg), ("detect", SECOND)):
        with step(f"{section} train", section, timings):
            det_dir, det_files = detect(cfg, prepared, project, name=name, section=section, views=views)
            det.append({s: str(det_files[s]) for s in ("oof", "test")})
    det_dir = stage_dir(project, "detect") / cfg.name  # the pipeline's own detector: the pseudo teacher, the report's
    with step("classify train", "classify", timings):
        cls_dir, cls_files = classify(cfg, prepared, project, views=views)
    with step("fuse", "fuse", timings):
        cls = {s: str(cls_files[s]) for s in ("oof", "test")}
        rows, fused, test = fusion_rows(cfg, Fusion(cfg, prepared, project), det, cls, prepared)
    rows += pseudo_rounds(cfg, prepared, project, det_dir, cls_dir, timings, views)

    table, margin = cv_table(rows, out, cfg.name)
    demo = compare_with_demo(cfg, float(table.final[0]))
    submission = test["files"]["submission"]
    LOGGER.info(f"submission: {submission}")
    result = {"dir": out, "table": table, "submission": submission, "timings": timings, "margin": margin, "demo": demo}
    if cfg.export:  # the trained pipeline as one portable bundle (siimcovid predict bundle=<project>/bundle/<name>)
        from siimcovid.bundle import export

        with step("export", "export", timings):
            settings = {"pipeline": cfg.name, "project": str(project), "overwrite": True}
            result["bundle"] = export(stages.stage_config("export", None, settings))
    if cfg.report:
        start = time.perf_counter()
        result["report"] = write_report(out, cfg, table, fused, prepared, det_dir, cls_dir, submission, timings, demo)
        timings["report"] = time.perf_counter() - start
    if demo:
        LOGGER.info(demo)  # the last line: how this CV compares with the demo's spread over seeds
    return result


# ----------------------------------------------------------------------------- the report
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
    demo: str | None = None,
) -> Path:
    """The plots and report.md with the CV table (and `demo`, the comparison with the demo's range, when there is one)."""
    from siimcovid import report
    from siimcovid.data.prepared import Prepared
    from siimcovid.data.truth import truth_rows

    images = scored_truth(prepared, fused)
    title = f"{cfg.name}: fused out-of-fold predictions"
    report.plot_pr_curves(truth_rows(images), fused["fused"].pred(), out / "pr_curves.png", title=title)
    studies = fused["fused"].studies
    labels = images.drop_duplicates("study_id").set_index("study_id").study_label
    confusion = report.confusion_matrix(labels.loc[studies.study_id].to_numpy(), studies)
    report.plot_confusion(confusion, out / "confusion.png", title="study classes, out-of-fold")
    report.plot_samples(Prepared(prepared), fused["fused"].boxes, fused["fused"].images, out / "samples.png")
    sources = f"""Data: `{cfg.data}`, prepared in `{prepared}`. Detector: `{det_dir}`. Classifier: `{cls_dir}`.
Submission (test split): `{submission}`."""
    sources += f"\n\n{demo[0].upper()}{demo[1:]}." if demo else ""
    return atomic_write_text(out / "report.md", report_text(cfg.name, sources, table, confusion, timings))


def markdown_table(table: pd.DataFrame) -> str:
    """The CV table in markdown, scores with 4 decimals."""
    fmt = lambda v: "" if pd.isna(v) else f"{v:.4f}"  # noqa: E731
    head = "| method | " + " | ".join(SCORE_COLUMNS) + " |\n|---|" + "---|" * len(SCORE_COLUMNS) + "\n"
    return head + "".join(
        "| " + r.method + " | " + " | ".join(fmt(getattr(r, c)) for c in SCORE_COLUMNS) + " |\n" for r in table.itertuples()
    )


def report_text(name: str, sources: str, table: pd.DataFrame, confusion: pd.DataFrame, timings: dict) -> str:
    """report.md: the CV table and how to read it, the plots, the time per step."""
    return f"""# siimcovid run: {name}

{sources}

## Out-of-fold CV (the competition metric)

{markdown_table(table)}
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


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401

        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- its row in `siimcovid runs`
def describe(run: Path) -> dict | None:
    """A run folder -> its two models, image sizes, data and tuning, its final CV beside the best baseline; None if not one."""
    cfg = quiet_yaml(run / "run.yaml")
    if not cfg:
        return None
    det, cls = cfg.get("detect") or {}, cfg.get("classify") or {}
    row = {
        "model": f"{Path(str(det.get('model', ''))).name} + {cls.get('model', '')}",
        "imgsz": f"{det.get('imgsz', '')}/{cls.get('imgsz', '')}",
        "settings": f"data={cfg.get('data')} tune_trials={cfg.get('tune_trials')}",
    }
    table = quiet_csv(run / "cv_table.csv")
    if table is not None and len(table):
        best_baseline = table[table.method.str.startswith("baseline")].final.max()
        row["cv_value"] = float(table.final.iloc[0])
        row["cv"] = f"final {row['cv_value']:.4f} (best baseline {best_baseline:.4f})"
    return row


def main(cfg: Config) -> dict:
    return run(cfg)
