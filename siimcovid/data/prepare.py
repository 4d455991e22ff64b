"""`siimcovid prepare`: a data root in a registered layout (SIIM, RSNA, a labelled CSV, a folder) -> images,
labels, masks, folds, data YAMLs, meta table (and labels.csv for external labelled sets).

Decoding runs in a pool of processes, one image at a time each (memory stays bounded by
the number of workers), with a progress bar. Every file is written under a temporary name
and renamed, so an interrupted run leaves no half-written image; re-running skips the
DICOMs whose images are all whole (convert.image_is_whole: the PNG/JPEG head and tail, not
just a file that exists; reading only the DICOM's header) and rewrites the cheap parts
(labels, masks, folds, lists, meta.csv, which is written last). The decode workers die with
the prepare process, even on kill -9.

out= follows the outputs rule (siimcovid.outputs): a new, empty or own folder (it holds prepare's record,
prepare_files.yaml, written first), else overwrite=true; never the root, the home folder or a folder holding the
data; with layout=folder never inside the data either (a re-run would read its own images). Every file prepare
may write there is listed in the record before any is written, so a user's file in the way stops it before any
work, and only listed files are replaced or removed. A folder an earlier siimcovid prepared (its prepare.yaml,
no record) is adopted as prepare's own. A data YAML is replaced only when it is one prepare wrote (its first line
says so): data_yaml_dir is shared by every dataset, a user's YAML of the same name stays.

lung_boxes=<folder> (siimcovid.data.lungs) also writes lungs.csv (tables.LUNG_BOXES) and, per size, the lung
detector's one-class YOLO dataset <size>/lung/ on the same folds, whose images are links to the prepared ones (a
symbolic link, else a hard link, else a copy), and data_yaml/<name>_lung_fold<k>.yaml (layout: siimcovid.data.prepared).
A train image whose lung box file is bad or missing stops prepare, or with on_error=skip is left out of the lung data
only (listed in skipped.csv). Without lung_boxes=, a re-run removes the lung files an earlier run wrote.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from siimcovid.config import Config, default_name, worker_processes
from siimcovid.data.boxes import as_array, boxes_to_json
from siimcovid.data.convert import convert_one, encode_params, init_worker, made_from
from siimcovid.data.folds import make_folds
from siimcovid.data.lungs import box_files, no_box_file, read_lung_boxes, yolo_line
from siimcovid.data.prepared import LUNG, LUNGS_CSV, RECORD, SKIPPED_CSV, data_yaml_name, folds_fingerprint
from siimcovid.data.prepared_paths import image_file, label_file, mask_file
from siimcovid.data.siim import IMAGE_CSV, Problems
from siimcovid.outputs import Earlier, Written, check_out, check_outside, open_out, read_mapping
from siimcovid.rundir import merge_run, write_run
from siimcovid.tables import BOX_COLUMNS, EXTERNAL_LABELS, LUNG_BOXES, META, SKIPPED, STUDY_CLASSES
from siimcovid.utils import LOGGER, SiimError, atomic_path, atomic_write_text, printable


def run_jobs(jobs: list[dict], workers: int, desc: str, convert=convert_one):
    """Yield convert(job) results (convert_one), in parallel when workers > 1 (0 or 1: here), with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", smoothing=0.05)
    try:
        if workers <= 1 or len(jobs) <= 1:
            init_worker()
            for job in jobs:
                yield convert(job)
                bar.update()
        else:
            # concurrent.futures, not mp.Pool: a worker killed outright (out of memory, a crash in a
            # decoder plugin) raises BrokenProcessPool here instead of hanging the run forever.
            # Workers get this pid to die with it: a kill -9 of prepare must not leave them decoding.
            context, parent = mp.get_context("spawn"), (os.getpid(),)
            with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=parent) as pool:
                pending = {pool.submit(convert, job): job for job in jobs}
                finished = set()
                try:
                    for future in as_completed(pending):
                        yield future.result()
                        finished.add(future)
                        bar.update()
                except BrokenProcessPool:
                    running = [j["path"] for f, j in pending.items() if f not in finished]
                    raise SiimError(
                        f"a prepare worker died (killed for memory, or crashed in a DICOM decoder) while converting one of "
                        f"{len(running)} images, e.g. {running[0] if running else '?'}: finished images are kept; re-run "
                        "(with workers=0 to name the file)"
                    ) from None
    finally:
        bar.close()


FOLDER_LAYOUTS = ("siim", "rsna", "csv")  # layouts whose root must be a folder (layout=folder also takes one file)


@dataclass(frozen=True)
class Target:
    """Where a prepare run reads and writes, from its settings."""

    root: Path  # the SIIM root
    name: str
    out: Path
    sizes: list[int]
    yolo_size: int


def check_settings(cfg: Config) -> Target:
    """The settings and the input folder, checked before anything is read or written."""
    root = Path(cfg.data)
    if not root.exists() or (not root.is_dir() and cfg.layout in FOLDER_LAYOUTS):  # layout=folder also reads one file
        raise SiimError(f"data folder not found: {root}")
    name = cfg.name or default_name("prepare", root.resolve().name, "the folder name of data")
    out = Path(cfg.out or Path("runs") / "prepare" / name)
    sizes = sorted(set(cfg.sizes))
    if not sizes:  # each size's type and range is checked with the settings (cfg/prepare.yaml)
        raise SiimError("sizes= is empty: give at least one image size")
    if cfg.get("resize_from") is not None and cfg.resize_from < sizes[-1]:
        raise SiimError(f"resize_from={cfg.resize_from} is smaller than the largest of sizes {sizes}: it makes them, give null")
    yolo_size = cfg.yolo_size or sizes[-1]
    if yolo_size not in sizes:
        raise SiimError(f"yolo_size {yolo_size} is not one of sizes {sizes}")
    if not cfg.splits:
        raise SiimError("splits= is empty: give train, test or both")
    check_out_folder(out, root, cfg)
    check_previous(out, root)
    check_made_from(out, sizes, cfg.get("resize_from"))
    target = Target(root, name, out, sizes, yolo_size)
    if "train" in cfg.splits:
        check_data_yamls(data_yaml_paths(name, cfg.n_folds, Path(cfg.data_yaml_dir)))
    if cfg.lung_boxes:
        check_lung_settings(cfg, name)
    return target


def check_lung_settings(cfg: Config, name: str) -> None:
    """lung_boxes=: a folder, boxes for the train split, data YAMLs that are prepare's to replace."""
    folder = Path(cfg.lung_boxes)
    if not folder.is_dir():
        raise SiimError(f"lung_boxes={folder}: no such folder (a folder of <image_id>.xml or .txt lung box files)")
    if "train" not in cfg.splits:
        raise SiimError(f"lung_boxes={folder} boxes the train images: give splits= with train")
    check_data_yamls(data_yaml_paths(name, cfg.n_folds, Path(cfg.data_yaml_dir), LUNG))


def earlier_settings(out: Path) -> dict | None:
    """The settings in <out>/prepare.yaml when a siimcovid prepare saved them there (a mapping naming its data), else
    None (no file, or a user's own file of that name)."""
    saved = merge_run(read_mapping(out / "prepare.yaml") or {})
    return saved if saved.get("data_resolved") else None


# What an earlier prepare wrote, by place (its tables also by their header: a user's skipped.csv is not taken for one)
EARLIER_TABLES = {"meta.csv": META, "meta.previous.csv": META, SKIPPED_CSV: SKIPPED, "labels.csv": EXTERNAL_LABELS}
EARLIER_FILES = re.compile(
    r"prepare\.yaml|\d+/(images/(train|test)/[^/]+\.(png|jpg)|labels/train/[^/]+\.txt|masks/train/[^/]+\.png"
    r"|fold\d+_(train|val)\.txt|test\.txt)"
)


def earlier_prepared(out: Path) -> Earlier | None:
    """A folder an earlier siimcovid prepared before prepare kept a record (outputs.Earlier): its prepare.yaml, no
    record. The files of the names and places prepare writes become prepare's (its tables only with their header);
    any other file stays the user's."""
    if os.path.lexists(out / RECORD) or earlier_settings(out) is None:
        return None
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.is_symlink()]
    return Earlier([f for f in files if EARLIER_FILES.fullmatch(f) or earlier_table(out / f, EARLIER_TABLES.get(f))])


def earlier_table(path: Path, table) -> bool:
    """Whether a top-level file is the table prepare writes under that name (its first line: the table's columns)."""
    if table is None:
        return False
    with open(path, "rb") as f:
        first = f.readline(4096).decode("utf-8", "replace").strip().split(",")
    return set(table.required) <= set(first)


def check_out_folder(out: Path, root: Path, cfg: Config) -> None:
    """The outputs rule for prepare's folder (module docstring), before anything is read or written."""
    check_out(out, RECORD, cfg.overwrite, sources=[root], earlier=earlier_prepared)
    if cfg.layout == "folder":
        check_outside(out, root, key="data")


def check_previous(out: Path, root: Path) -> None:
    """Refuse to mix two datasets in one output folder."""
    old = earlier_settings(out)
    if old is not None and old["data_resolved"] != str(root.resolve()):
        raise SiimError(
            f"{out} already holds data prepared from {old['data_resolved']}; choose another name= or out= for {root.resolve()}"
        )


def check_made_from(out: Path, sizes: list[int], resize_from: int | None) -> None:
    """Refuse a re-run whose images of a size both runs write would be made from another size: the earlier images are
    kept (prepare converts only what is missing), so the record would describe pixels they were not made from."""
    old = earlier_settings(out)
    if old is None or not old.get("sizes"):
        return
    before, now = made_from(old), made_from({"sizes": sizes, "resize_from": resize_from})
    shared = sorted(set(sizes) & {int(s) for s in old["sizes"]})
    if before != now and shared:
        hint = f"give resize_from={before}" if before >= max(sizes) else "prepare into another out= (or name=)"
        raise SiimError(
            f"{out}: its images at {shared} px were made from {before} px (sizes {sorted(old['sizes'])}); these "
            f"settings would make them from {now} px and keep the old ones: {hint}"
        )


def read_inputs(
    root: Path, splits: list[str], problems: Problems, layout: str = "siim", cfg: Config | None = None
) -> pd.DataFrame:
    """The inputs of the splits in the registered `layout` (siimcovid.data.layouts) -> one row per image
    to convert (boxes unclipped, as the input gives them). A layout function that takes `cfg` gets the
    settings (layout=csv reads its own); its rows may carry patient_id, file, stratum and labels (see
    siimcovid/data/external.py), and attrs["label_names"]."""
    from siimcovid import registry

    read = registry.get("layout", layout)
    takes_cfg = "cfg" in inspect.signature(read).parameters
    table = read(root, splits, problems, cfg=cfg) if takes_cfg else read(root, splits, problems)
    if table.empty and not problems.items:  # with problems: prepare lists them before it stops (nothing_readable)
        raise SiimError(f"no images found under {root} for splits {splits} (layout={layout})")
    return table


def check_folds_possible(table: pd.DataFrame, n_folds: int, seed: int) -> None:
    """Fail before the first decode when n_folds cannot split the train images (too few studies, or of
    every class|has-box stratum). Patient ids come from the DICOM headers, so here every study counts
    as its own patient; `build_meta` makes the real assignment, grouped by patient, after decoding."""
    train = table[table.split == "train"]
    if len(train):
        make_folds(train if "patient_id" in train else train.assign(patient_id=""), n_folds, seed)


def output_files(table: pd.DataFrame, cfg: Config, target: Target, label_names: list[str] | None) -> list[Path]:
    """Every file this run may write in its folder: the record lists them all before the first is written."""
    out, files = target.out, [target.out / n for n in ("prepare.yaml", "meta.csv", "meta.previous.csv", SKIPPED_CSV)]
    if label_names is not None:
        files.append(out / "labels.csv")
    for r in table.itertuples(index=False):
        files += [image_file(out, s, r.split, r.image_id, cfg.ext) for s in target.sizes]
        if r.split == "train":
            files += [f(out, s, r.image_id) for s in target.sizes for f in (label_file, mask_file)]
    if (table.split == "train").any():
        files += [out / str(target.yolo_size) / f"fold{k}_{part}.txt" for k in range(cfg.n_folds) for part in ("train", "val")]
        files += [out / str(target.yolo_size) / "test.txt"]
    if cfg.lung_boxes:
        files += lung_files(table, out, target.sizes, cfg.n_folds, cfg.ext)
    return files


def lung_folder(out: Path, size: int) -> Path:
    return out / str(size) / LUNG


def lung_image(out: Path, size: int, split: str, image_id: str, ext: str) -> Path:
    return lung_folder(out, size) / "images" / split / f"{image_id}.{ext}"


def lung_label(out: Path, size: int, image_id: str) -> Path:
    return lung_folder(out, size) / "labels" / "train" / f"{image_id}.txt"


def lung_files(table: pd.DataFrame, out: Path, sizes: list[int], n_folds: int, ext: str) -> list[Path]:
    """Every file of the lung data prepare may write (lung_boxes=): lungs.csv, and per size the links, labels, lists."""
    files = [out / LUNGS_CSV]
    for s in sizes:
        for r in table.itertuples(index=False):
            files.append(lung_image(out, s, r.split, r.image_id, ext))
            files += [lung_label(out, s, r.image_id)] if r.split == "train" else []
        lists = [f"fold{k}_{part}.txt" for k in range(n_folds) for part in ("train", "val")] + ["test.txt"]
        files += [lung_folder(out, s) / n for n in lists]
    return files


def remove_own(written: Written, path: Path) -> None:
    """Delete `path` when the record lists it, never another file. It stays listed: the record is every file this
    prepare may write, whatever it wrote so far, so that a killed run leaves the record an uninterrupted one does."""
    if written.owns(path):
        path.unlink(missing_ok=True)


def start_output(cfg: Config, target: Target, files: list[Path], label_names: list[str] | None = None) -> tuple[Path, Written]:
    """Open the output folder by the outputs rule, list every file the run may write (a user's file in the way stops
    it here), set the old meta table aside and save the settings; returns the set-aside path and the record.

    Until this run ends the folder is unfinished: a run failing half-way never leaves the old table
    beside the new settings, looking complete."""
    out = target.out
    # a user's file in the way is refused before anything is written; then the record first, whole in one write: the
    # same at every moment of a run (see remove_own)
    written = open_out(out, RECORD, "prepare", cfg.overwrite, [target.root], earlier=earlier_prepared, claim=files)
    previous_meta = out / "meta.previous.csv"
    if (out / "meta.csv").is_file():
        os.replace(out / "meta.csv", previous_meta)
    settings = Config(cfg, name=target.name, out=str(out), sizes=target.sizes, yolo_size=target.yolo_size)
    learned = {"data_resolved": str(target.root.resolve())}  # apart from the settings: the file stays a valid cfg=
    learned.update({"label_names": list(label_names)} if label_names is not None else {})
    write_run(out / "prepare.yaml", "prepare", settings, learned)
    for s in target.sizes:
        for sub in ("images/train", "images/test", "labels/train", "masks/train"):
            (out / str(s) / sub).mkdir(parents=True, exist_ok=True)
    return previous_meta, written


def decode_images(table: pd.DataFrame, cfg: Config, target: Target, problems: Problems) -> tuple[dict[str, dict], int]:
    """Convert every DICOM (skipping those whose images are whole) -> ({image_id: convert_one result}, number decoded)."""
    csv = str(target.root / IMAGE_CSV)  # the file a box's line refers to, unless the layout names it (column `file`)
    params = encode_params(cfg.ext, cfg.png_level)
    jobs = [
        {
            "out": str(target.out),
            "sizes": target.sizes,
            "resize_from": cfg.get("resize_from"),
            "ext": cfg.ext,
            "params": params,
            "image_id": r.image_id,
            "split": r.split,
            "path": r.path,
            "boxes": r.boxes,
            "line": r.line,
            "csv": getattr(r, "file", None) or csv,
            "max_pixels": cfg.max_pixels,
        }
        for r in table.itertuples(index=False)
    ]
    results, converted = {}, 0
    for res in run_jobs(jobs, worker_processes(cfg.workers), f"prepare {target.name} {target.sizes}"):
        if not res["ok"]:
            problems.add(res["error"])  # raises unless on_error=skip
            continue
        results[res["image_id"]] = res
        converted += res["converted"]
    problems.report("images")
    lost_test = int(((table.split == "test") & ~table.image_id.isin(results)).sum())
    if lost_test and cfg.layout == "siim":  # a submission lists SIIM's test images (a folder's are just unlabelled)
        LOGGER.warning(
            f"WARNING: {lost_test} TEST image(s) skipped: a submission must cover every test image, so `fuse split=test` "
            "will refuse until they are fixed (see skipped.csv)"
        )
    return results, converted


def build_meta(table: pd.DataFrame, results: dict[str, dict], root: Path, n_folds: int, seed: int) -> pd.DataFrame:
    """The converted images -> the META table: header facts, clipped boxes (JSON), folds grouped by patient."""
    table = table[table.image_id.isin(results)].reset_index(drop=True)
    info = pd.DataFrame([results[i] for i in table.image_id]).drop(columns=["ok", "converted", "image_id", "boxes"])
    if "patient_id" in table:  # the layout's patient (an external CSV's column) wins over the header's
        given = table.patient_id.fillna("").astype(str)
        table = table.assign(patient_id=given.where(given != "", info.patient_id))
        info = info.drop(columns=["patient_id"])
    meta = pd.concat([table.drop(columns=["boxes"]), info], axis=1)
    meta["boxes"] = [results[i]["boxes"] for i in table.image_id]
    meta["n_boxes"] = [len(b) for b in meta.boxes]
    meta["fold"] = -1
    is_train = (meta.split == "train").to_numpy()
    if is_train.any():
        meta.loc[is_train, "fold"] = make_folds(meta[is_train], n_folds, seed)
    meta["dicom"] = [printable(os.path.relpath(p, root)) for p in meta.path]  # a name not UTF-8: its bytes as \xNN
    meta["boxes"] = [boxes_to_json(as_array(b)) for b in meta.boxes]
    return meta[META.names]


def write_yolo_lists(meta: pd.DataFrame, out: Path, size: int, n_folds: int, exclude_none: bool, ext: str) -> list[Path]:
    """Per-fold image lists (paths relative to <out>/<size>, Ultralytics' './' form)."""
    lists = []
    train = meta[meta.split == "train"]
    rel = lambda df, split: "".join(f"./images/{split}/{i}.{ext}\n" for i in df.image_id)  # noqa: E731
    for k in range(n_folds):
        fit = train[train.fold != k]
        if exclude_none:
            fit = fit[fit.n_boxes > 0]
        for part, df in (("train", fit), ("val", train[train.fold == k])):
            path = out / str(size) / f"fold{k}_{part}.txt"
            atomic_write_text(path, rel(df, "train"))
            lists.append(path)
    test = meta[meta.split == "test"]
    if len(test):
        atomic_write_text(out / str(size) / "test.txt", rel(test, "test"))
    return lists


DATA_YAML_HEAD = "# Generated by `siimcovid prepare`"  # the first line of every data YAML prepare writes


def data_yaml_paths(name: str, n_folds: int, yaml_dir: Path, task: str = "opacity") -> list[Path]:
    return [yaml_dir / data_yaml_name(name, k, task) for k in range(n_folds)]


def check_data_yamls(paths: list[Path]) -> None:
    """Refuse to replace a YAML in data_yaml_dir that prepare did not write (its first line says who did)."""
    for path in paths:
        if path.is_symlink() or (path.exists() and not _starts_with(path, DATA_YAML_HEAD)):
            raise SiimError(
                f"{path} is not a data YAML siimcovid prepare wrote: move it away, or give another data_yaml_dir= or name="
            )


def _starts_with(path: Path, head: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(head)) == head.encode()
    except OSError:
        return False


def write_data_yamls(
    name: str, out: Path, size: int, n_folds: int, yaml_dir: Path, has_test: bool, task: str = "opacity"
) -> list[Path]:
    """data_yaml/<name>_fold<k>.yaml: plain Ultralytics data files, usable with `yolo detect train`; task=lung:
    <name>_lung_fold<k>.yaml, the lung detector's (its lists in <size>/lung/: `path` stays <prepared>/<size>, so
    every reader finds the prepared folder above it)."""
    paths = data_yaml_paths(name, n_folds, yaml_dir, task)
    check_data_yamls(paths)
    lists, names = (f"{LUNG}/", {0: LUNG}) if task == LUNG else ("", {0: "opacity"})
    for k, path in enumerate(paths):
        data = {
            "path": str((out / str(size)).resolve()),
            "train": f"{lists}fold{k}_train.txt",
            "val": f"{lists}fold{k}_val.txt",
            **({"test": f"{lists}test.txt"} if has_test else {}),
            **({"nc": 1} if task == LUNG else {}),
            "names": names,
        }
        what = f"{task} boxes, " if task == LUNG else ""
        text = f"{DATA_YAML_HEAD} from {out}: fold {k} of {n_folds}, {what}{size} px images.\n"
        text += yaml.safe_dump(data, sort_keys=False)
        atomic_write_text(path, text)
    return paths


def fold_summary(meta: pd.DataFrame) -> str:
    train = meta[meta.split == "train"]
    table = pd.crosstab(train.fold, train.study_label).reindex(columns=STUDY_CLASSES, fill_value=0)
    if not (train.study_label != "").any():  # an external set: no study classes
        table = table.drop(columns=STUDY_CLASSES)
    table["with_boxes"] = train.groupby("fold").n_boxes.apply(lambda s: int((s > 0).sum()))
    table["patients"] = train.groupby("fold").patient_id.nunique()
    table["images"] = train.groupby("fold").size()
    return table.to_string()


def warn_if_folds_changed(meta_path: Path, meta: pd.DataFrame) -> None:
    """Warn when the new fold assignment differs from the one of the previous meta table (set aside at `meta_path`)."""
    if not meta_path.is_file():
        return
    try:
        old = META.read(meta_path)
    except SiimError as e:  # the set-aside table only feeds this warning: an unreadable one must not undo the run
        LOGGER.warning(f"WARNING: cannot compare the folds with the previous meta table: {e}")
        return
    if folds_fingerprint(old) != folds_fingerprint(meta):
        LOGGER.warning(
            f"WARNING: the fold assignment of {meta_path.parent} changed (other images or seed): detectors and "
            "classifiers trained on the previous folds will refuse to resume or predict; train them under a new name="
        )


def write_labels(table: pd.DataFrame, meta: pd.DataFrame, label_names: list[str] | None, written: Written) -> None:
    """labels.csv (tables.EXTERNAL_LABELS) of an external labelled set: one row per prepared image."""
    path = written.folder / "labels.csv"
    if label_names is None:
        remove_own(written, path)  # an earlier run's
        return
    kept = table[table.image_id.isin(set(meta.image_id))]
    values = pd.DataFrame(kept["labels"].tolist(), columns=label_names, index=kept.index, dtype=float)
    EXTERNAL_LABELS.write(pd.concat([kept[["image_id"]], values], axis=1), path)


def check_lung_files(cfg: Config, table: pd.DataFrame) -> None:
    """on_error=raise: a train image without a lung box file stops prepare before the first decode (a wrong folder
    is told at once, not after hours of DICOMs); its contents are read once the image sizes are known (read_lungs)."""
    if not cfg.lung_boxes or cfg.on_error != "raise":
        return
    folder = Path(cfg.lung_boxes)
    names = {p.name for p in folder.iterdir()}
    for image_id in table.image_id[table.split == "train"]:
        if not box_files(folder, str(image_id), names):
            raise no_box_file(folder, str(image_id))


def read_lungs(cfg: Config, meta: pd.DataFrame, problems: Problems) -> pd.DataFrame | None:
    """The lung box of every prepared train image (lung_boxes=; None without it): bad or missing files go to
    `problems` (on_error=skip: those images are left out of the lung data); none read at all is an error."""
    if not cfg.lung_boxes:
        return None
    train = meta[meta.split == "train"]
    lungs = read_lung_boxes(cfg.lung_boxes, train, problems)
    if len(train) and lungs.empty:
        first = printable(str(problems.items[-1])) if problems.items else "?"
        raise SiimError(f"lung_boxes={cfg.lung_boxes}: no lung box read for any of the {len(train)} train images (last: {first})")
    return lungs


def link_image(target: Path, link: Path) -> None:
    """`link` shows the prepared image `target` without a copy: a relative symbolic link (the prepared folder may
    move), else a hard link, else a copy (a filesystem without links). A symbolic link already right is kept; the
    others are made again (a re-decoded image is a new file)."""
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    with atomic_path(link) as tmp:
        os.unlink(tmp)
        try:
            os.symlink(relative, tmp)
        except OSError:
            try:
                os.link(target, tmp)
            except OSError:
                shutil.copyfile(target, tmp)


def write_lung_data(meta: pd.DataFrame, lungs: pd.DataFrame | None, cfg: Config, target: Target, written: Written) -> list[Path]:
    """lungs.csv and, per size, the lung detector's YOLO dataset <size>/lung/ (module docstring); its data YAMLs
    (returned). lungs None (no lung_boxes=): the lung files an earlier run wrote are removed."""
    out = target.out
    if lungs is None:
        for rel in sorted(written.files):
            if rel == LUNGS_CSV or re.fullmatch(rf"\d+/{LUNG}/.+", rel):
                remove_own(written, out / rel)
        return []
    LUNG_BOXES.write(lungs, out / LUNGS_CSV)
    boxes = lungs.set_index("image_id")
    train, test = meta[meta.split == "train"], meta[meta.split == "test"]
    boxed = train[train.image_id.isin(boxes.index)]
    for s in target.sizes:
        for r in boxed.itertuples(index=False):
            link_image(image_file(out, s, "train", r.image_id, cfg.ext), lung_image(out, s, "train", r.image_id, cfg.ext))
            atomic_write_text(lung_label(out, s, r.image_id), yolo_line(list(boxes.loc[r.image_id, BOX_COLUMNS]), r.rows, r.cols))
        for r in train[~train.image_id.isin(boxes.index)].itertuples(index=False):  # skipped now: an earlier run's go
            remove_own(written, lung_image(out, s, "train", r.image_id, cfg.ext))
            remove_own(written, lung_label(out, s, r.image_id))
        for r in test.itertuples(index=False):
            link_image(image_file(out, s, "test", r.image_id, cfg.ext), lung_image(out, s, "test", r.image_id, cfg.ext))
        rel = lambda df, split: "".join(f"./images/{split}/{i}.{cfg.ext}\n" for i in df.image_id)  # noqa: E731
        for k in range(cfg.n_folds):
            atomic_write_text(lung_folder(out, s) / f"fold{k}_train.txt", rel(boxed[boxed.fold != k], "train"))
            atomic_write_text(lung_folder(out, s) / f"fold{k}_val.txt", rel(boxed[boxed.fold == k], "train"))
        atomic_write_text(lung_folder(out, s) / "test.txt", rel(test, "test"))
    yaml_dir, has_test = Path(cfg.data_yaml_dir), bool(len(test))
    return write_data_yamls(target.name, out, target.yolo_size, cfg.n_folds, yaml_dir, has_test, LUNG)


def write_outputs(
    meta: pd.DataFrame,
    cfg: Config,
    target: Target,
    problems: Problems,
    previous_meta: Path,
    written: Written,
    lungs: pd.DataFrame | None = None,
) -> list[Path]:
    """Image lists, data YAMLs, the lung data, skipped.csv, then meta.csv (last: its presence marks a finished
    prepare). Returns the data YAMLs written. Every file in the folder was claimed by start_output."""
    out, yamls = target.out, []
    if (meta.split == "train").any():
        write_yolo_lists(meta, out, target.yolo_size, cfg.n_folds, cfg.yolo_exclude_none, cfg.ext)
        has_test = (meta.split == "test").any()
        yamls = write_data_yamls(target.name, out, target.yolo_size, cfg.n_folds, Path(cfg.data_yaml_dir), has_test)
    yamls += write_lung_data(meta, lungs, cfg, target, written)
    if problems.items:
        SKIPPED.write(problems.table(), out / SKIPPED_CSV)
    else:
        remove_own(written, out / SKIPPED_CSV)
    warn_if_folds_changed(previous_meta, meta)
    META.write(meta, out / "meta.csv")
    remove_own(written, previous_meta)
    return yamls


class NothingReadable(SiimError):
    """Every input of a prepare was skipped: the message names skipped.csv; `root` and `count` let predict, which
    removes the folder that holds it, say it its own way."""

    def __init__(self, root, skipped: Path, count: int, first: str):
        super().__init__(f"no readable image in {root}: all {count} files skipped, see {skipped} (first: {first})")
        self.root, self.count = root, count


def nothing_readable(target: Target, problems: Problems) -> NothingReadable:
    """Every input was skipped: skipped.csv says why, and the one line to stop with names it (prepare.yaml and the
    empty folders of a folder this run created are gone by then: see prepare)."""
    path = SKIPPED.write(problems.table(), target.out / SKIPPED_CSV)
    first = printable(str(problems.items[0]))
    return NothingReadable(printable(target.root), Path(printable(path)), len(problems.items), first)


def abandon_output(written: Written) -> None:
    """Undo start_output in a folder this run created, when it wrote no image there: its prepare.yaml and empty
    folders go, so that nothing looks like a prepared folder (skipped.csv stays: the error names it; the record
    stays: the re-run knows the folder). A folder holding images keeps its prepare.yaml: the re-run resumes."""
    out = written.folder
    kept = {out / "prepare.yaml", out / SKIPPED_CSV, written.path}
    if any(p not in kept and not p.is_dir() for p in out.rglob("*")):
        return
    remove_own(written, out / "prepare.yaml")
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def prepare(cfg: Config) -> Path:
    target = check_settings(cfg)
    problems = Problems(cfg.on_error)
    table = read_inputs(target.root, cfg.splits, problems, cfg.layout, cfg)
    label_names = table.attrs.get("label_names")
    check_folds_possible(table, cfg.n_folds, cfg.seed)
    check_lung_files(cfg, table)
    created = not target.out.exists()
    previous_meta, written = start_output(cfg, target, output_files(table, cfg, target, label_names), label_names)
    try:
        results, converted = decode_images(table, cfg, target, problems)
        if not results:
            raise nothing_readable(target, problems)
    except BaseException:
        if created:
            abandon_output(written)
        raise
    meta = build_meta(table, results, target.root, cfg.n_folds, cfg.seed)
    lungs = read_lungs(cfg, meta, problems)
    write_labels(table, meta, label_names, written)
    yamls = write_outputs(meta, cfg, target, problems, previous_meta, written, lungs)

    n_train = int((meta.split == "train").sum())
    LOGGER.info(
        f"prepare: {n_train} train + {len(meta) - n_train} test images -> {target.out} "
        f"({converted} decoded, {len(results) - converted} already done, {len(problems.items)} skipped)"
    )
    if lungs is not None:
        LOGGER.info(f"prepare: {len(lungs)} lung boxes of {n_train} train images -> {target.out / LUNGS_CSV}")
    if n_train:
        LOGGER.info("folds (grouped by patient):\n" + fold_summary(meta))
        LOGGER.info(f"data YAMLs: {yamls[0]} ... {yamls[-1].name}")
    return target.out


def main(cfg: Config) -> Path:
    return prepare(cfg)
