"""<project>/<name>/fusion.yaml: what `siimcovid fuse` and `fuse tune` fused in their folder (FUSION_RECORD).

fuse and tune write it (siimcovid.fuse.stage, siimcovid.fuse.tune); `siimcovid export` reads it for a bundle's
fusion settings and member order (siimcovid.bundle.fusion), and checks by the sha256 that the files it names are
still the files fused. One entry per kind of run in the folder, the latest of each:

    format: 1
    test:            `fuse split=test` (the fusion of the submission; what export packs)
    oof:             `fuse split=oof`
    tune:            `fuse tune` (its params: the best found, best.yaml's; export packs it when there is no test)
      split          oof | test
      data           the prepared folder fused, as given
      folds          the folds fused (oof) or tuned on: all, or a list
      det, cls       the input files in the order given (the member order: det_weights and cls_weights follow it),
                     each {file: as given, sha256: of its bytes when fused, models: its `model` names in order of
                     appearance}
      none_cls       the none model files (fuse none_cls=; none_model_weights follows their order), as det and cls;
                     absent when the fusion had none
      params         every fusion parameter (fuse.yaml's keys tagged fusion), as fused; one a later siimcovid adds
                     and an older record lacks: cfg/fuse.yaml's default

An entry goes when its run starts writing its files and comes back after its last one (fuse: fuse_<split>.yaml;
tune: best.yaml): an entry present always stands beside the files of the run it describes.
"""

from __future__ import annotations

import re
from pathlib import Path

from siimcovid.artifacts import Document, Key, check_keys
from siimcovid.config import fusion_keys, schema
from siimcovid.utils import LOGGER, SiimError, file_sha256

NAME = "fusion.yaml"
FORMAT = 1
ENTRIES = ("test", "oof", "tune")  # export packs the first one present of test and tune
SPLITS = ("oof", "test")
ENTRY_KEYS = ("split", "data", "folds", "det", "cls", "none_cls", "params")
INPUT_KEYS = ("file", "sha256", "models")


def typed(key: str, value, label: str):
    """A value of a fuse setting, typed as cfg/fuse.yaml types it."""
    try:
        return schema("fuse").check(key, value)
    except SiimError as e:
        raise SiimError(f"{label}: {e}") from None


def input_files(value, label: str) -> list[dict]:
    """det / cls: a list of {file, sha256, models}."""
    if not isinstance(value, list):
        raise SiimError(f"{label}: not a list of input files")
    for item in value:
        ok = isinstance(item, dict) and not set(item) ^ set(INPUT_KEYS) and isinstance(item["file"], str)
        ok = ok and isinstance(item["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", item["sha256"]) is not None
        if not ok or not isinstance(item["models"], list) or not all(isinstance(m, str) for m in item["models"]):
            raise SiimError(f"{label}: {item!r} is not {{file: <path>, sha256: <64 hex digits>, models: [<names>]}}")
    return [dict(item) for item in value]


def params_of(value, label: str) -> dict:
    """Every fusion parameter, typed; one absent takes cfg/fuse.yaml's default."""
    if not isinstance(value, dict):
        raise SiimError(f"{label}: params is not a mapping of fusion parameters")
    keys = fusion_keys()
    check_keys(value, keys, f"{label}: params")
    defaults = schema("fuse").settings
    return {k: typed(k, value[k] if k in value else defaults[k].default, f"{label}: params") for k in keys}


def entry_of(value, label: str) -> dict:
    """One entry (module docstring), every value checked."""
    if not isinstance(value, dict):
        raise SiimError(f"{label} is not a mapping of {list(ENTRY_KEYS)}")
    check_keys(value, ENTRY_KEYS, label)
    if value.get("split") not in SPLITS:
        raise SiimError(f"{label}: split={value.get('split')!r}: expected oof or test")
    out = {"split": value["split"], "data": typed("data", value.get("data"), label)}
    out["folds"] = typed("folds", value.get("folds", "all"), label)
    out |= {kind: input_files(value.get(kind, []), f"{label}: {kind}") for kind in ("det", "cls")}
    if "none_cls" in value:  # the none model files (a record of before them has none)
        out["none_cls"] = input_files(value["none_cls"], f"{label}: none_cls")
    out["params"] = params_of(value.get("params"), label)
    return out


def entries(name: str):
    return lambda value, label: None if value is None else entry_of(value, f"{label}: {name}")


def check_format(data: dict, label: str) -> None:
    if data.get("format") != FORMAT:
        raise SiimError(f"{label}: format {data.get('format')!r}: this siimcovid reads format {FORMAT} (re-run the fusion)")


FUSION_RECORD = Document(
    NAME,
    "runs/fuse/<name>/fusion.yaml",
    (
        Key("format", f"{FORMAT}: the format of this record"),
        Key(
            "test",
            "`fuse split=test`: split, data, folds, det and cls (each input file: file, sha256, models), params",
            entries("test"),
            True,
        ),
        Key("oof", "`fuse split=oof`: as test", entries("oof"), True),
        Key("tune", "`fuse tune`: as test; params: the best found (best.yaml's)", entries("tune"), True),
    ),
    "what fuse and fuse tune fused in this folder (siimcovid.fuse.record): export reads it",
    checks=(check_format,),
    header="# siimcovid fuse's record of what it fused here (siimcovid.fuse.record); `siimcovid export` reads it\n",
)


# ----------------------------------------------------------------------------- writing (fuse, fuse tune)
def input_entry(path: str, models: list[str]) -> dict:
    """One input file as the record lists it: the path as given, the sha256 of its bytes, its model names."""
    return {"file": str(path), "sha256": file_sha256(path), "models": [str(m) for m in models]}


def make_entry(cfg, files: dict[str, list[dict]], params: dict) -> dict:
    """The entry of one run: cfg's split, data and folds, its input files (FuseInputs.files), the parameters."""
    entry = {"split": cfg.split, "data": str(cfg.data), "folds": cfg.folds if cfg.split == "oof" else "all"}
    entry |= {kind: list(files.get(kind, [])) for kind in ("det", "cls")}
    if files.get("none_cls"):  # listed when fused (fuse none_cls=)
        entry["none_cls"] = list(files["none_cls"])
    entry["params"] = {k: params[k] for k in fusion_keys()}
    return entry


def current(folder: Path) -> dict:
    """The folder's record as it stands ({} when there is none); one this siimcovid cannot read starts again (the
    outputs rule made it fuse's own: it only describes runs in this folder, which write theirs again)."""
    path = Path(folder) / NAME
    if not path.is_file():
        return {}
    try:
        return {k: v for k, v in FUSION_RECORD.read(path).items() if v is not None}
    except SiimError as e:
        LOGGER.warning(f"fuse: {e}: starting a new record")
        return {}


def update(folder: Path, kind: str, entry: dict | None) -> Path | None:
    """Set (entry) or remove (None) the folder's entry `kind`; the record goes when it holds no entry."""
    data = current(folder)
    if entry is None and kind not in data:
        return None
    data.pop("format", None)
    data = {k: v for k, v in data.items() if k != kind}
    if entry is not None:
        data[kind] = entry
    path = Path(folder) / NAME
    if not data:
        path.unlink(missing_ok=True)
        return None
    return FUSION_RECORD.write({"format": FORMAT, **{k: data[k] for k in ENTRIES if k in data}}, path)


def forget(folder: Path, kind: str) -> None:
    """Before a run writes its files: the record no longer vouches for the entry it replaces."""
    update(folder, kind, None)


def remember(folder: Path, kind: str, entry: dict) -> Path:
    """After a run's last file: its entry."""
    return update(folder, kind, entry)
