"""Where the node's results go, and where a polled study comes from: DICOM networking (pynetdicom) and DICOMweb
(dicomweb-client), each a small function over a destination string.

    "AE@HOST:PORT"                     C-STORE to that node (send_to=)
    "http(s)://HOST:PORT/PATH"         STOW-RS to that DICOMweb root (stow_to=)
    dicomweb://HOST:PORT/PATH          the polled server (source=; dicomwebs:// = https)

Nothing here chooses an address: each is one the user named.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pydicom

from siimcovid.utils import SiimError

AE_AT = re.compile(r"^(?P<ae>[^@\\]{1,16})@(?P<host>[^:@/]+):(?P<port>\d{1,5})$")
WEB_SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
SUCCESS = {0x0000, 0xB000, 0xB006, 0xB007}  # C-STORE success, and its warnings (coercion, elements discarded)


def parse_node(text: str, key: str = "send_to") -> tuple[str, str, int]:
    """AE@HOST:PORT -> (ae, host, port), else a one-line error naming the setting."""
    m = AE_AT.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise SiimError(f"{key}={text!r} is not AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
    return m["ae"].strip(), m["host"], int(m["port"])


def web_url(text: str, key: str = "source") -> str:
    """dicomweb://... -> http://..., dicomwebs://... -> https://..., http(s):// kept; anything else refused."""
    scheme, sep, rest = text.partition("://")
    if not sep or not rest or scheme not in {*WEB_SCHEMES, "http", "https"}:
        raise SiimError(f"{key}={text!r} is not a DICOMweb root (dicomweb://HOST:PORT/PATH, dicomwebs://, http(s)://)")
    return f"{WEB_SCHEMES.get(scheme, scheme)}://{rest.rstrip('/')}"


SENT, RETRY, REFUSED = "sent", "retry", "refused"  # what became of one send: stored, try again later, never (the reason kept)


def read_result(f: Path):
    """A result file to send, or why it cannot be (gone, not DICOM: a retry would not change that)."""
    try:
        return pydicom.dcmread(f), None
    except Exception as e:
        return None, f"{f} cannot be read ({type(e).__name__}: {e})"[:300]


def store_scu(
    ae_title: str, files: list[Path], node: str, tls: ssl.SSLContext | None = None
) -> dict[Path, tuple[str, str | None]]:
    """C-STORE `files` to node (AE@HOST:PORT) in one association: {file: (SENT | RETRY | REFUSED, why)}. A file of a
    kind the node did not accept (no presentation context) is REFUSED; a node that cannot be reached, RETRY."""
    from pynetdicom import AE

    called, host, port = parse_node(node)
    out: dict[Path, tuple[str, str | None]] = {}
    datasets = {}
    for f in files:
        ds, why = read_result(f)
        if ds is None:
            out[f] = (REFUSED, why)
        else:
            datasets[f] = ds
    if not datasets:
        return out
    ae = AE(ae_title=ae_title)
    add_contexts(ae, datasets.values())
    assoc = ae.associate(host, port, ae_title=called, tls_args=(tls, host) if tls else None)
    if not assoc.is_established:
        return {**out, **dict.fromkeys(datasets, (RETRY, f"no association with {node} (refused, rejected or unreachable)"))}
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        for f, ds in datasets.items():
            if (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) not in accepted:
                out[f] = (REFUSED, f"{node} does not accept {ds.SOPClassUID.name} in {ds.file_meta.TransferSyntaxUID.name}")
                continue
            if not assoc.is_established:
                out[f] = (RETRY, f"the association with {node} ended")
                continue
            code = getattr(assoc.send_c_store(ds), "Status", None)
            out[f] = (SENT, None) if code in SUCCESS else (RETRY, "no answer" if code is None else f"status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def stow(files: list[Path], url: str) -> dict[Path, tuple[str, str | None]]:
    """STOW-RS `files` to the DICOMweb root `url`, one request per file: {file: (SENT | RETRY | REFUSED, why)}; a
    file counts as stored only when the server's answer lists it (an HTTP 200 may carry a FailedSOPSequence)."""
    client = web_client(url)
    out: dict[Path, tuple[str, str | None]] = {}
    for f in files:
        ds, why = read_result(f)
        if ds is None:
            out[f] = (REFUSED, why)
            continue
        try:
            answer = client.store_instances([ds])
        except Exception as e:  # requests' errors, an HTTP status: the send is retried, the reason kept
            out[f] = (RETRY, f"{type(e).__name__}: {e}"[:300])
            continue
        stored = {str(r.get("ReferencedSOPInstanceUID", "")) for r in getattr(answer, "ReferencedSOPSequence", [])}
        failed = getattr(answer, "FailedSOPSequence", None)
        if failed or str(ds.SOPInstanceUID) not in stored:
            reason = f"failure reason {int(failed[0].get('FailureReason', 0)):#06x}" if failed else "not listed as stored"
            out[f] = (RETRY, f"STOW-RS to {url}: {reason}")
        else:
            out[f] = (SENT, None)
    return out


def add_contexts(ae, datasets) -> None:
    """A requested context per SOP class and transfer syntax of `datasets` (one syntax each: the peer accepts or
    refuses that one, and a dataset is sent in its own syntax)."""
    for cls, syntax in dict.fromkeys((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets):
        ae.add_requested_context(cls, syntax)


def web_client(url: str):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url)


def studies_on(client) -> dict[str, int]:
    """QIDO-RS: every study of the server and its instance count."""
    found = client.search_for_studies(fields=["StudyInstanceUID", "NumberOfStudyRelatedInstances"], get_remaining=True)
    out = {}
    for item in found:
        ds = pydicom.Dataset.from_json(item)
        uid = str(ds.get("StudyInstanceUID", ""))
        if uid:
            out[uid] = int(ds.get("NumberOfStudyRelatedInstances", 0) or 0)
    return out


def fetch_study(client, uid: str, own_series: set[int], manufacturer: str) -> list[pydicom.Dataset]:
    """WADO-RS: a study's instances but the node's own results (series `own_series` by `manufacturer`)."""
    out = []
    for item in client.search_for_series(uid, fields=["SeriesInstanceUID", "SeriesNumber", "Manufacturer"]):
        ds = pydicom.Dataset.from_json(item)
        number = ds.get("SeriesNumber")
        if str(ds.get("Manufacturer", "")) == manufacturer and number is not None and int(number) in own_series:
            continue
        out.extend(client.retrieve_series(uid, str(ds.SeriesInstanceUID)))
    return out


def tls_server(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """The SCP's TLS: its certificate; with `ca`, a caller must present one that `ca` signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_client(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext:
    """C-STORE over TLS: the destination verified with `ca` (else the system's CAs), presenting cert when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
