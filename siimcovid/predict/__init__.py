"""`siimcovid predict`: a bundle's models (siimcovid.bundle) on new data.

stage.py     the stage: open the bundle, prepare the source, every member's folds, fuse, the outputs
source.py    what the source is (a SIIM root, a DICOM tree, one file), its prepare settings, its sample submission
members.py   one detector or classifier member of a bundle on a prepared folder
record.py    <out>/predict.yaml: which bundle made the tables in <out>, so a re-run reuses only those
view.py      the tables, pictures and HTML page a person reads
"""
