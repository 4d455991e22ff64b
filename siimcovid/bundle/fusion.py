"""export's fusion: the bundle's fuse.yaml, read from what the fuse run recorded (siimcovid.fuse.record), not rebuilt.

fuse= is a fuse run folder (its fusion.yaml: the `test` entry, the fusion of the submission, else the `tune` entry),
its fusion.yaml, or one of its settings files (fuse_test.yaml -> test, fuse_oof.yaml -> oof, best.yaml and tune.yaml
-> tune); any other YAML is a file of fusion parameters (`siimcovid fuse cfg=` style), whose members keep the order
they are given in. The entry gives the member order (each input file's model names, in the order fused: det_weights
and cls_weights follow it) and every fusion parameter; each input file still there must be the one fused (its sha256).
A fuse folder of the release before the record (its settings files, no fusion.yaml) is one error saying how to
write the record: fuse it again (seconds).
"""

from __future__ import annotations

import re
from pathlib import Path

from siimcovid.bundle.members import Member, locate
from siimcovid.config import fusion_keys, load_config
from siimcovid.fuse.pipeline import not_factors
from siimcovid.fuse.record import FUSION_RECORD, NAME
from siimcovid.utils import LOGGER, SiimError, file_sha256

ENTRY_OF = {"fuse_test.yaml": "test", "fuse_oof.yaml": "oof", "best.yaml": "tune", "tune.yaml": "tune"}
RERUN = {"test": ("fuse", "fuse_test.yaml"), "oof": ("fuse", "fuse_oof.yaml"), "tune": ("fuse tune", "tune.yaml")}


def rerun(folder: Path, kind: str) -> str:
    """The command that does a fusion again with its saved settings, into its folder (wherever it lies now)."""
    command, saved = RERUN[kind]
    return f"`siimcovid {command} cfg={folder / saved} project={folder.parent} name={folder.name}`"


def no_record(folder: Path) -> SiimError:
    """The error for a fuse folder without fusion.yaml: the previous release's (its settings files), else not one."""
    for kind in ("test", "tune", "oof"):
        if (folder / RERUN[kind][1]).is_file():
            return SiimError(
                f"export: {folder} has no {NAME}, the record of what it fused that export reads (it was fused by an "
                f"earlier siimcovid): run {rerun(folder, kind)} to fuse it again and write it (the same fusion into "
                f"the same folder; {'a search' if kind == 'tune' else 'seconds'})"
            )
    return SiimError(f"export: {folder} is not a fuse run folder (no {NAME}): fuse=<a folder `siimcovid fuse` wrote>")


def recorded_entry(fuse: Path, kinds: tuple[str, ...] = ("test", "tune")) -> tuple[dict, str, Path] | None:
    """fuse= -> (the entry export packs, its kind, the record); None: fuse= is a YAML of fusion parameters."""
    if not fuse.exists():
        raise SiimError(f"export: fuse={fuse} not found")
    if fuse.is_file() and fuse.name != NAME and fuse.name not in ENTRY_OF:
        return None
    folder = fuse if fuse.is_dir() else fuse.parent
    if not (folder / NAME).is_file():
        raise no_record(folder)
    record = FUSION_RECORD.read(folder / NAME, f"export: {folder / NAME}")
    kinds = (ENTRY_OF[fuse.name],) if fuse.name in ENTRY_OF else kinds
    for kind in kinds:
        if record.get(kind):
            return record[kind], kind, folder / NAME
    raise SiimError(
        f"export: {folder / NAME} records no {' or '.join(kinds)} fusion (that of the submission is `siimcovid fuse "
        f"split=test`'s): fuse into {folder}, or give fuse= another fuse run folder"
    )


def check_unchanged(entry: dict, kind: str, record: Path, anchors: list[Path]) -> None:
    """Each input file the entry lists that is still there holds the bytes fused (its sha256): the fusion settings
    were made for those predictions. One that is gone: its models are the record's (a warning)."""
    for item in entry["det"] + entry["cls"] + entry.get("none_cls", []):
        path = locate(item["file"], anchors)
        if path is None or not path.is_file():
            LOGGER.warning(f"export: {item['file']}, which {record} fused, is gone: its models {item['models']} as recorded")
        elif file_sha256(path) != item["sha256"]:
            raise SiimError(
                f"export: {path} changed since {record} fused it (another sha256): the fusion settings were made for "
                f"other predictions; run {rerun(record.parent, kind)} to fuse them again"
            )


def fused_models(entry: dict, members: list[Member], key: str, record: Path) -> list[list[str]]:
    """The model names of each file the fusion read (the record's), checked against the members exported."""
    per_file = [item["models"] for item in entry.get(key, [])]  # none_cls: absent from a fusion without none models
    empty = [item["file"] for item in entry.get(key, []) if not item["models"]]
    if empty:
        raise SiimError(f"export: {record}: {empty[0]} has no `model` column: which run made it is not known")
    if key in ("cls", "none_cls") and any(len(n) > 1 or "+" in n[0] for n in per_file):
        raise SiimError(f"export: {record} fused a classifier file of several models {per_file}: fuse each run's own table")
    names = [n for names in per_file for n in names]
    if sorted(names) != sorted(m.name for m in members):
        given = [m.name for m in members]
        raise SiimError(f"export: {record} fused {key} models {names}, but the runs exported are {given}")
    return per_file


OWN_TABLE = {"det": "pred_{split}.csv", "cls": "pred_{split}_image.csv", "none_cls": "pred_{split}_none.csv"}  # a run's own


def run_folder(member: Member) -> Path | None:
    """The run folder a member's weights came from (the folder above its fold<k>/)."""
    weights = next(iter(member.weights.values()), None)
    folds = [p for p in Path(weights).parents if re.fullmatch(r"fold\d+", p.name)] if weights else []
    return folds[0].parent if folds else None


def check_members_fused(entry: dict, members: list[Member], key: str, record: Path) -> None:
    """Each member is the run the fusion fused under its name: a run's own table of the split fused, when the fusion read it alone
    (one model in the file), is the file fused (its sha256). Another run of the same name is refused."""
    fused = {item["models"][0]: item for item in entry.get(key, []) if len(item["models"]) == 1}
    for m in members:
        run, item = run_folder(m), fused.get(m.name)
        table = run / OWN_TABLE[key].format(split=entry.get("split") or "test") if run is not None else None
        if item is None or table is None or not table.is_file():
            continue
        if file_sha256(table) != item["sha256"]:
            raise SiimError(
                f"export: {run} is not the run {record} fused as {m.name!r}: its {table.name} is not the file fused "
                f"({item['file']}); export the run fused, or fuse this one ({rerun(record.parent, 'test')})"
            )


def from_record(entry: dict, det: list[Member], cls: list[Member], record: Path, nones: list[Member] = ()) -> dict:
    """fuse.yaml of the bundle from a recorded entry: its parameters and its member order; per-file det_weights and
    det_scale become per-model ones when one file held several models."""
    out = dict(entry["params"])
    det_files, cls_files = fused_models(entry, det, "det", record), fused_models(entry, cls, "cls", record)
    for key in PER_DET_FILE:
        if isinstance(out[key], list) and out[key] and any(len(f) > 1 for f in det_files):
            if len(out[key]) != len(det_files):
                raise SiimError(f"export: {record}: {key}={out[key]} for {len(det_files)} detection file(s) {det_files}")
            out[key] = {n: w for w, names in zip(out[key], det_files) for n in names}
    none_files = fused_models(entry, list(nones), "none_cls", record)  # none models: listed when there are some
    out |= {"none_cls": [f[0] for f in none_files]} if none_files else {}
    return {**out, "det": [n for f in det_files for n in f], "cls": [f[0] for f in cls_files]}


PER_DET_FILE = ("det_weights", "det_scale")  # fusion settings given per det file (a list) or per model (a mapping)
MEMBER_SETTINGS = {"det_weights": "det", "det_scale": "det", "cls_weights": "cls"}  # and the member list each follows
MEMBER_SETTINGS["none_model_weights"] = "none_cls"


def check_member_settings(fusion: dict, where) -> None:
    """A bundle's (or export's) per-member fusion settings against its member lists: a list holds one value per
    member, a mapping names members only, every value a finite number > 0 (fuse.yaml's spec does not look inside a
    mapping, and a bundle is hostile: refused when it is opened, not after its members have predicted)."""
    for key, members in MEMBER_SETTINGS.items():
        value, names = fusion.get(key) or [], list(fusion.get(members) or [])
        values = list(value.values()) if isinstance(value, dict) else list(value)
        if isinstance(value, dict) and not set(map(str, value)) <= set(names):
            raise SiimError(f"{where}: {key} names {sorted(set(map(str, value)) - set(names))}, not members {names}")
        if not isinstance(value, dict) and values and len(values) != len(names):
            raise SiimError(f"{where}: the fusion's {key}={value} do not match its {len(names)} members {names}")
        if not_factors(values):
            raise SiimError(f"{where}: {key}={value}: every value must be a number > 0")


def from_settings(path: Path | None, det: list[Member], cls: list[Member], nones: list[Member] = ()) -> dict:
    """fuse.yaml of the bundle from a YAML of fusion parameters (None: cfg/fuse.yaml's defaults), the members in the
    order given; such a file names no input files (what fusion read is the record's to say)."""
    cfg = load_config("fuse", {"cfg": str(path)} if path else {})
    if cfg.det or cfg.cls or cfg.get("none_cls"):
        raise SiimError(
            f"export: {path} lists det/cls files but is not a record of what fuse fused ({NAME}): give "
            "fuse=<the fuse run folder> (its fusion.yaml), or a YAML of the fusion parameters only"
        )
    names = {"det": [m.name for m in det], "cls": [m.name for m in cls]}
    names |= {"none_cls": [m.name for m in nones]} if nones else {}
    return {**{k: cfg[k] for k in fusion_keys()}, **names}


def fusion_settings(fuse: Path | None, det: list[Member], cls: list[Member], anchors: list[Path]) -> tuple[dict, Path | None]:
    """(fuse.yaml of the bundle: every fusion parameter and the member order (det, cls, none_cls), the file it was read
    from). cls: the classify members, the none models (task=none: fuse's none_cls) among them."""
    nones = [m for m in cls if m.settings.get("task") == "none"]
    cls = [m for m in cls if m.settings.get("task") != "none"]
    found = recorded_entry(Path(fuse)) if fuse is not None else None
    if fuse is None:
        LOGGER.warning("export: no fuse= given: the bundle fuses with cfg/fuse.yaml's defaults, members in the order given")
        out, source = from_settings(None, det, cls, nones), None
    elif found is None:
        LOGGER.info(f"export: fusion parameters from {fuse}, members in the order given")
        out, source = from_settings(Path(fuse), det, cls, nones), Path(fuse)
    else:
        entry, kind, source = found
        check_unchanged(entry, kind, source, [*anchors, *source.resolve().parents])
        check_members_fused(entry, det, "det", source)
        check_members_fused(entry, cls, "cls", source)
        check_members_fused(entry, nones, "none_cls", source)
        out = from_record(entry, det, cls, source, nones)
        LOGGER.info(f"export: fusion settings and member order from {source} ({kind})")
    check_member_settings(out, "export")
    return out, source
