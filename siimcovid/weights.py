"""Model weights that travel (a bundle's members): tensors only, beside a data-only description of the model.

A pickle (`torch.load(weights_only=False)`, Ultralytics' `torch_load`) rebuilds whatever objects it names, so
loading one from a stranger runs the stranger's code. What travels instead:

    fold<k>.safetensors   the state dict, in safetensors (a JSON header and raw tensors: nothing to execute)
    model.yaml            how to rebuild the model before loading that state dict, one per member (its folds share it):

        detector     family: ultralytics, task: detect, names: [class names], single_cls: bool,
                     yaml: the Ultralytics model YAML the model was built from (a dict: nc, scales, scale,
                     backbone, head, ...) -> ultralytics.nn.tasks.DetectionModel(yaml), as training built it
        classifier   family: timm, model: a timm name, in_chans, drop_rate, drop_path_rate, mask_stride, none_head
                     -> siimcovid.classify.model.build_model (timm.create_model(name, pretrained=False, ...))

A description is checked before anything is built (check_description), because an Ultralytics YAML is not
plain data to Ultralytics: parse_model looks each layer's module name up among its own globals and calls it,
and `eval`s `activation`. So a layer must name a torch.nn or ultralytics.nn.modules Module class (not
TorchVision, which loads torchvision weights), its arguments must be literals, and an activation must read
nn.<Module>(literals). A timm name must be one timm registers locally (no `hf-hub:` names, which fetch code
and configs). The state dict must then fit the rebuilt model exactly (strict load).
"""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

from siimcovid.utils import SiimError, atomic_path

SUFFIX = ".safetensors"
DESCRIPTION = "model.yaml"
ULTRALYTICS_KEYS = {  # the keys of an Ultralytics model YAML that a detection model reads (all data)
    "nc", "scales", "scale", "backbone", "head", "yaml_file", "channels", "activation", "depth_multiple",
    "width_multiple", "end2end", "reg_max", "inplace",
}  # fmt: skip
NOT_LAYERS = {"TorchVision"}  # Ultralytics layers that load weights of their own (torchvision's, from the network)
# torch.nn layers a model YAML may name: those YOLO architectures use (a layer without weights could otherwise grow
# the images a forward pass holds, e.g. Upsample(scale_factor=1000), past any memory: no weights file would tell)
TORCH_LAYERS = {"Upsample", "Identity", "BatchNorm2d", "ConvTranspose2d", "MaxPool2d", "Dropout"}
# the layers that enlarge their input, and the positions of their YAML arguments that say by how much
UPSAMPLING = {"nn.Upsample": (1,), "nn.ConvTranspose2d": (1, 2), "ConvTranspose": (1, 2), "DWConvTranspose2d": (1, 2)}
MAX_UPSAMPLING = 8  # YOLO upsamples by 2 at a time
ACTIVATIONS = {"SiLU", "ReLU", "ReLU6", "LeakyReLU", "Hardswish", "Hardsigmoid", "GELU", "Mish", "Sigmoid", "Tanh",
               "Identity", "ELU", "SELU"}  # element-wise: an activation of another kind changes every Conv's output  # fmt: skip
# Bounds far above any real YOLO (a yolov5x has 25 layers of at most 1,280 channels; scales multiply by at most
# 1.33 and cap channels at 1,024 or 2,048): a description past them would only allocate memory until killed.
MAX_LAYERS, MAX_REPEATS, MAX_ARG, MAX_MULTIPLE = 1000, 100, 100_000, 16
CLASSIFIER_KEYS = {  # siimcovid.classify.model.MODEL_KEYS with their types: the only arguments build_model takes
    "model": str, "in_chans": int, "drop_rate": float, "drop_path_rate": float, "mask_stride": int, "none_head": bool,
}  # fmt: skip


# ----------------------------------------------------------------------------- tensors
def save_state(state: dict, path: Path, half: bool = False) -> str:
    """A state dict -> safetensors at path (atomic); half: floating tensors in fp16. Returns the floating dtype."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        tensors[key] = (value.half() if half and value.is_floating_point() else value).contiguous().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
    return str(floats[0] if floats else torch.float32).replace("torch.", "")


def load_state(path: Path, where: str, sha256: str | None = None) -> dict:
    """A safetensors file -> its state dict (on the CPU); anything else is a one-line error naming `where`.

    sha256: what the file must hash to. The bytes hashed are the bytes deserialized (read once): a file swapped
    after open_bundle checked it is refused, not loaded."""
    import hashlib

    from siimcovid.utils import safetensors_state

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SiimError(f"{where}: cannot be read ({e.strerror})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SiimError(f"{where} changed after the bundle was checked: its checksum no longer matches the manifest")
    return safetensors_state(data, where)


def header_shapes(path: Path, where: str) -> dict[str, tuple]:
    """{tensor name: shape} from a safetensors file's header (no tensor is read); anything else is an error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SiimError(f"{where}: not a readable safetensors file ({e})") from None
    if not shapes:
        raise SiimError(f"{where}: a safetensors file with no tensor")
    return shapes


def meta_model(desc: dict, kind: str):
    """The described model with every tensor on the meta device (shapes, no memory): a description that asks for
    a billion parameters costs nothing here. A detector is its layers only (parse_model, keys under `model.`)."""
    import torch

    with torch.device("meta"):
        if kind == "detect":
            from ultralytics.nn.tasks import parse_model

            arch = copy.deepcopy(desc["yaml"])
            layers, _ = parse_model(arch, ch=int(arch.get("channels") or 3), verbose=False)
            return torch.nn.ModuleDict({"model": layers})
        from siimcovid.classify.model import build_model

        return build_model({k: desc[k] for k in CLASSIFIER_KEYS}, pretrained=False)


def check_fits(desc: dict, kind: str, shapes: dict[str, tuple], where: str, imgsz: int | None = None) -> None:
    """Before any memory is spent: the model the description builds has exactly the tensors of the weights file
    (names and shapes), and a classifier runs at its image size (a timm model of a fixed input size would not)."""
    import torch

    try:
        model = meta_model(desc, kind)
    except SiimError:
        raise
    except Exception as e:  # a description that passed the checks but that the library cannot build
        raise SiimError(f"{where}: its model does not build ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if own != shapes:
        differ = sorted(set(own) ^ set(shapes)) or [k for k in own if own[k] != shapes[k]]
        raise SiimError(
            f"{where}: the weights do not fit the model its {DESCRIPTION} describes ({len(own)} tensors of the model, "
            f"{len(shapes)} in the file; e.g. {differ[0]!r})"
        )
    if kind == "classify" and imgsz:
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, 1, imgsz, imgsz, device="meta"))
        except Exception as e:
            raise SiimError(f"{where}: its model does not run on {imgsz} px images ({str(e).splitlines()[0][:160]})") from None


def load_into(model, state: dict, where: str) -> None:
    """The state dict into the model, every tensor of it and no other (floating tensors cast to the model's dtype)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise SiimError(
            f"{where}: the weights do not fit the model its {DESCRIPTION} describes ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape, e.g. {first!r})"
        )
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- checks
def literal(value, where: str, what: str):
    """A YAML value made of str, int, float, bool, None, lists and string-keyed dicts only (finite numbers)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SiimError(f"{where}: {what} is {value} (a number must be finite)")
        return value
    if isinstance(value, list):
        if len(value) > 100_000:
            raise SiimError(f"{where}: {what} is a list of {len(value)} items")
        return [literal(v, where, what) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: literal(v, where, f"{what}.{k}") for k, v in value.items()}
    raise SiimError(f"{where}: {what} holds a {type(value).__name__}, not plain data")


def torch_module(name: str):
    """torch.nn.<name> if it is a Module class, else None."""
    import torch

    cls = getattr(torch.nn, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.nn.Module) else None


def ultralytics_layer(name: str):
    """The class an Ultralytics model YAML may name as a layer (what parse_model will look up), else None."""
    import torch
    import ultralytics.nn.modules as modules
    import ultralytics.nn.tasks as tasks

    if name.startswith("nn."):
        return torch_module(name[3:]) if name[3:] in TORCH_LAYERS else None
    if name in NOT_LAYERS or name not in getattr(modules, "__all__", ()):
        return None
    cls = getattr(modules, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)) or getattr(tasks, name, None) is not cls:
        return None
    return cls


def check_activation(text, where: str) -> None:
    """`activation` is eval'ed by Ultralytics: only `nn.<Module>(literal, ...)` (or torch.nn.<Module>) is accepted."""
    try:
        call = ast.parse(str(text).strip(), mode="eval").body
        func, parts = call.func, []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        parts.append(func.id)
        dotted = ".".join(reversed(parts))
        args = [*call.args, *(k.value for k in call.keywords)]
        ok = dotted.rsplit(".", 1)[0] in ("nn", "torch.nn") and parts[0] in ACTIVATIONS and torch_module(parts[0]) is not None
        ok = ok and all(isinstance(a, ast.Constant) for a in args) and all(k.arg for k in call.keywords)
    except (SyntaxError, AttributeError, ValueError):
        ok = False
    if not ok:
        raise SiimError(f"{where}: activation {text!r} is not of the form nn.<Activation>(literal arguments), e.g. nn.SiLU()")


def check_ultralytics_yaml(arch, where: str) -> dict:
    """An Ultralytics model YAML that builds a detection model and can run nothing else (the module docstring)."""
    if not isinstance(arch, dict):
        raise SiimError(f"{where}: `yaml` is not a mapping (an Ultralytics model YAML)")
    arch = literal(arch, where, "yaml")
    unknown = sorted(set(arch) - ULTRALYTICS_KEYS)
    if unknown:
        raise SiimError(f"{where}: unknown key(s) {unknown} in the Ultralytics model YAML (known: {sorted(ULTRALYTICS_KEYS)})")
    if not isinstance(arch.get("nc"), int) or isinstance(arch["nc"], bool) or not 1 <= arch["nc"] <= 10_000:
        raise SiimError(f"{where}: yaml.nc must be a number of classes, got {arch.get('nc')!r}")
    if "activation" in arch and arch["activation"] is not None:
        check_activation(arch["activation"], where)
    layers = (arch.get("backbone") or []) + (arch.get("head") or [])
    if not isinstance(arch.get("backbone"), list) or not layers:
        raise SiimError(f"{where}: the Ultralytics model YAML has no layers (backbone, head)")
    if len(layers) > MAX_LAYERS:
        raise SiimError(f"{where}: {len(layers)} layers (at most {MAX_LAYERS})")
    for i, layer in enumerate(layers):
        if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str) and isinstance(layer[3], list)):
            raise SiimError(f"{where}: layer {i} is not [from, number, module, args]")
        source, number, module, args = layer
        sources = source if isinstance(source, list) else [source]
        if not sources or not all(is_int(s) and abs(s) <= MAX_LAYERS for s in sources):
            raise SiimError(f"{where}: layer {i}: `from` {source!r} is not a layer index or a list of them")
        if not is_int(number) or not 1 <= number <= MAX_REPEATS:
            raise SiimError(f"{where}: layer {i}: `number` {number!r} is not a count of 1 to {MAX_REPEATS}")
        if ultralytics_layer(module) is None:
            raise SiimError(f"{where}: layer {i} names {module!r}, not a model layer of torch.nn or Ultralytics")
        values = [literal_number(a) for a in args]  # Ultralytics reads a string argument as the literal it spells
        if any(abs(v) > MAX_ARG for v in numbers(values)):
            raise SiimError(f"{where}: layer {i}: an argument above {MAX_ARG} (channels, kernel sizes): not a real model")
        for at in UPSAMPLING.get(module, ()):
            factor = values[at] if at < len(values) else None
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= MAX_UPSAMPLING:
                raise SiimError(f"{where}: layer {i}: {module} enlarges by {factor!r}: at most {MAX_UPSAMPLING}, a number")
        if module == "nn.Upsample" and values and values[0] is not None:
            raise SiimError(f"{where}: layer {i}: nn.Upsample to a fixed size {values[0]!r}: give a scale factor only")
    if not (arch.get("channels") is None or (is_int(arch["channels"]) and 1 <= arch["channels"] <= 4)):
        raise SiimError(f"{where}: yaml.channels={arch['channels']!r} (image channels: 1 to 4)")
    scales = arch.get("scales") or {}
    if scales and arch.get("scale") and arch["scale"] not in scales:
        raise SiimError(f"{where}: yaml.scale={arch['scale']!r} is not one of its scales {sorted(scales)}")
    multiples = [[arch.get("depth_multiple", 1.0), arch.get("width_multiple", 1.0), 1]]
    multiples += list(scales.values()) if isinstance(scales, dict) else [None]
    for m in multiples:
        if not (isinstance(m, list) and len(m) == 3 and len(numbers(m)) == 3):
            raise SiimError(f"{where}: scales / depth_multiple / width_multiple are not numbers [depth, width, max channels]")
        if not (0 < m[0] <= MAX_MULTIPLE and 0 < m[1] <= MAX_MULTIPLE and 1 <= m[2] <= MAX_ARG):
            raise SiimError(f"{where}: a scale {m} out of range (depth and width multiples up to {MAX_MULTIPLE})")
    return arch


def literal_number(value):
    """A YAML layer argument as Ultralytics will read it: a string that spells a Python literal becomes it."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    return value


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def numbers(value) -> list:
    """Every int and float inside a literal value (what could size a layer)."""
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_description(desc, kind: str, where: str) -> dict:
    """A member's model.yaml, checked: the description of `kind` ("detect" | "classify") that builds it."""
    if not isinstance(desc, dict):
        raise SiimError(f"{where}: not a model description (a mapping)")
    family = {"detect": "ultralytics", "classify": "timm"}[kind]
    if desc.get("family") != family:
        raise SiimError(f"{where}: family {desc.get('family')!r}; this siimcovid builds {kind} members of family {family}")
    if kind == "detect":
        names = desc.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or desc.get("task") != "detect":
            raise SiimError(f"{where}: a detector needs task: detect and names: [class names]")
        arch = check_ultralytics_yaml(desc.get("yaml"), where)
        if len(names) != arch["nc"]:
            raise SiimError(f"{where}: {len(names)} names for yaml.nc={arch['nc']} classes")
        return {"family": family, "task": "detect", "names": names, "single_cls": bool(desc.get("single_cls")), "yaml": arch}
    out = {"family": family}
    for key, typ in CLASSIFIER_KEYS.items():
        value = desc.get(key)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise SiimError(f"{where}: {key}={value!r} is not a {typ.__name__}")
        out[key] = value
    unknown = sorted(set(desc) - set(CLASSIFIER_KEYS) - {"family"})
    if unknown:
        raise SiimError(f"{where}: unknown key(s) {unknown} (a classifier is described by {sorted(CLASSIFIER_KEYS)})")
    if not (0.0 <= out["drop_rate"] <= 1.0 and 0.0 <= out["drop_path_rate"] <= 1.0 and 1 <= out["in_chans"] <= 4):
        raise SiimError(f"{where}: in_chans, drop_rate or drop_path_rate out of range")
    check_timm_name(out["model"], where)
    return out


def check_timm_name(name: str, where: str) -> None:
    import timm

    if ":" in name or "/" in name or not timm.is_model(name):
        raise SiimError(f"{where}: model {name!r} is not a timm model of this timm (hub names are not accepted)")


# ----------------------------------------------------------------------------- descriptions (export) and models (predict)
def detector_description(model, single_cls: bool = False) -> dict:
    """The description of an Ultralytics DetectionModel (export): its model YAML, class names and single_cls."""
    arch = copy.deepcopy(dict(model.yaml))
    if arch.get("yaml_file"):
        arch["yaml_file"] = Path(str(arch["yaml_file"])).name  # the file it came from, without the folders of this machine
    names = model.names
    names = [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
    return {"family": "ultralytics", "task": "detect", "names": names, "single_cls": bool(single_cls), "yaml": arch}


def classifier_description(model_cfg: dict) -> dict:
    """The description of a siimcovid classifier (export): timm's name and the arguments of build_model."""
    if model_cfg.get("labels"):
        raise SiimError("a multi-label pretraining model predicts no study classes: it does not travel in a bundle")
    return {"family": "timm", **{k: model_cfg[k] for k in CLASSIFIER_KEYS}}


SHELL = Path(__file__).parent / "cfg" / "models" / "shell.yaml"


def detector(desc: dict, path: Path, where: str, sha256: str | None = None):
    """An Ultralytics YOLO predicting with the weights at `path`, built from the checked description `desc`.

    The model is built as training built it (DetectionModel from the YAML dict, so no file name is guessed at)
    and set up as Ultralytics' own checkpoint loader sets one up (fp32, eval, inplace layers). YOLO() itself
    builds from a file only: it starts from a one-layer shell (siimcovid/cfg/models/shell.yaml) and is handed
    the model, as Ultralytics' trainer hands its model back (Model.train: self.model = trainer.model)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    arch = copy.deepcopy(desc["yaml"])
    model = DetectionModel(arch, ch=int(arch.get("channels") or 3), nc=arch["nc"], verbose=False)
    load_into(model, load_state(path, where, sha256), where)
    model = model.float().eval()
    model.names = dict(enumerate(desc["names"]))
    model.task = "detect"
    model.args = {"task": "detect", "single_cls": desc["single_cls"]}  # what YOLO keeps of a checkpoint's args
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = True
    yolo = YOLO(str(SHELL), task="detect")
    yolo.model, yolo.overrides = model, {**model.args, "model": str(path)}
    return yolo


def classifier(desc: dict, path: Path, where: str, device, channels_last: bool = False, sha256: str | None = None):
    """A siimcovid StudyNet in eval mode on `device`, built from the checked description with the weights at `path`."""
    import torch

    from siimcovid.classify.model import build_model

    model = build_model({k: desc[k] for k in CLASSIFIER_KEYS}, pretrained=False, channels_last=channels_last)
    load_into(model, load_state(path, where, sha256), where)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()
