"""Who made a bundle: Ed25519 signatures (`siimcovid keygen`, `export sign=<private key>`, `predict trust=<keys>`).

A bundle's manifest lists every file's sha256, but whoever edits a file can recompute it: the manifest catches
accidents, not intent. A signature catches intent. `export sign=` writes <bundle>/signature.yaml:

    algorithm   ed25519
    key         the signing key's id: the first 16 hex digits of the sha256 of its raw 32-byte public key
    signed      what is vouched for: {format: 1, files: {path: sha256}} of every file of the bundle but
                signature.yaml (manifest.yaml included)
    signature   base64 of the Ed25519 signature of `signed` as canonical JSON (sorted keys, no spaces)

`predict trust=<a public key file | a folder of them>` refuses a bundle that is unsigned, signed by a key it
does not trust, or whose signature does not verify, and names the first file that changed since it was signed.
Keys are PEM (what keygen writes: PKCS8 private key, SubjectPublicKeyInfo public key) or OpenSSH
(`ssh-ed25519 ...` public keys, `-----BEGIN OPENSSH PRIVATE KEY-----` private keys), unencrypted. The
cryptography comes from the `cryptography` package (OpenSSL's Ed25519).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import yaml

from siimcovid.utils import LOGGER, SiimError, atomic_write_text, name_problem, read_input

SIGNATURE = "signature.yaml"
STATEMENT_FORMAT = 1
KEY_SUFFIXES = (".pub", ".pem")  # the public keys a trust= folder is read for
MAX_KEY_BYTES = 64 << 10  # a key file is a few hundred bytes: anything far larger is not one


# ----------------------------------------------------------------------------- keys
def read_key_file(path: Path, what: str) -> bytes:
    try:
        return read_input(path, MAX_KEY_BYTES, "key file")
    except SiimError as e:
        raise SiimError(f"{what}={path}: {getattr(e, 'reason', e)}") from None


def private_key(path: str | os.PathLike):
    """An Ed25519 private key from a PEM or OpenSSH file (unencrypted)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    data = read_key_file(path, "sign")
    load = serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data else serialization.load_pem_private_key
    try:
        key = load(data, password=None)
    except TypeError:
        raise SiimError(f"sign={path}: an encrypted key; siimcovid reads unencrypted keys (keep the file private)") from None
    except ValueError as e:
        raise SiimError(f"sign={path}: not a private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SiimError(f"sign={path}: a {type(key).__name__}; bundles are signed with Ed25519 keys (siimcovid keygen)")
    return key


def public_key(path: Path):
    """An Ed25519 public key from a PEM or OpenSSH (`ssh-ed25519 ...`) file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = read_key_file(path, "trust")
    load = serialization.load_ssh_public_key if data.lstrip().startswith(b"ssh-") else serialization.load_pem_public_key
    try:
        key = load(data)
    except (ValueError, TypeError) as e:
        raise SiimError(f"trust={path}: not a public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SiimError(f"trust={path}: a {type(key).__name__}; bundles are signed with Ed25519 keys (siimcovid keygen)")
    return key


def key_id(public) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def trusted_keys(trust: str | os.PathLike) -> dict[str, object]:
    """{key id: public key} of trust=: one key file, or every *.pub / *.pem file of a folder."""
    path = Path(trust)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in KEY_SUFFIXES and p.is_file())
        if not files:
            raise SiimError(f"trust={path}: a folder with no public key file ({' or '.join(KEY_SUFFIXES)})")
    else:
        files = [path]
    keys = {}
    for f in files:
        key = public_key(f)
        keys[key_id(key)] = key
    return keys


def keygen(cfg) -> dict[str, Path]:
    """`siimcovid keygen out=<path>`: <path>.key (private, mode 0600) and <path>.pub; never over an existing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not cfg.out:
        raise SiimError("keygen needs out=<path>: writes <path>.key (private) and <path>.pub")
    base = Path(cfg.out)
    if name_problem(base.name) or str(cfg.out).endswith(("/", os.sep)) or os.path.lexists(base):
        raise SiimError(
            f"keygen: out={cfg.out} names no new file (the keys are <out>.key and <out>.pub): give a path ending in a new "
            "name, e.g. out=keys/team"
        )
    private, public = base.with_name(base.name + ".key"), base.with_name(base.name + ".pub")
    for p in (private, public):
        if p.exists() or p.is_symlink():
            raise SiimError(f"keygen: {p} exists: a key is never overwritten (choose another out=)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from its first byte
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    atomic_write_text(public, pub.decode())
    LOGGER.info(
        f"keygen: key {key_id(key.public_key())}: private {private} (keep it secret: `siimcovid export ... sign={private}`), "
        f"public {public} (give it to those who run your bundles: `siimcovid predict ... trust={public}`)"
    )
    return {"private": private, "public": public}


def main(cfg) -> dict[str, Path]:
    return keygen(cfg)


# ----------------------------------------------------------------------------- signing and checking a bundle
def canonical(signed: dict) -> bytes:
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_bundle(root: Path, files: dict[str, str], key_path: str | os.PathLike) -> Path:
    """<root>/signature.yaml vouching for `files` ({path: sha256} of every file but the signature)."""
    key = private_key(key_path)
    signed = {"format": STATEMENT_FORMAT, "files": dict(sorted(files.items()))}
    data = {
        "algorithm": "ed25519",
        "key": key_id(key.public_key()),
        "signed": signed,
        "signature": base64.b64encode(key.sign(canonical(signed))).decode(),
    }
    LOGGER.info(f"export: signed with key {data['key']} ({key_path})")
    return atomic_write_text(root / SIGNATURE, yaml.safe_dump(data, sort_keys=False))


def signature_of(data, where) -> tuple[str, dict, bytes]:
    """(key id, signed statement, signature bytes) of a parsed signature.yaml; a malformed one is an error."""
    bad = SiimError(f"bundle {where}: {SIGNATURE} is not a siimcovid signature (ed25519: key, signed, signature)")
    if not isinstance(data, dict) or data.get("algorithm") != "ed25519" or not isinstance(data.get("key"), str):
        raise bad
    signed = data.get("signed")
    if not isinstance(signed, dict) or signed.get("format") != STATEMENT_FORMAT or not isinstance(signed.get("files"), dict):
        raise bad
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in signed["files"].items()):
        raise bad
    try:
        signature = base64.b64decode(str(data.get("signature")), validate=True)
    except ValueError:
        raise bad from None
    return data["key"], signed, signature


def check_signature(data, trust: str | os.PathLike, where, vouched: dict[str, str]) -> str:
    """Verify a bundle's parsed signature.yaml (None: unsigned) against the keys of trust=, then what was signed
    against what the bundle holds now (`vouched`: {path: sha256} by its manifest, the manifest's own included; the
    files are checked against the manifest when read). Returns the key id; names the first file that changed."""
    keys = trusted_keys(trust)
    if data is None:
        raise SiimError(f"bundle {where} is not signed, and trust={trust} asks for a signature by key {', '.join(keys)}")
    key, signed, signature = signature_of(data, where)
    if key not in keys:
        raise SiimError(f"bundle {where}: signed by key {key}, which trust={trust} does not hold ({', '.join(keys)})")
    from cryptography.exceptions import InvalidSignature

    try:
        keys[key].verify(signature, canonical(signed))
    except InvalidSignature:
        raise SiimError(
            f"bundle {where}: {SIGNATURE} does not verify with key {key}: the signature or what it signed was changed"
        ) from None
    files = signed["files"]
    for rel in sorted(set(files) | set(vouched), key=lambda r: (r == "manifest.yaml", r)):  # a file, not the manifest
        if rel not in vouched:
            raise SiimError(f"bundle {where}: {rel} is missing (it was signed by key {key})")
        if rel not in files:
            raise SiimError(f"bundle {where}: {rel} was added after the bundle was signed by key {key}")
        if vouched[rel] != files[rel]:
            raise SiimError(f"bundle {where}: {rel} changed after the bundle was signed by key {key}")
    return key


def unsigned_note(data, where) -> None:
    """The one line predict says about a bundle's signature when no trust= is given."""
    if data is None:
        LOGGER.info(f"bundle {where} is unsigned: its files are checked against its manifest, not against who made it")
    else:
        key, _, _ = signature_of(data, where)
        LOGGER.info(f"bundle {where} is signed by key {key} (not checked: give trust=<that public key> to check it)")
