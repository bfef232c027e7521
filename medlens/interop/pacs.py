"""A round trip through a PACS that speaks DICOMweb: find a study's images (QIDO-RS), fetch
them (WADO-RS), predict, and store a DICOM Structured Report about each back (STOW-RS).

Nothing touches the disk: instances are fetched into memory, decoded with the same checks as
any upload (:func:`medlens.data.imaging.read_image`), and the reports are sent from memory.
The summary names instances by series and instance number, never by patient or UID, and the
DICOMweb client's own logging is kept below the level that would print its URLs (they hold
study UIDs).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

from medlens.errors import MedLensError

__all__ = ["PacsError", "PacsResult", "round_trip"]

log = logging.getLogger(__name__)

# Objects that are no images to classify: structured reports, presentation states, key
# object selections, encapsulated documents, raw data.
NOT_IMAGES = {"SR", "PR", "KO", "DOC", "RAW", "SEG", "REG", "RWV", "PLAN"}


class PacsError(MedLensError):
    """The DICOMweb server cannot be reached, refuses a request, or has no such study."""


@dataclass
class PacsResult:
    """What a round trip did: one line per instance, stored report UIDs, and failures."""

    lines: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs of the stored SRs
    failed: int = 0
    skipped: int = 0  # instances that already had a report from this model version


@dataclass
class _Server:
    """A DICOMweb server: its URL, a client, and the deadline of each request in seconds."""

    url: str
    client: Any
    timeout: float

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        return _call(what, self.url, getattr(self.client, method), *args,
                     deadline=self.timeout, **kwargs)  # fmt: skip


def _client(url: str, timeout: float) -> _Server:
    from dicomweb_client.api import DICOMwebClient

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its URLs carry UIDs
    client = DICOMwebClient(url=url.rstrip("/"), timeout=timeout)
    # One retry after a quarter second (the client's default, 5 attempts with exponential
    # back-off, makes "server down" take half a minute to say).
    client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)
    return _Server(url, client, timeout)


def _value(attrs: dict, tag: str) -> Any:
    values = (attrs.get(tag) or {}).get("Value") or [None]
    return values[0]


def _call(what: str, url: str, fn: Any, *args: Any, deadline: float = 30, **kwargs: Any) -> Any:
    """A DICOMweb request whose failures become one clear :class:`PacsError`: a server that
    cannot be reached, refuses, loops on redirects, answers something that is not DICOMweb
    (HTML, garbage), or does not finish within ``deadline`` seconds in all (a server that
    drips a byte at a time would otherwise reset the per-read timeout for ever)."""
    import threading

    import requests

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)  # left behind if the server hangs
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        raise PacsError(
            f"the DICOMweb server at {url} did not finish {what} within {deadline:g} s "
            "(--timeout); it is too slow or stalled"
        )
    e = box.get("error")
    if e is None:
        return box.get("value")
    if isinstance(e, requests.exceptions.ConnectionError):
        raise PacsError(
            f"cannot reach the DICOMweb server at {url} ({what}); is it running, and is the "
            "URL its DICOMweb root (for Orthanc: http://HOST:8042/dicom-web)?"
        ) from None
    if isinstance(e, requests.exceptions.Timeout):
        raise PacsError(f"the DICOMweb server at {url} did not answer in time ({what})") from None
    if isinstance(e, requests.exceptions.HTTPError):
        code = e.response.status_code if e.response is not None else "?"
        raise PacsError(f"the DICOMweb server at {url} refused {what} (HTTP {code})") from None
    if isinstance(e, requests.exceptions.TooManyRedirects):
        raise PacsError(
            f"the server at {url} redirects in a loop ({what}); check the URL"
        ) from None
    if not isinstance(e, MedLensError) and isinstance(e, Exception):
        raise PacsError(
            f"the server at {url} did not answer {what} as a DICOMweb server would "
            f"({type(e).__name__}); is the URL its DICOMweb root (for Orthanc: "
            "http://HOST:8042/dicom-web)?"
        ) from None
    raise e


def _instances(server: _Server, study: str) -> list[dict]:
    found = server.call("the QIDO-RS search", "search_for_instances", study_instance_uid=study,
                        fields=["Modality", "SeriesNumber", "InstanceNumber", "Rows"])  # fmt: skip
    if not isinstance(found, list) or not all(isinstance(a, dict) for a in found):
        raise PacsError(
            f"the server at {server.url} answered the QIDO-RS search with something that is not "
            "a list of DICOM JSON objects; is the URL its DICOMweb root?"
        )
    if not found:
        raise PacsError(
            f"the DICOMweb server at {server.url} has no instances of the requested study; check the "
            "Study Instance UID (a QIDO-RS search found nothing)"
        )
    images = [a for a in found if _value(a, "00080060") not in NOT_IMAGES]
    return images


def _name(attrs: dict) -> str:
    return f"series {_value(attrs, '00200011')}, instance {_value(attrs, '00200013')}"


def _one(server: _Server, attrs: dict, predictor: Any, about: dict, card: dict,
         force: bool) -> tuple:  # fmt: skip
    """Fetch, decode and predict one instance; returns ``(name, prediction, report dataset)``.
    The report's UID is derived from the image's and the model version's (unless ``force``),
    so a second run finds the first one's report."""
    from medlens.data.imaging import read_image
    from medlens.errors import ImageReadError
    from medlens.interop.sr import dicom_sr

    uids = [_value(attrs, t) for t in ("0020000D", "0020000E", "00080018")]
    name = _name(attrs)
    if not all(isinstance(u, str) and u for u in uids):
        raise ImageReadError(f"{name}: the server listed it without its UIDs; skipped")
    ds = server.call(f"the WADO-RS retrieval of {name}", "retrieve_instance", *uids)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except Exception as e:  # noqa: BLE001 - not a dataset (HTML, garbage) or an unsavable one
        raise ImageReadError(
            f"{name}: the server's WADO-RS answer is not a DICOM instance ({type(e).__name__})"
        ) from None
    img = read_image(buf.getvalue(), name=name, target_size=predictor.pre.image_size)
    prediction = predictor.predict_pixels([img.pixels])[0]
    sr = dicom_sr(prediction, about, card, img.dicom)
    if not force:
        _derive_uid(sr, uids[2], about)
    return name, prediction, sr


def _derive_uid(sr: Any, image_uid: str, about: dict) -> None:
    """Give the report a UID derived from the image's UID and the model's name and version:
    the same model version reporting on the same image twice gives the same UID."""
    from pydicom.uid import generate_uid

    uid = generate_uid(entropy_srcs=["medlens-sr", image_uid, str(about.get("name")),
                                     str(about.get("version"))])  # fmt: skip
    sr.SOPInstanceUID = uid
    if getattr(sr, "file_meta", None) is not None:
        sr.file_meta.MediaStorageSOPInstanceUID = uid


def _has_report(server: _Server, study: str, uid: Any) -> bool:
    found = server.call("the QIDO-RS search for an earlier report", "search_for_instances",
                        study_instance_uid=study, search_filters={"SOPInstanceUID": str(uid)})  # fmt: skip
    return bool(found)


def _store(server: _Server, sr: Any, study: str, name: str) -> None:
    """STOW-RS one report; a response that lists it as failed is a refusal too."""
    url = server.url
    what = f"the STOW-RS storage of the report on {name}"
    answer = server.call(what, "store_instances", [sr], study_instance_uid=study)
    failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
    if failed:
        reason = getattr(failed[0], "FailureReason", "?")
        raise PacsError(f"the DICOMweb server at {url} refused {what} (failure reason {reason})")
    # A server may acknowledge an instance and still drop it (Orthanc's filters do): a report
    # counts as stored only once a search finds it.
    kept = server.call(f"the QIDO-RS check of {what}", "search_for_instances",
                       study_instance_uid=study,
                       search_filters={"SOPInstanceUID": str(sr.SOPInstanceUID)})  # fmt: skip
    if not kept:
        raise PacsError(
            f"the DICOMweb server at {url} did not keep the report on {name}: STOW-RS "
            "acknowledged it, but a QIDO-RS search does not find it (a filter on the server "
            "may refuse reports; ask its administrator)"
        )


def round_trip(
    url: str,
    studies: list[str],
    predictor: Any,
    about: dict,
    card: dict,
    *,
    store: bool = True,
    limit: int | None = None,
    timeout: float = 30,
    force: bool = False,
    dry_run: bool = False,
) -> PacsResult:
    """Predict every image instance of ``studies`` on the DICOMweb server at ``url`` and,
    with ``store``, send back one DICOM SR per instance into the same study.

    Args:
        url: The server's DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        studies: Study Instance UIDs.
        predictor: A :class:`medlens.inference.predictor.Predictor`.
        about: ``{"name", "version", "title"}`` of the model.
        card: Its model card.
        store: STOW-RS the reports (False: predict only).
        limit: At most this many instances per study.
        timeout: Seconds each request may take in all.
        force: Store a report even where this model version already stored one (a new UID).
        dry_run: Predict and say what would be stored or skipped; store nothing.

    Raises:
        PacsError: the server is down, a study has no instances, or a request is refused.
    """
    from medlens.errors import ImageReadError, UsageError

    server = _client(url, timeout)
    result = PacsResult()
    for s, study in enumerate(studies, start=1):
        images = _instances(server, study)[:limit]
        result.lines.append(f"study {s} of {len(studies)}: {len(images)} image instance(s)")
        for attrs in images:
            try:
                name, prediction, sr = _one(server, attrs, predictor, about, card, force)
            except (ImageReadError, UsageError) as e:  # one unusable instance: go on
                result.failed += 1
                result.lines.append(f"  {e}")
                continue
            p = prediction.probabilities[prediction.label]
            flag = " (out of distribution)" if prediction.ood.get("flag") else ""
            line = f"  {name}: {prediction.label} {p:.3f}{flag}"
            if (store or dry_run) and not force and _has_report(server, study, sr.SOPInstanceUID):
                result.skipped += 1
                line += ", a report from this model version is stored already (--force: another)"
            elif dry_run:
                line += ", a report would be stored (dry run)"
            elif store:
                _store(server, sr, study, name)
                result.stored.append(str(sr.SOPInstanceUID))
                line += ", report stored"
            result.lines.append(line)
    return result
