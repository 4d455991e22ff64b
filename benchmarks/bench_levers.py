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

Tiny models (YOLOv5n and ResNet10t from scratch, 64 px, a few epochs) on a 2-core CPU: the point is a
correct, honest procedure that runs anywhere; the size of a gain here says little about the real data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


# ----------------------------------------------------------------------------- the report
def verdict(mean: float, std: float) -> str:
    if pd.isna(mean) or pd.isna(std):
        return "n/a (one seed: no spread)" if pd.isna(std) and not pd.isna(mean) else "n/a"
    if abs(mean) <= std:
        return "no gain (within the spread)"
    return "gain" if mean > 0 else "loss"


def summarise(rows: pd.DataFrame) -> str:
    """Per seed, mean +- std over seeds, and each arm's gain over the baseline of the same seed."""
    lines = ["per seed:", rows.rename(columns=COLUMNS).to_string(index=False, float_format=lambda v: f"{v:.4f}"), ""]
    stats = rows.groupby("arm", sort=False)[list(COLUMNS)].agg(["mean", "std"])
    lines.append("mean +- std over seeds:")
    for arm, r in stats.iterrows():
        cells = "  ".join(f"{COLUMNS[c]} {r[(c, 'mean')]:.4f} +- {r[(c, 'std')]:.4f}" for c in COLUMNS)
        lines.append(f"  {ARMS[arm]:<55} {cells}")
    base = rows[rows.arm == "baseline"].set_index("seed")[list(COLUMNS)]
    lines += ["", "gain over the baseline (same seed), mean +- std of the per-seed gains:"]
    for arm in [a for a in ARMS if a != "baseline" and a in set(rows.arm)]:
        gains = rows[rows.arm == arm].set_index("seed")[list(COLUMNS)] - base
        cells = "  ".join(
            f"{COLUMNS[c]} {gains[c].mean():+.4f} +- {gains[c].std():.4f} ({verdict(gains[c].mean(), gains[c].std())})"
            for c in COLUMNS
        )
        lines.append(f"  {ARMS[arm]:<55} {cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_levers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-studies", type=int, default=48, help="labelled SIIM train studies (small on purpose)")
    parser.add_argument("--pool-studies", type=int, default=144, help="unlabelled pool: the SIIM test split")
    parser.add_argument("--external-studies", type=int, default=240, help="RSNA-like and NIH-like studies each")
    parser.add_argument("--det-epochs", type=int, default=12)
    parser.add_argument("--cls-epochs", type=int, default=6)
    parser.add_argument("--box-conf", type=float, default=0.25, help="pseudo: teacher box confidence kept")
    parser.add_argument("--quick", action="store_true", help="2 epochs, few tuning trials: a smoke test")
    args = parser.parse_args()
    args.out = args.out.resolve()
    start, rows = time.perf_counter(), []
    for seed in args.seeds:
        rows += one_seed(args, seed)
        pd.DataFrame(rows).to_csv(args.out / "levers.csv", index=False)  # what is done so far survives an interruption
    table = pd.DataFrame(rows)
    text = summarise(table)
    (args.out / "levers.txt").write_text(text + "\n")
    print(f"\n{text}\n\n{len(args.seeds)} seed(s) in {(time.perf_counter() - start) / 60:.1f} min; {args.out / 'levers.csv'}")


if __name__ == "__main__":
    main()
