"""`siimcovid export`: the runs to pack, their members, the bundle's files, written in a work folder and renamed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from siimcovid import signing, stages, weights
from siimcovid.artifacts import dump_yaml
from siimcovid.bundle.archive import zip_tree
from siimcovid.bundle.engines import check_formats, check_int8, export_engines
from siimcovid.bundle.files import (
    CONVERSION_KEYS,
    FUSION,
    FUSION_FILE,
    MANIFEST,
    MANIFEST_FILE,
    PREPARE,
    PREPARE_FILE,
    manifest,
    manifest_files,
)
from siimcovid.bundle.fusion import fusion_settings
from siimcovid.bundle.members import LUNG, Member, describe, kind_of, run_family
from siimcovid.bundle.place import check_out, move_into_place, work_folder
from siimcovid.config import Config, read_yaml
from siimcovid.rundir import saved_predict_settings
from siimcovid.utils import LOGGER, SiimError, atomic_write_text, file_sha256


@dataclass
class Sources:
    """The run folders an export packs and the settings their predictions were made with."""

    name: str
    detect: list[Path]
    classify: list[Path]
    fuse: Path | None  # a fuse run folder or a YAML file (siimcovid.bundle.fusion); None: cfg/fuse.yaml's defaults
    run: dict  # run.yaml of a `siimcovid run` ({} when the runs are named one by one)
    anchors: list[Path]  # folders a relative path of a run's settings may be relative to

    def runs(self, kind: str) -> list[Path]:
        return self.detect if kind == "detect" else self.classify


def run_sources(cfg: Config, project: Path, anchors: list[Path]) -> Sources:
    """pipeline=<name>: <project>/run/<name>/run.yaml and the detect, classify and fuse runs of that name."""
    if cfg.detect or cfg.classify or cfg.fuse:
        raise SiimError("export: give pipeline=<name>, or detect=/classify=/fuse= one by one, not both")
    run_yaml = project / stages.stage("run").folder / cfg.pipeline / "run.yaml"
    if not run_yaml.is_file():
        raise SiimError(f"export: {run_yaml} not found: pipeline=<name> names a `siimcovid run` under project={project}")
    folder = lambda stage, name=cfg.pipeline: project / stages.stage(stage).folder / name  # noqa: E731
    fuse = folder("fuse") / "fuse_test.yaml"  # the fusion of its submission: the `test` entry of its fusion.yaml
    if not fuse.is_file():
        raise SiimError(f"export: {fuse} not found: run {cfg.pipeline} has not written its submission (finish `siimcovid run`)")
    settings = read_yaml(run_yaml)
    detect = [folder("detect", n) for n in stages.detector_names({**settings, "name": cfg.pipeline})]  # detect2: a second one
    return Sources(cfg.pipeline, detect, [folder("classify")], fuse, settings, anchors)


def export_sources(cfg: Config) -> Sources:
    project = Path(cfg.project)
    anchors = [project.resolve().parent, project]
    if cfg.pipeline:
        return run_sources(cfg, project, anchors)
    if not cfg.detect and not cfg.classify:
        raise SiimError(
            "export: give pipeline=<a siimcovid run's name>, or the run folders: detect=<dir>[,...] classify=<dir>[,...]"
        )
    detect, classify = [Path(d) for d in cfg.detect], [Path(d) for d in cfg.classify]
    fuse = Path(cfg.fuse) if cfg.fuse else None
    name = (fuse if fuse is None or fuse.is_dir() else fuse.parent).name if fuse else "+".join(p.name for p in detect + classify)
    return Sources(name, detect, classify, fuse, {}, anchors)


def predict_config(stage: str, src: Sources, weights_name: str | None) -> Config:
    """The `<stage> predict` settings the run's predictions were made with: run.yaml's `<stage>_predict` section
    over cfg/<stage>.yaml (the runtime settings `run` adds from the train section change no prediction);
    runs named one by one saved none, so cfg/<stage>.yaml's defaults."""
    settings = dict(src.run.get(f"{stage}_predict") or {})
    if weights_name:
        settings["weights"] = weights_name
    return stages.stage_config(stage, "predict", settings)


def kind_members(kind: str, src: Sources, weights_name: str | None) -> list[tuple[Member, Path]]:
    """(Member, the prepared folder it trained on) of every run of one kind, their names distinct."""
    pcfg = predict_config(kind, src, weights_name)
    out = []
    for d in src.runs(kind):
        family = run_family(d, kind)
        member, prepared = kind_of(kind, family).member(d, pcfg, src.anchors, weights_name)
        member.family = family
        out.append((member, prepared))
    names = [m.name for m, _ in out]
    if len(set(names)) < len(names):
        raise SiimError(f"export: two {kind} runs share a name {names}: fusion tells members apart by name")
    return out


def lung_members(members: list[Member], src: Sources) -> list[tuple[Member, Path, Path]]:
    """(Member, prepared folder, run folder) of each lung detector that the members of crop=lung cropped with (their
    `lung`, the lung run's folder until now: from here the lung member's name), the folds they crop packed and no
    other (open_bundle refuses a lung fold no member crops with: a bundle predicts every fold it holds)."""
    pcfg, found, used = predict_config("detect", src, None), {}, {}
    for m in members:
        if m.settings.get("crop") != "lung":
            continue
        run = Path(m.settings["lung"])
        if run not in found:
            lung, prepared = LUNG.member(run, pcfg, src.anchors)
            found[run] = (lung, prepared, run)
        lung = found[run][0]
        lacking = sorted(set(m.weights) - set(lung.weights))
        if lacking:
            raise SiimError(f"export: {m.kind}/{m.name} crops with the lung run {run}, which has no finished fold(s) {lacking}")
        m.settings["lung"] = lung.name
        used.setdefault(run, set()).update(m.weights)
    for run, (lung, _, _) in found.items():
        lung.weights = {k: w for k, w in sorted(lung.weights.items()) if k in used[run]}
        lung.settings["imgsz"] = {k: v for k, v in lung.settings["imgsz"].items() if k in used[run]}
    names = [lung.name for lung, _, _ in found.values()]
    if len(set(names)) < len(names):
        raise SiimError(f"export: lung runs of one name {sorted(map(str, found))}: a bundle tells its lung members apart by name")
    return list(found.values())


def note_unsaved(src: Sources, weights_name: str | None, lung_runs: list[Path]) -> None:
    """Runs named one by one whose predict recorded no settings take the stages' defaults: say which (the lung runs
    the members crop with too: a lung member predicts the new images with them)."""
    unsaved = [d for d in [*src.detect, *src.classify, *lung_runs] if not saved_predict_settings(d)]
    if unsaved and not src.run:
        from siimcovid.detect.predict import PREDICT_KEYS

        det_cfg, cls_cfg = predict_config("detect", src, weights_name), predict_config("classify", src, weights_name)
        shown = " ".join(f"{k}={det_cfg[k]}" for k in PREDICT_KEYS)
        LOGGER.info(
            f"export: {', '.join(map(str, unsaved))} saved no predict settings (predicted before siimcovid recorded them): "
            f"the defaults, detect {shown}, classify tta={cls_cfg.tta}"
        )


def prepare_settings(prepared: list[Path], sizes: list[int]) -> dict:
    """prepare.yaml of the bundle (PREPARE_FILE): the sizes the members read and the conversion of the folders they
    trained on."""
    from siimcovid.data.prepared import Prepared

    conversions = {str(p): conversion(Prepared.read_cfg(p)) for p in dict.fromkeys(prepared)}
    if len({tuple(c.values()) for c in conversions.values()}) > 1:
        raise SiimError(f"export: the members trained on images converted differently, {conversions}: one bundle holds one")
    found = next(iter(conversions.values()))
    source = found.pop("resize_from")  # a smaller size's pixels are those of the larger one it was resized from
    return {"sizes": sorted(set(sizes)), **({"resize_from": source} if source > max(sizes) else {}), **found}


def conversion(prepare_cfg: dict) -> dict:
    """What makes a prepared folder's pixels (CONVERSION_KEYS) and the size its sizes were resized from."""
    from siimcovid.data.convert import made_from

    return {"resize_from": made_from(prepare_cfg), **{k: prepare_cfg.get(k) for k in CONVERSION_KEYS}}


def ordered(members: list[Member], names: list[str]) -> list[Member]:
    by_name = {m.name: m for m in members}
    return [by_name[n] for n in names]


def write_members(root: Path, members: list[Member], half: bool) -> dict[str, str]:
    """model.yaml, settings.yaml and fold<k>.safetensors of every member under root/<kind>/<name>/;
    returns {"<kind>/<name>": weights dtype}. The folds of a member share one description (one architecture)."""
    dtypes = {}
    jobs = [(m, k, p) for m in members for k, p in sorted(m.weights.items())]
    folds_id: dict[str, dict[int, str]] = {}
    for m, k, src in tqdm(jobs, desc="export", unit="checkpoint"):
        key = f"{m.kind}/{m.name}"
        dtypes[key], desc, fold_id = kind_of(m.kind, m.family).pack(src, root / key / f"fold{k}{weights.SUFFIX}", half)
        if m.model and desc != m.model:
            raise SiimError(f"export: {src}: fold {k} of {key} has another architecture than its other folds")
        m.model = desc
        if fold_id:
            folds_id.setdefault(key, {})[k] = fold_id
    for m in members:
        key, kind = f"{m.kind}/{m.name}", kind_of(m.kind, m.family)
        describe(kind, m.kind, m.model, f"export: {key}/{weights.DESCRIPTION}")  # predict will read it so
        atomic_write_text(root / key / weights.DESCRIPTION, dump_yaml(m.model))  # declared by siimcovid.weights
        settings = {**m.settings, **({"folds_id": folds_id[key]} if key in folds_id else {})}
        kind.check(dict(settings), m.model, set(m.weights), f"export: {key}/settings.yaml")
        kind.settings.write(settings, root / key / "settings.yaml")
    return dtypes


def portable(path: str | Path, project: Path) -> str:
    """A folder as the manifest records it: relative to the project when inside it, else its own name (the
    manifest travels: it keeps no absolute path of the machine that made it)."""
    path, project = Path(path).resolve(), Path(project).resolve()
    return path.relative_to(project).as_posix() if path.is_relative_to(project) else path.name


def source_record(
    src: Sources, members: list[Member], prepared: list[Path], fuse: Path | None, project: Path, lungs: list
) -> dict:
    """Where a bundle came from: the run, each member's run folder (the lung members' too), the fusion file read,
    the prepared folders."""
    dirs = {f"{m.kind}/{m.name}": portable(d, project) for m, d in zip(members, src.detect + src.classify)}
    dirs |= {f"{m.kind}/{m.name}": portable(d, project) for m, _, d in lungs}
    return {
        "run": src.name if src.run else None,
        "members": dirs,
        "fuse": portable(fuse, project) if fuse else None,
        "prepared": sorted({portable(p, project) for p in prepared}),
    }


def write_bundle(tmp: Path, members: list[Member], files: dict, cfg: Config, prepared: dict) -> dict[str, str]:
    """Every file of the bundle into the folder tmp: prepare.yaml, fuse.yaml, the members, the manifest (which lists
    every other file: written last but the signature), the signature (sign=: it vouches for every file). prepared:
    {(kind, name): the prepared folder the member trained on} (int8's calibration images)."""
    PREPARE_FILE.write(files["prepare"], tmp / PREPARE)
    FUSION_FILE.write(files["fusion"], tmp / FUSION)
    dtypes = write_members(tmp, members, cfg.fp16_weights)
    # read back from the safetensors just written: what predict would load
    export_engines(tmp, members, cfg.formats, cfg.int8, prepared, cfg.calibration)
    MANIFEST_FILE.write(manifest(tmp, files["sources"], cfg.fp16_weights, dtypes), tmp / MANIFEST)
    if cfg.sign:
        signing.sign_bundle(tmp, {rel: file_sha256(tmp / rel) for rel in [MANIFEST, *manifest_files(tmp)]}, cfg.sign)
    return dtypes


def export(cfg: Config) -> Path:
    """`siimcovid export`: pack the run(s) into a bundle folder or zip; returns its path."""
    if cfg.sign:
        signing.private_key(cfg.sign)  # a key that cannot sign fails before any packing
    check_formats(cfg.formats)
    check_int8(cfg.int8)
    src = export_sources(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.project) / stages.stage("export").folder / src.name
    check_out(out, cfg.overwrite, [Path(cfg.project), *src.detect, *src.classify, src.fuse])
    det, cls = kind_members("detect", src, cfg.weights), kind_members("classify", src, cfg.weights)
    fusion, fuse_file = fusion_settings(src.fuse, [m for m, _ in det], [m for m, _ in cls], src.anchors)
    lungs = lung_members([m for m, _ in det + cls], src)  # crop=lung: the lung detectors the members cropped with
    note_unsaved(src, cfg.weights, [d for _, _, d in lungs])
    packed = det + cls + [(m, p) for m, p, _ in lungs]
    prepared = [p for _, p in packed]
    files = {
        "prepare": prepare_settings(prepared, [kind_of(m.kind, m.family).size(m.settings) for m, _ in packed]),
        "fusion": fusion,
        "sources": source_record(src, [m for m, _ in det + cls], prepared, fuse_file, Path(cfg.project), lungs),
    }
    members = ordered([m for m, _ in det], fusion["det"]) + ordered([m for m, _ in cls], fusion["cls"])
    members += ordered([m for m, _ in cls], fusion.get("none_cls") or [])  # the none models (task=none), classify kind
    members += [m for m, _, _ in lungs]
    out.parent.mkdir(parents=True, exist_ok=True)
    work = work_folder(out)
    tmp = work / "bundle"
    try:
        tmp.mkdir()
        dtypes = write_bundle(tmp, members, files, cfg, {(m.kind, m.name): Path(p) for m, p in packed})
        if out.suffix == ".zip":
            zip_tree(tmp, work / out.name)
            tmp = work / out.name
        move_into_place(tmp, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    LOGGER.info(f"export: {out} ({size / 1e6:.1f} MB; {len(members)} models, dtypes {dtypes})")
    return out


def main(cfg: Config) -> Path:
    return export(cfg)
