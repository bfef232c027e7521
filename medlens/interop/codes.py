"""Coded concepts for the classes of a model.

A class is coded with SNOMED CT where MedLens knows a code for its label, or where the model
card's ``codes`` section gives one (``codes: {LABEL: {code, display, system}}``), and with the
label's own text otherwise. The codes below were chosen for the bundled models; a site must
check them against its own terminology service before relying on them.
"""

from __future__ import annotations

from dataclasses import dataclass

SNOMED = "http://snomed.info/sct"
SNOMED_DICOM = "SCT"  # the coding scheme designator DICOM uses for SNOMED CT
LOCAL = "urn:medlens:label"  # the label text, when no standard code is known
LOCAL_DICOM = "99MEDLENS"  # a private coding scheme designator for the same

#: label (lower case) -> (SNOMED CT concept id, preferred term)
KNOWN = {
    "pneumonia": ("233604007", "Pneumonia"),
    "covid19": ("840539006", "Disease caused by severe acute respiratory syndrome coronavirus 2"),
    "covid-19": ("840539006", "Disease caused by severe acute respiratory syndrome coronavirus 2"),
    "covid": ("840539006", "Disease caused by severe acute respiratory syndrome coronavirus 2"),
    "tuberculosis": ("56717001", "Tuberculosis"),
    "yes_pharyngitis": ("405737000", "Pharyngitis"),
    "pharyngitis": ("405737000", "Pharyngitis"),
    "normal": ("17621005", "Normal"),
    "no_finding": ("17621005", "Normal"),
}


@dataclass(frozen=True)
class Concept:
    """One coded concept: ``system`` is a FHIR system URI, ``scheme`` its DICOM designator."""

    code: str
    display: str
    system: str
    scheme: str

    @property
    def standard(self) -> bool:
        return self.system != LOCAL


def concept(label: str, card: dict | None = None) -> Concept:
    """The coded concept of a class label: the card's ``codes`` entry, a known SNOMED CT
    code, or the label itself under MedLens' local code system."""
    given = ((card or {}).get("codes") or {}).get(label)
    if given:
        system = given.get("system", SNOMED)
        scheme = SNOMED_DICOM if system == SNOMED else given.get("scheme", LOCAL_DICOM)
        return Concept(str(given["code"]), given.get("display", label), system, scheme)
    known = KNOWN.get(label.lower())
    if known:
        return Concept(known[0], known[1], SNOMED, SNOMED_DICOM)
    return Concept(label[:16], label, LOCAL, LOCAL_DICOM)
