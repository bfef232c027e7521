"""Decode any medical image a user has (PNG, JPEG, TIFF, BMP, WebP, ... or DICOM) into uint8.

:func:`read_image` is the single entry point used by training, evaluation, the CLI and the web
app. It returns a :class:`DecodedImage` whose ``pixels`` are ``uint8`` with shape ``(H, W)``
(grayscale) or ``(H, W, 3)`` (RGB); choosing channels and resizing is left to preprocessing.
Anything that cannot be decoded raises :class:`ImageReadError` with a one-line message that
names the file and says what to do, so callers can show it to users verbatim.

DICOM patient identifiers never leave this module: the pydicom dataset is dropped after decoding
and only the Modality tag is kept.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medlens.errors import ImageReadError

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = ["MAX_PIXELS", "DecodedImage", "ImageReadError", "is_dicom", "read_image"]

MAX_PIXELS = 64_000_000
"""Default decompression-bomb guard: the largest width*height :func:`read_image` will decode."""

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_HIGH_DEPTH_MODES = {
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "I": "32-bit integer",
    "F": "floating-point",
}
# Install hints for compressed transfer syntaxes that pydicom decodes only through plugins.
# First match on the transfer syntax name wins, so "JPEG-LS" must come before "JPEG".
_CODEC_HINTS = (
    ("JPEG 2000", "pylibjpeg + pylibjpeg-openjpeg"),
    ("HTJ2K", "pylibjpeg + pylibjpeg-openjpeg"),
    ("JPEG-LS", "pylibjpeg + pylibjpeg-libjpeg (or pyjpegls)"),
    ("JPEG", "pylibjpeg + pylibjpeg-libjpeg"),
    ("RLE", "pylibjpeg + pylibjpeg-rle"),
)


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarrays with == is ambiguous
class DecodedImage:
    """A decoded image, ready for preprocessing.

    Attributes:
        pixels: ``uint8`` C-contiguous array, ``(H, W)`` for grayscale or ``(H, W, 3)`` for RGB.
        source_format: Container format, e.g. ``"PNG"``, ``"JPEG"``, ``"TIFF"``, ``"DICOM"``.
        notes: Human-readable remarks about conversions applied (bit depth, alpha, frames, ...).
        modality: DICOM Modality tag (``"CR"``, ``"DX"``, ``"MR"``, ...); ``None`` for non-DICOM.
        dicom: A DICOM upload's header (the pydicom dataset without its pixel data): what a
            DICOM Structured Report about it must reference. It holds patient identifiers: it
            stays in memory, never in ``repr``, logs or files unless the caller writes an SR.
    """

    pixels: np.ndarray
    source_format: str
    notes: tuple[str, ...] = ()
    modality: str | None = None
    dicom: Dataset | None = field(default=None, repr=False, compare=False)

    def header_facts(self) -> dict[str, str | int]:
        """The non-identifying header facts a reader checks (modality, view, body part,
        photometric interpretation, bits, size); empty for a non-DICOM image."""
        if self.dicom is None:
            return {}
        out = {}
        for key in _HEADER_FACTS:
            value = self.dicom.get(key)
            if value not in (None, ""):
                out[key] = value if isinstance(value, int) else str(value).strip()
        return out


_HEADER_FACTS = (
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
)
"""DICOM attributes shown with a result: none of them identifies a patient."""


def read_image(
    src: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
    target_size: int | None = None,
    hint: str | None = None,
) -> DecodedImage:
    """Decode a raster image or a DICOM file into a ``uint8`` array.

    Args:
        src: Path to a file, or the file's content as ``bytes`` (an upload; never written to disk).
        name: How error messages refer to the image; defaults to the path, or ``"upload"``.
        max_pixels: Refuse images with more than this many pixels (width * height), checked from
            the header before any pixel data is decoded.
        target_size: The side of the square the caller resizes to next (the model's input
            size), or None for the full image. A JPEG at least twice that size on both sides is
            then decoded at 1/2, 1/4 or 1/8 scale by libjpeg's scaled IDCT (Pillow's
            ``draft``), keeping both sides ``>= target_size``: a 1024x1024 upload for a 224 px
            model decodes to 256x256, which is faster to decode and to resize. Pass the same
            value wherever images are decoded for one model (training cache, prediction,
            serving) so that every path sees the same pixels. Other formats ignore it.
        hint: What an error message tells the user to do (the command's own options).

    Returns:
        A :class:`DecodedImage` with ``(H, W)`` or ``(H, W, 3)`` ``uint8`` pixels.

    Raises:
        ImageReadError: The file is missing, empty, not an image, damaged, too large, or a DICOM
            without pixel data or in a transfer syntax this installation cannot decode.
        TypeError: ``src`` is neither a path nor bytes (a programming error, not a bad file).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        label, hint = name or "upload", hint or "upload a PNG, JPEG or DICOM image"
        data = bytes(src)
        if not data:
            raise ImageReadError(f"`{label}` is empty (0 bytes); {hint}")
        return _decode(io.BytesIO(data), label, hint, max_pixels, target_size)
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"read_image() needs a path or bytes, not {type(src).__name__}")
    label = name or str(src)
    hint = hint or "check the file, or save it again as PNG, JPEG or DICOM"
    try:
        fh = open(Path(src), "rb")
    except FileNotFoundError:
        raise ImageReadError(f"`{label}` does not exist; check the path") from None
    except IsADirectoryError:
        raise ImageReadError(
            f"`{label}` is a directory, not an image file; pass the files inside it"
        ) from None
    except OSError as exc:
        raise ImageReadError(
            f"`{label}` cannot be opened ({exc.strerror or exc}); check its permissions"
        ) from None
    with fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ImageReadError(f"`{label}` is empty (0 bytes); {hint}")
        return _decode(fh, label, hint, max_pixels, target_size)


def is_dicom(data: bytes | str | os.PathLike[str]) -> bool:
    """Tell whether ``data`` (file content or a path) is a DICOM file.

    True when the "DICM" magic sits at byte offset 128, or, for files written without the
    128-byte preamble, when pydicom can parse it with ``force=True`` and it has pixel data.
    Missing or unreadable paths give False.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _sniff_dicom(io.BytesIO(bytes(data)))
    try:
        with open(Path(data), "rb") as fh:
            return _sniff_dicom(fh)
    except OSError:
        return False


def _sniff_dicom(fh: IO[bytes]) -> bool:
    return fh.read(132)[128:132] == b"DICM" or _read_bare_dicom(fh) is not None


def _read_bare_dicom(fh: IO[bytes]) -> Dataset | None:
    """Parse a preamble-less DICOM with force=True; None unless it parses and has pixel data."""
    fh.seek(0)
    # force=True parses almost anything; a bare dataset starts with a group 0002 or 0008 tag
    # (little endian), which rules out PNG/JPEG/text cheaply before pydicom is even imported.
    if fh.read(2) not in (b"\x02\x00", b"\x08\x00"):
        return None
    import pydicom

    fh.seek(0)
    try:
        with warnings.catch_warnings():  # pydicom warns about every oddity of a non-DICOM file
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh, force=True)
    except Exception:  # noqa: BLE001 - any parse failure just means "not DICOM"
        return None
    return ds if any(k in ds for k in _PIXEL_KEYWORDS) else None


def _decode(
    fh: IO[bytes], label: str, hint: str, max_pixels: int, target_size: int | None = None
) -> DecodedImage:
    if fh.read(132)[128:132] == b"DICM":
        _refuse_deflate_bomb(fh, label, max_pixels)
        return _read_dicom(fh, label, hint, max_pixels)
    fh.seek(0)
    decoded = _read_raster(fh, label, hint, max_pixels, target_size)
    if decoded is not None:
        return decoded
    ds = _read_bare_dicom(fh)
    if ds is not None:
        return _read_dicom(fh, label, hint, max_pixels, ds=ds)
    raise ImageReadError(
        f"`{label}` is not an image MedLens can read (neither a picture format such as PNG, JPEG "
        f"or TIFF nor DICOM, whatever its name says); {hint}"
    )


# ----------------------------------------------------------------------------- raster (Pillow)


def _read_raster(
    fh: IO[bytes], label: str, hint: str, max_pixels: int, target_size: int | None = None
) -> DecodedImage | None:
    """Decode through Pillow; None when Pillow does not recognise the format."""
    try:
        # Image.open parses only the header. Pillow's own bomb warning is silenced because our
        # limit (checked right below) decides; its hard error still fires for >2x its limit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(fh)
    except UnidentifiedImageError:
        return None
    except Image.DecompressionBombError as exc:
        raise _pillow_bomb(fh, label, max_pixels, exc) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise ImageReadError(
            f"`{label}` is a damaged image file ({_reason(exc)}); {hint}"
        ) from None
    with im:
        if im.width * im.height > max_pixels:
            raise _too_big(label, im.size, max_pixels)
        fmt = {"MPO": "JPEG"}.get(im.format or "", im.format or "image")
        notes = []
        frames = getattr(im, "n_frames", 1)  # multi-frame formats only
        if getattr(im, "is_animated", False) or frames > 1:
            notes.append(f"multi-frame {fmt} ({frames} frames): used the first frame")
        if target_size and fmt == "JPEG" and min(im.size) >= 2 * target_size:
            # DCT-domain downscaling by 2/4/8 while decoding; both sides stay >= target_size.
            im.draft(None, (int(target_size), int(target_size)))
        try:
            im.load()  # force the full decode so truncated files fail here, not later
        except Image.DecompressionBombError as exc:
            raise _pillow_bomb(fh, label, max_pixels, exc) from None
        except Exception as exc:  # noqa: BLE001 - OSError, SyntaxError, EOFError, zlib.error...
            raise ImageReadError(
                f"`{label}` is damaged or truncated ({_reason(exc)}); re-export it, or {hint}"
            ) from None
        try:  # photographs of films/screens often carry an EXIF rotation
            orientation = im.getexif().get(0x0112, 1)
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                im = ImageOps.exif_transpose(im)
                notes.append(f"rotated/flipped upright per EXIF orientation {orientation}")
            elif orientation not in (1, None):
                notes.append(f"EXIF orientation {orientation!r} is not 1-8: left as stored")
        except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
            notes.append("EXIF orientation unreadable: left as stored")
        pixels = _pil_to_uint8(im, notes, label)
    return DecodedImage(_owned(pixels), fmt, tuple(notes))


def _pil_to_uint8(im: Image.Image, notes: list[str], label: str) -> np.ndarray:
    """Map any Pillow mode to (H, W) L or (H, W, 3) RGB uint8, appending what was done to notes."""
    if im.mode == "P":
        target = "RGBA" if "transparency" in im.info else "L" if _palette_is_grey(im) else "RGB"
        im = im.convert(target)
        notes.append(f"palette image converted to {'grayscale' if target == 'L' else 'RGB'}")
    elif im.mode in ("PA", "RGBa", "La"):  # un-premultiply / expand, then composite below
        im = im.convert("LA" if im.mode == "La" else "RGBA")
    elif im.mode == "1":
        im = im.convert("L")
        notes.append("1-bit image expanded to 0/255")

    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode in ("RGBA", "LA"):
        arr = np.asarray(im)
        colour, alpha = arr[..., :-1].astype(np.uint16), arr[..., -1:].astype(np.uint16)
        if (alpha < 255).any():
            notes.append("alpha channel dropped (composited on black)")
        out = ((colour * alpha + 127) // 255).astype(np.uint8)  # rounded c * a / 255
        return out[..., 0] if im.mode == "LA" else out
    if im.mode in _HIGH_DEPTH_MODES:
        notes.append(f"{_HIGH_DEPTH_MODES[im.mode]} image scaled to 8 bits (min-max)")
        return _minmax_uint8(np.asarray(im))
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        rgb = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"`{label}` uses Pillow mode {im.mode}, which cannot be converted "
            f"to RGB ({_reason(exc)}); convert it to PNG or JPEG"
        ) from None
    notes.append(f"{im.mode} converted to RGB")
    return np.asarray(rgb)


def _palette_is_grey(im: Image.Image) -> bool:
    palette = im.getpalette() or []
    entries = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
    return bool(len(entries)) and bool((entries == entries[:, :1]).all())


def _pillow_bomb(fh: IO[bytes], label: str, max_pixels: int, exc: Exception) -> ImageReadError:
    """Turn Pillow's DecompressionBombError into our message, recovering the header size."""
    size = _header_size(fh)
    if size is None:  # fall back to the pixel count in Pillow's message
        count = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(count.group(1)) if count else 0
        return ImageReadError(
            f"`{label}` is {pixels / 1e6:.1f} MP, more than the decoding limit; "
            "downscale it before uploading"
        )
    # Over our limit: say so. Under it (max_pixels was raised): Pillow's hard limit refused it.
    over_ours = size[0] * size[1] > max_pixels
    return _too_big(label, size, max_pixels if over_ours else 2 * (Image.MAX_IMAGE_PIXELS or 0))


def _header_size(fh: IO[bytes]) -> tuple[int, int] | None:
    # Image.open refuses huge images before returning them; the format plugins themselves parse
    # the header without that check, so ask them directly (same protocol as Image.open).
    try:
        fh.seek(0)
        prefix = fh.read(16)
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            ok = not accept or accept(prefix)
            if ok and not isinstance(ok, str):
                try:
                    fh.seek(0)
                    return factory(fh, "").size
                except Exception:  # noqa: BLE001 - wrong plugin, try the next one
                    continue
    except Exception:  # noqa: BLE001
        pass
    return None


# ------------------------------------------------------------------------------ DICOM (pydicom)


_DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_DEFLATE_CHUNK = 1 << 20


def deflate_limit(max_pixels: int) -> int:
    """The most bytes a deflated DICOM may inflate to: an 8-bit RGB (or 16-bit grey) image at
    the pixel limit, plus 1 MB of header."""
    return 3 * max_pixels + (1 << 20)


def _refuse_deflate_bomb(fh: IO[bytes], label: str, max_pixels: int) -> None:
    """pydicom inflates a deflated dataset whole, before anything can be checked: inflate it
    here first, chunk by chunk and discarding the output, and refuse it past
    :func:`deflate_limit` (a 0.5 MB upload can otherwise become gigabytes)."""
    import zlib

    fh.seek(132)
    head = fh.read(12)  # (0002,0000) UL: the length of the rest of the file meta group
    if len(head) < 12 or head[:4] != b"\x02\x00\x00\x00":
        return  # no group length: pydicom decides (and inflates only what is declared)
    meta = fh.read(int.from_bytes(head[8:12], "little"))
    if _DEFLATED not in meta:
        return
    limit, total = deflate_limit(max_pixels), 0
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or fh.read(_DEFLATE_CHUNK)
            if not chunk:
                break
            total += len(inflater.decompress(chunk, _DEFLATE_CHUNK))
            if total > limit:
                raise ImageReadError(
                    f"`{label}` is a deflated DICOM that inflates to more than "
                    f"{limit / 1e6:.0f} MB (the most an image within the "
                    f"{max_pixels / 1e6:.0f} MP limit needs): refused as a decompression bomb"
                )
    except zlib.error:
        pass  # not valid deflate data: pydicom's own reading reports the damage
    finally:
        fh.seek(0)


def _read_dicom(
    fh: IO[bytes], label: str, hint: str, max_pixels: int, ds: Dataset | None = None
) -> DecodedImage:
    import pydicom

    if ds is None:
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh)
        except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, struct errors...
            raise _unreadable_dicom(label, exc, hint) from None
    try:
        return _decode_dicom(ds, label, hint, max_pixels)
    except (ImageReadError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom parses elements lazily: an unknown VR,
        # a value of the wrong type or an inconsistent header surfaces here, on first access
        raise _unreadable_dicom(label, exc, hint) from None


def _decode_dicom(ds: Dataset, label: str, hint: str, max_pixels: int) -> DecodedImage:
    """The first frame of a parsed DICOM dataset, as 8-bit grey or RGB."""
    from pydicom import pixels as dpx
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if "Rows" in ds and "Columns" in ds:  # image attributes but no pixels: cut-off download
            raise ImageReadError(
                f"`{label}` has no pixel data although it describes an image, "
                f"so it is probably truncated; re-export it, or {hint}"
            )
        sop = getattr(ds.get("SOPClassUID"), "name", None) or "object"
        raise ImageReadError(
            f"`{label}` has no pixel data (it is a DICOM {sop} without an image); "
            "export the image series, not the report/structured document"
        )
    size = (int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    if size[0] * size[1] > max_pixels:
        raise _too_big(label, size, max_pixels)
    if not ds.file_meta.get("TransferSyntaxUID"):  # preamble-less files often lack file meta
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRBigEndian
            if little is False
            else ExplicitVRLittleEndian
        )
    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax.is_encapsulated:
        _check_frame_size(ds, label, size, max_pixels)
    try:
        arr = dpx.pixel_array(ds, index=0)  # decode only the first frame of multi-frame files
    except (NotImplementedError, RuntimeError) as exc:
        if not tsyntax.is_compressed:
            raise _unreadable_dicom(label, exc, hint) from None
        raise _codec_error(label, tsyntax, hint, exc) from None
    except Exception as exc:  # noqa: BLE001 - ValueError/AttributeError for inconsistent headers
        raise _unreadable_dicom(label, exc, hint) from None

    notes = []
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        notes.append(f"multi-frame DICOM ({frames} frames): used the first frame")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = dpx.apply_color_lut(arr, ds)
        pixels = rgb if rgb.dtype == np.uint8 else _scale_uint8(rgb, 0, np.iinfo(rgb.dtype).max)
        notes.append("palette colour DICOM converted to RGB")
    elif arr.ndim == 3:  # pydicom already converted YBR_FULL(_422) to RGB (raw=False)
        pixels = arr if arr.dtype == np.uint8 else _scale_uint8(arr, 0, 2 ** int(ds.BitsStored) - 1)
        if photometric.startswith("YBR"):
            notes.append(f"{photometric} converted to RGB")
    else:
        pixels = _dicom_mono(arr, ds, notes)
        if photometric == "MONOCHROME1":  # 0 = white in MONOCHROME1; flip to higher = brighter
            pixels = 255 - pixels
            notes.append("MONOCHROME1 inverted so that higher values are brighter")
    modality = str(ds.get("Modality") or "").strip() or None
    return DecodedImage(_owned(pixels), "DICOM", tuple(notes), modality, _header(ds))


def _header(ds: Dataset) -> Dataset:
    """The dataset's elements but its pixel data (a structured report references them)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    header = Dataset()
    for elem in ds:
        if elem.keyword not in _PIXEL_KEYWORDS:
            header.add(elem)
    header.file_meta = FileMetaDataset(ds.file_meta)
    return header


def _linear_rescale(ds: Dataset) -> tuple[float, float] | None:
    """(slope, intercept) when the modality LUT is a plain rescale with a positive slope (the
    usual case), else None (a LUT sequence, a negative or unreadable slope: pydicom decides)."""
    if "ModalityLUTSequence" in ds:
        return None
    try:
        slope = float(ds.get("RescaleSlope", 1) if ds.get("RescaleSlope") is not None else 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    return (
        (slope, intercept) if np.isfinite(slope) and slope > 0 and np.isfinite(intercept) else None
    )


def _dicom_mono(arr: np.ndarray, ds: Dataset, notes: list[str]) -> np.ndarray:
    """Modality LUT (rescale), then VOI LUT/window, then uint8 over the window's output range.

    A plain rescale (positive slope) and a linear window are applied in the stored values'
    own units: the window's edges are mapped back through the rescale and the stored pixels
    scaled straight to 8 bits in row chunks, with no float64 copy of the image (pydicom's
    modality LUT and windowing make two); min-max scaling is unchanged by a positive rescale.
    """
    from pydicom import pixels as dpx

    rescale = _linear_rescale(ds)
    values = arr
    if rescale is None:
        try:
            values = dpx.apply_modality_lut(arr, ds)
        except Exception as exc:  # noqa: BLE001 - e.g. letters in RescaleSlope, a broken LUT
            notes.append(f"modality LUT/rescale in the file is invalid ({_reason(exc)}): ignored")
    seq = ds.get("VOILUTSequence")
    # Mirror apply_voi_lut's own choice: a complete VOI LUT wins over window center/width.
    has_lut = bool(seq) and all(seq[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = all(ds.get(k) not in (None, "") for k in ("WindowCenter", "WindowWidth"))
    try:
        if has_lut:
            item = seq[0]
            entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            lut = dpx.apply_voi(np.arange(first, first + entries), ds)
            rescaled = dpx.apply_modality_lut(arr, ds) if rescale else values
            out = dpx.apply_voi(np.rint(rescaled).astype(np.int64), ds)  # indices must be ints
            notes.append("VOI LUT from the file applied")
            return _scale_uint8(out, float(lut.min()), float(lut.max()))
        if has_window:
            return _window(values, ds, rescale, notes)
    except Exception as exc:  # noqa: BLE001 - e.g. width < 1, unknown VOI function
        notes.append(f"VOI LUT/window in the file is invalid ({_reason(exc)}): ignored")
    bits = int(ds.get("BitsStored") or 8 * arr.itemsize)
    if bits <= 8 and rescale == (1.0, 0.0) and arr.size and 0 <= arr.min() and arr.max() <= 255:
        # The same grey levels as the same pixels saved as an 8-bit PNG or JPEG: no stretch
        # (a stretched 8-bit DICOM looked unlike the model's training images).
        notes.append("8-bit grey levels used as stored")
        return np.ascontiguousarray(arr, dtype=np.uint8)
    notes.append(f"{bits}-bit DICOM without a window: its full range of values shown")
    return _minmax_uint8(values)


def _window(
    values: np.ndarray, ds: Dataset, rescale: tuple[float, float] | None, notes: list[str]
) -> np.ndarray:
    """The file's window (centre/width) to uint8; ``values`` are stored values when
    ``rescale`` is given (the window's edges are then mapped back into their units)."""
    from pydicom import pixels as dpx

    center, width = float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth))
    if not (np.isfinite(center) and np.isfinite(width) and width >= 1):
        raise ValueError(f"center {center:g}, width {width:g}")
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function == "LINEAR":
        # DICOM PS3.3 C.11.2.1.2.1: below c - 0.5 - (w - 1) / 2 the output is its minimum,
        # above c - 0.5 + (w - 1) / 2 its maximum, linear between.
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        if rescale is not None:
            slope, intercept = rescale
            lo, hi = (lo - intercept) / slope, (hi - intercept) / slope
        out, lo_out, hi_out = values, lo, hi
    else:  # SIGMOID, LINEAR_EXACT: pydicom's implementation, on rescaled values
        rescaled = values * rescale[0] + rescale[1] if rescale else values
        out = dpx.apply_windowing(rescaled, ds)
        # Windowing maps below/above the window to fixed y_min/y_max that depend on
        # BitsStored, signedness and rescale; probing with -inf/+inf reads them back exactly.
        lo_out, hi_out = dpx.apply_windowing(np.array([-np.inf, np.inf]), ds)
    notes.append(f"window from the file applied (center {center:g}, width {width:g})")
    return _scale_uint8(out, float(lo_out), float(hi_out))


def _check_frame_size(ds: Dataset, label: str, header: tuple[int, int], max_pixels: int) -> None:
    """The first compressed frame's own size, read from its codestream header, must be the
    one Rows/Columns declare: a decoder allocates what the codestream says (a 64x64 header
    over a 12500x12500 JPEG frame would otherwise decode in full)."""
    from pydicom.encaps import get_frame

    frames = int(ds.get("NumberOfFrames") or 1)
    frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    size = _codestream_size(frame[:65536])
    if size is None or size == header:
        return
    if size[0] * size[1] > max_pixels:
        raise _too_big(label, size, max_pixels)
    raise ImageReadError(
        f"`{label}`: its first frame is {size[0]}x{size[1]} pixels but the header says "
        f"{header[0]}x{header[1]} (Columns x Rows); the file is damaged or inconsistent: "
        "re-export it"
    )


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG / JPEG-LS start-of-frame or a JPEG 2000 SIZ marker (or a
    JP2 file's image header box); None for other codestreams (RLE: the header's own size)."""
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:  # J2K: SOC, SIZ
        x, y, x0, y0 = (int.from_bytes(data[i : i + 4], "big") for i in (8, 12, 16, 20))
        return x - x0, y - y0
    box = data.find(b"ihdr")  # JP2 file: image header box (height, width)
    if data[4:8] == b"jP  " and box >= 0 and len(data) >= box + 12:
        h, w = (int.from_bytes(data[i : i + 4], "big") for i in (box + 4, box + 8))
        return w, h
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            h, w = (int.from_bytes(data[j : j + 2], "big") for j in (i + 5, i + 7))
            return (w, h) if h else None  # height 0: given later by a DNL marker
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _unreadable_dicom(label: str, exc: Exception, hint: str) -> ImageReadError:
    return ImageReadError(f"`{label}` is not a readable DICOM file ({_reason(exc)}); {hint}")


def _codec_error(
    label: str, tsyntax: Any, hint: str, exc: Exception | None = None
) -> ImageReadError:
    from pydicom.pixels import get_decoder

    try:
        plugins = get_decoder(tsyntax).available_plugins
    except NotImplementedError:  # e.g. MPEG/HEVC video: pydicom has no decoder at all
        plugins = ()
    ts = f"transfer syntax {tsyntax.name} ({tsyntax})"
    refused = _plugins_refuse(exc)
    if plugins and refused is None:  # a decoder is installed but failed on the data
        return ImageReadError(
            f"`{label}` uses {ts}, but its compressed pixel data could not be "
            "decoded "
            f"(corrupt?); re-export it as uncompressed DICOM, or {hint}"
        )
    pkgs = next((p for key, p in _CODEC_HINTS if key in tsyntax.name), None)
    install = f"install {pkgs} or " if pkgs else ""
    why = f" ({refused})" if refused else ""
    return ImageReadError(
        f"`{label}` uses {ts}, which this installation cannot decode{why}; "
        f"{install}convert the file to uncompressed DICOM"
    )


def _plugins_refuse(exc: Exception | None) -> str | None:
    """The first reason when every installed decoder refused this kind of data as unsupported
    (e.g. Pillow and 12-bit JPEG Extended) rather than failing on it; else None.

    pydicom gathers its plugins' failures into one RuntimeError, a ``name: message`` line each.
    """
    lines = [ln.strip() for ln in str(exc or "").splitlines()[1:] if ln.strip()]
    unsupported = re.compile(r"does not support|not supported|unsupported", re.I)
    if lines and all(unsupported.search(ln) for ln in lines):
        return lines[0].partition(": ")[2] or lines[0]
    return None


# ------------------------------------------------------------------------------------- helpers


def _owned(pixels: np.ndarray) -> np.ndarray:
    # np.asarray(PIL image) is a read-only view; callers (and torch.from_numpy) expect to own
    # a writeable, C-contiguous uint8 array.
    return np.require(pixels, np.uint8, ["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])


_ROWS_PER_CHUNK = 256  # float32 temporaries of at most 256 rows, whatever the image size


def _scale_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linearly map [lo, hi] to [0, 255], clipping outside (NaN -> 0); all zeros if the range
    is empty. Works through the rows in chunks with float32 temporaries, so the memory beyond
    the input is the uint8 output plus a few MB (a 64 MP 16-bit image: +64 MB, not GBs)."""
    arr = np.asarray(arr)
    out = np.zeros(arr.shape, np.uint8)
    if not hi > lo:
        return out
    k = np.float32(255.0 / (hi - lo))
    for start in range(0, arr.shape[0], _ROWS_PER_CHUNK):
        chunk = arr[start : start + _ROWS_PER_CHUNK].astype(np.float32)
        chunk -= np.float32(lo)
        chunk *= k
        np.clip(chunk, 0, 255, out=chunk)
        np.nan_to_num(chunk, copy=False, nan=0.0)
        out[start : start + _ROWS_PER_CHUNK] = np.rint(chunk, out=chunk)
    return out


def _minmax_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max scale to uint8; NaN/inf become the minimum and a constant image becomes 0.
    Integer images are scaled without any full-size float copy."""
    arr = np.asarray(arr)
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if arr.dtype.kind in "iub":
        return _scale_uint8(arr, float(arr.min()), float(arr.max()))
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo = float(np.min(arr, where=finite, initial=np.inf))
    hi = float(np.max(arr, where=finite, initial=-np.inf))
    out = _scale_uint8(arr, lo, hi)
    if not finite.all():
        out[np.logical_not(finite, out=finite)] = 0  # -inf/+inf/NaN count as the minimum
    return out


def _too_big(label: str, size: tuple[int, int], limit: int) -> ImageReadError:
    w, h = size
    return ImageReadError(
        f"`{label}` is {w}x{h} pixels ({w * h / 1e6:.1f} MP), more than the "
        f"{limit / 1e6:.1f} MP limit; downscale it before uploading"
    )


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element (pydicom windows with index 0 too)."""
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _reason(exc: BaseException) -> str:
    """First line of an exception message, shortened, so error messages stay one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (text[:157] + "...") if len(text) > 160 else text
