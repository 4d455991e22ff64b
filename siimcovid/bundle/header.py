"""What a bundle says of itself (its manifest and its signature), read once, and the checks of its files against it."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from siimcovid import signing
from siimcovid.artifacts import Document, parse_yaml
from siimcovid.bundle.files import MANIFEST, MANIFEST_FILE, MAX_MANIFEST_BYTES, MAX_YAML_BYTES, check_versions
from siimcovid.signing import SIGNATURE
from siimcovid.utils import SiimError, file_sha256, read_input


@dataclass
class Header:
    """What a bundle says of itself, read once: the manifest (its bytes, parsed) and the signature (parsed, or None).
    Every later check uses these bytes, not a second read of the files."""

    manifest: dict
    manifest_sha256: str
    signature: dict | None

    def vouched(self) -> dict[str, str]:
        """{path: sha256} of every file the bundle holds now, by its manifest (the manifest's own: of its bytes)."""
        return {MANIFEST: self.manifest_sha256, **{rel: e["sha256"] for rel, e in self.manifest["files"].items()}}


def read_limited(path: Path, limit: int, rel: str, where) -> bytes:
    """A regular file's bytes (not a link, a FIFO or a device: each could point anywhere, block or never end), refused
    past `limit`."""
    try:
        return read_input(path, limit, rel, links=False)
    except SiimError as e:
        raise SiimError(f"bundle {where}: {rel}: {getattr(e, 'reason', e)}") from None


def header_of(manifest: bytes, signature: bytes | None, where) -> Header:
    data = MANIFEST_FILE.parse(manifest, f"bundle {where}: {MANIFEST}")
    parsed = parse_yaml(signature, f"bundle {where}: {SIGNATURE}", SIGNATURE) if signature is not None else None
    if parsed is not None:
        signing.signature_of(parsed, where)  # a malformed signature stops here, before a zip is extracted
    return Header(data, hashlib.sha256(manifest).hexdigest(), parsed)


def read_header(root: Path, where) -> Header:
    if not os.path.lexists(root / MANIFEST):
        raise SiimError(f"bundle {where}: not a siimcovid bundle ({MANIFEST} missing)")
    manifest = read_limited(root / MANIFEST, MAX_MANIFEST_BYTES, MANIFEST, where)
    signature = read_limited(root / SIGNATURE, MAX_YAML_BYTES, SIGNATURE, where) if os.path.lexists(root / SIGNATURE) else None
    return header_of(manifest, signature, where)


def check_header(header: Header, trust, where) -> None:
    """Versions, then (trust=) the signature against what the manifest vouches for: before any file is read."""
    check_versions(header.manifest, where)
    if trust is not None:
        signing.check_signature(header.signature, trust, where, header.vouched())


def check_files(root: Path, data: dict, where) -> None:
    """Regular files only (no link, device or pipe anywhere), every listed file present, of its size and sha256;
    no file unlisted."""
    present = set()
    for folder, dirs, files in os.walk(root):  # links to folders are listed in dirs, never followed
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and name in dirs)):
                raise SiimError(f"bundle {where}: {rel} is not a regular file or folder (a link, a device or a pipe)")
            if stat.S_ISREG(mode):
                present.add(rel)
    listed = data["files"]
    for rel, entry in tqdm(listed.items(), desc="check bundle", unit="file", leave=False):
        if rel not in present:
            raise SiimError(f"bundle {where}: {rel} is missing (listed in {MANIFEST}): an incomplete copy?")
        if (root / rel).stat().st_size != entry["bytes"] or file_sha256(root / rel) != entry["sha256"]:
            raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")
    extra = sorted(present - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise SiimError(f"bundle {where}: {extra[0]} is not listed in {MANIFEST} ({len(extra)} unlisted): not as exported")


def bundle_yaml(root: Path, rel: str, header: Header, where, declared: Document | None = None) -> dict:
    """A bundle's YAML file, parsed from the bytes whose sha256 is checked (read once: what is parsed is what was
    vouched for); declared: its declaration (the mapping checked by it), else any mapping (a model description,
    checked by siimcovid.weights)."""
    entry = header.manifest["files"].get(rel)
    if entry is None:
        raise SiimError(f"bundle {where}: {rel} is missing")
    data = read_limited(root / rel, MAX_YAML_BYTES, rel, where)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")
    label = f"bundle {where}: {rel}"
    return declared.parse(data, label) if declared is not None else parse_yaml(data, label, Path(rel).name, MAX_YAML_BYTES)
