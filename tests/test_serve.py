"""siimcovid serve: the DICOM node (siimcovid.serve). Every server here binds 127.0.0.1."""

from __future__ import annotations

import collections
import copy
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from orthanc_scenario import listening  # tests/: the scenario's own helpers
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from siimcovid.serve.node import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STORE, Node, start_scp
from siimcovid.serve.queue import QUEUE_FILE, Queue
from siimcovid.serve.send import add_contexts
from siimcovid.stages import stage_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dicoms(root: Path) -> list[Path]:
    return sorted((root / "test").rglob("*.dcm"))


test_dicoms.__test__ = False  # a helper, not a test


def one_study(root: Path, to: Path, n: int) -> list[Path]:
    """n instances of one study: copies of a synthetic DICOM with new SOP Instance UIDs."""
    ds = pydicom.dcmread(test_dicoms(root)[0])
    to.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(to / f"{k}.dcm")
        ds.save_as(out[-1])
    return out


def node_of(out: Path, **settings) -> Node:
    cfg = stage_config("serve", None, {"bundle": "unused", "out": str(out), "port": free_port(), **settings})
    out.mkdir(parents=True, exist_ok=True)
    return Node(cfg)


def c_store(port: int, files, calling="SENDER", called="SIIMCOVID", tls=None) -> list[int] | None:
    """pynetdicom as a modality: the statuses of C-STORE of each file, or None when the association failed."""
    ae = AE(ae_title=calling)
    datasets = [pydicom.dcmread(f) for f in files]
    add_contexts(ae, datasets)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


class Recorder:
    """A destination node (a PACS stand-in) on 127.0.0.1 that counts every SOP Instance UID it is sent."""

    def __init__(self, port: int | None = None, classes=None):
        self.port = port or free_port()
        self.received: collections.Counter = collections.Counter()
        self.datasets: dict[str, pydicom.Dataset] = {}
        ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            if classes is None or cx.abstract_syntax in classes:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)])

    def store(self, event):
        ds = event.dataset
        self.received[str(ds.SOPInstanceUID)] += 1
        self.datasets[str(ds.SOPInstanceUID)] = ds
        return 0x0000

    def close(self):
        self.server.shutdown()


@pytest.fixture
def scp(tmp_path):
    nodes, servers = [], []

    def start(**settings):
        node = node_of(tmp_path / "node", **settings)
        nodes.append(node)
        servers.append(start_scp(node, node.cfg))
        return node

    yield start
    for server in servers:
        server.shutdown()
    for node in nodes:
        node.queue.close()


def rows(node: Node, table: str) -> list[dict]:
    return node.queue._rows(f"SELECT * FROM {table}")


def test_an_instance_is_stored_whole_listed_once_and_its_study_receiving(scp, _tiny_source):
    node = scp()
    files = test_dicoms(_tiny_source)
    assert c_store(node.cfg.port, files) == [0] * len(files)
    assert c_store(node.cfg.port, files[:1]) == [0]  # a copy of one it holds: success, not written again
    instances = rows(node, "instances")
    assert len(instances) == len(files)
    for row in instances:
        stored = pydicom.dcmread(node.root / row["file"])
        assert row["file"] == f"{STORE}/{stored.StudyInstanceUID}/{stored.SOPInstanceUID}.dcm"
        assert row["bytes"] == (node.root / row["file"]).stat().st_size
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): pydicom.dcmread(f) for f in files}
    for row in instances:  # the pixels as sent
        assert pydicom.dcmread(node.root / row["file"]).PixelData == sources[row["sop_uid"]].PixelData
    studies = rows(node, "studies")
    assert {s["uid"] for s in studies} == {str(ds.StudyInstanceUID) for ds in sources.values()}
    assert {s["state"] for s in studies} == {"receiving"}
    assert not list((node.root / STORE).glob(".*.part"))


def test_a_uid_that_is_no_uid_or_an_unreadable_dataset_is_refused_and_nothing_written(tmp_path, _tiny_source):
    node = node_of(tmp_path / "node")
    good = pydicom.dcmread(test_dicoms(_tiny_source)[0])
    for study, sop in [("../../evil", "1.2.3"), ("1.2.3", "../../../etc/x"), ("1.2.3", "/abs"), ("1.2.3", "1." + "2" * 70)]:
        ds = copy.deepcopy(good)
        ds.StudyInstanceUID, ds.SOPInstanceUID = study, sop
        assert node.receive(ds) == CANNOT_UNDERSTAND
    broken = pydicom.Dataset()  # no UIDs at all
    assert node.receive(broken) == CANNOT_UNDERSTAND
    assert not rows(node, "instances") and not (node.root / STORE).exists()
    assert not (tmp_path / "evil").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["node"]
    node.queue.close()


def test_the_node_refuses_with_out_of_resources_rather_than_pass_its_limits(scp, _tiny_source, tmp_path):
    two = one_study(_tiny_source, tmp_path / "study", 2)
    node = scp(max_study_mb=1.5 * two[0].stat().st_size / 1e6)  # one instance of a study fits, a second does not
    assert c_store(node.cfg.port, two) == [0, OUT_OF_RESOURCES]
    assert len(rows(node, "instances")) == 1 and len(list((node.root / STORE).rglob("*.dcm"))) == 1


def test_the_store_limit_counts_every_study(scp, _tiny_source):
    files = test_dicoms(_tiny_source)
    node = scp(max_store_gb=1.5 * max(f.stat().st_size for f in files) / 1e9)
    assert len({pydicom.dcmread(f).StudyInstanceUID for f in files}) == len(files) == 2
    assert c_store(node.cfg.port, files) == [0, OUT_OF_RESOURCES]


def test_only_the_allowed_callers_and_the_nodes_own_title_associate(scp, _tiny_source):
    node = scp(allowed_aets=["MODALITY1"])
    files = test_dicoms(_tiny_source)[:1]
    assert c_store(node.cfg.port, files, calling="INTRUDER") is None
    assert c_store(node.cfg.port, files, calling="MODALITY1", called="SOMEONEELSE") is None
    assert c_store(node.cfg.port, files, calling="MODALITY1") == [0]
    assert len(rows(node, "instances")) == 1


def test_associations_beyond_max_associations_are_rejected(scp, _tiny_source):
    node = scp(max_associations=1)
    ae = AE(ae_title="A")
    add_contexts(ae, [pydicom.dcmread(test_dicoms(_tiny_source)[0])])
    first = ae.associate("127.0.0.1", node.cfg.port, ae_title="SIIMCOVID")
    assert first.is_established
    second = ae.associate("127.0.0.1", node.cfg.port, ae_title="SIIMCOVID")
    assert not second.is_established
    first.release()
    time.sleep(0.5)
    third = ae.associate("127.0.0.1", node.cfg.port, ae_title="SIIMCOVID")
    assert third.is_established
    third.release()


def test_a_study_is_complete_after_its_quiet_time_or_when_a_kill_caught_it_predicting(tmp_path):
    queue = Queue(tmp_path)
    queue.add_instance("1.2.1", "1.2.1.1", "store/a", 10, now=100.0)
    queue.add_instance("1.2.1", "1.2.1.2", "store/b", 10, now=105.0)
    queue.add_instance("1.2.2", "1.2.2.1", "store/c", 10, now=100.0)
    assert [s["uid"] for s in queue.complete(quiet=10, now=112.0)] == ["1.2.2"]  # 1.2.1's last instance is 7 s old
    assert {s["uid"] for s in queue.complete(quiet=10, now=115.0)} == {"1.2.1", "1.2.2"}
    queue.set_state("1.2.1", "predicting")
    queue.close()
    again = Queue(tmp_path)  # a restart: the study caught predicting comes first, whatever the time
    assert [s["uid"] for s in again.complete(quiet=10, now=0.0)] == ["1.2.1"]
    assert again.study("1.2.1")["instances"] == 2 and again.study("1.2.1")["bytes"] == 20
    again.close()


def test_a_send_to_a_node_that_is_down_waits_doubling_and_is_never_dropped(tmp_path, _tiny_source):
    port = free_port()
    node = node_of(tmp_path / "node", send_to=f"PACS@127.0.0.1:{port}", backoff=0.2)
    src = test_dicoms(_tiny_source)[0]
    ds = pydicom.dcmread(src)
    result = node.root / "results" / "x.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(src.read_bytes())
    node.queue.add_instance("1.2.9", "1.2.9.1", "store/1.2.9/1.2.9.1.dcm", 1)
    node.queue.predicted("1.2.9", [(node.cfg.send_to, str(ds.SOPInstanceUID), "results/x.dcm")])
    waits = []
    for _ in range(3):  # nothing listens: each failure doubles the wait
        node.send_due()
        (row,) = rows(node, "sends")
        waits.append(row["next_try"] - time.time())
        assert row["state"] == "pending" and "no association" in row["error"]
        node.queue._write(("UPDATE sends SET next_try = 0", ()))
    assert waits[0] < waits[1] < waits[2] and 0.7 < waits[2] <= 0.8 + 0.1
    pacs = Recorder(port)
    try:
        node.send_due()
        assert pacs.received == {str(ds.SOPInstanceUID): 1}
        assert node.queue.study("1.2.9")["state"] == "done" and rows(node, "sends")[0]["attempts"] == 3
    finally:
        pacs.close()
        node.queue.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), made with cryptography."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "node.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "node.pem", folder / "node.key"


def test_with_tls_only_a_caller_that_speaks_tls_and_trusts_the_node_stores(scp, _tiny_source, tmp_path):
    import ssl

    cert, key = self_signed(tmp_path / "tls")
    node = scp(tls_cert=str(cert), tls_key=str(key))
    files = test_dicoms(_tiny_source)[:1]
    assert c_store(node.cfg.port, files) is None  # plain DICOM to a TLS port
    untrusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's CAs: not this certificate
    assert c_store(node.cfg.port, files, tls=(untrusting, "127.0.0.1")) is None
    trusting = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assert c_store(node.cfg.port, files, tls=(trusting, "127.0.0.1")) == [0]
    with socket.create_connection(("127.0.0.1", node.cfg.port)):  # a connection that never speaks stops no other
        start = time.time()
        assert c_store(node.cfg.port, files[:1], tls=(trusting, "127.0.0.1")) == [0]
        assert time.time() - start < 10
    assert len(rows(node, "instances")) == 1


def test_the_nodes_own_results_sent_back_to_it_are_not_a_study_to_predict(tmp_path, _tiny_source):
    from siimcovid.predict.dicom import MANUFACTURER, SERIES_NUMBER

    node = node_of(tmp_path / "node")
    ds = pydicom.dcmread(test_dicoms(_tiny_source)[0])
    ds.Manufacturer, ds.SeriesNumber = MANUFACTURER, SERIES_NUMBER["sc"]
    assert node.receive(ds) == 0 and not rows(node, "instances")
    ds.SeriesNumber = 3  # a series of the modality's, whatever its manufacturer says
    assert node.receive(ds) == 0 and len(rows(node, "instances")) == 1
    node.queue.close()


def test_settings_that_cannot_work_stop_before_anything_listens(tmp_path, capsys):
    from siimcovid.cli import call
    from siimcovid.utils import SiimError

    for bad, words in [
        ({"send_to": "ORTHANC"}, "AE@HOST:PORT"),
        ({"send_to": "A@127.0.0.1:99999"}, "AE@HOST:PORT"),
        ({"source": "ftp://x"}, "DICOMweb root"),
        ({"tls_cert": str(tmp_path / "c.pem")}, "go together"),
    ]:
        with pytest.raises(SiimError, match=words):
            call("serve", bundle=str(tmp_path / "b"), out=str(tmp_path / "node"), **bad)
    assert not (tmp_path / "node").exists()
    with pytest.raises(SiimError, match="queue.sqlite"):
        call("serve", "status", out=str(tmp_path))


def test_a_result_the_destination_cannot_take_is_refused_once_and_the_others_still_go(tmp_path, _tiny_source):
    src = pydicom.dcmread(test_dicoms(_tiny_source)[0])
    pacs = Recorder(classes={src.SOPClassUID})  # a PACS that takes this one kind of object only
    node = node_of(tmp_path / "node", send_to=f"PACS@127.0.0.1:{pacs.port}", backoff=0.1)
    results = node.root / "results"
    results.mkdir(parents=True)
    other = copy.deepcopy(src)
    other.SOPClassUID = other.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    src.save_as(results / "kept.dcm")
    other.save_as(results / "other.dcm")
    node.queue.add_instance("1.2.9", "1.2.9.1", "store/x", 1)
    files = [(str(other.SOPInstanceUID), "other.dcm"), ("1.2.9.77", "gone.dcm"), (str(src.SOPInstanceUID), "kept.dcm")]
    node.queue.predicted("1.2.9", [(node.cfg.send_to, uid, f"results/{f}") for uid, f in files])
    try:
        node.send_due()
        states = {r["file"]: (r["state"], r["error"]) for r in rows(node, "sends")}
        assert states["results/kept.dcm"] == ("sent", None) and pacs.received == {str(src.SOPInstanceUID): 1}
        assert (
            states["results/other.dcm"][0] == "refused" and "does not accept Secondary Capture" in states["results/other.dcm"][1]
        )
        assert states["results/gone.dcm"][0] == "refused" and "cannot be read" in states["results/gone.dcm"][1]
        assert node.queue.study("1.2.9")["state"] == "done" and node.queue.pending() == 0
        (row,) = node.queue.table()
        assert (row["sent"], row["refused"], row["unsent"]) == (1, 2, 0)
    finally:
        pacs.close()
        node.queue.close()


def test_an_instance_that_arrives_while_a_study_is_taken_keeps_it_receiving(tmp_path):
    queue = Queue(tmp_path)
    queue.add_instance("1.2.1", "1.2.1.1", "store/a", 10, now=100.0)
    (listed,) = queue.complete(quiet=10, now=200.0)
    queue.add_instance("1.2.1", "1.2.1.2", "store/b", 10)  # a new instance, after the listing
    assert queue.begin(listed["uid"], quiet=10) is None and queue.study("1.2.1")["state"] == "receiving"
    queue._write(("UPDATE studies SET last_instance = 0", ()))
    assert [queue.begin("1.2.1", quiet=10) for _ in range(2)] == [1, 2]  # a restart counts the tries
    queue.close()


def test_one_node_per_folder(tmp_path):
    from siimcovid.serve.node import one_node
    from siimcovid.utils import SiimError

    first = one_node(tmp_path / QUEUE_FILE)
    with pytest.raises(SiimError, match="one node per folder"):
        one_node(tmp_path / QUEUE_FILE)
    first.close()
    one_node(tmp_path / QUEUE_FILE).close()


class FakeServer:
    """A DICOMweb server's answers (QIDO JSON, WADO datasets), as dicomweb-client returns them; counts the fetches."""

    def __init__(self):
        self.studies: dict[str, list[pydicom.Dataset]] = {}
        self.fetches = collections.Counter()

    def search_for_studies(self, fields=None, get_remaining=False):
        return [
            {"0020000D": {"vr": "UI", "Value": [u]}, "00201208": {"vr": "IS", "Value": [len(d)]}} for u, d in self.studies.items()
        ]

    def search_for_series(self, uid, fields=None):
        return [{"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00200011": {"vr": "IS", "Value": [1]}}]

    def retrieve_series(self, uid, series):
        self.fetches[uid] += 1
        return self.studies[uid]


def test_a_polled_server_s_crafted_instances_are_left_out_and_its_study_fetched_once(tmp_path, _tiny_source):
    from siimcovid.predict.dicom import MANUFACTURER

    node = node_of(tmp_path / "node", source="dicomweb://127.0.0.1:1/dicom-web", quiet=0.01)
    server = FakeServer()
    server.studies["1.2.5"] = []
    node.poll(server)  # the first search: 1.2.5 was there before the node
    good = pydicom.dcmread(test_dicoms(_tiny_source)[0])
    crafted = copy.deepcopy(good)
    crafted.SOPInstanceUID, crafted.Manufacturer, crafted.SeriesNumber = generate_uid(), MANUFACTURER, None
    no_meta = copy.deepcopy(good)
    no_meta.SOPInstanceUID = generate_uid()
    del no_meta.file_meta
    server.studies[str(good.StudyInstanceUID)] = [crafted, no_meta, good]
    for _ in range(3):
        node.poll(server)
        time.sleep(0.05)
    assert server.fetches == {str(good.StudyInstanceUID): 1} and "1.2.5" not in server.fetches
    assert {r["sop_uid"] for r in rows(node, "instances")} >= {str(good.SOPInstanceUID)}
    assert [s["uid"] for s in node.queue.complete(node.cfg.quiet, fetched_only=True)] == [str(good.StudyInstanceUID)]
    node.queue.close()


# end to end, with a bundle


def serve_process(bundle: Path, out: Path, port: int, pacs: int, log: Path, **settings) -> subprocess.Popen:
    args = {"bundle": bundle, "out": out, "port": port, "send_to": f"PACS@127.0.0.1:{pacs}", "quiet": 1, "workers": 0, **settings}
    cmd = [sys.executable, "-m", "siimcovid", "serve", *(f"{k}={v}" for k, v in args.items())]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(what, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.time() + timeout
    while time.time() < end:
        value = what()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out (or serve ended) waiting; log:\n{log.read_text()[-3000:] if log else ''}")


def states(out: Path) -> dict[str, str]:
    if not (out / QUEUE_FILE).exists():
        return {}
    with sqlite3.connect(out / QUEUE_FILE, timeout=30) as db:
        return dict(db.execute("SELECT uid, state FROM studies").fetchall())


@pytest.mark.slow
def test_a_node_killed_mid_study_then_restarted_delivers_every_result_once(tiny_run, tmp_path):
    from siimcovid.tables import DICOM_RESULTS

    base, result = tiny_run
    files = test_dicoms(base / "siim")
    pacs, port, out, log = Recorder(), free_port(), tmp_path / "node", tmp_path / "serve.log"
    try:
        proc = serve_process(result["bundle"], out, port, pacs.port, log)
        wait_for(lambda: listening(port), 120, proc, log)
        assert c_store(port, files) == [0] * len(files)
        wait_for(lambda: "predicting" in states(out).values(), 60, proc, log)
        proc.send_signal(signal.SIGKILL)  # in the middle of its first study
        proc.wait()
        proc = serve_process(result["bundle"], out, port, pacs.port, log, exit_idle=3)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        assert set(states(out).values()) == {"done"}
        made = [DICOM_RESULTS.read(p) for p in (out / "results").glob("*/dicom.csv")]
        expected = {uid for table in made for uid in table.sop_instance_uid}
        assert len(made) == len(states(out)) and expected
        assert set(pacs.received) == expected and set(pacs.received.values()) == {1}, pacs.received
        sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        refs = {str(r.ReferencedSOPInstanceUID) for ds in pacs.datasets.values() if ds.Modality == "PR"
                for s in ds.ReferencedSeriesSequence for r in s.ReferencedImageSequence}  # fmt: skip
        assert refs == sent  # a presentation state per image received
        assert "from before: going on with them" in log.read_text()
        from siimcovid.cli import call

        table = call("serve", "status", out=str(out))  # what a person reads
        assert set(table.state) == {"done"} and table.sent.sum() == len(expected) and table.unsent.sum() == 0
    finally:
        pacs.close()
        if proc.poll() is None:
            proc.kill()


def orthanc_missing() -> str | None:
    """Why the Orthanc test cannot run here, or None."""
    import shutil

    for tool, package in (("Orthanc", "orthanc"), ("storescu", "dcmtk"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package}; .ci/run installs it)"
    if not Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so").exists():
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "unshare -n is not allowed here: Orthanc listens on every interface, so it runs only in a namespace of its own"
    return None


@pytest.mark.slow
@pytest.mark.pacs
@pytest.mark.skipif(orthanc_missing() is not None, reason=str(orthanc_missing()))
def test_a_real_pacs_forwards_a_study_and_gets_its_results_back_and_a_polled_one_too(tiny_run, tmp_path):
    import json

    base, result = tiny_run
    first, second = sorted(p for p in (base / "siim" / "test").iterdir() if p.is_dir())[:2]
    script = Path(__file__).with_name("orthanc_scenario.py")
    cmd = ["unshare", "-n", sys.executable, str(script), str(tmp_path / "work"), str(result["bundle"]), str(first), str(second)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in (tmp_path / "work").glob("*.log"))
    assert run.returncode == 0, run.stderr[-3000:] + logs
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    for mode in ("scp", "poll"):
        got, sources = seen[mode], set(seen[f"{mode}_sources"])
        assert len(got["SR"]) == 1 and set(got["SR"][0]) == sources, (mode, got)  # one SR, referencing every image
        assert sorted(r for pr in got["PR"] for r in pr) == sorted(sources)  # a presentation state per image
        assert seen[f"{mode}_exit"] == 0, logs
    assert seen["study1_after"] == seen["study1_before"]  # the poll node left the study that was there before it
    print(f"\nlast instance to results in Orthanc: forwarded {seen['scp_seconds']:.1f} s, polled {seen['poll_seconds']:.1f} s")
