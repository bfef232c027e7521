"""A prediction about a DICOM image as a DICOM Structured Report, built with highdicom.

The document is a Comprehensive SR holding a TID 1500 measurement report: the observer is a
device (the MedLens model, with its name and version as the algorithm identification), one
measurement group references the source image (its SOP Class and Instance UIDs) and holds the
finding as a qualitative evaluation (the predicted class, coded by
:mod:`medlens.interop.codes`) and each class's calibrated probability as a measurement (UCUM
unit ``1``). highdicom copies the patient and study modules of the source image, so a PACS
files the report with its study. The report is marked preliminary and unverified, and its
series description says that it is AI-generated and not for diagnostic use.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from medlens.errors import UsageError
from medlens.interop.codes import LOCAL_DICOM, concept

__all__ = ["dicom_sr", "SERIES_DESCRIPTION", "UIDS", "TYPE2"]

SERIES_DESCRIPTION = "MedLens AI result, not for diagnostic use"
_SERIES_NUMBER = 9701  # a high number keeps the AI series after the acquired ones
DIAGNOSIS_CODE = ("439401001", "SCT", "Diagnosis")  # the evaluation's name: SNOMED CT
UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
"""Type-1 UIDs of the image: the report references it, and is filed with its study, by them."""
TYPE2 = {
    "PatientName": "PN",
    "PatientID": "LO",
    "PatientBirthDate": "DA",
    "PatientSex": "CS",
    "StudyDate": "DA",
    "StudyTime": "TM",
    "StudyID": "SH",
    "AccessionNumber": "SH",
    "ReferringPhysicianName": "PN",
}
"""The patient and study attributes (type 2: required, may be empty) the report copies, by VR."""
_UID = re.compile(r"[0-9][0-9.]{0,63}")
_TIME = re.compile(r"([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9]|60)?(\.[0-9]{1,6})?)?")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value[:16], scheme, meaning[:64])


def _diagnosis() -> Any:
    return _code(*DIAGNOSIS_CODE)


def _group(
    prediction: Any, card: dict, source: Any, algorithm: Any, prediction_id: str | None = None
) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    finding = concept(prediction.label, card)
    flagged = (prediction.ood or {}).get("flag") is True
    qualitative = [
        hd.sr.QualitativeEvaluation(
            name=_diagnosis(), value=_code(finding.code, finding.scheme, finding.display)
        )
    ]
    if flagged:  # the finding stands, but the image did not look like the training images
        qualitative.append(
            hd.sr.QualitativeEvaluation(
                name=_code("OOD", LOCAL_DICOM, "Image unlike the model's training images"),
                value=codes.SCT.Yes,
            )
        )
    unit = _code("1", "UCUM", "no units")
    measurements = [
        hd.sr.Measurement(
            name=_code(f"P-{label}", LOCAL_DICOM, f"Calibrated probability of {label}"),
            value=float(p),
            unit=unit,
            algorithm_id=algorithm,
        )
        for label, p in prediction.probabilities.items()
    ]
    if prediction.threshold is not None:
        measurements.append(
            hd.sr.Measurement(
                name=_code("THRESHOLD", LOCAL_DICOM, "Operating threshold"),
                value=float(prediction.threshold),
                unit=unit,
            )
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(),
            # the prediction record's id, so feedback can name this report's prediction
            identifier=f"MedLens prediction {prediction_id}"
            if prediction_id
            else "MedLens image classification",
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=qualitative,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _comprehensive_sr(**kwargs: Any) -> Any:
    """highdicom's Comprehensive SR, copying the patient and study modules of any image.

    highdicom looks those modules up by the image's SOP class and knows only current classes:
    a retired one (Ultrasound Image Storage (Retired), ...) or a private one raised KeyError.
    Every composite image IOD has the same patient and study modules, so such an image's are
    copied as a Secondary Capture image's.
    """
    import highdicom as hd

    class Report(hd.sr.ComprehensiveSR):
        def copy_patient_and_study_information(self, dataset: Any) -> None:
            try:
                super().copy_patient_and_study_information(dataset)
            except KeyError:  # a SOP class highdicom does not know
                proxy = copy.copy(dataset)
                proxy.SOPClassUID = _SECONDARY_CAPTURE
                super().copy_patient_and_study_information(proxy)

    return Report(**kwargs)


def dicom_sr(prediction: Any, model: dict, card: dict, source: Any) -> Any:
    """A DICOM SR (pydicom dataset) for one prediction about ``source``.

    The report's ``notes`` attribute (a list, not a DICOM element) says which of the image's
    patient and study attributes were left empty because they were absent or malformed.

    Args:
        prediction: A :class:`medlens.inference.predictor.Prediction`.
        model: ``{"name", "version", "title"[, "prediction_id"]}`` of the model (and the
            prediction record's id of this prediction, when it is recorded).
        card: The model card (its ``codes`` section, if any, codes the classes).
        source: The DICOM image's header (:attr:`medlens.data.imaging.DecodedImage.dicom`).

    Raises:
        UsageError: ``source`` is None (not a DICOM image), lacks or has malformed UIDs a
            report must reference (:data:`UIDS`), or has non-ASCII text in an unknown
            character set.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if source is None:
        raise UsageError(
            "a DICOM structured report needs a DICOM image (it references the image's study "
            "and SOP instance); this image is not DICOM: use the JSON or FHIR output for it"
        )
    evidence, notes, charset = _evidence(source)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"MedLens {model['name']}"[:64], version=str(model["version"])[:16]
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"MedLens {model['name']}"[:64], model_name=str(model["version"])
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("363679005", "SCT", "Imaging"),
        imaging_measurements=[
            _group(prediction, card, evidence, algorithm, model.get("prediction_id"))
        ],
    )
    sr = _comprehensive_sr(
        evidence=[evidence],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="MedLens",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        specific_character_set=charset,
    )
    sr.notes = notes
    return sr


def _evidence(source: Any) -> tuple[Any, list[str], str | None]:
    """A copy of ``source`` that a structured report can be built on, what was left out of
    it, and the character set the report needs (None: the default repertoire).

    The SOP Class, SOP Instance, Study and Series Instance UIDs are type 1 (the report is filed
    and found by them): a missing or malformed one is a :class:`UsageError`. The patient and
    study attributes the report copies (:data:`TYPE2`) are type 2, which the standard lets be
    empty: one that is absent, has several values or a value its VR does not allow is left
    empty and named in the returned notes, so an anonymised or slightly malformed image still
    gets a valid report.

    Raises:
        UsageError: a missing or malformed UID; an unknown Specific Character Set over text
            that is not plain ASCII (its characters cannot be known).
    """
    from pydicom.multival import MultiValue

    missing, malformed = [], []
    for key in UIDS:
        value = source.get(key)
        if value is None or str(value).strip() == "":
            missing.append(key)
        elif isinstance(value, MultiValue) or not _UID.fullmatch(str(value).strip()):
            malformed.append(key)
    if missing or malformed:
        what = [f"lacks {', '.join(missing)}"] if missing else []
        if malformed:
            what.append(
                f"has a {', '.join(malformed)} that is not a DICOM UID (digits and dots, at "
                "most 64 characters)"
            )
        raise UsageError(
            f"the DICOM image {' and '.join(what)}: a structured report cannot reference it; "
            "export the image again from the PACS, or ask for format=json or fhir"
        )
    evidence = copy.deepcopy(source)
    emptied = []
    for key, vr in TYPE2.items():
        reason = _type2_problem(evidence.get(key), vr)
        if reason is not None:
            setattr(evidence, key, None if vr in ("DA", "TM") else "")
            emptied.append(f"{key} ({reason})")
    if "Modality" not in evidence:  # highdicom reads it (the report's own is SR)
        evidence.Modality = ""
    notes = [f"left empty in the report: {', '.join(emptied)}"] if emptied else []
    return evidence, notes, _charset(evidence)


def _type2_problem(value: Any, vr: str) -> str | None:
    """Why a type-2 value cannot be copied into the report as it is (None: it can)."""
    from pydicom.multival import MultiValue

    if value is None:
        return "absent"
    if isinstance(value, MultiValue):
        return f"{len(value)} values, where one is allowed" if len(value) > 1 else None
    text = str(value).strip()
    if not text:
        return None
    if vr == "DA" and not _valid_date(text):
        return "not a DICOM date, YYYYMMDD"
    if vr == "TM" and not _TIME.fullmatch(text):
        return "not a DICOM time, HHMMSS"
    if vr == "CS" and text not in ("M", "F", "O"):
        return "not M, F or O"
    return None


def _valid_date(text: str) -> bool:
    from datetime import datetime

    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return len(text) == 8


def _charset(evidence: Any) -> str | None:
    """The report's Specific Character Set: UTF-8 when the image's text is not plain ASCII.

    pydicom has already decoded the image's text by its declared character set (ISO 2022
    code extensions for Japanese included); the report writes the same characters in UTF-8.

    Raises:
        UsageError: the image declares a character set pydicom does not know and holds text
            that is not ASCII: that text was read with a guessed encoding.
    """
    from pydicom.charset import python_encoding

    declared = evidence.get("SpecificCharacterSet") or []
    declared = [declared] if isinstance(declared, str) else list(declared)
    known = {_charset_key(k) for k in python_encoding}
    unknown = [str(v) for v in declared if str(v).strip() and _charset_key(v) not in known]
    ascii_only = all(_is_ascii(elem.value) for elem in evidence if elem.VR != "SQ")
    if ascii_only:
        return None
    if unknown:
        raise UsageError(
            f"the DICOM image declares the character set {', '.join(unknown)}, which is not "
            "a DICOM character set, and holds text that is not plain ASCII, so its names "
            "cannot be copied into a report faithfully; correct (0008,0005) Specific Character "
            "Set (e.g. ISO_IR 100 for Latin-1, ISO_IR 192 for UTF-8) and send it again, or ask "
            "for format=json or fhir"
        )
    return "ISO_IR 192"


def _charset_key(name: Any) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(name).upper())


def _is_ascii(value: Any) -> bool:
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return all(_is_ascii(v) for v in value)
    if isinstance(value, (bytes, bytearray)):
        return True  # binary VRs (OB, UN, ...) are not text
    return str(value).isascii() if value is not None else True
