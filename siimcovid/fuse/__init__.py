"""Fusion: WBF over models / folds / TTA, the none and opacity formulas, scored OOF or a submission.

Modules:
    stage.py     `siimcovid fuse`: fuse(cfg) one split -> tables, scores_oof.csv (oof) or submission.csv (test)
    tune.py      `siimcovid fuse tune`: tune(cfg) a seeded search of the fusion parameters on OOF -> best.yaml
    pipeline.py  fusion as one function of (inputs, parameters): run_fusion (checks Python-built
                 parameters), fuse_split, fusion_params, check_params, score_fused, fold_scores, Fused, WbfCache
    inputs.py    load_inputs(cfg) -> FuseInputs: the detection and classifier files, checked
    formulas.py  the none / opacity / member formulas (registered by name in siimcovid.registry)
    wbf.py       Weighted Boxes Fusion per image (ensemble-boxes): wbf_table, check_wbf_params
    summary.py   describe(run_dir): the row of a fuse run in `siimcovid runs` (yaml and pandas only)

The submission format lives in `siimcovid.submission`, the metric in `siimcovid.metrics`.
"""

__all__ = ["formulas", "inputs", "pipeline", "stage", "summary", "tune", "wbf"]
