"""Results in the hospital's formats: HL7 FHIR R4 and DICOM Structured Reports, and a round
trip through a DICOMweb server (a PACS).

* :mod:`medlens.interop.codes` - the coded concept of each class (SNOMED CT where known);
* :mod:`medlens.interop.fhir` - a FHIR R4 DiagnosticReport with contained Observations;
* :mod:`medlens.interop.sr` - a DICOM SR (TID 1500 measurement report) built with highdicom;
* :mod:`medlens.interop.pacs` - QIDO-RS search, WADO-RS retrieve, predict, STOW-RS the SR back.
"""
