"""Fusion: WBF over models / folds / TTA, the none and opacity formulas, scored OOF or a submission.

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule).

Modules:
    stage.py     `siimcovid fuse`: main(cfg), fuse(cfg) one split -> tables, scores_oof.csv (oof) or submission.csv
    tune.py      `siimcovid fuse tune`: main(cfg), tune(cfg) a seeded search of the fusion parameters on OOF
    pipeline.py  fusion as one function of (inputs, parameters): run_fusion(...) (checks Python-built parameters),
                 fuse_split, fusion_params, check_params, score_fused, fold_scores, Fused, WbfCache
    inputs.py    load_inputs(cfg) -> FuseInputs: the detection and classifier files, checked
    record.py    fusion.yaml: what fuse and fuse tune fused in their folder (the record `siimcovid export` reads)
    formulas.py  the none / opacity / member formulas, registered as the kinds none_det and none_blend
    wbf.py       Weighted Boxes Fusion per image (ensemble-boxes): wbf_table(...), check_wbf_params(...)
    summary.py   describe(run_dir): the row of a fuse run in `siimcovid runs` (yaml and pandas only)

The submission format lives in `siimcovid.submission`, the metric in `siimcovid.metrics`.
"""

__all__ = ["formulas", "inputs", "pipeline", "record", "stage", "summary", "tune", "wbf"]
