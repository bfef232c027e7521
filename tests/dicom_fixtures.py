"""DICOM images as a PACS holds them: a real chest X-ray in a DX dataset with (made-up)
patient and study identifiers, for the structured report, FHIR and PACS tests. Built on
:func:`test_imaging.make_dicom` (the pixel module and file meta)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_imaging import dicom_bytes, make_dicom

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
PATIENT_ID = "MEDLENS-TEST-0042"
PATIENT_NAME = "Testpatient^Alice"


def dicom_xray(
    pixels: np.ndarray, *, patient_id: str = PATIENT_ID, study_uid: str | None = None
) -> Dataset:
    """A frontal chest X-ray (8-bit grey ``pixels``) as a DX DICOM dataset."""
    ds = make_dicom(
        np.ascontiguousarray(pixels, dtype=np.uint8),
        PatientName=PATIENT_NAME,
        PatientID=patient_id,
        PatientBirthDate="20190101",
        PatientSex="F",
        StudyInstanceUID=study_uid or generate_uid(),
        SeriesInstanceUID=generate_uid(),
        StudyID="1",
        SeriesNumber=1,
        InstanceNumber=1,
        AccessionNumber="ACC-0042",
        StudyDate="20261201",
        StudyTime="090000",
        ReferringPhysicianName="",
        Modality="DX",
        ViewPosition="PA",
        BodyPartExamined="CHEST",
        Manufacturer="Test",
        PresentationIntentType="FOR PRESENTATION",
        ImageType=["ORIGINAL", "PRIMARY"],
    )
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_STORAGE
    return ds


to_bytes = dicom_bytes
