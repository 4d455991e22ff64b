"""Issue 20, item 2: what does one distilled student cost and score against the ensemble of its teachers?

    python benchmarks/bench_distill.py                      # classifiers: CPU, a few minutes on 2 cores
    python benchmarks/bench_distill.py --stage detect       # YOLO detectors (detect train distill=): about 15 minutes
    python benchmarks/bench_distill.py --quick              # a smoke test (either stage)

On one synthetic SIIM set (prepared at --imgsz, 3 folds), trained here on the CPU with tiny models from scratch:

    teachers    two classify runs (--teachers, default resnet18 and resnet26d), every fold
    student     one smaller classify run (--student, default resnet10t) with distill=<the teachers>
                (fold k learns from teacher fold k's probabilities on fold k's training images: honest OOF)
    alone       the same student model on the hard labels only (what distillation adds, at the same cost)

Printed: the OOF study mAP of each teacher, of the teachers' ensemble (`classify predict run=t1,t2`, ensemble=mean),
of the student and of the student alone; then the predict time of `classify predict split=test` of the student and of
the teachers' ensemble (all folds' models, tta=hflip), measured side by side in this process, in turns, the best of
--repeats. The numbers are tiny synthetic ones: they show that the procedure runs and what it costs, not what it
gains on the real data.

--stage detect: the same three arms with YOLO detectors from scratch at --det-imgsz (teachers --det-teachers, default
yolov5n and yolov5s; student and alone --det-student, default yolov5n; distill_weight --det-distill-weight; AdamW at
lr0 0.004 and mosaic 0.5, bench_levers.py's tiny YOLO settings). Printed:
the OOF opacity AP of each, of the teachers' ensemble (WBF of their OOF boxes, equal weights, iou 0.6), and the time
of `detect predict split=test` (tta=false) of the student against the teachers', side by side, the best of --repeats.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from siimcovid import cli  # noqa: E402
from siimcovid.data.prepared import Prepared  # noqa: E402
from siimcovid.runs import overall_scores, score  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_distill"))
    p.add_argument("--teachers", default="resnet18,resnet26d")
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-studies", type=int, default=96)
    p.add_argument("--test-studies", type=int, default=32)
    p.add_argument("--distill-weight", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=["classify", "detect"], default="classify")
    p.add_argument("--det-teachers", default="yolov5n.yaml,yolov5s.yaml")
    p.add_argument("--det-student", default="yolov5n.yaml")
    p.add_argument("--det-imgsz", type=int, default=128)
    p.add_argument("--det-epochs", type=int, default=30)
    p.add_argument("--det-distill-weight", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="the smallest settings (a smoke test)")
    p.add_argument("--keep", action="store_true", help="keep --out, and reuse what it holds (default: a fresh one, removed)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_studies, args.test_studies, args.epochs, args.imgsz, args.repeats = 36, 8, 1, 64, 1
        args.det_epochs, args.det_imgsz = 1, 64
    if args.stage == "detect":
        args.imgsz = args.det_imgsz  # the prepared size
    return args


def train_settings(args, model: str) -> dict:
    return {"model": model, "pretrained": False, "imgsz": args.imgsz, "epochs": args.epochs, "fine_lr": [], "batch": 16}


def main(argv=None) -> dict:
    args = parse(argv)
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    root, project, data = args.out / "siim", args.out / "runs" / "classify", args.out / "prepared"
    if not (data / "prepare.yaml").is_file():  # --keep: a second run reuses the data, the finished runs are skipped
        cli.call("synth", out=str(root), train_studies=args.train_studies, test_studies=args.test_studies, rows=256,
                 cols=300, workers=2, seed=args.seed)  # fmt: skip
        cli.call("prepare", data=str(root), name="siim", out=str(data), sizes=[args.imgsz], n_folds=3, workers=2,
                 data_yaml_dir=str(args.out / "data_yaml"))  # fmt: skip
    if args.stage == "detect":
        return detect_arms(args, data)
    common = {"data": str(data), "project": str(project), "workers": 0, "device": "cpu", "seed": args.seed, "tracking": "none"}
    teachers = [f"teacher_{m}" for m in args.teachers.split(",")]
    for name, model in zip(teachers, args.teachers.split(",")):
        cli.call("classify", "train", name=name, **train_settings(args, model), **common)
    student = {**train_settings(args, args.student), **common}
    cli.call("classify", "train", name="student", distill=[str(project / t) for t in teachers],
             distill_weight=args.distill_weight, **student)  # fmt: skip
    cli.call("classify", "train", name="alone", **student)

    pred = {"project": str(project), "workers": 0, "device": "cpu", "batch": 16, "tta": "hflip"}
    maps = {}
    for name in [*teachers, "student", "alone"]:
        cli.call("classify", "predict", run=str(project / name), split=["oof"], **pred)
        maps[name] = score(overall_scores(project / name), "study_map")
    ensemble = args.out / "ensemble"
    runs = [str(project / t) for t in teachers]
    cli.call("classify", "predict", run=runs, split=["oof"], out=str(ensemble), reuse=True, **pred)
    maps["teachers' ensemble"] = score(overall_scores(ensemble), "study_map")

    best = time_predict(args, "classify", project, teachers, pred)
    scores = f"OOF study mAP (synthetic data, {args.imgsz} px, {args.epochs} epochs, 3 folds, from scratch, tta=hflip)"
    report(args, maps, scores, best, f"predict split=test ({len(Prepared(data).split('test'))} images, 3 fold models "
           f"per run, tta=hflip, CPU, best of {args.repeats})")  # fmt: skip
    return {"map": maps, "predict_s": best}


def time_predict(args, stage: str, project: Path, teachers: list[str], pred: dict) -> dict:
    """`<stage> predict split=test` of the student and of the teachers' ensemble, in turns (a busy neighbour slows
    both), the best of --repeats each: {arm: seconds}."""
    arms = {"student": [str(project / "student")], "teachers' ensemble": [str(project / t) for t in teachers]}
    best = dict.fromkeys(arms, float("inf"))
    for _ in range(args.repeats):
        for arm, runs in arms.items():
            t0 = time.perf_counter()
            out = {"out": str(args.out / "timing" / arm.replace("'", "").replace(" ", "_"))} if len(runs) > 1 else {}
            cli.call(stage, "predict", run=runs, split=["test"], **pred, **out)
            best[arm] = min(best[arm], time.perf_counter() - t0)
    return best


def report(args, scores: dict, scores_title: str, best: dict, timing_title: str) -> None:
    """The scores and the predict times, printed; --out removed unless --keep."""
    print(f"\n{scores_title}:")
    for name, value in scores.items():
        print(f"  {name:24s} {value:.4f}")
    print(f"\n{timing_title}:")
    for arm, seconds in best.items():
        print(f"  {arm:24s} {seconds:7.2f} s  ({seconds / best['student']:.2f}x the student)")
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


def detect_arms(args, data: Path) -> dict:
    """--stage detect: YOLO teachers, a student distilled from them, the student's model alone (module docstring)."""
    import pandas as pd

    from siimcovid.detect.predict import scores_oof
    from siimcovid.fuse.wbf import wbf_table
    from siimcovid.tables import BOX_COLUMNS, DETECTIONS

    project = args.out / "runs" / "detect"
    common = {"data": str(data), "data_yaml_dir": str(args.out / "data_yaml"), "project": str(project), "workers": 0}
    common |= {"device": "cpu", "seed": args.seed, "imgsz": args.det_imgsz, "epochs": args.det_epochs, "batch": 8}
    common |= {"pretrained": False, "hyp": "yolov5m", "plots": False, "tracking": "none"}
    common |= {"optimizer": "AdamW", "lr0": 0.004, "mosaic": 0.5}  # bench_levers' tiny YOLO: SGD at 0.01 learns nothing here
    models = args.det_teachers.split(",")
    teachers = [f"teacher_{Path(m).stem}" for m in models]
    for name, model in zip(teachers, models):
        cli.call("detect", "train", name=name, model=model, **common)
    student = {**common, "model": args.det_student}
    cli.call("detect", "train", name="student", distill=[str(project / t) for t in teachers],
             distill_weight=args.det_distill_weight, **student)  # fmt: skip
    cli.call("detect", "train", name="alone", **student)

    pred = {"project": str(project), "device": "cpu", "batch": 16, "tta": False}
    aps = {}
    for name in [*teachers, "student", "alone"]:
        cli.call("detect", "predict", run=str(project / name), split=["oof"], **pred)
        aps[name] = score(overall_scores(project / name), "opacity")
    prep = Prepared(data)
    boxes = pd.concat([DETECTIONS.read(project / t / "pred_oof.csv").assign(set=i) for i, t in enumerate(teachers)])
    fused = wbf_table(boxes, prep.split("train")[["image_id", "rows", "cols"]], len(teachers), workers=1)
    fold = prep.split("train").set_index("image_id").fold
    fused = fused.assign(model="ensemble", fold=fused.image_id.map(fold))[["image_id", "model", "fold", *BOX_COLUMNS, "conf"]]
    table = scores_oof(fused, prep, sorted(prep.split("train").fold.unique()), "ensemble")
    aps["teachers' ensemble"] = float(table[table.fold == "all"]["opacity"].iloc[0])

    best = time_predict(args, "detect", project, teachers, pred)
    scores = f"OOF opacity AP (synthetic data, {args.det_imgsz} px, {args.det_epochs} epochs, 3 folds, from scratch)"
    report(args, aps, scores, best, f"detect predict split=test ({len(prep.split('test'))} images, 3 fold models per "
           f"run, tta=false, CPU, best of {args.repeats})")  # fmt: skip
    return {"ap": aps, "predict_s": best}


if __name__ == "__main__":
    main()
