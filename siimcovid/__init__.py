"""siimcovid: SIIM-FISABIO-RSNA COVID-19 detection, from raw DICOM to a scored submission.

One command line, `siimcovid <stage> [mode] key=value ...` (siimcovid.cli), over these stages
(registered once in siimcovid.stages): synth, prepare, detect, classify, fuse, evaluate, run, runs.

Packages (stages import torch / Ultralytics only when they run):
    data/        the SIIM download, synthetic data, prepare, the prepared folder, THE ground truth
    detect/      `siimcovid detect train | predict | evolve` (Ultralytics YOLOv5)
    classify/    `siimcovid classify train | predict` (timm study classifiers)
    fuse/        `siimcovid fuse` and `fuse tune`: WBF and the none / opacity formulas
Modules:
    cli.py         main(argv), call(stage, mode, **settings), resolve(argv): the entry point
    stages.py      Stage, STAGES: each stage's modes, run folder and row in `siimcovid runs`
    config.py      load_config(stage, overrides), Config, read_yaml, fusion_keys, runtime_keys
    tables.py      the contracts of every table crossing a stage boundary (META, DETECTIONS, ..., SCORES)
                   and the class / box constants
    metrics.py     the competition metric: score, Score, average_precision, fold_scores
    submission.py  submission strings: make_submission, read_submission, check_submission
    ensemble.py    combine(members, weights, method): THE way to combine ensemble members
    registry.py    register / names / get: named implementations (fusion formulas, ensemble methods)
    rundir.py      fold_dir, fold_numbers, fold_files, fold_checkpoints, check_finished, changed_settings,
                   refuse_changed: what run folders share
    evaluate.py    `siimcovid evaluate`: evaluate(cfg) a submission against known truth
    run.py         `siimcovid run`: run(cfg) the whole pipeline, the CV table and the report
    runs.py        `siimcovid runs`: list_runs(project) every run as one table
    report.py      the report's plots: plot_pr_curves, plot_confusion, plot_samples
    utils.py       SiimError, DataError, atomic writes, as_list, LOGGER
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "classify",
    "cli",
    "config",
    "data",
    "detect",
    "ensemble",
    "evaluate",
    "fuse",
    "metrics",
    "registry",
    "report",
    "run",
    "rundir",
    "runs",
    "stages",
    "submission",
    "tables",
    "utils",
]
