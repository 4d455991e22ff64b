"""`siimcovid export`: a trained pipeline packed into one portable bundle; `open_bundle` reads one back, checked.

    siimcovid export pipeline=demo                          # runs/run/demo's models and fusion -> runs/bundle/demo
    siimcovid export pipeline=demo out=demo.zip fp16_weights=true  # one zip file, the classifiers' weights in fp16
    siimcovid export pipeline=demo formats=openvino,onnx   # every fold also as OpenVINO IR and ONNX (predict backend=)
    siimcovid export detect=runs/detect/v5m,runs/detect/v5x classify=runs/classify/b3,runs/classify/b5 \\
        fuse=runs/fuse/ens out=ens.zip                      # runs named one by one: an ensemble bundle

A bundle is a folder (out=x.zip: the same tree in one stored zip file). Nothing in it is code: weights are
safetensors, every other file is YAML read with a safe loader, and each model is rebuilt from a checked,
data-only description (siimcovid.weights), so a bundle from a stranger cannot run anything when it is opened.
Each file is declared once (siimcovid.artifacts.Document: export writes it and open_bundle reads it with the same
declaration; `print(<declaration>.describe())` prints its keys):

    manifest.yaml                  files.MANIFEST_FILE: format, siimcovid version, created (UTC), sources (run and
                                   folder names, no absolute paths), package versions, half, dtypes,
                                   files: {relative path: {sha256, bytes}} of every other file
    signature.yaml                 (sign=<private key> only) an Ed25519 signature of every file (siimcovid.signing)
    prepare.yaml                   files.PREPARE_FILE: the conversion the models were trained on: sizes (those the
                                   members read), ext, png_level
    fuse.yaml                      files.FUSION_FILE: the fusion settings of the run's submission (every fusion key)
                                   and the member order: det: [names], cls: [names] (fusion weights follow it), as
                                   the fuse run recorded them (siimcovid.fuse.record: its fusion.yaml)
    detect/<name>/model.yaml       the detector's description: its Ultralytics model YAML, class names (siimcovid.weights)
    detect/<name>/settings.yaml    members.DETECT_SETTINGS: size (prepared side it reads), imgsz {fold: int}, conf, iou,
                                   tta, max_det, predict_imgsz, weights (and `ultralytics`: agnostic_nms / classes,
                                   when the run gave them; crop=lung: crop, lung (the lung member it crops with),
                                   crop_margin, lung_conf, view_fusion, view_iou, as its run's predict recorded them)
    detect/<name>/fold<k>.safetensors  the weights predict evaluates (Ultralytics' EMA, fp16 as training left them)
    classify/<name>/model.yaml     the classifier's description: timm name and build_model's arguments
    classify/<name>/settings.yaml  members.CLASSIFY_SETTINGS: imgsz, tta, weights, folds_id {fold: its fold fingerprint}
                                   (crop=lung: crop, lung, crop_margin, lung_conf, view_fusion)
    classify/<name>/fold<k>.safetensors  the weights load_checkpoint_model evaluates (EMA); fp16 with fp16_weights=true
    <kind>/<name>/fold<k>.onnx     formats=onnx: the fold's network as ONNX; fold<k>.xml + fold<k>.bin: formats=openvino,
                                   its OpenVINO IR; fold<k>.int8.xml + fold<k>.int8.bin: int8=<kind>, the network
                                   quantised to int8, as OpenVINO IR (each engine: every fold of a built-in member or
                                   none: siimcovid.bundle.engines)
    lung/<name>/                   crop=lung: the YOLO lung detector (`detect train task=lung`) that members name in
                                   their `lung`, packed as a detector (model.yaml, settings.yaml, fold<k>.safetensors:
                                   every fold of the members that crop with it); `siimcovid predict` runs it first and
                                   crops fold k of each member with lung fold k's boxes of the new images. A lung
                                   member that no member names, or a name with no such member, is refused

Only finished folds are packed (the predict stages' rules). The bundle is built in a temporary
folder beside `out` and renamed at the end (a zip: a temporary file, renamed): an `out` that exists
is complete. `open_bundle` checks everything before any work: the manifest, the format, the package
versions (another major version of torch, Ultralytics or timm is an error), the signature (trust=),
every file's checksum, regular files only, no file unlisted, every YAML (typed as the stages type
their settings), every description, every member with folds. A zip is checked against its manifest
entry by entry as it is extracted, once, into a cache folder named by its sha256
(~/.cache/siimcovid/bundles/<sha256>, or $SIIMCOVID_CACHE/<sha256>); nothing unlisted is written there.

Modules:
    export.py   main(cfg), export(cfg): the runs to pack (pipeline=: its detectors, detect2's too), their members
                (and the lung runs they cropped with), the bundle written and renamed into place
    fusion.py   fusion_settings(...): the bundle's fuse.yaml from the fuse run's record (siimcovid.fuse.record)
    members.py  the two member kinds behind one per-kind table (KINDS), and the lung detectors' (LUNG): Member,
                pack_detector, pack_classifier, read_member, the declarations of their settings.yaml
    engines.py  the exported engines: export_engines (formats=), found_engines (open), Net (predict backend=)
    files.py    the declarations of manifest.yaml, prepare.yaml and fuse.yaml; file_table, package_versions
    header.py   what a bundle says of itself (Header: manifest and signature), check_files
    archive.py  zip bundles: zip_tree, extract_zip (checked entry by entry into the cache)
    place.py    where export writes: check_out, work_folder (WORK_MARK), move_into_place
    open.py     open_bundle(path, trust=None) -> Bundle, every check before any work
"""

from siimcovid.bundle.export import export, main
from siimcovid.bundle.files import FORMAT, MANIFEST, file_table
from siimcovid.bundle.members import KINDS, Member
from siimcovid.bundle.open import Bundle, open_bundle
from siimcovid.bundle.place import WORK_MARK

__all__ = [  # the modules, then what this package re-exports (export: the function, as `from siimcovid.bundle import export`)
    "archive", "engines", "export", "files", "fusion", "header", "members", "open", "place",
    "Bundle", "FORMAT", "KINDS", "MANIFEST", "Member", "WORK_MARK", "file_table", "main", "open_bundle",
]  # fmt: skip
