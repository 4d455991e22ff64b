"""Time per image of each step of `siimcovid predict`, on real-size synthetic DICOMs, and the projection for
the competition's test set (1,263 images; 2 detectors + 2 classifiers x 5 folds, flip TTA).

    PYTHONPATH=. python benchmarks/bench_predict.py [--images 2] [--repeat 1] [--work runs/bench_predict]
        [--precision fp32,bf16,int8] [--backends torch,openvino,onnx]

Writes --images test DICOMs of real size (about 2544 x 3028, 10-16 bit, a share compressed: RLE, JPEG 2000,
JPEG-LS; `siimcovid synth rows=2544 cols=3028`) once into --work, then measures on this machine's CPU
(best of --repeat after one warm-up; torch uses every core):

  prepare       decode + VOI LUT + resize + write of one DICOM at sizes 512 and 640 (convert_one: one
                prepare worker's work per image; the DICOM read from the page cache), uncompressed and
                compressed (2 more DICOMs, every one compressed); the projection assumes 35% compressed
  detect        one fold's Ultralytics predict of one image (pre-processing, forward, NMS at predict's
                conf 0.001), yolov5m.yaml / yolov5x.yaml at 512 and 640, built untrained (pretrained=False:
                the weights do not change the speed), loaded from a checkpoint as predict loads it;
                flip = the image and its mirror (2 passes); augment = Ultralytics' TTA (flip + 2 scales,
                what `tta=true` runs for a detector; timed on the first image only)
  classify      one fold's forward of siimcovid's StudyNet (timm backbone + study/none heads), softmax,
                tf_efficientnet_b3_ns / b5_ns at 512 and 640, untrained; flip = the image and its mirror
  fuse          WBF of 2 detectors x 5 folds x 2 TTA variants (~20 boxes each) + the formulas, per image
                (siimcovid.fuse.pipeline.run_fusion on 200 synthetic images, one process)
  view          write_view: the tables, one drawn picture per image (640 px) and the page, per image

--precision, --backends: each model is also timed in those CPU precisions and backends, one right after the other
(torch bf16: under torch.autocast, classifiers channels_last, `siimcovid predict precision=bf16`; openvino / onnx: the
network exported as `siimcovid export formats=` exports it and run as `predict backend=` runs it (bf16: OpenVINO's
inference precision; ONNX Runtime in fp32 only; openvino int8: the network quantised as `export int8=` quantises it,
calibrated on the --images, and run as `predict precision=int8` runs it), inside the same Ultralytics predict and
softmax); a table of every variant and the ensemble's projection in each, and of int8 detectors with bf16 (or fp32)
classifiers, what `export int8=detect` + `predict backend=auto precision=int8` runs.

GFLOPs per forward (torch's FlopCounterMode) come with each model: the GPU projection is a formula over
them and the CPU numbers, with the GPU's throughput as an assumption, NOT a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

TEST_IMAGES, FOLDS, TTA = 1263, 5, 2  # the competition's public test set; 5 folds; flip TTA = 2 passes
DETECTORS = ["yolov5m.yaml", "yolov5x.yaml"]
CLASSIFIERS = ["tf_efficientnet_b3_ns", "tf_efficientnet_b5_ns"]
SIZES = [512, 640]
LIMIT_H = 9.0  # the notebook's limit
SHARE_COMPRESSED = 0.35  # ASSUMED share of compressed DICOMs in the test set (synth's default) for the projection
NATIVE = {"Implicit VR Little Endian", "Explicit VR Little Endian"}


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up: first calls allocate, fuse layers, fill caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_data(work: Path, n: int, compressed: float, seed: int) -> Path:
    from siimcovid.config import load_config
    from siimcovid.data.synth import generate

    settings = dict(out=str(work / f"synth-{n}-c{compressed}"), train_studies=1, test_studies=n, rows=2544, cols=3028)
    settings.update(size_jitter=0.15, compressed=compressed, multi_image_studies=0.0, seed=seed)
    return generate(load_config("synth", settings))


def prepare_folder(data: Path, out: Path) -> tuple[Path, pd.DataFrame]:
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare

    prepared = prepare(load_config("prepare", dict(data=str(data), out=str(out), sizes=SIZES, splits=["test"], workers=1)))
    return prepared, pd.read_csv(prepared / "meta.csv", keep_default_na=False)


def time_convert(data: Path, meta: pd.DataFrame, scratch: Path, repeat: int) -> list[tuple[bool, float]]:
    """(compressed?, seconds) of convert_one (sizes 512 and 640) per DICOM: one prepare worker's work."""
    from siimcovid.data.convert import convert_one, encode_params, init_worker

    init_worker()
    out = []
    for row in meta.itertuples():
        job = dict(out=str(scratch), sizes=SIZES, ext="png", params=encode_params("png"), image_id=row.image_id, split="test")
        job.update(path=str(data / row.dicom), boxes=[], line=None, csv="")

        def convert(job=job):
            shutil.rmtree(scratch, ignore_errors=True)
            for s in SIZES:
                (scratch / str(s) / "images" / "test").mkdir(parents=True)
            assert convert_one(job)["ok"]

        out.append((row.transfer_syntax not in NATIVE, best_of(convert, repeat)))
        print(f"  prepare {row.cols} x {row.rows}, {row.bits_stored} bit, {row.transfer_syntax}: {out[-1][1]:.3f} s")
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def bench_prepare(work: Path, n: int, repeat: int) -> tuple[dict, Path, pd.DataFrame]:
    """Seconds per DICOM, uncompressed and compressed (a second set, every file compressed), and the prepared
    folder of the first set for the later steps."""
    data = make_data(work, n, 0.35, seed=1)
    prepared, meta = prepare_folder(data, work / "prepared")
    packed = make_data(work, 2, 1.0, seed=2)
    _, packed_meta = prepare_folder(packed, work / "prepared-compressed")
    timed = time_convert(data, meta, work / "scratch", repeat) + time_convert(packed, packed_meta, work / "scratch", repeat)
    times = {kind: [t for c, t in timed if c == (kind == "compressed")] for kind in ("uncompressed", "compressed")}
    result = {kind: float(np.mean(v)) for kind, v in times.items() if v}
    result["mix"] = sum(
        result.get(k, 0.0) * w for k, w in (("compressed", SHARE_COMPRESSED), ("uncompressed", 1 - SHARE_COMPRESSED))
    )
    return result, prepared, meta


def gflops(model, x) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def detector_weights(yaml: str, work: Path):
    """An untrained 1-class model stored as a bundle stores a fold (fp16 safetensors + its description), loaded back
    as predict loads a bundle's detector (siimcovid.weights.detector)."""
    from ultralytics.nn.tasks import DetectionModel

    from siimcovid import weights

    model = DetectionModel(yaml, nc=1, verbose=False).half()
    desc = weights.check_description(weights.detector_description(model), "detect", yaml)
    path = work / f"{Path(yaml).stem}-fold0{weights.SUFFIX}"
    if not path.is_file():
        weights.save_state(model.state_dict(), path)
    return weights.detector(desc, path, str(path))


def engine_net(graph, example, outputs: list[str], variant: str, work: Path, stem: str, samples: list[np.ndarray]):
    """The network `graph` exported (siimcovid.bundle.engines, as export formats= / int8= writes it) and loaded as
    predict backend= / precision=int8 loads it; variant: <backend>-<precision>; samples: int8's calibration inputs."""
    import hashlib

    from siimcovid.bundle import engines

    backend, precision = variant.split("-")
    onnx_path = work / f"{stem}.onnx"
    if not onnx_path.is_file():
        onnx_path.write_bytes(engines.onnx_bytes(graph, example, outputs))
    files = [onnx_path]
    if precision == "int8":
        backend, files = engines.INT8, [work / f"{stem}.int8.xml", work / f"{stem}.int8.bin"]
        if not files[0].is_file():
            engines.quantize(onnx_path, samples, work / f"{stem}.int8.onnx")
            engines.save_ir(work / f"{stem}.int8.onnx", files[0])
    elif backend == "openvino":
        files = [work / f"{stem}.xml", work / f"{stem}.bin"]
        if not files[0].is_file():
            engines.save_ir(onnx_path, files[0])
    digests = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size} for p in files}
    return engines.Net(backend, files, digests, precision, stem)


def letterboxed(image: np.ndarray, size: int) -> np.ndarray:
    """A BGR image as Ultralytics' predict feeds a square network: letterboxed, RGB, (1, 3, size, size) in [0, 1]."""
    from ultralytics.data.augment import LetterBox

    boxed = LetterBox((size, size), auto=False, stride=32)(image=image)[..., ::-1]
    return np.ascontiguousarray(boxed.transpose(2, 0, 1))[None].astype(np.float32) / 255


def torch_precision(variant: str) -> str:
    return variant if "-" not in variant else "fp32"  # an engine's precision is its own; torch around it runs fp32


def bench_detector(yaml: str, size: int, images: list[np.ndarray], work: Path, repeat: int, precision: str = "fp32") -> dict:
    """precision: a variant, siimcovid's CPU precision for torch (siimcovid.engine.devices: bf16 = under autocast, as
    predict precision=bf16) or <backend>-<precision> for an exported engine (predict backend=)."""
    import torch

    from siimcovid.engine.devices import cpu_autocast

    yolo = detector_weights(yaml, work)
    gflop = gflops(yolo.model.float().eval(), torch.zeros(1, 3, size, size))
    if "-" in precision:
        from siimcovid.bundle.engines import detector_graph, detector_on

        samples = [letterboxed(im, size) for im in images]  # int8's calibration: these images
        graph, stem = detector_graph(yolo.model), f"{Path(yaml).stem}-{size}"
        net = engine_net(graph, torch.zeros(1, 3, size, size), ["boxes"], precision, work, stem, samples)
        yolo = detector_on(yolo, net)
        precision = torch_precision(precision)
    args = dict(imgsz=size, conf=0.001, iou=0.5, max_det=100, device="cpu", verbose=False)

    def predict(batch, **kw):
        with cpu_autocast("cpu", precision):
            return yolo.predict(batch, **args, **kw)

    plain = np.mean([best_of(lambda im=im: predict(im), repeat) for im in images])
    flip = np.mean([best_of(lambda im=im: predict([im, im[:, ::-1].copy()]), repeat) for im in images])
    augment = best_of(lambda: predict(images[0], augment=True), repeat)  # the first image only: costly
    return {"plain": plain, "flip": flip, "augment": augment, "gflops": gflop}


def bench_classifier(name: str, size: int, images: list[np.ndarray], work: Path, repeat: int, precision: str = "fp32") -> dict:
    """precision bf16: autocast and channels_last, as predict precision=bf16 runs a classifier on the CPU;
    <backend>-<precision>: the exported engine, as predict backend= runs it."""
    import torch

    from siimcovid.classify.model import build_model, probabilities
    from siimcovid.engine.devices import cpu_autocast, cpu_precision

    variant, precision = precision, torch_precision(precision)
    bf16 = cpu_precision("cpu", precision) == "bf16"
    cfg = {"model": name, "in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0, "mask_stride": 16, "none_head": True}
    with contextlib.redirect_stderr(io.StringIO()):  # timm's deprecation note on the _ns names
        model = build_model(cfg, pretrained=False, channels_last=bf16).eval()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    tensors = [torch.from_numpy(cv2.resize(im[..., 0], (size, size))).float().div(255).expand(1, 3, size, size) for im in images]
    gflop = gflops(model.float(), tensors[0])
    if "-" in variant:
        from siimcovid.bundle.engines import ClassifierOn, classifier_graph

        samples = [x.contiguous().numpy() for x in tensors]  # int8's calibration: these images
        net = engine_net(classifier_graph(model), tensors[0], ["study", "none"], variant, work, f"{name}-{size}", samples)
        model = ClassifierOn(net)

    def run(x, flip: bool):
        with torch.no_grad(), cpu_autocast("cpu", precision):
            probabilities(model(x))
            if flip:
                probabilities(model(x.flip(-1)))

    plain = np.mean([best_of(lambda x=x: run(x, False), repeat) for x in tensors])
    flip = np.mean([best_of(lambda x=x: run(x, True), repeat) for x in tensors])
    return {"plain": plain, "flip": flip, "gflops": gflop}


def bench_fusion(n_images: int = 200, boxes: int = 20) -> float:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_fuse import PARAMS, build

    from siimcovid.fuse.inputs import FuseInputs
    from siimcovid.fuse.pipeline import run_fusion

    n_sets = len(DETECTORS) * FOLDS * TTA
    images, det, member = build(n_images, n_sets, boxes)
    sets = pd.DataFrame({"set": range(n_sets), "file": 0, "model": "m", "fold": -1, "tta": "", "name": "m"})
    inputs = FuseInputs("test", images[["image_id", "study_id", "fold", "rows", "cols"]], list(images.study_id), det, sets)
    inputs.members, inputs.member_files, inputs.det_files = [member] * len(CLASSIFIERS), ["a", "b"], ["d"]
    return best_of(lambda: run_fusion(inputs, PARAMS, workers=1), 1) / n_images


def bench_view(prepared: Path, meta: pd.DataFrame, work: Path) -> float:
    from siimcovid.predict.view import write_view
    from siimcovid.tables import FUSED_BOXES, FUSED_IMAGES, FUSED_STUDIES, STUDY_CLASSES

    rng = np.random.default_rng(0)
    fused, n = work / "fused", len(meta)
    fused.mkdir(exist_ok=True)
    none = rng.uniform(size=n)
    FUSED_IMAGES.write(meta.assign(fold=-1, n_boxes=5, none_cls=none, none_det=none, none=none), fused / "images_test.csv")
    studies = pd.DataFrame(rng.dirichlet(np.ones(4), n), columns=STUDY_CLASSES).assign(study_id=meta.study_id)
    FUSED_STUDIES.write(studies.drop_duplicates("study_id"), fused / "studies_test.csv")
    xy = rng.uniform(0.1, 0.5, (n * 5, 2)) * np.repeat(meta[["cols", "rows"]].to_numpy(), 5, axis=0)
    boxes = pd.DataFrame({"image_id": np.repeat(meta.image_id, 5), "x_min": xy[:, 0], "y_min": xy[:, 1]})
    boxes = boxes.assign(x_max=boxes.x_min * 1.6, y_max=boxes.y_min * 1.6, conf=rng.uniform(size=n * 5))
    FUSED_BOXES.write(boxes.assign(wbf_conf=boxes.conf), fused / "boxes_test.csv")
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
        seconds = best_of(lambda: write_view(prepared, fused, work / "view"), 1)
    return seconds / n


def projection(t: dict, det_size: int, cls_size: int, precision: str = "fp32", cls_precision: str | None = None) -> dict:
    """CPU seconds per test image of the competition's ensemble: both detectors at det_size, both classifiers at
    cls_size, 5 folds, flip TTA, the detectors in `precision`, the classifiers in cls_precision (default the same);
    and its parts."""
    key = lambda p, *k: k if p == "fp32" else (*k, p)  # noqa: E731
    cls_precision = cls_precision or precision
    det = FOLDS * sum(t[key(precision, "detect", m, det_size)]["flip"] for m in DETECTORS)
    cls = FOLDS * sum(t[key(cls_precision, "classify", m, cls_size)]["flip"] for m in CLASSIFIERS)
    flops = (
        FOLDS
        * TTA
        * (
            sum(t[("detect", m, det_size)]["gflops"] for m in DETECTORS)
            + sum(t[("classify", m, cls_size)]["gflops"] for m in CLASSIFIERS)
        )
    )
    return {"prepare": t["prepare"], "detect": det, "classify": cls, "fuse": t["fuse"], "view": t["view"], "gflops": flops}


def print_report(t: dict, n_images: int) -> None:
    cores = os.cpu_count()
    print(f"\nsiimcovid predict, seconds per image on this CPU ({cores} cores, torch {threads()} threads), {n_images} DICOMs")
    print(f"  {'step':<44} {'plain':>8} {'flip x2':>8} {'augment':>8} {'GFLOPs':>8}")
    for kind, seconds in t["prepare_kinds"].items():
        what = f"{SHARE_COMPRESSED:.0%} compressed (assumed)" if kind == "mix" else kind
        print(f"  {f'prepare (512, 640), {what}':<44} {seconds:8.3f}")
    for kind, models in (("detect", DETECTORS), ("classify", CLASSIFIERS)):
        for m in models:
            for s in SIZES:
                r = t[(kind, m, s)]
                aug = f"{r['augment']:8.3f}" if "augment" in r else f"{'':8}"
                print(f"  {f'{kind} {m} @{s}, one fold':<44} {r['plain']:8.3f} {r['flip']:8.3f} {aug} {r['gflops']:8.1f}")
    print(f"  {'fuse: WBF of 20 box sets + formulas':<44} {t['fuse']:8.4f}")
    print(f"  {'view: tables, picture, page':<44} {t['view']:8.3f}")

    print(f"\nProjection, competition test set: {TEST_IMAGES} images, 2 detectors + 2 classifiers x {FOLDS} folds, flip TTA")
    for det_size, cls_size in ((512, 512), (640, 640), (640, 512)):
        p = projection(t, det_size, cls_size)
        per_image = sum(v for k, v in p.items() if k != "gflops")
        hours = per_image * TEST_IMAGES / 3600
        verdict = "within" if hours <= LIMIT_H else "OVER"
        print(
            f"  CPU (measured here), detectors @{det_size}, classifiers @{cls_size}: {per_image:6.1f} s/image "
            f"(prepare {p['prepare']:.2f}, detect {p['detect']:.1f}, classify {p['classify']:.1f}, fuse {p['fuse']:.3f}, "
            f"view {p['view']:.2f}) -> {hours:5.1f} h, {verdict} the {LIMIT_H:g} h limit; {p['gflops']:.0f} GFLOPs/image"
        )
    p = projection(t, 640, 640)
    print(
        "\nOne GPU: NOT MEASURED (no GPU here). A formula over the CPU numbers above (detectors and classifiers @640):\n"
        f"  T = {TEST_IMAGES} x ( prepare / c  +  G / F  +  fuse  +  view )\n"
        f"    = {TEST_IMAGES} x ( {p['prepare']:.2f} / c  +  {p['gflops']:.0f} GFLOP / F  +  {p['fuse']:.4f}"
        f"  +  {p['view']:.2f} ) s\n"
        "  c = CPU cores decoding DICOMs in parallel with the GPU (prepare's workers), F = the GPU's sustained\n"
        "  throughput on these networks in fp16 (GFLOP/s). Both are assumptions, e.g.:"
    )
    for c, f in ((2, 10_000), (4, 20_000), (4, 40_000)):
        seconds = TEST_IMAGES * (p["prepare"] / c + p["gflops"] / f + p["fuse"] + p["view"])
        print(f"    c={c}, F={f / 1000:g} TFLOP/s: {seconds / 60:6.1f} min ({seconds / 3600:.2f} h of the {LIMIT_H:g} h)")
    print("  (the GPU also runs the decode concurrently: the larger of prepare / c and G / F bounds the time, not their sum)")


def print_precisions(t: dict, precisions: list[str]) -> None:
    """The models' flip-TTA seconds per image in each precision, measured one after the other here, and the
    projection of the ensemble in each (siimcovid predict precision=...)."""
    from siimcovid.engine.devices import cpu_has_bf16

    others = [p for p in precisions if p != "fp32"]
    if not others:
        return
    print(f"\nPrecision and backend on this CPU (AVX-512 BF16 / AMX: {'yes' if cpu_has_bf16() else 'no'}), one fold, flip TTA, "
          "s/image (x: torch fp32 / it):")  # fmt: skip
    print(f"  {'model':<36} {'fp32':>8} " + " ".join(f"{p:>13} {'x':>6}" for p in others))
    for kind, models in (("detect", DETECTORS), ("classify", CLASSIFIERS)):
        for m in models:
            for s in SIZES:
                base = t[(kind, m, s)]["flip"]
                cells = " ".join(f"{t[(kind, m, s, p)]['flip']:13.3f} {base / t[(kind, m, s, p)]['flip']:5.2f}x" for p in others)
                print(f"  {f'{kind} {m} @{s}':<36} {base:8.3f} {cells}")
    # export int8=detect + predict backend=auto precision=int8: the detectors' int8 engines, the classifiers as auto
    mixed = {"openvino-int8": "openvino-bf16" if cpu_has_bf16() else "openvino-fp32"}
    mixed = {d: c for d, c in mixed.items() if d in precisions and c in precisions}
    for det_size, cls_size in ((512, 512), (640, 640)):
        parts = {p: projection(t, det_size, cls_size, p) for p in precisions}
        parts |= {f"{d} + {c.split('-')[1]} classifiers": projection(t, det_size, cls_size, d, c) for d, c in mixed.items()}
        total = {p: sum(v for k, v in q.items() if k != "gflops") for p, q in parts.items()}
        print(f"  ensemble, detectors @{det_size}, classifiers @{cls_size}, s/image (hours for {TEST_IMAGES}; torch fp32 / it):")
        for p in total:
            print(f"    {p:<36} {total[p]:7.1f} s ({total[p] * TEST_IMAGES / 3600:5.1f} h; {total['fp32'] / total[p]:.2f}x)")
        fastest = min([p for p in total if p != "fp32"], key=total.get)
        print(f"    fastest: {fastest}, {total['fp32'] / total[fastest]:.2f}x torch fp32 (the goal: 4x)")


def threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2, help="real-size test DICOMs to time (each model runs on each)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per measurement (best kept), after one warm-up")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_predict")
    ap.add_argument("--precision", default="fp32,bf16,int8",
                    help="the models' CPU precisions to time side by side (fp32 first; int8: OpenVINO's only)")  # fmt: skip
    ap.add_argument("--backends", default="torch,openvino,onnx", help="predict backend= values to time (torch first)")
    args = ap.parse_args()
    asked = ["fp32", *[p for p in args.precision.split(",") if p != "fp32"]]
    backends = ["torch", *[b for b in args.backends.split(",") if b not in ("torch", "")]]
    # every backend in every precision it computes (ONNX Runtime: fp32; int8: OpenVINO, export int8='s engines), torch
    # fp32 first: "fp32", "bf16", "openvino-bf16", "openvino-int8"
    computes = {"torch": ("fp32", "bf16"), "onnx": ("fp32",), "openvino": ("fp32", "bf16", "int8")}
    if set(backends) - set(computes):
        ap.error(f"--backends: expected any of {', '.join(computes)}, not {', '.join(sorted(set(backends) - set(computes)))}")
    precisions = [p if b == "torch" else f"{b}-{p}" for b in backends for p in asked if p in computes[b]]
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    t: dict = {}
    t["prepare_kinds"], prepared, meta = bench_prepare(args.work, args.images, args.repeat)
    t["prepare"] = t["prepare_kinds"]["mix"]
    big = [cv2.imread(str(prepared / "640" / "images" / "test" / f"{i}.png")) for i in meta.image_id]
    for m in DETECTORS:
        for s in SIZES:
            for p in precisions:  # one after the other: the same load on the machine for both
                key = ("detect", m, s) if p == "fp32" else ("detect", m, s, p)
                t[key] = bench_detector(m, s, big, args.work, args.repeat, p)
                print(f"  detect {m} @{s} {p}: {t[key]}", flush=True)
    for m in CLASSIFIERS:
        for s in SIZES:
            for p in precisions:
                key = ("classify", m, s) if p == "fp32" else ("classify", m, s, p)
                t[key] = bench_classifier(m, s, big, args.work, args.repeat, p)
                print(f"  classify {m} @{s} {p}: {t[key]}", flush=True)
    t["fuse"] = bench_fusion()
    t["view"] = bench_view(prepared, meta[["image_id", "study_id", "rows", "cols"]], args.work)
    print_report(t, len(meta))
    print_precisions(t, precisions)
    print(f"\n(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
