"""Zip bundles: a bundle tree in one stored zip, checked against its manifest entry by entry as it is extracted, once,
into a cache folder named by the zip's sha256 (~/.cache/siimcovid/bundles/<sha256>, or $SIIMCOVID_CACHE/<sha256>);
nothing unlisted is written there."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import zipfile
from pathlib import Path

from tqdm import tqdm

from siimcovid.bundle.files import MANIFEST, MAX_MANIFEST_BYTES, MAX_YAML_BYTES, inside
from siimcovid.bundle.header import Header, check_header, header_of, read_header
from siimcovid.signing import SIGNATURE
from siimcovid.utils import SiimError, atomic_path, stream_sha256, temp_dir_beside

CACHE_ENV = "SIIMCOVID_CACHE"


def cache_dir() -> Path:
    """Where zip bundles are extracted: $SIIMCOVID_CACHE, else ~/.cache/siimcovid/bundles."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "siimcovid" / "bundles"


def zip_tree(root: Path, out: Path) -> None:
    """The tree of root into one stored zip at out (a temporary file, renamed)."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(root).as_posix())


def zip_root(names: list[str]) -> str | None:
    """The folder of the zip that holds manifest.yaml: '' (the top), or its one top folder (a zipped bundle folder)."""
    if MANIFEST in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
        return next(iter(tops)) + "/"
    return None


def zip_entries(zf: zipfile.ZipFile, where) -> tuple[str, Header, dict[str, zipfile.ZipInfo]]:
    """(the bundle's folder in the zip, its header, {relative path: entry}), every entry checked against the
    manifest before anything is extracted: stored (a bundle's zip is never compressed: nothing can inflate),
    not encrypted, a listed path of the listed size, or the manifest and the signature."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    names = [i.filename for i in infos]
    if len(set(names)) < len(names):
        raise SiimError(f"bundle {where}: the zip holds two entries of one name: not extracting it")
    if not all(map(inside, names)):
        raise SiimError(f"bundle {where}: holds a path outside the bundle: not extracting it")
    odd = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1]
    if odd:
        raise SiimError(f"bundle {where}: {odd[0]} is compressed or encrypted in the zip: a bundle's zip stores its files")
    prefix = zip_root(names)
    if prefix is None:
        raise SiimError(f"bundle {where}: not a siimcovid bundle ({MANIFEST} missing)")
    entries = {i.filename[len(prefix) :]: i for i in infos}
    if len(entries) < len(infos) or any(not i.filename.startswith(prefix) for i in infos):
        raise SiimError(f"bundle {where}: the zip holds files beside its bundle folder {prefix}: not extracting it")
    for rel, limit in ((MANIFEST, MAX_MANIFEST_BYTES), (SIGNATURE, MAX_YAML_BYTES)):
        if rel in entries and entries[rel].file_size > limit:
            raise SiimError(f"bundle {where}: {rel} is {entries[rel].file_size} bytes (a bundle's {rel} is at most {limit})")
    signature = read_entry(zf, entries[SIGNATURE], where) if SIGNATURE in entries else None
    header = header_of(read_entry(zf, entries[MANIFEST], where), signature, where)
    listed = header.manifest["files"]
    for rel, info in entries.items():
        if rel in (MANIFEST, SIGNATURE):
            continue
        if rel not in listed:
            raise SiimError(f"bundle {where}: {rel} is not listed in {MANIFEST}: not extracting it (not as exported)")
        if info.file_size != listed[rel]["bytes"]:
            raise SiimError(f"bundle {where}: {rel} is corrupt: its size in the zip is not the one {MANIFEST} lists")
    missing = sorted(set(listed) - set(entries))
    if missing:
        raise SiimError(f"bundle {where}: {missing[0]} is missing (listed in {MANIFEST}): an incomplete copy?")
    return prefix, header, entries


def read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise SiimError(f"bundle {where}: {info.filename} is corrupt ({e})") from None


def extract_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst: Path, entry: dict | None, rel: str, where) -> None:
    """One zip entry to dst, streamed: never more bytes than listed, and its sha256 as listed (entry None: the
    manifest or the signature, checked by their readers)."""
    digest, written = hashlib.sha256(), 0
    limit = entry["bytes"] if entry else MAX_MANIFEST_BYTES
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dst, "xb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise SiimError(f"bundle {where}: {rel} is corrupt: it holds more bytes than {MANIFEST} lists")
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise SiimError(f"bundle {where}: {rel} is corrupt ({e})") from None
    except OSError as e:
        raise SiimError(f"bundle {where}: {rel} cannot be extracted to {dst.parent} ({e.strerror})") from None
    if entry and (written != entry["bytes"] or digest.hexdigest() != entry["sha256"]):
        raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")


def cached(cache: Path, prefix: str, header: Header, where) -> Header | None:
    """The header of the extracted copy of a zip in the cache, if there is one and it holds the zip's own manifest
    and signature byte for byte (a copy left by another zip, or planted by someone else, is refused)."""
    if not os.path.lexists(cache):
        return None
    if not stat.S_ISDIR(os.lstat(cache).st_mode) or (prefix and not stat.S_ISDIR(os.lstat(cache / prefix).st_mode)):
        raise SiimError(f"bundle {where}: its cache entry {cache} is not a folder siimcovid extracted: delete it")
    try:
        same = read_header(cache / prefix, where)
    except SiimError as e:
        raise SiimError(f"bundle {where}: its extracted copy {cache} is not the zip's ({e}): delete it") from None
    if same.manifest_sha256 != header.manifest_sha256 or same.signature != header.signature:
        raise SiimError(f"bundle {where}: its extracted copy {cache} holds another manifest than the zip: delete it")
    return same


def extract_zip(path: Path, trust) -> tuple[Path, Header, Path | None]:
    """A zip bundle -> (its bundle root in the cache, the header read there, the cache entry if extracted now).
    The zip is read through one handle (the bytes hashed are the bytes extracted); its header is checked (with
    trust=, the signature) before anything is extracted; every entry is checked against the manifest as it is
    streamed out into <cache>/<the zip's sha256>/."""
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise SiimError(f"bundle {path}: cannot be read ({e.strerror})") from None
    with handle:
        digest = stream_sha256(handle)
        handle.seek(0)
        try:
            zf = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError) as e:
            raise SiimError(f"bundle {path}: neither a bundle folder nor a zip file ({e})") from None
        with zf:
            prefix, header, entries = zip_entries(zf, path)
            check_header(header, trust, path)
            cache = cache_dir() / digest
            copy = cached(cache, prefix, header, path)
            if copy is not None:
                return cache / prefix, copy, None
            extract_all(zf, entries, header, cache, prefix, path)
    try:
        return cache / prefix, cached(cache, prefix, header, path), cache  # what was extracted is what was checked
    except SiimError:
        shutil.rmtree(cache, ignore_errors=True)
        raise


def extract_all(zf: zipfile.ZipFile, entries: dict, header: Header, cache: Path, prefix: str, where) -> None:
    """Every entry into a temporary folder beside the cache entry, renamed to it at the end (all or nothing)."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SiimError(f"bundle {where}: cannot make its cache folder {cache.parent} ({e.strerror})") from None
    need = sum(e["bytes"] for e in header.manifest["files"].values())
    free = shutil.disk_usage(cache.parent).free
    if need > free:
        raise SiimError(f"bundle {where}: needs {need / 1e9:.1f} GB to extract, {cache.parent} has {free / 1e9:.1f} GB")
    tmp = temp_dir_beside(cache, suffix="")
    try:
        for rel, info in tqdm(entries.items(), desc="extract bundle", unit="file", leave=False):
            extract_entry(zf, info, tmp / prefix / rel, header.manifest["files"].get(rel), rel, where)
        with contextlib.suppress(OSError):  # another process extracted it meanwhile: keep theirs
            os.rename(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
