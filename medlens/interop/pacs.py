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


def _client(url: str, timeout: float) -> Any:
    from dicomweb_client.api import DICOMwebClient

    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # its URLs carry UIDs
    client = DICOMwebClient(url=url.rstrip("/"), timeout=timeout)
    # One retry after a quarter second (the client's default, 5 attempts with exponential
    # back-off, makes "server down" take half a minute to say).
    client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=250)
    return client


def _value(attrs: dict, tag: str) -> Any:
    values = (attrs.get(tag) or {}).get("Value") or [None]
    return values[0]


def _call(what: str, url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A DICOMweb request whose failures become one clear :class:`PacsError`."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.ConnectionError:
        raise PacsError(
            f"cannot reach the DICOMweb server at {url} ({what}); is it running, and is the "
            "URL its DICOMweb root (for Orthanc: http://HOST:8042/dicom-web)?"
        ) from None
    except requests.exceptions.Timeout:
        raise PacsError(f"the DICOMweb server at {url} did not answer in time ({what})") from None
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else "?"
        raise PacsError(f"the DICOMweb server at {url} refused {what} (HTTP {code})") from None


def _instances(client: Any, url: str, study: str) -> list[dict]:
    found = _call("the QIDO-RS search", url, client.search_for_instances, study_instance_uid=study,
                  fields=["Modality", "SeriesNumber", "InstanceNumber", "Rows"])  # fmt: skip
    if not found:
        raise PacsError(
            f"the DICOMweb server at {url} has no instances of the requested study; check the "
            "Study Instance UID (a QIDO-RS search found nothing)"
        )
    images = [a for a in found if _value(a, "00080060") not in NOT_IMAGES]
    return images


def _one(client: Any, url: str, attrs: dict, predictor: Any, about: dict, card: dict) -> tuple:
    """Fetch, decode and predict one instance; returns ``(name, prediction, report bytes,
    report dataset)``."""
    from medlens.data.imaging import read_image
    from medlens.interop.sr import dicom_sr

    uids = [_value(attrs, t) for t in ("0020000D", "0020000E", "00080018")]
    name = f"series {_value(attrs, '00200011')}, instance {_value(attrs, '00200013')}"
    ds = _call(f"the WADO-RS retrieval of {name}", url, client.retrieve_instance, *uids)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    img = read_image(buf.getvalue(), name=name, target_size=predictor.pre.image_size)
    prediction = predictor.predict_pixels([img.pixels])[0]
    return name, prediction, dicom_sr(prediction, about, card, img.dicom)


def _store(client: Any, url: str, sr: Any, study: str, name: str) -> None:
    """STOW-RS one report; a response that lists it as failed is a refusal too."""
    what = f"the STOW-RS storage of the report on {name}"
    answer = _call(what, url, client.store_instances, [sr], study_instance_uid=study)
    failed = getattr(answer, "FailedSOPSequence", None) if answer is not None else None
    if failed:
        reason = getattr(failed[0], "FailureReason", "?")
        raise PacsError(f"the DICOMweb server at {url} refused {what} (failure reason {reason})")
    # A server may acknowledge an instance and still drop it (Orthanc's filters do): a report
    # counts as stored only once a search finds it.
    kept = _call(f"the QIDO-RS check of {what}", url, client.search_for_instances,
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

    Raises:
        PacsError: the server is down, a study has no instances, or a request is refused.
    """
    from medlens.errors import ImageReadError, UsageError

    client = _client(url, timeout)
    result = PacsResult()
    for s, study in enumerate(studies, start=1):
        images = _instances(client, url, study)[:limit]
        result.lines.append(f"study {s} of {len(studies)}: {len(images)} image instance(s)")
        for attrs in images:
            try:
                name, prediction, sr = _one(client, url, attrs, predictor, about, card)
            except (ImageReadError, UsageError) as e:  # one unusable instance: go on
                result.failed += 1
                result.lines.append(f"  {e}")
                continue
            p = prediction.probabilities[prediction.label]
            flag = " (out of distribution)" if prediction.ood.get("flag") else ""
            line = f"  {name}: {prediction.label} {p:.3f}{flag}"
            if store:
                _store(client, url, sr, study, name)
                result.stored.append(str(sr.SOPInstanceUID))
                line += ", report stored"
            result.lines.append(line)
    return result
