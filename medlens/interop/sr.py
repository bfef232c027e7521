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

from typing import Any

from medlens.errors import UsageError
from medlens.interop.codes import LOCAL_DICOM, concept

__all__ = ["dicom_sr", "SERIES_DESCRIPTION"]

SERIES_DESCRIPTION = "MedLens AI result, not for diagnostic use"
_SERIES_NUMBER = 9701
DIAGNOSIS_CODE = (
    "439401001",
    "SCT",
    "Diagnosis",
)  # the evaluation's name: SNOMED CT "Diagnosis"  # a high number keeps the AI series after the acquired ones


def _code(value: str, scheme: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value[:16], scheme, meaning[:64])


def _diagnosis() -> Any:
    return _code(*DIAGNOSIS_CODE)


def _group(prediction: Any, card: dict, source: Any, algorithm: Any) -> Any:
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
            uid=hd.UID(), identifier="MedLens image classification"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=qualitative,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def dicom_sr(prediction: Any, model: dict, card: dict, source: Any) -> Any:
    """A DICOM SR (pydicom dataset) for one prediction about ``source``.

    Args:
        prediction: A :class:`medlens.inference.predictor.Prediction`.
        model: ``{"name", "version", "title"}`` of the model.
        card: The model card (its ``codes`` section, if any, codes the classes).
        source: The DICOM image's header (:attr:`medlens.data.imaging.DecodedImage.dicom`).

    Raises:
        UsageError: ``source`` is None (not a DICOM image) or lacks the UIDs a report must
            reference.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if source is None:
        raise UsageError(
            "a DICOM structured report needs a DICOM image (it references the image's study "
            "and SOP instance); this image is not DICOM: use the JSON or FHIR output for it"
        )
    missing = [
        k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID") if not source.get(k)
    ]
    if missing:
        raise UsageError(
            f"the DICOM image lacks {', '.join(missing)}: a structured report cannot reference "
            "it; export the image again from the PACS"
        )
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
        imaging_measurements=[_group(prediction, card, source, algorithm)],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
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
    )
    return sr
