"""Exported inference engines in a bundle: ONNX and OpenVINO copies of every fold, beside its safetensors.

    siimcovid export pipeline=demo formats=openvino,onnx          # fold<k>.onnx, fold<k>.xml + fold<k>.bin per member
    siimcovid predict bundle=... source=... out=... backend=auto   # OpenVINO where present (bf16 with precision=bf16|auto)

What an engine replaces is the network's forward pass and nothing else, so the pre- and post-processing stay the code
the PyTorch path runs: a detector's engine stands in for the DetectionModel's `_predict_once` inside Ultralytics
(its letterbox, its TTA views (augment), its NMS and box scaling unchanged), a classifier's for StudyNet's forward
inside classify's `infer` (its TTA views unchanged). Both are exported with dynamic batch, height and width, so the
last short batch, Ultralytics' TTA scales and lung crops run as they are.

    fold<k>.onnx            the network traced from the bundle's own fold<k>.safetensors (opset OPSET, every weight
                            inside the file), outputs: a detector's decoded boxes (B, 4 + nc, anchors); a classifier's
                            `study` logits (B, 4) and `none` logits (B,) where it has a none head (no mask head)
    fold<k>.xml, fold<k>.bin  the same network as OpenVINO IR (fp32 weights), read from that ONNX by OpenVINO's runtime;
                            bf16 is chosen when it is compiled (INFERENCE_PRECISION_HINT), not stored
    fold<k>.int8.xml, .bin  export int8=<kinds>: the network quantised to int8 (weights per channel, activations per
                            tensor, calibrated on `calibration` of the fold's own training images as predict feeds them),
                            as OpenVINO IR; predict precision=int8 runs it (the convolutions and matrix products in int8,
                            the rest in bf16 where the CPU computes it, else fp32: int8_rest)

Why ONNX Runtime's quantiser (onnxruntime.quantization.quantize_static, QDQ format) and not NNCF: NNCF sends usage
telemetry unless a consent file opts out, and it would be one more package; ONNX Runtime is already here, and OpenVINO
runs its QuantizeLinear / DequantizeLinear graph as int8 kernels.

Each engine file is listed and checksummed in the manifest like every other file, and is read into memory, hashed
against that checksum and handed to its runtime as bytes (never by path: nothing changes between check and use). An
ONNX file must hold its weights itself (external data would name other files to read) and use the standard operator
set only; neither runtime is given an extension library, so a bundle cannot run code through its engines.

Why not Ultralytics' own exporter: it converts with openvino.convert_model, whose tool layer may send telemetry,
and may pip-install what it lacks at run time; this module needs neither (torch.onnx, then OpenVINO's runtime).
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
import warnings
from pathlib import Path

import numpy as np

from siimcovid import weights as weights_of
from siimcovid.utils import LOGGER, SiimError

ENGINES = ("onnx", "openvino")  # what export formats= writes and predict backend= reads besides torch
INT8 = "int8"  # the int8 OpenVINO IR (export int8=, predict precision=int8): an engine of its own, run by OpenVINO
SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml", ".bin"), INT8: (".int8.xml", ".int8.bin")}  # a fold's files, the first named
PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino", INT8: "openvino"}  # each engine's runtime (siimcovid[engines])
INT8_KINDS = ("detect", "classify", "lung")  # export int8='s values: the member kinds quantised
OPSET = 17
STANDARD_DOMAINS = ("", "ai.onnx")


def available(engine: str) -> bool:
    """Whether this Python can run `engine` (check_runtime passes)."""
    return engine == "torch" or all(has_module(n) for n in [PACKAGES[engine]] + (["onnx"] if engine == "onnx" else []))


def check_formats(formats, where: str = "export") -> list[str]:
    """export's formats=: a list of ENGINES whose writers are installed (onnx: torch.onnx's; openvino: its runtime)."""
    formats = list(dict.fromkeys(formats or []))
    wrong = [f for f in formats if f not in ENGINES]
    if wrong:
        raise SiimError(f"{where}: formats={wrong[0]!r}: expected any of {', '.join(ENGINES)}")
    needed = (["onnx"] if formats else []) + (["openvino"] if "openvino" in formats else [])
    missing = [name for name in needed if not has_module(name)]
    if missing:
        raise SiimError(f"{where}: formats={','.join(formats)} needs {' and '.join(missing)}: pip install 'siimcovid[engines]'")
    return formats


def check_runtime(engine: str, where: str) -> None:
    """predict's backend=: its runtime installed (onnx: onnxruntime, and onnx to check the file before it runs)."""
    missing = [name for name in ([PACKAGES[engine]] + (["onnx"] if engine == "onnx" else [])) if not has_module(name)]
    if missing:
        raise SiimError(f"{where}: backend={engine} needs {' and '.join(missing)}: pip install 'siimcovid[engines]'")


def check_int8(kinds, where: str = "export") -> list[str]:
    """export's int8=: member kinds (INT8_KINDS) to quantise; needs ONNX Runtime's quantiser and OpenVINO."""
    kinds = list(dict.fromkeys(kinds or []))
    wrong = [k for k in kinds if k not in INT8_KINDS]
    if wrong:
        raise SiimError(f"{where}: int8={wrong[0]!r}: expected any of {', '.join(INT8_KINDS)} (the members to quantise)")
    missing = [name for name in (("onnx", "onnxruntime", "openvino") if kinds else ()) if not has_module(name)]
    if missing:
        raise SiimError(f"{where}: int8={','.join(kinds)} needs {' and '.join(missing)}: pip install 'siimcovid[engines]'")
    return kinds


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- export
def detector_graph(model):
    """A DetectionModel's forward as predict runs it (eval, conv and batch norm fused): the decoded boxes only."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net._predict_once(x)[0]

    net = copy.deepcopy(model).float().eval()
    net = net.fuse(verbose=False) if hasattr(net, "fuse") else net
    for m in net.modules():  # the anchor grid traced from the input's shape, not one cached by an earlier call
        if hasattr(m, "dynamic") and hasattr(m, "anchors"):
            m.dynamic, m.shape = True, None
    return Graph(net).eval()


def classifier_graph(model):
    """A StudyNet's forward without its mask head: (study logits, none logits) or (study logits,)."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return (out["study"], out["none"]) if out["none"] is not None else (out["study"],)

    return Graph(model).eval()


def onnx_bytes(graph, example, outputs: list[str]) -> bytes:
    """The ONNX file of `graph` traced on `example` (dynamic batch, height and width), every weight inside it."""
    import torch

    buffer = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow: the shapes are dynamic axes
        torch.onnx.export(graph, example, buffer, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=outputs, dynamic_axes=axes, do_constant_folding=True)  # fmt: skip
    return buffer.getvalue()


def member_graph(member, path: Path):
    """(graph to trace, example input, output names) of one fold of a built-in member, read back from the bundle's own
    safetensors (what predict's PyTorch path loads), on the CPU in fp32."""
    import torch

    where = f"export: {member.kind}/{member.name}/{path.name}"
    if member.kind == "classify":
        model = weights_of.classifier(member.model, path, where, torch.device("cpu"))
        size = int(member.settings["imgsz"])
        example = torch.rand(1, 1, size, size)
        with torch.no_grad():
            has_none = model(example)["none"] is not None
        return classifier_graph(model), example, ["study", "none"] if has_none else ["study"]
    fold = int(re.fullmatch(r"fold(\d+)" + re.escape(weights_of.SUFFIX), path.name)[1])
    size = fold_imgsz(member.settings, fold)
    model = weights_of.detector(member.model, path, where).model
    if getattr(model, "end2end", False):
        raise SiimError(f"{where}: an end-to-end head selects its boxes inside the network: no exported engine for it")
    return detector_graph(model), torch.rand(1, detector_channels(member), size, size), ["boxes"]


def fold_imgsz(settings: dict, fold: int) -> int:
    """A detector member's training size of fold k (settings.yaml's imgsz {fold: size}; YAML may key it as text)."""
    return int({int(k): v for k, v in (settings.get("imgsz") or {}).items()}[fold])


def detector_channels(member) -> int:
    """The input channels of a detector member's network (its model YAML's `channels`, Ultralytics' default 3)."""
    return int((member.model.get("yaml") or {}).get("channels") or 3)


def end_to_end(member) -> bool:
    """A detector whose head selects its boxes itself (Ultralytics' end2end heads, e.g. YOLOv10 / YOLO26)."""
    if member.kind == "classify":
        return False
    arch = member.model.get("yaml") or {}
    return bool(arch.get("end2end")) or any(str(layer[2]).startswith("v10Detect") for layer in arch.get("head") or [])


def save_ir(onnx_path: Path, xml_path: Path) -> None:
    """The ONNX file as OpenVINO IR (xml + bin, fp32 weights), by OpenVINO's runtime (not its telemetry-sending tools)."""
    import openvino as ov

    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def engine_paths(folder: Path, fold: int, engine: str) -> list[Path]:
    return [folder / f"fold{fold}{suffix}" for suffix in SUFFIXES[engine]]


def network_inputs(member, fold: int, prepared: Path, n: int, part: str = "train") -> list[np.ndarray]:
    """`n` of fold k's own images (a fixed draw of prepared.fold(k, part): "train", what it trained on, calibrates;
    "val", what it never saw, checks), each as the fold's network receives it in predict: a classifier's (1, 1, imgsz,
    imgsz) grey in [0, 1]; a detector's letterboxed to its fold's imgsz as Ultralytics does, (1, channels, imgsz,
    imgsz) RGB in [0, 1] (predict_imgsz where the member predicts at another size). Whole images: a crop=lung member's
    crops span the same pixel values."""
    import cv2

    from siimcovid.data.prepared import Prepared

    data = Prepared(prepared)
    images = data.fold(fold, part)
    if images.empty:
        what = "training image to calibrate on" if part == "train" else "held-out image to check on"
        raise SiimError(f"export int8: {member.kind}/{member.name} fold {fold}: {prepared} has no {what}")
    ids = images.image_id.sample(min(n, len(images)), random_state=fold).tolist()
    s, out = member.settings, []
    for image_id in ids:
        if member.kind == "classify":
            size = data.check_size(int(s["imgsz"]))
            grey = read_image(data.image_path(image_id, "train", size), cv2.IMREAD_GRAYSCALE)
            out.append(cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)[None, None].astype(np.float32) / 255)
            continue
        from ultralytics.data.augment import LetterBox

        imgsz = int(s.get("predict_imgsz") or fold_imgsz(s, fold))
        imgsz = -(-imgsz // 32) * 32  # as Ultralytics' check_imgsz rounds it up to the stride (32; a P6 model's 64 aside)
        image = read_image(data.image_path(image_id, "train", data.check_size(int(s["size"]))), cv2.IMREAD_COLOR)
        image = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=image)
        image = image[..., :1] if detector_channels(member) == 1 else image[..., ::-1]  # Ultralytics feeds RGB
        out.append(np.ascontiguousarray(image.transpose(2, 0, 1))[None].astype(np.float32) / 255)
    return out


def read_image(path: Path, flags: int) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), flags)
    if image is None:
        raise SiimError(f"export int8: could not read the image {path}")
    return image


def quantize(onnx_path: Path, samples: list[np.ndarray], out: Path) -> None:
    """The ONNX model at onnx_path quantised to int8 (QDQ) into `out`, by ONNX Runtime's static quantiser: the
    convolutions' and matrix products' inputs, weights per output channel (signed), activations per tensor (unsigned,
    ranges the min and max over `samples`); every other operator (a detector's box decoding, softmax, sigmoid) stays
    fp32."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Samples(CalibrationDataReader):
        def __init__(self):
            self.left = iter(samples)

        def get_next(self):
            x = next(self.left, None)
            return None if x is None else {"images": x}

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its notes on biases built by Constant nodes (they stay fp32)
    try:
        quantize_static(str(onnx_path), str(out), Samples(), quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=kept_in_fp32(onnx_path))  # fmt: skip
    finally:
        root.level = level


def kept_in_fp32(onnx_path: Path) -> list[str]:
    """The convolutions quantize leaves in fp32: a YOLO head's DFL (its fixed weights 0..15 and the softmax it reads
    are the box distances: int8 would round them, as Ultralytics' own int8 export knows), and those whose input is a
    Concat's output (a C3 block's cv3, the neck's). OpenVINO 2026.4's CPU plugin computes a QDQ convolution there unlike
    ONNX Runtime: on the demo's trained yolov5n that one layer alone moved its top confidences by up to 0.5, where ONNX
    Runtime ran the same graph within 0.02. Measured, keeping them costs no speed (yolov5m at 512 px)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return [n.name for n in convs if "/dfl/" in n.name or made_by.get(n.input[0]) == "Concat"]


def export_engines(
    root: Path, members: list, formats: list[str], int8: list[str] = (), prepared: dict | None = None, calibration: int = 64
) -> None:
    """The engines of every built-in member's folds into the bundle folder `root` (beside the safetensors written
    there); a member of a family of its own, or with an end-to-end head, is left as PyTorch only, said. int8: the
    member kinds also quantised (fold<k>.int8.xml), on `calibration` images of prepared[(kind, name)], the prepared
    folder the member trained on."""
    from tqdm import tqdm

    if not formats and not int8:
        return
    jobs = []
    for m in [m for m in members if formats or m.kind in int8]:  # int8 alone: the kinds it names
        if m.family or end_to_end(m):  # an end-to-end head's top-k is traced with max_det fixed: not torch's predict
            why = f"family={m.family}" if m.family else "an end-to-end head"
            LOGGER.warning(f"export: {m.kind}/{m.name} ({why}) has no exported engine: it predicts with torch")
            continue
        jobs += [(m, k, root / f"{m.kind}/{m.name}/fold{k}{weights_of.SUFFIX}") for k in sorted(m.weights)]
    what = ",".join([*formats, *([f"int8 ({','.join(int8)})"] if int8 else [])])
    checked: dict[tuple[str, str], tuple] = {}  # {(kind, name): (member, {fold: its int8 deviation})}
    for m, k, path in tqdm(jobs, desc=f"export {what}", unit="fold"):
        onnx_path = engine_paths(path.parent, k, "onnx")[0]
        onnx_path.write_bytes(onnx_bytes(*member_graph(m, path)))
        if "openvino" in formats:
            save_ir(onnx_path, engine_paths(path.parent, k, "openvino")[0])
        if m.kind in int8:
            quantized = path.parent / f"fold{k}.int8.onnx"  # the bundle's work folder: removed once it is IR
            trained_on, xml = prepared[(m.kind, m.name)], engine_paths(path.parent, k, INT8)[0]
            quantize(onnx_path, network_inputs(m, k, trained_on, calibration), quantized)
            save_ir(quantized, xml)
            quantized.unlink()
            checked.setdefault((m.kind, m.name), (m, {}))[1][k] = check_int8_fold(m, k, onnx_path, xml, trained_on)
        if "onnx" not in formats:
            onnx_path.unlink()
    for m, found in checked.values():
        log_int8(m, found)


INT8_TOLERANCE = 1e-2  # the gates' int8 tolerance: probabilities and confidences (absolute), boxes (of the image side)
INT8_CHECK_IMAGES = 8  # held-out images each int8 fold is checked on at export
CONFIDENT = 0.1  # int8_deviation's boxes: the anchors of at least this score (a low one's box is noise, int8 or not)


def int8_rest() -> str:
    """What an int8 IR's operators that are not int8 (kept_in_fp32's convolutions, the rest) compute in: bf16 where
    this CPU computes it natively (measured: yolov5m at 512 px 15% faster than in f32), else f32."""
    from siimcovid.engine.devices import cpu_has_bf16

    return "bf16" if cpu_has_bf16() else "f32"


def int8_deviation(member, fp32: Path, int8: Path, inputs: list[np.ndarray]) -> dict[str, float]:
    """How far the int8 network (OpenVINO IR, as predict runs it: int8_rest) is from fp32 (the ONNX model, OpenVINO in
    f32) on `inputs`: for a classifier {"probability": the largest absolute difference of what predict writes (the
    softmax of study, the sigmoid of none; a task=none model's none only)}; for a detector {"confidence": the same
    over every anchor's class scores, "box": the largest corner difference of the confident anchors (fp32 score at
    least CONFIDENT and half the image's best), as a share of the image side; absent where no anchor is confident}."""
    import openvino as ov
    from scipy.special import expit, softmax

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads()}
    nets = [core.compile_model(core.read_model(str(p)), "CPU", {**config, "INFERENCE_PRECISION_HINT": hint})
            for p, hint in ((fp32, "f32"), (int8, int8_rest()))]  # fmt: skip (the int8 one as predict runs it)
    worst: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        worst[key] = max(worst.get(key, 0.0), float(value))

    def outputs(net, x) -> dict[str, np.ndarray]:
        result = net(x)
        return {o.get_any_name(): np.asarray(result[o], np.float64) for o in net.outputs}

    for x in inputs:
        a, b = (outputs(net, x) for net in nets)
        if member.kind == "classify":
            keys = ["none"] if member.settings.get("task") == "none" else [k for k in ("study", "none") if k in a]
            for key in keys:
                squash = expit if key == "none" else lambda t: softmax(t, axis=-1)
                note("probability", np.abs(squash(a[key]) - squash(b[key])).max())
            continue
        for key, value in detector_deviation(a["boxes"][0], b["boxes"][0], max(x.shape[2:])).items():
            note(key, value)
    return worst


def detector_deviation(u: np.ndarray, v: np.ndarray, side: int) -> dict[str, float]:
    """int8_deviation's terms for one image's detector outputs u (fp32) and v (int8), each (4 + classes, anchors):
    centre x, centre y, width, height (pixels), then the class scores."""
    out = {"confidence": float(np.abs(u[4:] - v[4:]).max())}
    score = u[4:].max(0)
    confident = score >= max(CONFIDENT, 0.5 * score.max())
    if confident.any():
        corners = [np.concatenate([t[:2] - t[2:4] / 2, t[:2] + t[2:4] / 2])[:, confident] for t in (u, v)]
        out["box"] = float(np.abs(corners[0] - corners[1]).max() / side)
    return out


def check_int8_fold(member, fold: int, fp32: Path, int8: Path, prepared: Path) -> dict[str, float]:
    """The int8 fold against fp32 on INT8_CHECK_IMAGES of its held-out images (int8_deviation)."""
    return int8_deviation(member, fp32, int8, network_inputs(member, fold, prepared, INT8_CHECK_IMAGES, part="val"))


def log_int8(member, found: dict[int, dict[str, float]]) -> None:
    """One line per member: the largest deviation of its int8 folds from fp32 (check_int8_fold), a warning where it is
    beyond INT8_TOLERANCE (predict precision=int8 would move this member's outputs more than the gates allow)."""
    keys = dict.fromkeys(key for f in found.values() for key in f)
    worst = {key: max((f[key], k) for k, f in found.items() if key in f) for key in keys}
    said = ", ".join(f"{key} {v:.2g}{' of the side' if key == 'box' else ''} (fold {k})" for key, (v, k) in worst.items())
    where = f"export int8: {member.kind}/{member.name} against fp32 on {INT8_CHECK_IMAGES} held-out images per fold: at most"
    if max(v for v, _ in worst.values()) > INT8_TOLERANCE:
        LOGGER.warning(
            f"{where} {said}, beyond the {INT8_TOLERANCE:g} int8 is held to: `predict precision=int8` moves its outputs "
            f"that much (export int8= without {member.kind} keeps it in fp32 or bf16)"
        )
    else:
        LOGGER.info(f"{where} {said} (within {INT8_TOLERANCE:g})")


# ----------------------------------------------------------------------------- a bundle's engine files
def found_engines(kind: str, name: str, listed: dict, root: Path, folds: set, where) -> dict[str, dict[int, Path]]:
    """{engine: {fold: its first file}} of a member, from the manifest's files; an engine is all of the member's folds
    or none of them, each fold with every file of its engine (an IR without its weights is refused)."""
    out = {}
    for engine, suffixes in SUFFIXES.items():
        files = {}
        for suffix in suffixes:
            pattern = re.compile(rf"{re.escape(kind)}/{re.escape(name)}/fold(\d{{1,4}}){re.escape(suffix)}")
            files[suffix] = {int(m[1]) for rel in listed if (m := pattern.fullmatch(rel))}
        every = set().union(*files.values())
        if not every:
            continue
        incomplete = sorted(set(folds) - every) or sorted(every - set(folds))
        for suffix, have in files.items():
            if have != every:
                fold = sorted(every - have)[0]
                raise SiimError(
                    f"bundle {where}: {kind}/{name}/fold{fold}{suffixes[0]} has no fold{fold}{suffix}: not as exported"
                )
        if incomplete:
            raise SiimError(
                f"bundle {where}: {kind}/{name}/ has {engine} files for folds {sorted(every)} but weights for folds "
                f"{sorted(folds)}: an engine is exported for every fold (not as exported)"
            )
        out[engine] = {k: root / f"{kind}/{name}/fold{k}{suffixes[0]}" for k in sorted(every)}
    return out


def engine_files(member, root: Path) -> set[str]:
    """The engine files of a member (relative paths), as export writes them."""
    return {
        p.relative_to(root).as_posix()
        for engine, folds in member.engines.items()
        for k, first in folds.items()
        for p in engine_paths(first.parent, k, engine)
    }


def checked_bytes(path: Path, listed: dict | None, where: str) -> bytes:
    """A file's bytes, checked against its manifest entry (listed: {sha256, bytes}): a regular file, not a link, of the
    listed size, read once (the bytes checked are the bytes used; a file swapped for a huge one or a FIFO is refused
    before it is read)."""
    import os
    import stat

    if not listed:
        raise SiimError(f"{where}: not in the bundle's manifest")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise SiimError(f"{where}: cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != int(listed["bytes"]):
            raise SiimError(f"{where}: not the file the manifest lists (a regular file of {listed['bytes']} bytes)")
        data = f.read(int(listed["bytes"]) + 1)
    if len(data) != int(listed["bytes"]) or hashlib.sha256(data).hexdigest() != listed["sha256"]:
        raise SiimError(f"{where}: its sha256 is not the manifest's (the file changed after the bundle was opened)")
    return data


def check_onnx(data: bytes, where: str) -> None:
    """An ONNX model that names no other file (external data) and only the standard operators (no custom domain).
    Every message of the model is walked (graphs, functions, attributes, sparse tensors): a tensor anywhere may name
    external data, and ONNX Runtime reads it relative to the working folder."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:
        raise SiimError(f"{where}: not an ONNX model ({type(e).__name__}: {e})") from None
    external, domains = [], {o.domain for o in model.opset_import}

    def walk(message) -> None:
        if isinstance(message, onnx.TensorProto) and message.data_location == onnx.TensorProto.EXTERNAL:
            external.append(message.name)
        if isinstance(message, (onnx.NodeProto, onnx.FunctionProto)):
            domains.add(message.domain)
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            for item in value if field.is_repeated else [value]:
                walk(item)

    walk(model)
    if external:
        raise SiimError(f"{where}: the ONNX model keeps weights in other files (external data): refused, it would read them")
    odd = sorted(domains - set(STANDARD_DOMAINS))
    if odd:
        raise SiimError(f"{where}: the ONNX model uses operators of domain {odd[0]!r}: only the standard operator set is run")


def check_ir(data: bytes, where: str) -> None:
    """OpenVINO IR: XML whose root is <net>, without a DOCTYPE (no entities to expand). OpenVINO's read_model guesses
    the format from the bytes, so an ONNX model (whose external data could name any file) in fold<k>.xml would
    otherwise be read as ONNX, unchecked."""
    import xml.etree.ElementTree as ElementTree

    head = data[:4096].lstrip()
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data or not head.startswith((b"<?xml", b"<net")):
        raise SiimError(f"{where}: not an OpenVINO IR (XML with a <net> root, no DOCTYPE)")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as e:
        raise SiimError(f"{where}: not an OpenVINO IR ({e})") from None
    if root.tag != "net":
        raise SiimError(f"{where}: not an OpenVINO IR (its root is <{root.tag}>, not <net>)")


# ----------------------------------------------------------------------------- running one
def threads() -> int:
    """The threads an engine computes with: torch's (torch.set_num_threads, OMP_NUM_THREADS), so that a backend is
    compared with torch, and shares a machine, on the same cores."""
    import torch

    return max(int(torch.get_num_threads()), 1)


class Net:
    """One fold's exported network: net(array) -> its outputs {name: array} (float32 in, float32 out)."""

    def __init__(self, engine: str, files: list[Path], digests: dict, precision: str, where: str):
        self.engine, self.precision = engine, precision
        data = [checked_bytes(p, digests.get(p.name), f"{where}/{p.name}") for p in files]  # digests: manifest entries
        if engine == "onnx":
            import onnxruntime as ort

            check_onnx(data[0], f"{where}/{files[0].name}")
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = threads()
            self.session = ort.InferenceSession(data[0], options, providers=["CPUExecutionProvider"])
            self.names = [o.name for o in self.session.get_outputs()]
        else:
            import openvino as ov

            check_ir(data[0], f"{where}/{files[0].name}")
            core = ov.Core()
            model = core.read_model(model=data[0], weights=ov.Tensor(np.frombuffer(data[1], dtype=np.uint8)))
            # OpenVINO picks bf16 by itself on such CPUs: say which; an int8 IR's other operators: int8_rest
            hint = {"fp32": "f32", "bf16": "bf16", "int8": int8_rest()}[precision]
            config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads()}
            self.compiled = core.compile_model(model, "CPU", config)
            ran = str(self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
            if ran != hint:  # OpenVINO falls back to f32 where the CPU lacks bf16, silently: say so, record nothing false
                raise SiimError(f"{where}: OpenVINO computes in {ran} on this CPU, not {precision}: precision=fp32 or auto")
            self.names = [o.get_any_name() for o in self.compiled.outputs]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.engine == "onnx":
            found = self.session.run(None, {"images": x})
        else:
            result = self.compiled(x)
            found = [result[o] for o in self.compiled.outputs]
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.names, found)}


def detector_on(yolo, net: Net):
    """An Ultralytics YOLO (weights.detector's) whose network's forward is the engine's: Ultralytics' own predict
    around it (letterbox, augment's scales and flips, NMS) is left as it is."""
    import torch

    def predict_once(x, *args, **kwargs):
        return torch.from_numpy(net(x.detach().float().cpu().numpy())["boxes"]).to(x.device), None

    yolo.model._predict_once = predict_once  # DetectionModel.predict and _predict_augment both call it
    return yolo


class ClassifierOn:
    """A StudyNet stand-in: model(x) -> {"study", "none", "mask": None} from the engine (classify's infer calls it)."""

    def __init__(self, net: Net):
        self.net = net

    def eval(self):
        return self

    def __call__(self, x):
        import torch

        out = {k: torch.from_numpy(v).to(x.device) for k, v in self.net(x.detach().float().cpu().numpy()).items()}
        return {"study": out["study"], "none": out.get("none"), "mask": None}
