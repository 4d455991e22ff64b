"""siimcovid: SIIM-FISABIO-RSNA COVID-19 detection, from raw DICOM to a scored submission.

One command line, `siimcovid <stage> [mode] key=value ...` (siimcovid.cli). `siimcovid help` lists
the stages and every registered name (model families, layouts, fusion formulas, ensemble methods,
...); each stage is registered once in siimcovid.stages, everything else by name in siimcovid.registry.

What is public: a package's `__all__` names its modules, every one of them, and whatever its
`__init__.py` itself defines or re-exports (here `__version__`; siimcovid.bundle its API); the functions
are in their modules, and each module's line in its package's docstring names its public functions as
`name(...)`, the stage's own first: `siimcovid detect train` runs
`siimcovid.detect.train.main(cfg)`, a Config from `siimcovid.stages.stage_config("detect", "train", {...})`
(or `siimcovid.cli.call("detect", "train", epochs=3)`). tests/test_registry.py checks these lists
against the files and the stage registry.

Packages (stages import torch / Ultralytics only when they run):
    data/        the SIIM download, synthetic data, prepare, the prepared folder, THE ground truth, input layouts
    detect/      `siimcovid detect train | predict | evolve` (Ultralytics YOLO)
    classify/    `siimcovid classify train | predict` (timm study classifiers)
    engine/      the fold engine every model family trains and predicts through, devices, training events
    fuse/        `siimcovid fuse` and `fuse tune`: WBF and the none / opacity formulas
    bundle/      `siimcovid export`: main(cfg), export(cfg) the portable bundle; open_bundle(path) reads one back
    predict/     `siimcovid predict`: a bundle's models on new data
    serve/       `siimcovid serve`: a DICOM node that predicts studies as they arrive and sends the results back
Modules:
    cli.py         main(argv), call(stage, mode, **settings), resolve(argv), listing(): the entry point
    stages.py      Stage, stage(name), stage_config(name, mode, overrides): each stage's modes, run folder, runs row
    registry.py    register(kind, name), add(kind, name, obj), get(kind, name), names(kind), about(kind), kinds(): named things
    config.py      load_config(stage, overrides), Config, read_yaml, fusion_keys(), runtime_keys(stage)
    tables.py      Table: the contracts of every table crossing a stage boundary, and the class / box constants
    artifacts.py   Document: the declarations of the YAML files crossing a stage boundary (as tables.py for CSVs)
    metrics.py     the competition metric: score(truth, pred), Score, average_precision, fold_scores
    submission.py  submission strings: make_submission, read_submission, check_submission
    ensemble.py    combine(members, weights, method): THE way to combine ensemble members
    rundir.py      fold_dir, fold_numbers, fold_files, fold_checkpoints, check_finished, changed_settings,
                   refuse_changed: what run folders share
    outputs.py     open_out(...): the one rule for writing into a folder (new, empty, or the stage's own)
    evaluate.py    `siimcovid evaluate`: main(cfg), evaluate(cfg) a submission against known truth
    pseudo.py      `siimcovid pseudo`: main(cfg), pseudo(cfg) pseudo-labels from per-fold teachers; describe(run)
    run.py         `siimcovid run`: main(cfg), run(cfg) the whole pipeline, the CV table and the report; describe(run)
    runs.py        `siimcovid runs`: main(cfg), list_runs(project) every run as one table
    signing.py     `siimcovid keygen`: main(cfg), keygen(cfg); sign_bundle, check_signature: bundle signatures
    weights.py     save_state, load_state: weights that travel (safetensors + a data-only model description)
    ray_engine.py  `engine=ray`: run_folds(...) over a Ray cluster (Ray is optional)
    report.py      the report's plots: plot_pr_curves, plot_confusion, plot_samples
    reference.py   pages(): the documentation site's reference pages, generated from the cfg files, tables and registry
    utils.py       SiimError, DataError, atomic writes, as_list, LOGGER
    views.py       crop=lung: LungBoxes, lungs_of(cfg), detect_views(...), cut, to_original: the lung-crop views
"""

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "artifacts",
    "bundle",
    "classify",
    "cli",
    "config",
    "data",
    "detect",
    "engine",
    "ensemble",
    "evaluate",
    "fuse",
    "metrics",
    "outputs",
    "predict",
    "pseudo",
    "ray_engine",
    "reference",
    "registry",
    "report",
    "run",
    "rundir",
    "runs",
    "serve",
    "signing",
    "stages",
    "submission",
    "tables",
    "utils",
    "views",
    "weights",
]
