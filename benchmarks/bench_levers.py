"""Issue 12, item 5: do the two levers of the top teams (external data, pseudo-labels) move the honest CV?

On a synthetic setup where more data should matter, for each seed:

    SIIM-like set   a SMALL labelled train split (--train-studies, default 48) and a larger unlabelled
                    pool: its test split (--pool-studies, default 144), the competition's public test set's role
    RSNA-like set   `siimcovid synth kind=rsna` (boxes of lung opacities), prepared with layout=rsna
    NIH-like set    `siimcovid synth kind=chestxray14` (multi-label findings), prepared with layout=csv

and four arms, each a `siimcovid run` (the same tiny models, folds and fusion tuning):

    baseline                        the SIIM train split only
    (a) detector pretrained         detector pretrained on the RSNA-like boxes, then fine-tuned per fold
    (b) classifier pretrained       classifier pretrained multi-label on the NIH-like labels, then fine-tuned (init=)
    (c) one pseudo-label round      the baseline's per-fold teachers label the pool (teacher=fold: honest OOF),
                                    students train on the train split + those labels (extra=)

Scores are out of fold: classifier study mAP (classify's scores_oof.csv), detector opacity AP (detect's
scores_oof.csv) and the fused final score with the NESTED tuning (tuned on the other folds, scored on
the held-out one). Printed per seed, as mean +- std over seeds, and as the gain over the baseline of
the same seed (mean +- std of the per-seed gains): a gain smaller than its spread is reported as no gain.

    python benchmarks/bench_levers.py                       # 3 seeds, about 40 minutes on 2 CPU cores
    python benchmarks/bench_levers.py --seeds 0 --quick     # one seed, the smallest settings (a smoke test)

Issue 19, item 4 (`--levers detect`): the podium's detector levers, on synthetic data with lung boxes
(`siimcovid synth` writes <root>/lung_boxes; run's crop=lung reads them), three arms per seed:

    baseline        `siimcovid run`, crop=none: one YOLO detector, whole images
    crop            the same with crop=lung: run trains the lung detector first (section lung_detect, run
                    <name>-lung), the YOLO detector trains on and predicts whole + lung-crop views (and the
                    classifiers too where run gives them the views: this script does not care)
    frcnn           the baseline + detect2 = torchvision Faster R-CNN (family=torchvision, --frcnn-arch, from
                    scratch) fused with the YOLO detector; fuse tune searches det_scale per member. It is the
                    baseline's run given detect2: the baseline's YOLO and classifier are reused as trained (run
                    resumes them), so its gain is the second detector's and nothing else's

Per arm: the OOF opacity AP of its YOLO detector (and of the Faster R-CNN), the lung detector's OOF AP@0.5
(class lung of its scores_oof.csv), the nested fused opacity AP and final; gains over the baseline of the
same seed as above. Then the predict-time cost of each lever: `detect predict split=test` of every detector
the arm needs (crop: the lung detector, then the crop detector; frcnn: YOLO, then Faster R-CNN), all arms
timed side by side in this process, interleaved, the fastest of --timing-repeats; seconds per test image
(all folds' models: each image passes every fold's model, and every view of it) and the ratio to the baseline.

    python benchmarks/bench_levers.py --levers detect --out /tmp/bench             # 3 seeds, 28 min on 2 cores
    python benchmarks/bench_levers.py --levers detect --seeds 0 --quick            # the smoke test

Issue 20, item 6 (`--levers classify`): the podium's classifier levers, four arms per seed on one `siimcovid run`
(the baseline: its prepared data, its YOLO detector's OOF boxes and its classifier), each fused by `siimcovid fuse
split=oof` with the SAME default parameters (no tuning: only the classifier side differs between arms):

    baseline        the run's classifier, no TTA
    swa             the same classifier trained with swa_epochs=--swa-epochs (SWA of its last epochs)
    d4              the baseline's classifier predicted with tta=d4 (8 views) instead of none
    none_model      the baseline + a binary none model (classify train task=none) as none_cls=, none_model_weight 0.5

Per arm: the classifier's OOF study mAP and the fused AP(none), opacity AP and final (fuse's scores_oof.csv), gains
over the baseline of the same seed as above. The student of distillation has its own script,
benchmarks/bench_distill.py (its score against its teachers' and the predict time of one model against theirs).

    python benchmarks/bench_levers.py --levers classify --out /tmp/bench_cls        # 3 seeds
    python benchmarks/bench_levers.py --levers classify --seeds 0 --quick           # the smoke test

Tiny models (YOLOv5n and ResNet10t from scratch, 64 px, the detect group's detectors 128 px) on 2 CPU cores: the point is a
correct, honest procedure that runs anywhere; the size of a gain here says little about the real data.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siimcovid import cli  # noqa: E402
from siimcovid.config import schema  # noqa: E402
from siimcovid.run import NESTED, PSEUDO_ROUND  # noqa: E402
from siimcovid.runs import overall_scores, score  # noqa: E402

ARMS = {
    "baseline": "baseline",
    "det_rsna": "(a) detector pretrained on RSNA-like boxes",
    "cls_nih": "(b) classifier pretrained on ChestX-ray14-like labels",
    "pseudo": "(c) one pseudo-label round (teacher=fold)",
}
COLUMNS = {
    "cls_study_map": "classifier study mAP",
    "det_opacity_ap": "detector opacity AP",
    "fused_final": "fused final (nested)",
}


def settings(args) -> dict:
    """The tiny models and run settings every arm shares."""
    q = args.quick
    return {
        "prepare": {"sizes": [64], "n_folds": 3, "workers": 2, "data_yaml_dir": str(args.out / "data_yaml")},
        "detect": {
            "model": "yolov5n.yaml",
            "pretrained": False,
            "hyp": "yolov5m",
            "mosaic": 0.5,
            "optimizer": "AdamW",
            "lr0": 0.004,
            "epochs": 2 if q else args.det_epochs,
            "imgsz": 64,
            "batch": 16,
            "device": "cpu",
            "workers": 0,
            "plots": False,
        },  # fmt: skip
        "detect_predict": {"tta": False, "batch": 32},
        "classify": {
            "model": "resnet10t",
            "pretrained": False,
            "imgsz": 64,
            "epochs": 2 if q else args.cls_epochs,
            "fine_lr": [],
            "batch": 16,
            "workers": 0,
            "device": "cpu",
        },  # fmt: skip
        "classify_predict": {"tta": False, "workers": 0},
        "tune_trials": 4 if q else 12,
        "nested_tuning": True,
        "report": False,
    }


# ----------------------------------------------------------------------------- data
def make_data(args, seed: int) -> dict[str, Path]:
    """The three synthetic sets of a seed, the external ones prepared (SIIM is prepared by each run)."""
    base = args.out / f"seed{seed}"
    size = {"rows": 256, "cols": 300, "workers": 2, "seed": seed}
    siim = base / "siim"
    cli.call("synth", out=str(siim), train_studies=args.train_studies, test_studies=args.pool_studies, **size)
    cli.call("synth", kind="rsna", out=str(base / "rsna"), train_studies=args.external_studies, **size)
    cli.call("synth", kind="chestxray14", out=str(base / "nih"), train_studies=args.external_studies, **size)
    common = {"sizes": [64], "n_folds": 3, "workers": 2, "data_yaml_dir": str(args.out / "data_yaml")}
    rsna = cli.call("prepare", data=str(base / "rsna"), layout="rsna", name=f"rsna{seed}",
                    out=str(args.out / "runs" / "prepare" / f"rsna{seed}"), **common)  # fmt: skip
    nih = cli.call("prepare", data=str(base / "nih"), layout="csv", csv="Data_Entry_2017.csv", path_column="Image Index",
                   patient_column="Patient ID", label_format="pipe", image_dir="images", name=f"nih{seed}",
                   out=str(args.out / "runs" / "prepare" / f"nih{seed}"), **common)  # fmt: skip
    return {"siim": siim, "rsna": Path(rsna), "nih": Path(nih)}


# ----------------------------------------------------------------------------- pretraining (D's mechanisms)
def pretrain_detector(args, rsna: Path, seed: int, shared: dict) -> dict:
    """Train the detector on the RSNA-like boxes (fold 0's train part; its val part picks best.pt); the
    detect settings that start the SIIM detectors from it (init=<run> where `detect` has it, else pretrained=<best.pt>)."""
    project = args.out / "runs" / "detect"
    det = {**shared["detect"], "epochs": shared["detect"]["epochs"] * 2}
    cli.call("detect", "train", data=str(rsna), project=str(project), name=f"rsna-pre{seed}", fold=0, **det)
    run = project / f"rsna-pre{seed}"
    if "init" in schema("detect").settings:
        return {"init": str(run)}
    return {"pretrained": str(run / "fold0" / "weights" / "best.pt")}


def pretrain_classifier(args, nih: Path, seed: int, shared: dict) -> dict:
    """Train the classifier multi-label on the NIH-like labels; the classify settings that start from it (init=)."""
    project = args.out / "runs" / "classify"
    cls = {**shared["classify"], "epochs": shared["classify"]["epochs"] * 2}
    cli.call("classify", "train", data=str(nih), project=str(project), name=f"nih-pre{seed}", fold=0, **cls)
    return {"init": str(project / f"nih-pre{seed}")}


# ----------------------------------------------------------------------------- arms
def run_arm(args, name: str, siim: Path, shared: dict, **sections) -> pd.DataFrame:
    """One `siimcovid run` (sections override the shared settings key by key); its CV table."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in shared.items()}
    for section, extra in sections.items():
        cfg[section] = {**cfg.get(section, {}), **extra} if isinstance(extra, dict) else extra
    result = cli.call("run", name=name, data=str(siim), project=str(args.out / "runs"), **cfg)
    return result["table"]


def scores(args, run_name: str, table: pd.DataFrame, prefix: str = "") -> dict:
    """The three numbers of one arm: the classifier's and detector's OOF scores, the nested fused final."""
    runs = args.out / "runs"
    nested = table[table.method == prefix + NESTED]
    return {
        "cls_study_map": score(overall_scores(runs / "classify" / run_name), "study_map"),
        "det_opacity_ap": score(overall_scores(runs / "detect" / run_name), "opacity"),
        "fused_final": float(nested.final.iloc[0]) if len(nested) else float("nan"),
    }


def one_seed(args, seed: int) -> list[dict]:
    data = make_data(args, seed)
    shared = settings(args)
    out, name = [], f"s{seed}"
    pseudo = {"rounds": 1, "box_conf": args.box_conf}
    table = run_arm(args, f"base-{name}", data["siim"], shared, pseudo=pseudo)  # the baseline, then its pseudo round
    out.append({"seed": seed, "arm": "baseline", **scores(args, f"base-{name}", table)})
    out.append({"seed": seed, "arm": "pseudo", **scores(args, f"base-{name}-pseudo1", table, PSEUDO_ROUND.format(r=1))})
    det = pretrain_detector(args, data["rsna"], seed, shared)
    table = run_arm(args, f"det-{name}", data["siim"], shared, detect=det)
    out.append({"seed": seed, "arm": "det_rsna", **scores(args, f"det-{name}", table)})
    cls = pretrain_classifier(args, data["nih"], seed, shared)
    table = run_arm(args, f"cls-{name}", data["siim"], shared, classify=cls)
    out.append({"seed": seed, "arm": "cls_nih", **scores(args, f"cls-{name}", table)})
    return out


# ----------------------------------------------------------------------------- issue 19: the detector levers
DETECT_ARMS = {
    "baseline": "baseline (YOLO, whole images)",
    "crop": "crop=lung (lung detector + lung-crop views)",
    "frcnn": "YOLO + Faster R-CNN fused (det_scale tuned)",
}
DETECT_COLUMNS = {
    "det_opacity_ap": "YOLO opacity AP",
    "det2_opacity_ap": "Faster R-CNN opacity AP",
    "lung_ap": "lung detector AP@0.5",
    "fused_opacity_ap": "fused opacity AP (nested)",
    "fused_final": "fused final (nested)",
}


def detect_settings(args) -> dict:
    """The shared tiny settings with the detectors at --det-imgsz (at 64 px from scratch YOLO found no opacity in the
    data group), no bundle export (not what is measured), more tuning trials (det_scale is one more parameter)."""
    shared = settings(args)
    size = args.det_imgsz
    return {
        **shared,
        "prepare": {**shared["prepare"], "sizes": sorted({size, shared["classify"]["imgsz"]})},
        "detect": {**shared["detect"], "imgsz": size, "batch": 8},  # more steps: from scratch YOLO needs them
        "export": False,
        "tune_trials": 4 if args.quick else 16,
    }


def lung_settings(args, shared: dict) -> dict:
    """The lung detector's `detect train` settings (run's lung_detect section): the opacity detector's tiny YOLO."""
    return {**shared["detect"], "epochs": 2 if args.quick else args.lung_epochs}


def frcnn_settings(args, shared: dict) -> dict:
    """The second detector (run's detect2 section): torchvision's Faster R-CNN from scratch, on the CPU."""
    machine = {k: shared["detect"][k] for k in ("device", "workers")}
    return {
        "family": "torchvision", "arch": args.frcnn_arch, "pretrained": False, "imgsz": args.frcnn_imgsz,
        "epochs": 2 if args.quick else args.frcnn_epochs, "batch": 8, "optimizer": "AdamW", "lr0": args.frcnn_lr,
        **machine,
    }  # fmt: skip


def detect_scores(args, name: str, table: pd.DataFrame) -> dict:
    """An arm's numbers: its detectors' OOF scores (YOLO <name>, lung <name>-lung, Faster R-CNN <name>-torchvision,
    nan where the arm has none) and the nested fused opacity AP and final."""
    det = args.out / "runs" / "detect"
    nested = table[table.method == NESTED]
    row = nested.iloc[0] if len(nested) else {}
    return {
        "det_opacity_ap": score(overall_scores(det / name), "opacity"),
        "det2_opacity_ap": score(overall_scores(det / f"{name}-torchvision"), "opacity"),
        "lung_ap": score(overall_scores(det / f"{name}-lung"), "lung"),
        "fused_opacity_ap": float(row["opacity"]) if len(nested) else float("nan"),
        "fused_final": float(row["final"]) if len(nested) else float("nan"),
    }


def tuned_det_scale(args, name: str) -> str:
    """The det_scale fuse tune chose on all OOF (best.yaml of <project>/fuse/<name>), as text."""
    from siimcovid.config import read_yaml

    best = args.out / "runs" / "fuse" / name / "best.yaml"
    return str((read_yaml(best) or {}).get("det_scale", "-")) if best.is_file() else "-"


def keep_table(args, name: str, arm: str, seed: int) -> None:
    """A copy of the arm's cv_table.csv (the frcnn arm re-runs the baseline's run name, which rewrites it)."""
    kept = args.out / "cv_tables"
    kept.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.out / "runs" / "run" / name / "cv_table.csv", kept / f"{arm}-s{seed}.csv")


def make_siim(args, seed: int, studies: int) -> Path:
    """A seed's SIIM-like set; `siimcovid synth` writes its lung boxes (<root>/lung_boxes) beside it."""
    siim = args.out / f"seed{seed}" / "siim"
    cli.call("synth", out=str(siim), train_studies=studies, test_studies=args.test_studies, rows=256, cols=300,
             workers=2, seed=seed)  # fmt: skip
    return siim


@dataclass
class Predicts:
    """What `detect predict` of one arm runs at predict time, in order: (run dir, the views settings it needs)."""

    prepared: Path
    runs: list[tuple[Path, dict]]


def arm_predicts(args, base: str, crop: str) -> dict[str, Predicts]:
    """The detectors each arm predicts with (its lung detector first: the crop views need its boxes)."""
    det, prep = args.out / "runs" / "detect", args.out / "runs" / "prepare"
    views = {"crop": "lung", "lung": str(det / f"{crop}-lung")}
    return {
        "baseline": Predicts(prep / base, [(det / base, {})]),
        "crop": Predicts(prep / crop, [(det / f"{crop}-lung", {}), (det / crop, views)]),
        "frcnn": Predicts(prep / base, [(det / base, {}), (det / f"{base}-torchvision", {})]),
    }


def time_predict(args, shared: dict, what: Predicts, out: Path) -> float:
    """Seconds of `detect predict split=test` of each of the arm's detectors on its prepared test images (model load
    included), one after another, into a fresh out= (source= the same prepared folder: the runs' own files stay)."""
    settings = {**shared["detect_predict"], "device": shared["detect"]["device"], "workers": shared["detect"]["workers"]}
    start = time.perf_counter()
    for k, (run, views) in enumerate(what.runs):
        cli.call("detect", "predict", run=str(run), split=["test"], source=str(what.prepared), out=str(out / f"m{k}"),
                 **settings, **views)  # fmt: skip
    return time.perf_counter() - start


def predict_costs(args, shared: dict, seed: int, base: str, crop: str) -> list[dict]:
    """Each arm's predict seconds per test image, the arms interleaved (a slow moment of a shared CPU hits all), the
    fastest of --timing-repeats, after one untimed warm-up; rows {seed, arm, images, s_per_image}."""
    from siimcovid.data.prepared import Prepared

    arms = arm_predicts(args, base, crop)
    images = len(Prepared(arms["baseline"].prepared).split("test"))
    work = args.out / "timing" / f"s{seed}"
    shutil.rmtree(work, ignore_errors=True)
    time_predict(args, shared, arms["baseline"], work / "warmup")
    best = {arm: float("inf") for arm in arms}
    for r in range(args.timing_repeats):
        for arm, what in arms.items():
            best[arm] = min(best[arm], time_predict(args, shared, what, work / f"r{r}" / arm))
    shutil.rmtree(work, ignore_errors=True)
    return [{"seed": seed, "arm": arm, "images": images, "s_per_image": best[arm] / max(images, 1)} for arm in arms]


def one_seed_detect(args, seed: int) -> tuple[list[dict], list[dict]]:
    """The three arms of a seed: ([score rows], [predict-cost rows])."""
    siim = make_siim(args, seed, args.train_studies)
    shared = detect_settings(args)
    base, crop = f"dbase-s{seed}", f"dcrop-s{seed}"
    out = []
    table = run_arm(args, base, siim, shared)
    out.append({"seed": seed, "arm": "baseline", **detect_scores(args, base, table), "det_scale": "-"})
    keep_table(args, base, "baseline", seed)
    table = run_arm(args, crop, siim, shared, crop="lung", lung_detect=lung_settings(args, shared))
    out.append({"seed": seed, "arm": "crop", **detect_scores(args, crop, table), "det_scale": "-"})
    keep_table(args, crop, "crop", seed)
    table = run_arm(args, base, siim, shared, detect2=frcnn_settings(args, shared))  # the baseline's models resumed
    out.append({"seed": seed, "arm": "frcnn", **detect_scores(args, base, table), "det_scale": tuned_det_scale(args, base)})
    keep_table(args, base, "frcnn", seed)
    return out, predict_costs(args, shared, seed, base, crop)


def summarise_costs(costs: pd.DataFrame, arms: dict = DETECT_ARMS) -> str:
    """Predict seconds per test image per arm (mean +- std over seeds) and the ratio to the baseline of the same seed."""
    base = costs[costs.arm == "baseline"].set_index("seed").s_per_image
    lines = ["predict time (`detect predict split=test`, every fold's model and view; seconds per test image):"]
    for arm in [a for a in arms if a in set(costs.arm)]:
        mine = costs[costs.arm == arm].set_index("seed").s_per_image
        ratio = mine / base
        lines.append(
            f"  {arms[arm]:<55} {mine.mean():.4f} +- {mine.std():.4f} s/image  x{ratio.mean():.2f} the baseline's"
            f" ({int(costs.images.iloc[0])} test images)"
        )
    return "\n".join(lines)


def run_detect(args) -> str:
    rows, costs = [], []
    for seed in args.seeds:
        found, cost = one_seed_detect(args, seed)
        rows, costs = rows + found, costs + cost
        pd.DataFrame(rows).to_csv(args.out / "levers_detect.csv", index=False)  # survives an interruption
        pd.DataFrame(costs).to_csv(args.out / "levers_detect_costs.csv", index=False)
    table = pd.DataFrame(rows)
    scales = ", ".join(f"seed {r.seed}: {r.det_scale}" for r in table[table.arm == "frcnn"].itertuples())
    text = "\n\n".join(
        [
            summarise(table.drop(columns="det_scale"), DETECT_ARMS, DETECT_COLUMNS),
            f"det_scale tuned on all OOF (YOLO, Faster R-CNN): {scales}",
            summarise_costs(pd.DataFrame(costs)),
        ]
    )
    (args.out / "levers_detect.txt").write_text(text + "\n")
    return text


# ----------------------------------------------------------------------------- issue 20: the classifier levers
CLASSIFY_ARMS = {
    "baseline": "baseline (classifier, tta=none)",
    "swa": "SWA of the classifier's last epochs",
    "d4": "tta=d4 (8 views) at predict",
    "none_model": "+ a binary none model (none_cls=)",
}
CLASSIFY_COLUMNS = {
    "cls_study_map": "classifier study mAP",
    "fused_none_ap": "fused AP(none)",
    "fused_opacity_ap": "fused opacity AP",
    "fused_final": "fused final (default fusion)",
}


def fused(args, name: str, prepared: Path, det: Path, cls: Path, none_cls: Path | None = None) -> dict:
    """`siimcovid fuse split=oof` of the baseline's detector boxes and this classifier side, default parameters."""
    project = args.out / "runs" / "fuse_levers"
    cli.call("fuse", split="oof", data=str(prepared), det=[str(det)], cls=[str(cls)],
             none_cls=[str(none_cls)] if none_cls else [], project=str(project), name=name, overwrite=True)  # fmt: skip
    found = overall_scores(project / name)
    return {f"fused_{c}" if c == "final" else f"fused_{c}_ap": score(found, c) for c in ("none", "opacity", "final")}


def one_seed_classify(args, seed: int) -> list[dict]:
    """The four arms of a seed on one baseline run (its prepared data and detector boxes shared by all)."""
    siim = make_siim(args, seed, args.train_studies)
    shared = settings(args)
    base = f"cbase-s{seed}"
    run_arm(args, base, siim, shared)
    runs = args.out / "runs"
    prepared, det = runs / "prepare" / base, runs / "detect" / base / "pred_oof.csv"
    cls_dir, project = runs / "classify" / base, str(runs / "classify")
    train = {**shared["classify"], "data": str(prepared), "project": project}
    predict = {**shared["classify_predict"], "split": ["oof"]}
    row = {"seed": seed}
    out = [{**row, "arm": "baseline", "cls_study_map": score(overall_scores(cls_dir), "study_map"),
            **fused(args, f"{base}-baseline", prepared, det, cls_dir / "pred_oof_image.csv")}]  # fmt: skip
    swa = f"{base}-swa"
    cli.call("classify", "train", name=swa, swa_epochs=min(args.swa_epochs, train["epochs"] - 1), **train)
    cli.call("classify", "predict", run=swa, **{**predict, "project": project})
    out.append({**row, "arm": "swa", "cls_study_map": score(overall_scores(runs / "classify" / swa), "study_map"),
                **fused(args, swa, prepared, det, runs / "classify" / swa / "pred_oof_image.csv")})  # fmt: skip
    none = f"{base}-none"
    cli.call("classify", "train", name=none, task="none", **train)
    cli.call("classify", "predict", run=none, **{**predict, "project": project})
    none_oof = runs / "classify" / none / "pred_oof_none.csv"
    out.append({**row, "arm": "none_model", "cls_study_map": out[0]["cls_study_map"],
                **fused(args, none, prepared, det, cls_dir / "pred_oof_image.csv", none_oof)})  # fmt: skip
    cli.call("classify", "predict", run=base, **{**predict, "project": project, "tta": "d4"})  # rewrites the base's OOF
    out.append({**row, "arm": "d4", "cls_study_map": score(overall_scores(cls_dir), "study_map"),
                **fused(args, f"{base}-d4", prepared, det, cls_dir / "pred_oof_image.csv")})  # fmt: skip
    return out


def run_classify(args) -> str:
    rows = []
    for seed in args.seeds:
        rows += one_seed_classify(args, seed)
        pd.DataFrame(rows).to_csv(args.out / "levers_classify.csv", index=False)  # survives an interruption
    text = summarise(pd.DataFrame(rows), CLASSIFY_ARMS, CLASSIFY_COLUMNS)
    (args.out / "levers_classify.txt").write_text(text + "\n")
    return text


# ----------------------------------------------------------------------------- the report
def verdict(mean: float, std: float) -> str:
    if pd.isna(mean) or pd.isna(std):
        return "n/a (one seed: no spread)" if pd.isna(std) and not pd.isna(mean) else "n/a"
    if abs(mean) <= std:
        return "no gain (within the spread)"
    return "gain" if mean > 0 else "loss"


def cells(values: dict, columns: dict, fmt) -> str:
    """The cells of one line, a column left out where the arm has no such number (all nan: e.g. lung AP off crop)."""
    return "  ".join(fmt(c) for c in columns if values.get(c, False))


def summarise(rows: pd.DataFrame, arms: dict = ARMS, columns: dict = COLUMNS) -> str:
    """Per seed, mean +- std over seeds, and each arm's gain over the baseline of the same seed."""
    columns = {c: t for c, t in columns.items() if c in rows}
    shown = rows.rename(columns={**columns, "arm": "arm"})
    lines = ["per seed:", shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"), ""]
    stats = rows.groupby("arm", sort=False)[list(columns)].agg(["mean", "std"])
    lines.append("mean +- std over seeds:")
    for arm, r in stats.iterrows():
        has = {c: not pd.isna(r[(c, "mean")]) for c in columns}
        text = cells(has, columns, lambda c: f"{columns[c]} {r[(c, 'mean')]:.4f} +- {r[(c, 'std')]:.4f}")
        lines.append(f"  {arms[arm]:<55} {text}")
    base = rows[rows.arm == "baseline"].set_index("seed")[list(columns)]
    lines += ["", "gain over the baseline (same seed), mean +- std of the per-seed gains:"]
    for arm in [a for a in arms if a != "baseline" and a in set(rows.arm)]:
        gains = rows[rows.arm == arm].set_index("seed")[list(columns)] - base
        has = {c: gains[c].notna().any() for c in columns}
        text = cells(
            has, columns,
            lambda c: f"{columns[c]} {gains[c].mean():+.4f} +- {gains[c].std():.4f} ({verdict(gains[c].mean(), gains[c].std())})",
        )  # fmt: skip
        lines.append(f"  {arms[arm]:<55} {text}")
    return "\n".join(lines)


def run_data(args) -> str:
    rows = []
    for seed in args.seeds:
        rows += one_seed(args, seed)
        pd.DataFrame(rows).to_csv(args.out / "levers.csv", index=False)  # what is done so far survives an interruption
    text = summarise(pd.DataFrame(rows))
    (args.out / "levers.txt").write_text(text + "\n")
    return text


@dataclass
class Group:
    """A group of arms (--levers): what runs them, what it writes."""

    run: Callable
    table: str


GROUPS = {
    "data": Group(run_data, "levers.csv"),  # issue 12: external data, pseudo-labels
    "detect": Group(run_detect, "levers_detect.csv"),  # issue 19: lung-crop views, a second detector family
    "classify": Group(run_classify, "levers_classify.csv"),  # issue 20: SWA, d4 TTA, a binary none model
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--levers",
        choices=list(GROUPS),
        default="data",
        help="data: issue 12's (external data, pseudo-labels); detect: issue 19's (crop=lung, Faster R-CNN); "
        "classify: issue 20's (SWA, d4 TTA, a binary none model)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_levers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--train-studies",
        type=int,
        default=None,
        help="labelled SIIM train studies (small on purpose); default 48 (data), 80 (detect)",
    )
    parser.add_argument("--pool-studies", type=int, default=144, help="data: unlabelled pool, the SIIM test split")
    parser.add_argument("--external-studies", type=int, default=240, help="data: RSNA-like and NIH-like studies each")
    parser.add_argument("--det-epochs", type=int, default=None, help="default 12 (data), 30 (detect)")
    parser.add_argument("--cls-epochs", type=int, default=6)
    parser.add_argument("--box-conf", type=float, default=0.25, help="data, pseudo: teacher box confidence kept")
    parser.add_argument("--test-studies", type=int, default=24, help="detect: the test split (the predict-time cost)")
    parser.add_argument("--det-imgsz", type=int, default=128, help="detect: the detectors' image size")
    parser.add_argument("--lung-epochs", type=int, default=20, help="detect: the lung detector's epochs")
    parser.add_argument("--frcnn-arch", default="fasterrcnn_mobilenet_v3_large_fpn", help="detect: detect2's arch")
    parser.add_argument(
        "--frcnn-imgsz",
        type=int,
        default=128,
        help="detect: detect2's input size (at 64 px its anchors, 32 px and up, fit no box)",
    )
    parser.add_argument("--frcnn-epochs", type=int, default=10, help="detect: detect2's epochs")
    parser.add_argument("--frcnn-lr", type=float, default=0.001, help="detect: detect2's AdamW lr0")
    parser.add_argument("--timing-repeats", type=int, default=2, help="detect: predict timings per arm (the fastest)")
    parser.add_argument("--swa-epochs", type=int, default=3, help="classify: the SWA arm's swa_epochs")
    parser.add_argument("--quick", action="store_true", help="2 epochs, few tuning trials: a smoke test")
    args = parser.parse_args()
    args.out = args.out.resolve()
    defaults = {
        "train_studies": {"data": 48, "detect": 80, "classify": 80},
        "det_epochs": {"data": 12, "detect": 30, "classify": 12},
    }
    for key, per_group in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, per_group[args.levers])
    args.out.mkdir(parents=True, exist_ok=True)
    group, start = GROUPS[args.levers], time.perf_counter()
    text = group.run(args)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{text}\n\n{len(args.seeds)} seed(s) in {minutes:.1f} min; {args.out / group.table}")


if __name__ == "__main__":
    main()
