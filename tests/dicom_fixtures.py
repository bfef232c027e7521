"""DICOM images as a PACS holds them: a real chest X-ray in a DX dataset with (made-up)
patient and study identifiers, for the structured report, FHIR and PACS tests."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
PATIENT_ID = "MEDLENS-TEST-0042"
PATIENT_NAME = "Testpatient^Alice"


def dicom_xray(
    pixels: np.ndarray, *, patient_id: str = PATIENT_ID, study_uid: str | None = None
) -> Dataset:
    """A frontal chest X-ray (8-bit grey ``pixels``) as a DX DICOM dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, patient_id
    ds.PatientBirthDate, ds.PatientSex = "20190101", "F"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.AccessionNumber = "ACC-0042"
    ds.StudyDate, ds.StudyTime = "20261201", "090000"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.Manufacturer = "Test"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
