"""A real PACS (Orthanc with its DICOMweb plugin) and `siimcovid serve`, run by tests/test_serve.py inside a network
namespace of its own (`unshare -n`: only a loopback exists there, since Orthanc listens on every interface and has no
setting to bind one address). Prints one JSON line of what it saw; the test asserts on it.

    python tests/orthanc_scenario.py WORK BUNDLE DICOM_DIR_1 DICOM_DIR_2

1. storescu (dcmtk) sends study 1 to Orthanc; Orthanc forwards it to `serve` (C-STORE, its REST /modalities/.../store,
   as a routing rule would); serve is killed (-9) while it predicts, started again, predicts it and C-STOREs the
   results back; the test reads them from Orthanc's REST (one SR, one presentation state per image).
2. study 2 is stored in Orthanc only; `serve source=dicomweb://` finds it (QIDO-RS), fetches it (WADO-RS) and stores
   the results back (STOW-RS).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HTTP, DICOM, NODE = 18042, 14242, 11112
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def rest(path: str, data: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{HTTP}{path}", data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def until(what, timeout: float, step: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = what()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout} s")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_orthanc(work: Path) -> subprocess.Popen:
    config = {
        "Name": "siimcovid-test", "HttpPort": HTTP, "DicomPort": DICOM, "DicomAet": "ORTHANC",
        "StorageDirectory": str(work / "orthanc-db"), "IndexDirectory": str(work / "orthanc-db"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [PLUGIN],
        "DicomModalities": {"siimcovid": ["SIIMCOVID", "127.0.0.1", NODE]},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (work / "orthanc.json").write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    until(lambda: listening(HTTP) and listening(DICOM), 60)
    return proc


def serve(work: Path, bundle: str, name: str, **settings) -> subprocess.Popen:
    args = {"bundle": bundle, "out": work / name, "quiet": 1, "workers": 0, "exit_idle": 3, **settings}
    cmd = [sys.executable, "-m", "siimcovid", "serve", *(f"{k}={v}" for k, v in args.items())]
    return subprocess.Popen(cmd, stdout=(work / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)


def results_of(study_uid: str) -> dict:
    """Orthanc's series of a study by modality, each with its instances' tags."""
    (oid,) = [x["ID"] for x in rest("/tools/lookup", study_uid.encode()) if x["Type"] == "Study"]
    out: dict = {}
    for series in rest(f"/studies/{oid}/series"):
        for inst in series["Instances"]:
            tags = rest(f"/instances/{inst}/simplified-tags")
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(tags)
    return out


def predicting(node: Path) -> bool:
    import sqlite3

    if not (node / "queue.sqlite").exists():
        return False
    with sqlite3.connect(node / "queue.sqlite", timeout=30) as db:
        return bool(db.execute("SELECT 1 FROM studies WHERE state = 'predicting'").fetchall())


def refs(tags: dict) -> set[str]:
    """The SOP Instance UIDs a presentation state (or SR) references, from Orthanc's simplified tags."""
    found = set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "ReferencedSOPInstanceUID":
                    found.add(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(tags)
    return found


def main(work: Path, bundle: str, first: Path, second: Path) -> dict:
    import pydicom

    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    orthanc = start_orthanc(work)
    seen: dict = {}
    try:
        files1 = sorted(first.rglob("*.dcm"))
        uid1 = str(pydicom.dcmread(files1[0]).StudyInstanceUID)
        sop1 = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files1}
        subprocess.run(["storescu", "-R", "-aec", "ORTHANC", "127.0.0.1", str(DICOM), *map(str, files1)], check=True)
        node = serve(work, bundle, "node", send_to=f"ORTHANC@127.0.0.1:{DICOM}")
        until(lambda: listening(NODE), 120)
        oid = rest("/tools/lookup", uid1.encode())[0]["ID"]
        rest("/modalities/siimcovid/store", json.dumps({"Resources": [oid], "Synchronous": True}).encode())
        forwarded = time.time()  # the last instance is with serve
        until(lambda: predicting(work / "node"), 120)
        node.kill()  # kill -9 in the middle of the study, then the same command again
        node.wait()
        node = serve(work, bundle, "node", send_to=f"ORTHANC@127.0.0.1:{DICOM}")
        got = until(lambda: (r := results_of(uid1)) and {"SR", "PR"} <= set(r) and r, 300)
        seen["scp_seconds"] = time.time() - forwarded
        seen["scp"] = {m: [sorted(refs(t)) for t in tags] for m, tags in got.items() if m in ("SR", "PR", "OT", "DX", "CR")}
        seen["scp_sources"] = sorted(sop1)
        seen["scp_exit"] = node.wait(timeout=120)

        seen["study1_before"] = {m: len(t) for m, t in results_of(uid1).items()}
        poll = serve(work, bundle, "poll", source=f"dicomweb://127.0.0.1:{HTTP}/dicom-web", poll=1, exit_idle=6)
        until(lambda: "before this node" in (work / "poll.log").read_text(), 120)  # its first search: study 1 is old
        files2 = sorted(second.rglob("*.dcm"))
        uid2 = str(pydicom.dcmread(files2[0]).StudyInstanceUID)
        subprocess.run(["storescu", "-R", "-aec", "ORTHANC", "127.0.0.1", str(DICOM), *map(str, files2)], check=True)
        stored = time.time()
        got = until(lambda: (r := results_of(uid2)) and {"SR", "PR"} <= set(r) and r, 300)
        seen["poll_seconds"] = time.time() - stored
        seen["poll"] = {m: [sorted(refs(t)) for t in tags] for m, tags in got.items()}
        seen["poll_sources"] = sorted(str(pydicom.dcmread(f).SOPInstanceUID) for f in files2)
        seen["poll_exit"] = poll.wait(timeout=120)
        seen["study1_after"] = {m: len(t) for m, t in results_of(uid1).items()}  # there before the poll node: not predicted
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
    return seen


if __name__ == "__main__":
    work, bundle, first, second = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(main(work, bundle, first, second)))
