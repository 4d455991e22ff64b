"""The DICOM results of `siimcovid predict ... dicom=sr,gsps,sc`: what a hospital's systems read (highdicom, on pydicom).

    write_dicom(prepared, studies, images, boxes, shown, out, record, kinds, algorithm) -> the rows of dicom.csv

For every study whose images are DICOM files, under <out>/dicom/<study_id>/:

    sr.dcm                 sr: a Comprehensive 3D SR, template TID 1500 (Measurement Report), as IHE AI Results
                           asks: the study's four class probabilities and its predicted class (a TID 1501 group
                           referencing every image), per image P(none) (a TID 1501 group referencing the image)
                           and every fused opacity box of at least dicom_min_conf (a TID 1410 planar ROI: a closed
                           polyline in the image's original pixels, referencing its SOP Instance UID, with the box's
                           confidence)
    gsps_<image_id>.dcm    gsps: per image a Grayscale Softcopy Presentation State: the image's confident boxes
                           (predict's pictures': conf >= min_conf, at most max_boxes) and their confidences as
                           graphic annotations over the untouched original, with its display window
    sc_<image_id>.dcm      sc: per image a Secondary Capture: the original (windowed to 8 bits) with the same
                           boxes burned in, in colour; marked DERIVED, burned-in annotation, not for diagnosis alone

<out>/dicom.csv (tables.DICOM_RESULTS) lists every object: its kind, file, SOP Instance UID and the image(s) it
references. Patient and study tags come from the source (the results join the source's study); every object is
in a series of its own kind, made by siimcovid (Manufacturer, Software Versions, and in the SR the algorithm's
name, version and the bundle's sha256). The source's pixel data is read, never modified, and never copied into an
SR or a presentation state.

Their UIDs are derived from what they say (pydicom's generate_uid of the bundle's sha256, the source UIDs and the
predictions): predicting the same images with the same bundle again gives the same UIDs, so a result sent twice
replaces itself in a PACS instead of appearing twice; another prediction gets new UIDs.

Real sources are not all conformant: the competition's UIDs are 12 hex digits, not DICOM UIDs. A result references
its source's UIDs exactly as they are (a reference that is not the source's would point at nothing); its own UIDs
are always valid. An image that is no DICOM (a PNG input), lacks a UID a reference needs, or whose header no longer
matches what was predicted is left out of the DICOM results with a warning naming its file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from siimcovid.data.dicom import output_range, read_dicom, read_stored, window_to_uint8
from siimcovid.outputs import Written
from siimcovid.tables import DICOM_RESULTS, PREDICTED_BOXES, PREDICTED_IMAGES, PREDICTED_STUDIES, STUDY_CLASSES, STUDY_COLUMNS
from siimcovid.utils import LOGGER, DataError, atomic_path

KINDS = ("sr", "gsps", "sc")
DICOM_DIR, DICOM_CSV = "dicom", "dicom.csv"
MANUFACTURER = "siimcovid"
SCHEME = "99SIIMCOVID"  # a private coding scheme (PS3.16 8.2: designators beginning "99") for the competition's terms
SERIES_NUMBER = {"sr": 9901, "gsps": 9902, "sc": 9903}  # high, so they sort after the source's series in a viewer
NOT_FOR_DIAGNOSIS = "AI result (siimcovid), not verified by a physician: not for diagnosis alone"
LABEL_BGR = (0, 0, 255)


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, meaning)


def vocabulary() -> dict:
    """The codes the SR speaks (built on first use: highdicom is imported only when DICOM results are asked for)."""
    from highdicom.sr import CodedConcept

    classes = {c: _code(c, STUDY_COLUMNS[c]) for c in STUDY_CLASSES}
    return {
        "procedure": CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        "class": classes,
        "probability": {c: _code(f"p-{c}", f"Probability of {STUDY_COLUMNS[c]}") for c in STUDY_CLASSES},
        "study_finding": _code("appearance", "COVID-19 pneumonia appearance"),
        "predicted": _code("predicted", "Predicted appearance"),  # (not DCM "Finding": that names the finding type)
        "opacity": _code("opacity", "Opacity"),
        "none": _code("p-none", "Probability of no opacity"),
        "confidence": _code("confidence", "Detection confidence"),
        "unit": CodedConcept("1", "UCUM", "no units"),
    }


def result_uid(*parts) -> str:
    """A valid DICOM UID determined by `parts` (module docstring: the same result, the same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


# Type 2 attributes (present, possibly empty) of the patient and study modules that the results copy from their
# source: a source without one is still referenced, the result says it is unknown.
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def header_of(ds, where="the source"):
    """The source's header as the results copy it: every element but the pixel data and overlays, plus the type 2
    patient and study attributes it lacks, empty."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for elem in ds:
        group = elem.tag.group
        if group == 0x7FE0 or (0x6000 <= group <= 0x601E and elem.tag.element >= 0x3000):
            continue
        header.add(elem)
    for key in PATIENT_STUDY:
        if key not in header:
            setattr(header, key, None)
        elif header[key].VR in ("DA", "TM") and header[key].value and not valid_time(header[key].VR, header[key].value):
            value, vr = header[key].value, header[key].VR
            LOGGER.warning(f"WARNING: predict dicom=: {where}: {key} {value!r} is no DICOM {vr}: the results say it is unknown")
            setattr(header, key, None)  # (real headers hold such values; a result must still be written)
    return header


def valid_time(vr: str, value) -> bool:
    """Whether a DA or TM value is one DICOM can read (pydicom parses it; real headers hold 'notadate')."""
    from pydicom.valuerep import DA, TM

    try:
        return (DA if vr == "DA" else TM)(str(value)) is not None
    except ValueError:
        return False


class Source:
    """One source image as the results reference it: its header (pixels deferred) and, read once, its display."""

    def __init__(self, row, max_pixels: int | None = None, pixels: bool = True):
        self.row, self.path = row, Path(row.file)
        if pixels:
            arr, ds, stored_range = read_stored(self.path, max_pixels)
        else:
            arr, ds, stored_range = None, read_dicom(self.path, header_only=True), None
        for key in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"):
            if not str(ds.get(key, "") or "").strip():
                raise DataError(f"its header has no {key}, which a DICOM result must reference", self.path)
        if (int(ds.Rows), int(ds.Columns)) != (int(row.rows), int(row.cols)):
            raise DataError(
                f"it is {ds.Rows} x {ds.Columns} pixels now, {row.rows} x {row.cols} when it was predicted: not the same image",
                self.path,
            )
        self.display = None if arr is None else window_to_uint8(arr, ds, output_range(stored_range, ds))  # as prepare shows it
        self.ds, self.stored_range = header_of(ds, self.path), stored_range  # (the decoded pixels are not kept)

    @property
    def sop_uid(self) -> str:
        return str(self.ds.SOPInstanceUID).strip()

    @property
    def study_uid(self) -> str:
        return str(self.ds.StudyInstanceUID).strip()

    @property
    def sop_class(self) -> str:
        return str(self.ds.SOPClassUID).strip()


def closed_rectangle(box, rows: int, cols: int) -> np.ndarray:
    """A box as DICOM draws it: (column, row) corners of a closed polyline in the image's pixel space (0\\0 the
    top-left corner of the top-left pixel: PS3.3 C.10.5.1.2, C.18.6.1.2), clipped to the image."""
    x1, x2 = np.clip([box.x_min, box.x_max], 0, cols)
    y1, y2 = np.clip([box.y_min, box.y_max], 0, rows)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


def algorithm_id(algorithm: dict):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(
        name=MANUFACTURER, version=algorithm["version"], parameters=[f"bundle sha256 {algorithm['bundle_sha256']}"]
    )


def make_sr(study, sources: list[Source], images: pd.DataFrame, boxes: pd.DataFrame, algorithm: dict, uids: dict):
    """The study's TID 1500 Measurement Report in a Comprehensive 3D SR (module docstring)."""
    import highdicom as hd
    from highdicom.sr import (
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        ImageRegion,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        SourceImageForRegion,
        TrackingIdentifier,
    )

    words, algo = vocabulary(), algorithm_id(algorithm)
    device = DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", algorithm["bundle_sha256"]),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=str(algorithm["bundle"])[:64],
    )
    context = ObservationContext(
        observer_device_context=ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )
    study_group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=result_uid(uids["sr"], "study"), identifier="study classes"),
        finding_type=words["study_finding"],
        algorithm_id=algo,
        measurements=[
            Measurement(name=words["probability"][c], value=float(getattr(study, c)), unit=words["unit"], algorithm_id=algo)
            for c in STUDY_CLASSES
        ],
        qualitative_evaluations=[QualitativeEvaluation(words["predicted"], words["class"][study.predicted])],
        source_images=[SourceImageForMeasurementGroup(s.sop_class, s.sop_uid) for s in sources],
    )
    groups = [study_group]
    by_image = dict(tuple(boxes.groupby("image_id", sort=False)))
    for source in sources:
        image = images.loc[source.row.image_id]
        groups.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=result_uid(uids["sr"], "image", source.sop_uid), identifier="image"),
                finding_type=words["opacity"],
                algorithm_id=algo,
                measurements=[Measurement(name=words["none"], value=float(image["none"]), unit=words["unit"], algorithm_id=algo)],
                source_images=[SourceImageForMeasurementGroup(source.sop_class, source.sop_uid)],
            )
        )
        for k, box in enumerate(by_image.get(source.row.image_id, boxes.iloc[:0]).itertuples(index=False), 1):
            region = ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=closed_rectangle(box, int(image.rows), int(image.cols)),
                source_image=SourceImageForRegion(source.sop_class, source.sop_uid),
            )
            groups.append(
                PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=TrackingIdentifier(
                        uid=result_uid(uids["sr"], "box", source.sop_uid, k), identifier=f"opacity {k}"
                    ),
                    referenced_region=region,
                    finding_type=words["opacity"],
                    algorithm_id=algo,
                    measurements=[
                        Measurement(name=words["confidence"], value=float(box.conf), unit=words["unit"], algorithm_id=algo)
                    ],
                )
            )
    report = MeasurementReport(observation_context=context, procedure_reported=words["procedure"], imaging_measurements=groups)
    sr = Comprehensive3DSR(
        evidence=[s.ds for s in sources],
        content=report,
        series_instance_uid=uids["sr_series"],
        series_number=SERIES_NUMBER["sr"],
        sop_instance_uid=uids["sr"],
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="siimcovid AI results (TID 1500)",
        software_versions=algorithm["version"],
    )
    sr.CodingSchemeIdentificationSequence = [coding_scheme()]  # how a private scheme is declared (SOP Common module)
    return sr


def coding_scheme():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "siimcovid: the SIIM-FISABIO-RSNA COVID-19 Detection classes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def lut_values(item) -> np.ndarray:
    """A VOI LUT item's table: LUTData as pydicom gives it (numbers, or the raw bytes of OW), LUTDescriptor's count."""
    count, bits = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[2])
    data = item.LUTData
    if isinstance(data, bytes):
        values = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
    else:
        values = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if len(values) < count:
        raise DataError(f"its VOI LUT lists {len(values)} values, its descriptor {count}")
    return values[:count].astype(np.uint8 if bits <= 8 else np.uint16)


def window_of(source: Source):
    """The display window a presentation state gives its image: the source's own VOI (a LUT or a window) when it has
    one, else its values' whole range (what prepare and the pictures stretch to)."""
    from highdicom import VOILUT
    from highdicom.pr import SoftcopyVOILUTTransformation

    ds = source.ds
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        return SoftcopyVOILUTTransformation(
            voi_luts=[VOILUT(int(item.LUTDescriptor[1]), lut_values(item), str(item.get("LUTExplanation", "")) or None)]
        )
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = (ds.WindowCenter, ds.WindowWidth)
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        return SoftcopyVOILUTTransformation(window_center=center, window_width=max(width, 1.0))
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = sorted(v * slope + intercept for v in source.stored_range)
    return SoftcopyVOILUTTransformation(window_center=(lo + hi + 1) / 2, window_width=max(hi - lo + 1, 2.0))


def summary(study, image) -> str:
    return f"siimcovid: {study.predicted} {getattr(study, study.predicted):.2f}, P(none) {float(image['none']):.2f}"


def make_gsps(study, source: Source, image, shown: pd.DataFrame, algorithm: dict, uids: dict, sop_uid: str, number: int):
    """The image's presentation state: its confident boxes and their confidences over the untouched original."""
    from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
    from highdicom.pr import (
        AnnotationUnitsValues,
        GraphicAnnotation,
        GraphicLayer,
        GraphicObject,
        GraphicTypeValues,
        GrayscaleSoftcopyPresentationState,
        TextObject,
    )

    rows, cols = int(image.rows), int(image.cols)
    layer = GraphicLayer(layer_name="SIIMCOVID", order=1, description="siimcovid: fused opacity boxes")
    graphics, texts = [], []
    line = max(8.0, rows / 40)  # the height of a label, in image pixels
    for box in shown.itertuples(index=False):
        corners = closed_rectangle(box, rows, cols)
        graphics.append(GraphicObject(GraphicTypeValues.POLYLINE, corners, AnnotationUnitsValues.PIXEL))
        x1, y1 = float(corners[0, 0]), float(corners[0, 1])
        top = y1 - line if y1 - line >= 0 else y1
        texts.append(
            TextObject(
                f"{box.conf:.2f}", AnnotationUnitsValues.PIXEL, bounding_box=(x1, top, min(x1 + 4 * line, cols), top + line)
            )
        )
    texts.append(
        TextObject(
            summary(study, image), AnnotationUnitsValues.PIXEL, bounding_box=(0.0, 0.0, min(24 * line, cols), min(line, rows))
        )
    )
    annotation = GraphicAnnotation(
        referenced_images=[source.ds], graphic_layer=layer, graphic_objects=graphics or None, text_objects=texts
    )
    inverse = str(source.ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"  # bone bright, as the image is read
    shape = PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[source.ds],
        series_instance_uid=uids["gsps_series"],
        series_number=SERIES_NUMBER["gsps"],
        sop_instance_uid=sop_uid,
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=algorithm["version"],
        device_serial_number=algorithm["bundle_sha256"][:16],
        content_label="SIIMCOVID",
        content_description="AI opacity boxes"[:64],
        graphic_layers=[layer],
        graphic_annotations=[annotation],
        voi_lut_transformations=[window_of(source)],
        presentation_lut_transformation=PresentationLUTTransformation(presentation_lut_shape=shape),
        series_description="siimcovid AI boxes (presentation state)",
    )
    copy_series_anatomy(source.ds, gsps)
    return gsps


def copy_series_anatomy(source, dataset) -> None:
    """The source's body part and laterality into a result's General Series (Laterality, type 2C, is needed for a
    paired part only: a validator can tell a chest is not one from BodyPartExamined)."""
    for key in ("BodyPartExamined", "Laterality"):
        if source.get(key):
            setattr(dataset, key, source.get(key))


def burned(source: Source, study, image, shown: pd.DataFrame) -> np.ndarray:
    """The source's display (8 bits, full size) in colour with the confident boxes and the summary burned in: RGB."""
    from siimcovid.predict.view import draw_boxes

    picture = draw_boxes(cv2.cvtColor(source.display, cv2.COLOR_GRAY2BGR), shown)
    h, w = picture.shape[:2]
    scale = max(0.45, max(h, w) / 1000)
    (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    for k, text in enumerate((summary(study, image), "not for diagnosis alone")):
        y = h - (1 - k) * (th + base + 4) - base - 2  # bottom left, away from the lungs' boxes
        cv2.putText(picture, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, scale, LABEL_BGR, max(1, round(scale * 2)), cv2.LINE_AA)
    return cv2.cvtColor(picture, cv2.COLOR_BGR2RGB)


def make_sc(study, source: Source, image, shown: pd.DataFrame, algorithm: dict, uids: dict, sop_uid: str, number: int):
    """The image's Secondary Capture with the boxes burned in (module docstring)."""
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset

    ds = source.ds
    sc = SCImage.from_ref_dataset(
        ref_dataset=ds,
        pixel_array=burned(source, study, image, shown),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids["sc_series"],
        series_number=SERIES_NUMBER["sc"],
        sop_instance_uid=sop_uid,
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # (highdicom asks for one: replaced by the source's below)
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="siimcovid AI boxes (burned in)",
        software_versions=algorithm["version"],
    )
    copy_series_anatomy(ds, sc)
    sc.PatientOrientation = ds.get("PatientOrientation") or None  # type 2C: the source's, empty when it gives none
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "boxes of siimcovid's predicted opacities drawn on the windowed original"[:1024]
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.sop_class, source.sop_uid
    sc.SourceImageSequence = [ref]
    return sc


def study_uids(
    study_uid: str, sources: list[Source], images: pd.DataFrame, boxes: pd.DataFrame, shown, study, algorithm: dict
) -> dict:
    """The series and SR UIDs of a study's results, determined by what they say (module docstring): the SR's boxes
    and the ones the presentation states and captures draw (dicom_min_conf above MIN_CONF leaves some out of the SR)."""
    said = [algorithm["bundle_sha256"], study_uid, *(round(float(getattr(study, c)), 6) for c in STUDY_CLASSES)]
    for s in sources:
        mine = [b[b.image_id == s.row.image_id].round(3).to_csv(index=False) for b in (boxes, shown)]
        said += [s.sop_uid, round(float(images.loc[s.row.image_id, "none"]), 6), *mine]
    uids = {"sr": result_uid("sr", *said)}
    uids |= {f"{k}_series": result_uid(k, "series", *said) for k in KINDS}
    return uids


def save(dataset, path: Path) -> None:
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():  # a source's non-conformant UIDs are referenced as they are (module docstring)
            warnings.simplefilter("ignore", UserWarning)
            dataset.save_as(tmp, enforce_file_format=True)


COLUMNS = [c.name for c in DICOM_RESULTS.columns]


def left_out(what, e: Exception) -> None:
    """A result that cannot be made is left out with a warning naming its file; the others are still written."""
    why = str(e) if isinstance(e, DataError) else f"{what}: {type(e).__name__}: {e}"
    LOGGER.warning(f"WARNING: predict dicom=: {why} (left out of the DICOM results)")


def study_sources(rows, max_pixels: int | None, pixels: bool) -> list[Source]:
    """The study's images that results can reference: DICOM files of one StudyInstanceUID (the first's)."""
    sources = []
    for row in rows.itertuples(index=False):
        try:
            sources.append(Source(row, max_pixels, pixels))
        except Exception as e:  # pydicom raises many types for a damaged file; a PNG input is no DICOM
            left_out(
                row.file, e if isinstance(e, DataError) else DataError(f"not a DICOM image ({type(e).__name__}: {e})", row.file)
            )
    for s in sources[1:]:
        if s.study_uid != sources[0].study_uid:
            left_out(s.path, DataError(f"StudyInstanceUID {s.study_uid}, not its study's {sources[0].study_uid}", s.path))
    return [s for s in sources if s.study_uid == sources[0].study_uid]


def write_dicom(
    studies: pd.DataFrame,
    images: pd.DataFrame,
    boxes: pd.DataFrame,
    shown: pd.DataFrame,
    out: Path,
    record: Written,
    kinds: tuple[str, ...],
    algorithm: dict,
    max_pixels: int | None = None,
) -> pd.DataFrame:
    """The DICOM results (module docstring) of predict's tables: studies.csv, images.csv, `boxes` (the SR's) and
    `shown` (the boxes the presentation states and secondary captures draw); `algorithm`: {"version", "bundle",
    "bundle_sha256"}. Returns the rows of dicom.csv. Files of an earlier run that this one does not write (other
    images, other kinds) are removed (the record's only)."""
    from tqdm import tqdm

    images = images.set_index("image_id", drop=False)
    by_study = dict(tuple(images.groupby("study_id", sort=False)))
    shown_by_image = dict(tuple(shown.groupby("image_id", sort=False)))
    pixels = bool({"gsps", "sc"} & set(kinds))  # an SR alone reads headers only
    rows, written = [], []
    for study in tqdm(list(studies.itertuples(index=False)), desc="dicom", unit="study"):
        sources = study_sources(by_study.get(study.study_id, images.iloc[:0]), max_pixels, pixels)
        if not sources:
            continue
        uids = study_uids(sources[0].study_uid, sources, images, boxes, shown, study, algorithm)
        folder, made = out / DICOM_DIR / study.study_id, []
        if "sr" in kinds:
            try:
                made.append(
                    ("sr", folder / "sr.dcm", make_sr(study, sources, images, boxes, algorithm, uids), uids["sr"], sources)
                )
            except Exception as e:
                left_out(f"the SR of study {study.study_id}", e)
        for number, s in enumerate(sources, 1):
            image, mine = images.loc[s.row.image_id], shown_by_image.get(s.row.image_id, shown.iloc[:0])
            for kind, make in (("gsps", make_gsps), ("sc", make_sc)):
                if kind not in kinds:
                    continue
                sop_uid = result_uid(kind, uids["sr"], s.sop_uid)
                try:
                    dataset = make(study, s, image, mine, algorithm, uids, sop_uid, number)
                except Exception as e:
                    left_out(f"the {kind} of {s.path}", e)
                    continue
                made.append((kind, folder / f"{kind}_{s.row.image_id}.dcm", dataset, sop_uid, [s]))
        record.claim(*(path for _, path, *_ in made))
        for kind, path, dataset, sop_uid, refs in made:
            save(dataset, path)
            written.append(path)
            rows.append(
                {
                    "study_id": study.study_id,
                    "kind": kind,
                    "file": record.relative(path),
                    "sop_instance_uid": sop_uid,
                    "series_instance_uid": uids[f"{kind}_series"],
                    "study_instance_uid": sources[0].study_uid,
                    "references": " ".join(r.sop_uid for r in refs),
                }
            )
    stale = set(record.files) - {record.relative(p) for p in written}
    record.remove(*(out / p for p in sorted(stale) if p.startswith(f"{DICOM_DIR}/")))
    return pd.DataFrame(rows, columns=COLUMNS)


def write_results(
    out: Path, record: Written, kinds: tuple[str, ...], algorithm: dict, min_conf: float = 0.0, max_pixels: int | None = None
) -> Path | None:
    """predict's step: the DICOM results of the tables in `out` (studies.csv, images.csv; the SR's boxes: those of
    boxes.csv of at least `min_conf`; the others': those the pictures draw) -> <out>/dicom/ and <out>/dicom.csv; with no
    kinds, an earlier run's are removed. Returns dicom.csv's path, or None."""
    from siimcovid.predict.view import MAX_BOXES, MIN_CONF, shown_boxes

    out = Path(out)
    table = out / DICOM_CSV
    if not kinds:
        record.remove(table)
        record.remove_all(DICOM_DIR)
        return None
    studies = PREDICTED_STUDIES.read(out / "studies.csv")
    images = PREDICTED_IMAGES.read(out / "images.csv")
    boxes = PREDICTED_BOXES.read(out / "boxes.csv")
    record.claim(table)
    shown = shown_boxes(boxes, MIN_CONF, MAX_BOXES)
    rows = write_dicom(studies, images, boxes[boxes.conf >= min_conf], shown, out, record, kinds, algorithm, max_pixels)
    DICOM_RESULTS.write(rows, table)
    LOGGER.info(
        f"predict: {len(rows)} DICOM object(s) of {rows.study_id.nunique()} studies under {out / DICOM_DIR}, listed in {table}"
    )
    return table
