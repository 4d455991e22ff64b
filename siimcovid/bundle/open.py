"""open_bundle: a bundle folder or zip -> a checked Bundle, every check done before any work."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from siimcovid import signing
from siimcovid.bundle.archive import extract_zip
from siimcovid.bundle.files import FUSION, FUSION_FILE, PREPARE, PREPARE_FILE, TOP_FILES, check_sizes
from siimcovid.bundle.header import Header, bundle_yaml, check_files, check_header, read_header
from siimcovid.bundle.members import KINDS, LUNG_KIND, Member, kind_of, lung_of, member_files, read_member
from siimcovid.utils import SiimError


@dataclass
class Bundle:
    """An opened, checked bundle: members in fuse.yaml's order."""

    root: Path
    manifest: dict
    prepare: dict
    fusion: dict
    manifest_sha256: str  # of the manifest's bytes open_bundle checked: what identifies the bundle
    detectors: list[Member] = field(default_factory=list)
    classifiers: list[Member] = field(default_factory=list)
    lungs: list[Member] = field(default_factory=list)  # the lung detectors the members of crop=lung name (members.LUNG)


def lung_members(root: Path, members: list[Member], listed: dict, read, where) -> list[Member]:
    """The lung members that the members of crop=lung name (members.LUNG), each read and checked as a member, with
    every fold of the members that crop with it (lung fold k crops for their fold k) and no other: export packs those
    folds alone, and predict would run a fold nobody crops with (unused_lung_folds)."""
    out: dict[str, Member] = {}
    used: dict[str, set] = {}
    for m in members:
        name = lung_of(m.settings)
        if name is None:
            continue
        if name not in out:
            if not any(rel.startswith(f"{LUNG_KIND}/{name}/") for rel in listed):
                raise SiimError(
                    f"bundle {where}: {m.kind}/{m.name}/settings.yaml crops with the lung detector {name!r}, but "
                    f"{LUNG_KIND}/{name}/ is not in the bundle: not as exported"
                )
            out[name] = read_member(root, LUNG_KIND, name, listed, read, where)
        lacking = sorted(set(m.weights) - set(out[name].weights))
        if lacking:
            raise SiimError(
                f"bundle {where}: {m.kind}/{m.name} crops fold(s) {lacking} with {LUNG_KIND}/{name}, which has no such "
                "fold: not as exported"
            )
        used.setdefault(name, set()).update(m.weights)
    for name, lung in out.items():
        unused_lung_folds(lung, used[name], root, where)
    return list(out.values())


def unused_lung_folds(lung: Member, used: set, root: Path, where) -> None:
    """A lung member's folds are those its members crop with (used): a fold more is refused, naming its file."""
    extra = sorted(set(lung.weights) - used)
    if extra:
        rel = lung.weights[extra[0]].relative_to(root).as_posix()
        raise SiimError(
            f"bundle {where}: {rel}: lung fold(s) {extra} crop for no member (the members of crop=lung with "
            f"{LUNG_KIND}/{lung.name} have folds {sorted(used)}): not as exported (a bundle of an earlier siimcovid "
            "packed every fold of the lung run: `siimcovid export` it again)"
        )


def none_members(root: Path, fusion: dict, classifiers: list[Member], listed: dict, read, where) -> list[Member]:
    """fuse.yaml's none_cls: the binary none models (classify/<name>/, task: none), read as classify members after the
    classifiers. Each list's members are of its task, and no name is in both: else not as exported."""
    names = fusion.get("none_cls") or []
    both = sorted(set(names) & set(fusion["cls"]))
    if both:
        raise SiimError(f"bundle {where}: {FUSION} lists {both[0]} in both cls and none_cls: not as exported")
    nones = [read_member(root, "classify", n, listed, read, where) for n in names]
    for m in classifiers + nones:
        task = m.settings.get("task") or "study"
        if (task == "none") != (m.name in names):
            raise SiimError(
                f"bundle {where}: classify/{m.name}/settings.yaml says task {task}, but {FUSION} lists it in "
                f"{'none_cls' if m.name in names else 'cls'}: not as exported"
            )
    return nones


def read_members(root: Path, header: Header, fusion: dict, where) -> dict[str, list[Member]]:
    """{kind: members in fuse.yaml's order; lung: the lung members they name}; a file that is none of the bundle's
    files (TOP_FILES and those of these members) is an error: a bundle holds nothing else, so nothing else can be
    slipped in."""
    listed = header.manifest["files"]
    read = lambda rel, declared: bundle_yaml(root, rel, header, where, declared)  # noqa: E731
    out = {kind: [read_member(root, kind, n, listed, read, where) for n in fusion[k.key]] for kind, k in KINDS.items()}
    out["classify"] += none_members(root, fusion, out["classify"], listed, read, where)
    if not any(out.values()):
        raise SiimError(f"bundle {where}: {FUSION} names no member (det: [], cls: [])")
    out[LUNG_KIND] = lung_members(root, [m for group in out.values() for m in group], listed, read, where)
    known = set(TOP_FILES).union(*(member_files(m, root) for members in out.values() for m in members))
    unknown = sorted(set(listed) - known)
    if unknown:
        first = unknown[0].split("/")
        key = KINDS[first[0]].key if first[0] in KINDS else None
        member = key is not None and len(first) > 2 and first[1] not in fusion[key]
        why = f"{first[0]}/{first[1]}/ is not a member of {FUSION}'s {key}" if member else "not a file of a bundle"
        if first[0] == LUNG_KIND and len(first) > 2:
            why = f"{LUNG_KIND}/{first[1]}/ is the lung detector of no member (none crops with it)"
        raise SiimError(f"bundle {where}: {unknown[0]}: {why} ({len(unknown)} such file(s)): not as exported")
    return out


def read_bundle(root: Path, header: Header, where) -> Bundle:
    """The checked files of a bundle root -> the Bundle (its YAML parsed from checked bytes, its members)."""
    fusion = bundle_yaml(root, FUSION, header, where, FUSION_FILE)
    members = read_members(root, header, fusion, where)
    sizes = {kind_of(kind, m.family).size(m.settings) for kind, group in members.items() for m in group}
    prepare = check_sizes(bundle_yaml(root, PREPARE, header, where, PREPARE_FILE), sizes, where)
    found = (members["detect"], members["classify"], members[LUNG_KIND])
    return Bundle(root, header.manifest, prepare, fusion, header.manifest_sha256, *found)


def open_bundle(path: str | Path, trust: str | Path | None = None) -> Bundle:
    """A bundle folder or zip, every check done before any work (each a SiimError naming the bundle and the file).
    trust: a public key file or a folder of them: the bundle must be signed by one of them (siimcovid.signing)."""
    where = Path(path)
    if not where.exists():
        raise SiimError(f"bundle {where} not found")
    if trust is not None:
        signing.trusted_keys(trust)  # a bad trust= fails before a zip is read
    if where.is_file():
        root, header, fresh = extract_zip(where, trust)  # its header checked (versions, signature) before extraction
    else:
        root, header, fresh = where, read_header(where, where), None
        check_header(header, trust, where)
    try:
        check_files(root, header.manifest, where)
        bundle = read_bundle(root, header, where)
    except SiimError as e:
        if fresh is not None:  # extracted now, refused now: nothing of it stays in the cache
            shutil.rmtree(fresh, ignore_errors=True)
        elif root != where:  # a copy extracted earlier from this zip, changed since
            raise SiimError(f"{e} (in the extracted copy {root}: delete it to extract the zip again)") from None
        raise
    if trust is None:
        signing.unsigned_note(header.signature, where)
    return bundle
