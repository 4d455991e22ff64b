"""The files of a bundle besides its members', each declared once (siimcovid.artifacts.Document): export writes
them with these declarations, open_bundle reads them with the same ones.

    manifest.yaml    MANIFEST_FILE: format, siimcovid, created, sources, versions, half, dtypes, files
    prepare.yaml     PREPARE_FILE: sizes, ext, png_level (the conversion predict gives new images)
    fuse.yaml        FUSION_FILE: every fusion setting, det, cls and none_cls (the member order)
    signature.yaml   siimcovid.signing (sign=<private key> only)

`print(MANIFEST_FILE.describe())` prints one. The members' files: siimcovid.bundle.members.
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from siimcovid import __version__
from siimcovid.artifacts import Document, Key
from siimcovid.config import fusion_keys, schema
from siimcovid.signing import SIGNATURE
from siimcovid.utils import LOGGER, SiimError, file_sha256, name_problem

FORMAT = 2  # the bundle format this siimcovid writes and reads (1: pickled checkpoints, no longer read)
MANIFEST = "manifest.yaml"
PREPARE = "prepare.yaml"
FUSION = "fuse.yaml"
MAX_MANIFEST_BYTES = 4 << 20  # a manifest of 1,000 folds is ~200 KB
MAX_YAML_BYTES = 1 << 20  # every other YAML file of a bundle is a few KB
MAX_PATH = 1024  # bytes of a path a bundle lists (its longest real one: ~60)
PACKAGES = ("torch", "torchvision", "ultralytics", "timm", "ensemble_boxes", "pydicom", "numpy", "pandas")
MAJOR_CHECKED = ("torch", "ultralytics", "timm")  # another major version may not load (or run) the checkpoints
CONVERSION_KEYS = ("ext", "png_level")  # prepare's settings that change the pixels a model sees (besides the size)
TOP_FILES = (PREPARE, FUSION)  # besides the manifest and the signature; each member: members.member_files


def typed(stage: str, key: str):
    """The check of a key that is a stage setting: typed as cfg/<stage>.yaml types it."""

    def check(value, label: str):
        try:
            return schema(stage).check(key, value)
        except SiimError as e:
            raise SiimError(f"{label}: {e}") from None

    return check


# ----------------------------------------------------------------------------- manifest.yaml
def package_versions() -> dict[str, str | None]:
    """Python and the packages a bundle's models need, as installed here (None: not installed)."""
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def major(version: str) -> str:
    return str(version).split(".")[0]


def check_format(data: dict, label: str) -> None:
    fmt = data.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise SiimError(f"{label}: unknown bundle format {fmt!r} (this siimcovid reads format {FORMAT})")
    if fmt > FORMAT:
        raise SiimError(
            f"{label}: format {fmt} was written by a newer siimcovid ({data.get('siimcovid')}); "
            f"this one ({__version__}) reads format {FORMAT}: upgrade siimcovid"
        )
    if fmt < FORMAT:
        raise SiimError(
            f"{label}: format {fmt} (siimcovid {data.get('siimcovid')}) holds pickled checkpoints, "
            f"which run whatever code they hold when loaded; this siimcovid reads format {FORMAT} (weights only): "
            "export the runs again with `siimcovid export`"
        )


def inside(rel) -> bool:
    """Whether a path a bundle lists stays inside it: relative, '/'-separated, each part a plain name, not long."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or len(rel.encode("utf-8", "replace")) > MAX_PATH:
        return False
    return not any(map(name_problem, rel.split("/")))


def file_entries(files, label: str) -> dict:
    """The files table: paths inside the bundle (none also another's folder), each with a sha256 and a size."""
    label = label if label.endswith(MANIFEST) else f"{label}: {MANIFEST}"
    if not isinstance(files, dict):
        raise SiimError(f"{label} is not a bundle manifest (no `files` table)")
    folders = set()
    for rel, entry in files.items():
        if not inside(rel):
            raise SiimError(f"{label} lists {rel!r}, which is not a path inside the bundle")
        folders.update("/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1))
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        if not ok or not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool) or entry["bytes"] < 0:
            raise SiimError(f"{label}: the entry of {rel} is not {{sha256: <64 hex digits>, bytes: <size>}}")
    clash = sorted(folders & (set(files) | {MANIFEST, SIGNATURE}))
    if clash:
        raise SiimError(f"{label} lists {clash[0]} as a file and as a folder")
    if {MANIFEST, SIGNATURE} & set(files):
        raise SiimError(f"{label} lists itself or {SIGNATURE}")
    return files


MANIFEST_FILE = Document(
    MANIFEST,
    "<bundle>/manifest.yaml",
    (
        Key("format", f"the bundle format ({FORMAT}: safetensors weights, data-only descriptions)"),
        Key("siimcovid", "the version of siimcovid that wrote the bundle"),
        Key("created", "when (UTC, YYYY-MM-DDTHH:MM:SSZ)"),
        Key(
            "sources",
            "where it came from: run, members {kind/name: run folder}, fuse, prepared (names relative to "
            "the project, never an absolute path of the machine that made it)",
        ),
        Key(
            "versions",
            "python and the packages the models need, as installed where it was made (another major "
            "version of torch, ultralytics or timm is refused)",
        ),
        Key("half", "whether the classifiers' weights are stored in fp16"),
        Key("dtypes", "{kind/name: the dtype its weights are stored in}"),
        Key("files", "{relative path: {sha256, bytes}} of every file but the manifest and the signature", file_entries),
    ),
    "what a bundle holds and how to check it (every other file's sha256 and size); read first, with the signature",
    checks=(check_format,),
    max_bytes=MAX_MANIFEST_BYTES,
)


def check_versions(data: dict, where) -> None:
    """Another major version of torch / Ultralytics / timm than the bundle's: an error; any other difference: a warning."""
    made = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    made, here = {str(k): str(v) for k, v in made.items() if v}, package_versions()
    for name in MAJOR_CHECKED:
        if made.get(name) and not here.get(name):
            raise SiimError(f"bundle {where}: {MANIFEST}: made with {name} {made[name]}, which is not installed here")
        if made.get(name) and major(made[name]) != major(here[name]):
            raise SiimError(
                f"bundle {where}: {MANIFEST}: made with {name} {made[name]}, this environment has {name} {here[name]}: "
                f"another major version may not load its checkpoints; install {name}=={made[name]}"
            )
    differ = [f"{k} {v} (here {here.get(k)})" for k, v in made.items() if v and str(here.get(k)) != str(v)]
    if differ:
        LOGGER.warning(f"bundle {where}: made with other package versions: {', '.join(differ)}")


def manifest_files(root: Path) -> list[str]:
    """The relative paths of every file under root that the manifest lists: all but itself and the signature."""
    files = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in files if rel not in (MANIFEST, SIGNATURE))


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under root but the manifest and the signature."""
    return {rel: {"sha256": file_sha256(root / rel), "bytes": (root / rel).stat().st_size} for rel in manifest_files(root)}


def manifest(root: Path, sources: dict, half: bool, dtypes: dict) -> dict:
    """The manifest of the bundle tree at root (MANIFEST_FILE): written last, it lists every other file."""
    return {
        "format": FORMAT,
        "siimcovid": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sources": sources,
        "versions": package_versions(),
        "half": half,
        "dtypes": dtypes,
        "files": file_table(root),
    }


# ----------------------------------------------------------------------------- prepare.yaml
PREPARE_FILE = Document(
    PREPARE,
    "<bundle>/prepare.yaml",
    (
        Key(
            "sizes",
            "the prepared sizes the members read (each an image written per source image), no more",
            typed("prepare", "sizes"),
        ),
        Key(
            "resize_from",
            "the size the members' prepared folder made its smaller sizes from (prepare's resize_from; absent: the largest size)",
            typed("prepare", "resize_from"),
            optional=True,
        ),
        Key("ext", "the image format the members trained on (prepare's ext)", typed("prepare", "ext")),
        Key("png_level", "its PNG compression level (prepare's png_level)", typed("prepare", "png_level")),
    ),
    "the conversion the models were trained on: predict prepares new images with it (siimcovid.predict.source)",
    max_bytes=MAX_YAML_BYTES,
)


def check_sizes(prepare: dict, sizes: set[int], where) -> dict:
    """prepare.yaml's sizes are those the members read, no more (each is an image written per source image)."""
    if set(prepare["sizes"]) != sizes:
        raise SiimError(f"bundle {where}: {PREPARE}: sizes {prepare['sizes']}, but its members read {sorted(sizes)}")
    return prepare


# ----------------------------------------------------------------------------- fuse.yaml
def member_names(value, label: str) -> list[str]:
    names = value or []
    if not isinstance(names, list) or any(name_problem(n) for n in names) or len(set(map(str, names))) < len(names):
        raise SiimError(f"{label} is not a list of distinct member names")
    return [str(n) for n in names]


def member_list(key: str):
    return lambda value, label: member_names(value, f"{label}: {key}: {value or []!r}")


def fusion_file() -> Document:
    keys = [Key(k, f"fuse's {k} (cfg/fuse.yaml)", typed("fuse", k), optional=True) for k in fusion_keys()]
    keys += [
        Key("det", "the detector members' names in fusion order (det_weights follow it)", member_list("det")),
        Key("cls", "the classifier members' names in fusion order (cls_weights follow it)", member_list("cls")),
        Key("none_cls", "the none model members' names (classify/<name>/ of task none) in fusion order (none_model_weights "
            "follow it); absent: none", member_list("none_cls"), optional=True),  # fmt: skip
    ]
    doc = "the fusion settings of the run's submission (every fusion key) and the member order; a key a later "
    doc += "siimcovid adds and an older bundle lacks: cfg/fuse.yaml's default"
    return Document(FUSION, "<bundle>/fuse.yaml", tuple(keys), doc, max_bytes=MAX_YAML_BYTES)


FUSION_FILE = fusion_file()
