"""How long a study takes through `siimcovid serve` and a real PACS: Orthanc forwards each study to the node, the
node predicts it and C-STOREs the results back; timed from the forward's end (the node holds the last instance) to
the study's SR and presentation states stored in Orthanc. Runs in a network namespace of its own (`unshare -n`, as
root: Orthanc listens on every interface), like tests/test_serve.py, with its helpers (tests/orthanc_scenario.py).

    python benchmarks/bench_serve.py --bundle runs/bundle/demo --studies datasets/siim-synth/test --n 8 --quiet 2

one by one: each study forwarded once the one before has its results (the latency a radiologist waits, quiet included)
a burst:    every study forwarded at once (the rate one node keeps up: studies an hour)
The node's log gives each study's predict time (the whole `siimcovid predict` call): the share predict takes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def run(args) -> dict:
    import orthanc_scenario as o
    import pydicom

    from siimcovid.serve.send import SENT, store_scu

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    studies = sorted(p for p in Path(args.studies).iterdir() if p.is_dir())[: 2 * args.n]
    orthanc = o.start_orthanc(work)
    try:
        uids = []
        for folder in studies:
            files = sorted(folder.rglob("*.dcm"))
            sent = store_scu("BENCH", files, f"ORTHANC@127.0.0.1:{o.DICOM}")  # pynetdicom: RLE, JPEG 2000 as they are
            assert all(state == SENT for state, _ in sent.values()), sent
            uids.append(str(pydicom.dcmread(files[0]).StudyInstanceUID))
        node = o.serve(work, args.bundle, "node", send_to=f"ORTHANC@127.0.0.1:{o.DICOM}", quiet=args.quiet, exit_idle=30)
        o.until(lambda: o.listening(o.NODE), 300)

        def forward(uid):
            oid = next(x["ID"] for x in o.rest("/tools/lookup", uid.encode()) if x["Type"] == "Study")
            o.rest("/modalities/siimcovid/store", json.dumps({"Resources": [oid], "Synchronous": True}).encode())
            return time.time()

        def back(uid):
            return o.until(lambda: {"SR", "PR"} <= set(o.results_of(uid)), 900, 0.1) and time.time()

        one = []
        for u in uids[: args.n]:
            sent = forward(u)
            one.append(back(u) - sent)
            print(f"study {len(one)}: {one[-1]:.1f} s", flush=True)
        burst, start = uids[args.n :], time.time()
        for u in burst:
            forward(u)
        done = max(back(u) for u in burst)
        node.terminate()
        node.wait(timeout=120)
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
    log = (work / "node.log").read_text()  # the node's own measure: the whole predict call, the bundle's checks included
    predict = [float(m) for m in re.findall(r"predicted in ([0-9.]+) s", log)]
    return {
        "studies": len(uids),
        "images": sum(len(list(f.rglob("*.dcm"))) for f in studies),
        "quiet": args.quiet,
        "latency": one,
        "burst_seconds": done - start,
        "burst_studies": len(burst),
        "predict": predict,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="runs/bundle/demo")
    ap.add_argument("--studies", default="datasets/siim-synth/test", help="a folder of study folders of DICOMs")
    ap.add_argument("--n", type=int, default=8, help="studies one by one, then as many in a burst")
    ap.add_argument("--quiet", type=float, default=2.0)
    ap.add_argument("--work", default="runs/bench_serve")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inside:  # again, inside a network namespace of its own
        cmd = ["unshare", "-n", sys.executable, __file__, *sys.argv[1:], "--inside"]
        sys.exit(subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode)
    r = run(args)
    lat, pred = r["latency"], r["predict"][: len(r["latency"])]
    print(f"siimcovid serve + Orthanc, bundle {args.bundle}, {r['studies']} studies ({r['images']} images), quiet={r['quiet']} s")
    print(f"one by one ({len(lat)} studies): last instance -> results in Orthanc median {statistics.median(lat):.1f} s "
          f"(min {min(lat):.1f}, max {max(lat):.1f}); of it quiet {r['quiet']:.1f} s, "
          f"predict median {statistics.median(pred):.1f} s")  # fmt: skip
    rate = r["burst_studies"] / r["burst_seconds"] * 3600
    print(f"a burst of {r['burst_studies']} studies: all results back {r['burst_seconds']:.1f} s after the first forward: "
          f"{rate:.0f} studies an hour; predict took {sum(r['predict'][len(lat):]):.1f} s of it")  # fmt: skip


if __name__ == "__main__":
    main()
