"""`siimcovid predict`: a bundle's models (siimcovid.bundle) on new data.

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule).

Modules:
    stage.py    the stage: main(cfg), predict(cfg): open the bundle, prepare the source, every member's folds, fuse,
                the outputs
    source.py   what the source is (a SIIM root, a DICOM tree, one file), its prepare settings, its sample submission
    members.py  one detector or classifier member of a bundle on a prepared folder: predict_detector(...),
                predict_classifier(...)
    record.py   Record: <out>/predict.yaml, which bundle made the tables in <out>, so a re-run reuses only those
    plan.py     plan(...): each member timed on a few images, the projected total, budget= (the cuts that fit)
    view.py     write_view(...): the tables, pictures and HTML page a person reads
    dicom.py    write_results(...), write_dicom(...): dicom=: the results as DICOM SR, presentation states and
                secondary captures, for a PACS and its viewers
"""

__all__ = ["dicom", "members", "plan", "record", "source", "stage", "view"]
