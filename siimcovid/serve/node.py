"""`siimcovid serve`: a DICOM node that predicts each study it receives with a bundle and sends the results back.

    receive   a Storage SCP (pynetdicom) on host:port (127.0.0.1 by default), or source=dicomweb:// polled
              (QIDO-RS for new studies, WADO-RS to fetch one once its instance count has been still for `quiet`)
    store     each instance to <out>/store/<study uid>/<sop uid>.dcm (written whole, then renamed), then listed in
              the queue (siimcovid.serve.queue) before the sender is answered
    predict   a study with no new instance for `quiet` seconds: `siimcovid predict` of its folder into
              <out>/results/<study uid>/ with dicom= (the CSVs, pictures and index.html are kept there)
    send      its DICOM results (dicom.csv) to send_to (C-STORE) and/or stow_to (STOW-RS); a failed send waits and
              is tried again, doubling the wait, never dropped

The SCP answers with the DICOM status: 0xA700 (out of resources) for an instance that would pass max_study_mb or
max_store_gb or the disk's free space, 0xC210 (cannot understand) for one that cannot be read as DICOM or whose
UIDs are no UIDs (a UID names a file: "../x" is never one), 0x0000 for a copy of an instance already held (not
written again). An instance of a study already predicted is kept and not predicted: a study is predicted once, on
what arrived before its quiet time ended (logged). The node's own results, sent back to it, are ignored. A study
whose predict was cut PREDICT_TRIES times (a crash, a kill) is failed rather than tried forever.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.uid import UID

from siimcovid.config import Config
from siimcovid.outputs import check_place, open_out
from siimcovid.predict.dicom import MANUFACTURER, SERIES_NUMBER
from siimcovid.serve.queue import PREDICT_TRIES, QUEUE_FILE, Queue
from siimcovid.serve.send import (
    REFUSED,
    RETRY,
    SENT,
    fetch_study,
    parse_node,
    store_scu,
    stow,
    studies_on,
    tls_client,
    tls_server,
    web_client,
    web_url,
)
from siimcovid.tables import DICOM_RESULTS
from siimcovid.utils import LOGGER, SiimError

PREDICT_KEYS = ("bundle", "trust", "device", "workers", "backend", "precision")  # serve's settings each study's predict takes

RECORD = "serve.yaml"  # the node's record of its folder (siimcovid.outputs): it lists queue.sqlite, which lists the rest
STORE, RESULTS = "store", "results"
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE = 0xA700, 0xC210, 0xC211
FREE_MARGIN = 1 << 30  # bytes the disk keeps free whatever max_store_gb says
OWN_SERIES = set(SERIES_NUMBER.values())


def is_uid(text) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): the only text the node makes a file name of."""
    return isinstance(text, str) and UID(text) == text and UID(text).is_valid


def own_result(ds) -> bool:
    """One of the node's results (predict.dicom's manufacturer and series numbers), sent back to it."""
    try:
        return str(ds.get("Manufacturer", "")) == MANUFACTURER and int(ds.get("SeriesNumber")) in OWN_SERIES
    except (TypeError, ValueError):
        return False


class Node:
    """The node's folder, queue and settings; `receive` stores one dataset, `step` does the work that is due."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.root = Path(cfg.out)
        self.queue = Queue(self.root)
        self.destinations = [d for d in (cfg.send_to, self.stow_url()) if d]
        self.tls = tls_client(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.send_tls else None
        self.store_lock = threading.Lock()  # the size checks and the write of one instance, one at a time
        self.last_activity = time.time()

    def stow_url(self) -> str | None:
        if self.cfg.stow_to:
            return web_url(self.cfg.stow_to, "stow_to")
        return web_url(self.cfg.source) if self.cfg.source else None

    # receive
    def receive(self, ds: pydicom.Dataset, encoded: bytes | None = None, where: str = "") -> int:
        """Store one instance (its file meta on ds.file_meta); returns the DICOM status to answer."""
        self.last_activity = time.time()
        try:
            study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        except Exception as e:  # a dataset pydicom cannot decode
            LOGGER.warning(f"serve: an instance from {where} is not readable DICOM ({type(e).__name__}: {e}): refused")
            return CANNOT_UNDERSTAND
        if not (is_uid(study) and is_uid(sop)):
            LOGGER.warning(f"serve: an instance from {where} has no valid Study / SOP Instance UID ({study!r}, {sop!r}): refused")
            return CANNOT_UNDERSTAND
        if own_result(ds):
            return 0x0000
        with self.store_lock:
            known = self.queue.study(study)
            if self.queue.has_instance(sop):
                return 0x0000
            if known and known["state"] != "receiving":
                LOGGER.warning(
                    f"serve: instance {sop} of study {study} came after the study was {known['state']}: kept, not predicted"
                )
            data = encoded if encoded is not None else dataset_bytes(ds)
            refused = self.refusal(known, len(data))
            if refused:
                LOGGER.warning(f"serve: instance {sop} of study {study} refused: {refused}")
                return OUT_OF_RESOURCES
            rel = f"{STORE}/{study}/{sop}.dcm"
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            part = self.root / STORE / f".{sop}.part"  # beside the study folders: predict reads only whole files
            part.write_bytes(data)
            os.replace(part, path)
            self.queue.add_instance(study, sop, rel, len(data))
        return 0x0000

    def refusal(self, study: dict | None, size: int) -> str | None:
        mb, gb = self.cfg.max_study_mb, self.cfg.max_store_gb
        if (study["bytes"] if study else 0) + size > mb * 1e6:
            return f"the study would pass max_study_mb={mb}"
        if self.queue.stored_bytes() + size > gb * 1e9:
            return f"the store would pass max_store_gb={gb}"
        if shutil.disk_usage(self.root).free < size + FREE_MARGIN:
            return f"the disk of {self.root} has less than this instance and 1 GB free"
        return None

    # predict
    def predict(self, study: dict) -> None:
        uid = study["uid"]
        with self.store_lock:  # no instance of it is being written: it is complete, or it goes on receiving
            tries = self.queue.begin(uid, self.cfg.quiet, fetched_only=bool(self.cfg.source))
        if tries is None:
            return
        if tries > PREDICT_TRIES:
            LOGGER.error(f"serve: study {uid} failed: its predict was cut {PREDICT_TRIES} times (a crash or a kill)")
            self.queue.set_state(uid, "failed", f"predict did not end in {PREDICT_TRIES} tries")
            return
        out = self.root / RESULTS / uid
        LOGGER.info(f"serve: study {uid}: {study['instances']} instance(s) complete, predicting into {out}")
        from siimcovid.cli import call

        start = time.time()
        try:
            done = call(
                "predict",
                **{k: self.cfg[k] for k in PREDICT_KEYS},
                source=str(self.root / STORE / uid),
                out=str(out),
                dicom=list(self.cfg.dicom),
                dicom_min_conf=self.cfg.dicom_min_conf,
                plan=False,
            )
            table = DICOM_RESULTS.read(done["dicom"]) if done.get("dicom") else pd.DataFrame(columns=DICOM_RESULTS.names)
        except Exception as e:  # predict refused the study (no readable image, ...), or failed: kept as failed, with the reason
            LOGGER.error(f"serve: study {uid} failed: {e}", exc_info=not isinstance(e, SiimError))
            self.queue.set_state(uid, "failed", f"{type(e).__name__}: {e}"[:1000])
            return
        sends = [
            (d, r.sop_instance_uid, str(Path(RESULTS) / uid / r.file)) for d in self.destinations for r in table.itertuples()
        ]
        self.queue.predicted(uid, sends)
        LOGGER.info(f"serve: study {uid} predicted in {time.time() - start:.1f} s: {len(table)} DICOM result(s) to send")

    # send
    def send_due(self) -> int:
        due = self.queue.due()
        by = {}
        for row in due:
            by.setdefault(row["destination"], []).append(row)
        for destination, rows in by.items():
            files = {self.root / r["file"]: r for r in rows}
            try:
                if "://" in destination:
                    result = stow(list(files), destination)
                else:
                    result = store_scu(self.cfg.ae_title, list(files), destination, self.tls)
            except Exception as e:  # a TLS error, a bug: every send of this round waits and retries
                result = dict.fromkeys(files, (RETRY, f"{type(e).__name__}: {e}"))
            for f, (state, why) in result.items():
                row = files[f]
                if state == SENT:
                    self.queue.sent(destination, row["sop_uid"])
                elif state == REFUSED:
                    self.queue.refused(destination, row["sop_uid"], why)
                    LOGGER.error(f"serve: study {row['study_uid']}: {Path(f).name} is not sent to {destination}: {why}")
                else:
                    wait = self.queue.failed_send(destination, row["sop_uid"], why, self.cfg.backoff)
                    LOGGER.warning(f"serve: study {row['study_uid']}: sending {Path(f).name} to {destination} failed "
                                   f"(try {row['attempts'] + 1}): {why}; next try in {wait:.0f} s")  # fmt: skip
        for uid in self.queue.finish_sent():
            LOGGER.info(f"serve: study {uid}: every result sent ({', '.join(self.destinations) or 'no destination'})")
        return len(due)

    # poll
    def poll(self, client) -> None:
        """source=dicomweb://: new studies counted; one whose count has been still for `quiet` seconds fetched."""
        try:
            found = studies_on(client)
        except Exception as e:
            LOGGER.warning(
                f"serve: searching {self.cfg.source} failed ({type(e).__name__}: {e}); next search in {self.cfg.poll} s"
            )
            return
        if not self.cfg.poll_existing and self.queue.baseline(found):
            LOGGER.info(f"serve: {len(found)} studies on {self.cfg.source} before this node: not predicted (poll_existing=false)")
            return
        now = time.time()
        for uid, count in found.items():
            if not is_uid(uid) or self.queue.study(uid) is not None:
                continue
            self.queue.saw(uid, count, now)
            seen = self.queue.seen(uid)
            if seen["instances"] < 0:  # there before the node (-1), or fetched (-2)
                continue
            if now - seen["changed"] < self.cfg.quiet:
                self.last_activity = now  # a study on its way: the node is not idle
                continue
            try:
                datasets = fetch_study(client, uid, OWN_SERIES, MANUFACTURER)
            except Exception as e:
                LOGGER.warning(f"serve: fetching study {uid} failed ({type(e).__name__}: {e}); tried again at the next search")
                continue
            for ds in datasets:
                try:
                    self.receive(ds, where=self.cfg.source)
                except Exception as e:  # a crafted instance: logged, the rest of the study goes on
                    LOGGER.warning(
                        f"serve: an instance of study {uid} from {self.cfg.source} is not kept ({type(e).__name__}: {e})"
                    )
            if self.queue.study(uid) is None:
                LOGGER.warning(f"serve: study {uid} on {self.cfg.source} has no instance to predict")
            self.queue.fetched(uid)  # complete (predicted at the next step) and never fetched again

    def step(self) -> bool:
        """The work that is due now, one study at a time; True when something was done."""
        worked = False
        for study in self.queue.complete(self.cfg.quiet, fetched_only=bool(self.cfg.source)):
            self.predict(study)
            worked = True
            self.send_due()
        worked = self.send_due() > 0 or worked
        if worked:
            self.last_activity = time.time()
        return worked


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def scp_handlers(node: Node):
    from pynetdicom import evt

    def on_store(event):
        where = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            if str(ds.get("SOPInstanceUID", "")) != str(event.request.AffectedSOPInstanceUID):
                LOGGER.warning(f"serve: an instance from {where} is not the one its request names: refused")
                return CANNOT_UNDERSTAND
            return node.receive(ds, event.encoded_dataset(), where)
        except Exception as e:  # never an instance lost silently: the sender is told it failed
            LOGGER.warning(f"serve: an instance from {where} could not be stored ({type(e).__name__}: {e})")
            return CANNOT_UNDERSTAND if isinstance(e, (ValueError, EOFError, KeyError)) else PROCESSING_FAILURE

    def on_echo(event):
        return 0x0000

    return [(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, on_echo)]


def deferred_tls_server():
    """pynetdicom's threaded server with the TLS handshake moved out of its accept loop: pynetdicom wraps each accepted
    socket there, handshake included, so one connection that never speaks would stop every other; here each
    association's thread makes its own handshake (its first read), bounded by the association's timeouts."""
    from pynetdicom.transport import ThreadedAssociationServer

    class DeferredTLS(ThreadedAssociationServer):
        def get_request(self):
            sock, address = self.socket.accept()
            if self.ssl_context:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, address

    return DeferredTLS


def start_scp(node: Node, cfg: Config):
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, VerificationPresentationContexts

    ae = AE(ae_title=cfg.ae_title)
    for cx in AllStoragePresentationContexts:  # radiographs arrive compressed too (JPEG, JPEG 2000, RLE): every syntax
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.supported_contexts += VerificationPresentationContexts
    ae.maximum_associations = cfg.max_associations
    ae.require_called_aet = True
    if cfg.allowed_aets:
        ae.require_calling_aet = list(cfg.allowed_aets)
    tls = tls_server(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_cert else None
    server = ae.make_server(
        (cfg.host, cfg.port), ssl_context=tls, evt_handlers=scp_handlers(node), server_class=deferred_tls_server()
    )
    ae._servers.append(server)  # as ae.start_server does: server.shutdown() takes it off the list
    threading.Thread(target=server.serve_forever, name="serve-scp", daemon=True).start()
    LOGGER.info(f"serve: {cfg.ae_title} listening on {cfg.host}:{cfg.port}{' (TLS)' if tls else ''}")
    return server


def check(cfg: Config) -> None:
    for key in ("bundle", "out"):
        if not cfg[key]:
            raise SiimError(f"serve needs {key}=: `siimcovid serve bundle=<bundle> out=<folder> send_to=AE@HOST:PORT`")
    if cfg.send_to:
        parse_node(cfg.send_to)
    if cfg.source:
        web_url(cfg.source)
    if cfg.stow_to:
        web_url(cfg.stow_to, "stow_to")
    if not (cfg.send_to or cfg.stow_to or cfg.source):
        LOGGER.warning("serve: no send_to= or stow_to=: results stay in <out>/results/ only")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise SiimError("tls_cert= and tls_key= go together (the SCP's certificate and its private key)")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (cfg.allowed_aets and cfg.tls_cert and cfg.tls_ca):
        LOGGER.warning(
            f"serve: host={cfg.host} listens beyond this machine: on a network set allowed_aets= (AE titles are easily "
            "claimed), and tls_cert=, tls_key= with tls_ca= (only callers with a certificate the CA signed)"
        )


def predict_settings(cfg: Config) -> Config:
    """The node's settings every study's predict runs with (PREDICT_KEYS), as predict types and checks them."""
    from siimcovid.stages import stage_config

    return stage_config("predict", None, {k: cfg[k] for k in PREDICT_KEYS})


def serve(cfg: Config) -> dict:
    """Run the node until stopped (SIGINT, SIGTERM) or `exit_idle` seconds with nothing to do; returns the queue's table."""
    check(cfg)
    check_place(cfg.out)
    from siimcovid.bundle import open_bundle
    from siimcovid.predict.stage import check_engines, hardware

    bundle = open_bundle(cfg.bundle, cfg.trust)  # every check of the bundle, before anything listens (predict opens it per study)
    check_engines(bundle, hardware(predict_settings(cfg)), cfg.bundle)  # and that its members can run as asked
    record = open_out(cfg.out, RECORD, "serve", None, claim=[Path(cfg.out) / QUEUE_FILE])
    record.save()
    lock = one_node(Path(cfg.out) / QUEUE_FILE)
    node = Node(cfg)
    left = node.queue.pending()
    if left:
        LOGGER.info(f"serve: {left} study or send left in {node.queue.path} from before: going on with them")
    for old in set(node.queue.destinations()) - set(node.destinations):
        LOGGER.warning(f"serve: results are still owed to {old} (a destination of an earlier start): they are sent there")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    server = client = None
    try:
        if cfg.source:
            client = web_client(web_url(cfg.source))
        else:
            server = start_scp(node, cfg)
        next_poll = 0.0
        while not stop.is_set():
            if client is not None and time.time() >= next_poll:
                node.poll(client)
                next_poll = time.time() + cfg.poll
            if not node.step():
                idle = time.time() - node.last_activity
                if cfg.exit_idle and idle >= cfg.exit_idle and node.queue.pending() == 0 and not active(server):
                    LOGGER.info(f"serve: nothing to do for {idle:.0f} s (exit_idle={cfg.exit_idle}): stopping")
                    break
                stop.wait(0.5)
    finally:
        if server is not None:
            server.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
        table = node.queue.table()
        node.queue.close()
        lock.close()
    return {"out": Path(cfg.out), "studies": table}


def one_node(queue: Path):
    """One node per folder: an exclusive lock on its queue file (never replaced, unlike the record), held while it runs
    (two nodes would predict a study twice); SQLite's own locks are another kind (fcntl), untouched by it."""
    import fcntl

    handle = open(queue, "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SiimError(f"another siimcovid serve runs with out={queue.parent}: one node per folder") from None
    return handle


def active(server) -> bool:
    return server is not None and bool(server.active_associations)


def status(cfg: Config) -> pd.DataFrame:
    """`siimcovid serve status out=<node>`: every study, its state, its results sent and unsent, and why not."""
    if not cfg.out or not (Path(cfg.out) / QUEUE_FILE).is_file():
        raise SiimError(f"serve status needs out= a node's folder (one holding {QUEUE_FILE})")
    queue = Queue(Path(cfg.out))
    try:
        table = pd.DataFrame(queue.table())
    finally:
        queue.close()
    for col in ("received", "predicted", "finished"):
        if col in table:
            table[col] = pd.to_datetime(table[col], unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    print(table.to_string(index=False) if len(table) else f"no study in {cfg.out}")
    return table


def main(cfg: Config):
    return status(cfg) if cfg.get("mode") == "status" else serve(cfg)
