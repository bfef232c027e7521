"""Tests for medlens.imaging: every fixture is built here, in tmp_path or in memory."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.data.imaging import MAX_PIXELS, DecodedImage, is_dicom, read_image
from medlens.errors import ImageReadError

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR


# ------------------------------------------------------------------------------------ helpers


def save(tmp_path: Path, name: str, im: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    im.save(path, **kwargs)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grey) with a tiny, bogus IDAT."""
    chunk = png_chunk
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_dicom(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    tsyntax: str = ExplicitVRLittleEndian,
    frames: int = 1,
    **tags,
) -> Dataset:
    """A minimal CT-like dataset with patient fields that must never leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = tsyntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "12345", "19700101"
    ds.Modality = "CT"
    if pixels is not None:
        rows, cols = pixels.shape[-3:-1] if photometric == "RGB" else pixels.shape[-2:]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
        if photometric == "RGB":
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(pixels.dtype.kind == "i")
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def dicom_bytes(ds: Dataset, **kwargs) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, **kwargs)
    return buf.getvalue()


def write_dicom(tmp_path: Path, ds: Dataset, name: str = "img.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(dicom_bytes(ds))
    return path


def leaks_patient(img: DecodedImage) -> bool:
    text = repr(img) + " ".join(img.notes) + str(img.modality) + img.source_format
    return any(s in text for s in ("Doe", "Jane", "12345", "19700101"))


# ----------------------------------------------------------------------------- raster formats


def test_png_grey_and_rgb_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    rgb = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    for arr in (grey, rgb):
        out = read_image(save(tmp_path, f"x{arr.ndim}.png", Image.fromarray(arr)))
        assert out.source_format == "PNG" and out.modality is None and out.notes == ()
        assert out.pixels.dtype == np.uint8 and out.pixels.flags.c_contiguous
        assert out.pixels.flags.writeable
        np.testing.assert_array_equal(out.pixels, arr)


def test_bytes_input_matches_path_input(tmp_path):
    arr = np.arange(30 * 20 * 3, dtype=np.uint8).reshape(30, 20, 3)
    path = save(tmp_path, "a.png", Image.fromarray(arr))
    from_bytes = read_image(path.read_bytes())
    np.testing.assert_array_equal(from_bytes.pixels, read_image(path).pixels)
    np.testing.assert_array_equal(from_bytes.pixels, arr)


def test_grey_stored_as_rgb_stays_rgb(tmp_path):
    arr = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, axis=2)
    assert read_image(save(tmp_path, "g.png", Image.fromarray(arr))).pixels.shape == (8, 8, 3)


def test_jpeg_rgb(tmp_path):
    im = Image.new("RGB", (40, 30), (200, 30, 60))
    out = read_image(save(tmp_path, "x.jpg", im, quality=95))
    assert out.source_format == "JPEG" and out.pixels.dtype == np.uint8
    assert out.pixels.shape == (30, 40, 3)
    assert np.abs(out.pixels.astype(int) - (200, 30, 60)).max() <= 4


def test_16bit_png_is_min_max_scaled(tmp_path):
    arr = np.linspace(1000, 4000, 64 * 4).astype(np.uint16).reshape(4, 64)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    out = read_image(save(tmp_path, "x16.png", im))
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (4, 64)
    assert out.pixels.min() == 0 and out.pixels.max() == 255
    assert out.pixels[0, 0] == 0 and out.pixels[-1, -1] == 255
    assert np.all(np.diff(out.pixels.ravel().astype(int)) >= 0)
    assert any("16-bit" in n and "min-max" in n for n in out.notes)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_high_depth_scaling_needs_no_full_size_float_copies(dtype):
    import tracemalloc

    from medlens.data.imaging import _minmax_uint8

    arr = (np.arange(2000 * 2000) % 4096).astype(dtype).reshape(2000, 2000)
    tracemalloc.start()
    try:
        out = _minmax_uint8(arr)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    # The uint8 result (4 MB), row-chunk temporaries and, for floats, a 1-byte finite mask;
    # one float64 copy alone is 32 MB.
    bound = 9_000_000 + (4_000_000 if arr.dtype.kind == "f" else 0)
    assert peak < bound, f"{peak / 1e6:.1f} MB"


def test_rgba_and_la_composited_on_black(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[0, 255], [128, 255]]
    out = read_image(save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert out.pixels.shape == (2, 2, 3)
    assert (out.pixels[0, 0] == 0).all() and (out.pixels[0, 1] == 200).all()
    assert (out.pixels[1, 0] == 100).all()  # 200 * 128 / 255 = 100.4
    assert "alpha channel dropped (composited on black)" in out.notes

    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    out = read_image(save(tmp_path, "la.png", la))
    assert out.pixels.shape == (2, 2)
    np.testing.assert_array_equal(out.pixels, [[0, 200], [100, 200]])


def test_opaque_rgba_has_no_alpha_note(tmp_path):
    out = read_image(save(tmp_path, "o.png", Image.new("RGBA", (3, 3), (1, 2, 3, 255))))
    assert out.pixels.shape == (3, 3, 3) and out.notes == ()
    assert tuple(out.pixels[0, 0]) == (1, 2, 3)


def test_palette_colour_and_grey(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    out = read_image(save(tmp_path, "p.png", im))
    assert out.pixels.shape == (2, 4, 3)
    assert tuple(out.pixels[0, 0]) == (255, 0, 0) and tuple(out.pixels[0, 1]) == (0, 0, 255)

    grey = Image.new("P", (4, 2))
    grey.putpalette([v for i in range(256) for v in (i, i, i)])
    grey.putpixel((2, 1), 77)
    out = read_image(save(tmp_path, "pg.png", grey))
    assert out.pixels.shape == (2, 4) and out.pixels[1, 2] == 77 and out.pixels[0, 0] == 0


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([10, 20, 30, 90, 90, 90] + [0] * 762)
    im.putpixel((1, 0), 1)
    out = read_image(save(tmp_path, "pt.png", im, transparency=0))
    np.testing.assert_array_equal(out.pixels, [[[0, 0, 0], [90, 90, 90]]])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    im = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = read_image(save(tmp_path, "c.jpg", im, quality=95))
    assert out.pixels.shape == (8, 8, 3) and out.source_format == "JPEG"
    r, g, b = out.pixels[4, 4].astype(int)
    assert r > 240 and g < 15 and b < 15
    assert "CMYK converted to RGB" in out.notes


def test_one_bit_image(tmp_path):
    im = Image.new("1", (5, 3), 0)
    im.putpixel((2, 1), 1)
    out = read_image(save(tmp_path, "b.png", im))
    assert out.pixels.shape == (3, 5) and out.pixels[1, 2] == 255 and out.pixels.sum() == 255


def test_float_tiff_min_max_and_constant(tmp_path):
    arr = np.array([[-1.5, 0.0], [0.5, 2.5]], np.float32)
    out = read_image(save(tmp_path, "f.tif", Image.fromarray(arr, "F")))
    assert out.source_format == "TIFF"
    np.testing.assert_array_equal(out.pixels, [[0, 96], [128, 255]])  # (x + 1.5) / 4 * 255
    assert any("floating-point" in n for n in out.notes)

    flat = Image.fromarray(np.full((3, 3), 7.0, np.float32), "F")
    const = read_image(save(tmp_path, "c.tif", flat))
    np.testing.assert_array_equal(const.pixels, np.zeros((3, 3), np.uint8))


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)  # landscape, red block in the top-left corner
    arr[:3, :3] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    out = read_image(save(tmp_path, "r.png", Image.fromarray(arr), exif=exif))
    np.testing.assert_array_equal(out.pixels, np.rot90(arr, -1))
    assert any("EXIF orientation 6" in n for n in out.notes)

    jpeg = read_image(save(tmp_path, "r.jpg", Image.fromarray(arr), exif=exif))
    assert jpeg.pixels.shape == (20, 10, 3)


@pytest.mark.parametrize("value", [0, 9, 9999])
def test_an_invalid_exif_orientation_is_left_alone_and_said_so(tmp_path, value):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:3, :3] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = value
    out = read_image(save(tmp_path, "r.png", Image.fromarray(arr), exif=exif))
    np.testing.assert_array_equal(out.pixels, arr)
    assert f"EXIF orientation {value} is not 1-8: left as stored" in out.notes
    assert not any("rotated" in n for n in out.notes)


def test_multi_frame_tiff_uses_first_frame(tmp_path):
    frames = [Image.new("L", (4, 4), v) for v in (10, 20, 30)]
    path = tmp_path / "stack.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = read_image(path)
    assert (out.pixels == 10).all()
    assert "multi-frame TIFF (3 frames): used the first frame" in out.notes


# ---------------------------------------------------------------------- decompression bombs


def test_bomb_rejected_from_header_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    start = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert time.perf_counter() - start < 1.0
    msg = str(err.value)
    assert "bomb.png" in msg and "30000x30000" in msg and "900.0 MP" in msg and "64.0 MP" in msg
    assert "downscale" in msg and "\n" not in msg


def test_bomb_in_pillow_warning_range_is_an_error_not_a_warning():
    data = png_header_only(10000, 10000)  # 100 MP: above Pillow's warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError, match=r"`scan` is 10000x10000 pixels \(100.0 MP\)"):
            read_image(data, name="scan")


def test_max_pixels_override(tmp_path):
    path = save(tmp_path, "s.png", Image.new("L", (100, 50)))
    with pytest.raises(ImageReadError, match="100x50 pixels"):
        read_image(path, max_pixels=4999)
    assert read_image(path, max_pixels=5000).pixels.shape == (50, 100)
    # Raising our limit does not bypass Pillow's hard limit; still a clean ImageReadError.
    with pytest.raises(ImageReadError, match="30000x30000"):
        read_image(png_header_only(30000, 30000), max_pixels=10**10)
    assert MAX_PIXELS == 64_000_000


def test_dicom_size_guard():
    with pytest.raises(ImageReadError, match=r"`big\.dcm` is 4x3 pixels .* limit"):
        data = dicom_bytes(make_dicom(np.zeros((3, 4), np.uint16)))
        read_image(data, name="big.dcm", max_pixels=11)


# ------------------------------------------------------------------------------- bad inputs


def test_empty_file_and_empty_upload(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"`.*x\.png` is empty \(0 bytes\); check the file"):
        read_image(path)
    with pytest.raises(ImageReadError, match=r"`upload` is empty .*upload a PNG, JPEG or") as err:
        read_image(b"")
    assert "--skip-bad-images" not in str(err.value)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not an image\n" * 10)
    with pytest.raises(
        ImageReadError, match=r"notes\.txt` is not an image MedLens can read \(neither a picture"
    ):
        read_image(path)
    assert not is_dicom(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_raise(tmp_path, fmt):
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    msg = str(err.value)
    assert path.name in msg and "truncated" in msg and "\n" not in msg
    with pytest.raises(ImageReadError, match="`cut`"):
        read_image(data[: len(data) // 2], name="cut")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png` does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)
    assert not is_dicom(tmp_path / "nope.dcm")


def test_name_overrides_path_in_messages(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="^`patient scan 3` is empty"):
        read_image(path, name="patient scan 3")


# ------------------------------------------------------------------------------------- DICOM


def test_dicom_window_center_width(tmp_path):
    arr = np.array([[0, 1000, 1548, 2048], [2548, 2600, 3000, 4095]], np.uint16)
    ds = make_dicom(arr, bits_stored=12, WindowCenter=2048, WindowWidth=1000)
    out = read_image(write_dicom(tmp_path, ds, "ct.dcm"))
    assert out.source_format == "DICOM" and out.modality == "CT"
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == (2, 4)
    assert out.pixels[0, 0] == 0 and out.pixels[0, 1] == 0 and out.pixels[0, 2] == 0
    assert abs(int(out.pixels[0, 3]) - 128) <= 1
    assert (out.pixels[1, 1:] == 255).all()
    assert any("center 2048" in n and "width 1000" in n for n in out.notes)
    assert not leaks_patient(out)


def test_dicom_monochrome1_is_inverted(tmp_path):
    arr = np.array([[0, 100], [200, 300]], np.uint16)
    ds = make_dicom(arr, photometric="MONOCHROME1", bits_stored=12)
    out = read_image(write_dicom(tmp_path, ds))
    np.testing.assert_array_equal(out.pixels, [[255, 170], [85, 0]])  # brightest stored -> darkest
    assert any("MONOCHROME1" in n for n in out.notes)


def test_dicom_signed_ct_with_rescale_and_window(tmp_path):
    hu = np.array([[-1000, -160, 40], [240, 1000, 3000]], np.int32)
    stored = ((hu + 1024) // 1).astype(np.int16)  # slope 1, intercept -1024
    ds = make_dicom(
        stored,
        bits_stored=16,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )
    out = read_image(write_dicom(tmp_path, ds))
    px = out.pixels
    assert px[0, 0] == 0 and px[0, 1] == 0  # at or below the window's lower edge (-160)
    assert abs(int(px[0, 2]) - 128) <= 1  # window center
    assert px[1, 0] == 255 and px[1, 1] == 255 and px[1, 2] == 255


@pytest.mark.parametrize(
    "center, width", [("nan", "nan"), ("40", "nan"), ("inf", "400"), ("40", "0.5"), ("40", "-1")]
)
def test_a_dicom_window_that_cannot_work_is_ignored_not_applied(tmp_path, center, width):
    arr = np.array([[-500, 0], [250, 1500]], np.int16)
    ds = make_dicom(arr, WindowCenter=center, WindowWidth=width)
    out = read_image(dicom_bytes(ds))
    np.testing.assert_array_equal(out.pixels, [[0, 64], [96, 255]])  # min-max, not blank
    assert any(n.startswith("VOI LUT/window in the file is invalid") for n in out.notes)
    assert not any("window from the file applied" in n for n in out.notes)


@pytest.mark.parametrize("slope", ["abc", "1e999x"])
def test_a_dicom_rescale_with_letters_is_ignored_not_a_crash(tmp_path, slope):
    arr = np.array([[-500, 0], [250, 1500]], np.int16)
    ds = make_dicom(arr, RescaleIntercept="0")
    ds.add_new(0x00281053, "LO", slope)  # RescaleSlope holding text, as a broken writer leaves it
    out = read_image(dicom_bytes(ds))
    np.testing.assert_array_equal(out.pixels, [[0, 64], [96, 255]])
    assert any(n.startswith("modality LUT/rescale in the file is invalid") for n in out.notes)


@pytest.mark.parametrize(
    "tag, vr",
    [
        (b"\x28\x00\x11\x00", b"US"),  # Columns
        (b"\x28\x00\x10\x00", b"US"),  # Rows
        (b"\x28\x00\x00\x01", b"US"),  # BitsAllocated
        (b"\x28\x00\x04\x00", b"CS"),  # PhotometricInterpretation
    ],
)
def test_a_dicom_with_an_unknown_vr_is_unreadable_not_a_crash(tag, vr):
    arr = np.array([[0, 100], [200, 300]], np.uint16)
    data = dicom_bytes(make_dicom(arr, bits_stored=12))
    assert tag + vr in data
    with pytest.raises(ImageReadError, match="not a readable DICOM file.*Unknown Value Repr"):
        read_image(data.replace(tag + vr, tag + b"XX"), name="odd.dcm")


def test_a_deflated_dicom_is_read_and_a_deflate_bomb_refused_before_inflating():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from medlens.data.imaging import deflate_limit

    arr = np.array([[0, 100], [200, 300]], np.uint16)
    small = dicom_bytes(make_dicom(arr, bits_stored=12, tsyntax=DeflatedExplicitVRLittleEndian))
    out = read_image(small, name="small.dcm")
    np.testing.assert_array_equal(out.pixels, [[0, 85], [170, 255]])
    # A 64x64 image whose dataset also holds 8 MB of zeros: a few KB deflated.
    ds = make_dicom(np.zeros((64, 64), np.uint16), tsyntax=DeflatedExplicitVRLittleEndian)
    ds.add_new(0x00091010, "OB", b"\0" * 8_000_000)
    bomb = dicom_bytes(ds)
    assert len(bomb) < 50_000
    max_pixels = 1_000_000  # limit: 4 MB inflated
    assert deflate_limit(max_pixels) < 8_000_000
    with pytest.raises(ImageReadError, match="inflates to more than 4 MB.*decompression bomb"):
        read_image(bomb, name="bomb.dcm", max_pixels=max_pixels)
    assert read_image(bomb, name="ok.dcm").pixels.shape == (64, 64)  # within the default limit


@pytest.mark.parametrize("window", [True, False])
def test_a_rescaled_16_bit_dicom_needs_no_float64_copies(window):
    import tracemalloc

    from medlens.data.imaging import _dicom_mono

    stored = (np.arange(2000 * 2000) % 4000).astype(np.int16).reshape(2000, 2000)
    tags = {"RescaleSlope": 1, "RescaleIntercept": -1024}
    if window:
        tags.update(WindowCenter=40, WindowWidth=400)
    ds = make_dicom(stored, bits_stored=16, **tags)
    tracemalloc.start()
    try:
        out = _dicom_mono(stored, ds, [])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert peak < 9_000_000, f"{peak / 1e6:.1f} MB"  # one float64 copy alone is 32 MB
    if window:  # -160 HU (stored 864) and below are black, 239 HU (1263) and above white
        flat = out.ravel()
        assert flat[864] == 0 and flat[1263] == 255 and abs(int(flat[1064]) - 128) <= 1


def test_dicom_without_window_is_min_max(tmp_path):
    arr = np.array([[-500, 0], [250, 1500]], np.int16)
    out = read_image(write_dicom(tmp_path, make_dicom(arr)))
    np.testing.assert_array_equal(out.pixels, [[0, 64], [96, 255]])  # (x + 500) / 2000 * 255
    assert any("full range of values shown" in n for n in out.notes)


def test_an_8bit_dicom_keeps_the_grey_levels_of_the_same_pixels_as_a_png(tmp_path):
    """One preprocessing for the same pixels: an 8-bit DICOM of an X-ray is not stretched
    (a stretch made it look unlike the model's training JPEGs and the guard flagged it)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(40, 200, (32, 48)).astype(np.uint8)  # no 0 or 255: a stretch would show
    dcm = read_image(write_dicom(tmp_path, make_dicom(arr)))
    png = read_image(save(tmp_path, "same.png", Image.fromarray(arr)))
    np.testing.assert_array_equal(dcm.pixels, png.pixels)
    assert dcm.notes == ("8-bit grey levels used as stored",)
    assert not any("min-max" in n for n in dcm.notes)
    # MONOCHROME1 (white is low) is still inverted
    inv = read_image(write_dicom(tmp_path, make_dicom(arr, photometric="MONOCHROME1")))
    np.testing.assert_array_equal(inv.pixels, 255 - arr)


def test_dicom_multi_frame_uses_first_frame(tmp_path):
    arr = np.stack([np.full((3, 4), v, np.uint16) for v in (0, 500, 1000)])
    arr[0, 0, 0] = 100  # give frame 0 its own range so min-max is well defined
    out = read_image(write_dicom(tmp_path, make_dicom(arr, frames=3)))
    assert out.pixels.shape == (3, 4) and out.pixels[0, 0] == 255 and out.pixels[1, 1] == 0
    assert "multi-frame DICOM (3 frames): used the first frame" in out.notes


def test_dicom_rgb(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)
    arr[1, 2] = (10, 20, 30)
    out = read_image(write_dicom(tmp_path, make_dicom(arr, photometric="RGB")))
    np.testing.assert_array_equal(out.pixels, arr)


def test_dicom_from_bytes_matches_path(tmp_path):
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    path = write_dicom(tmp_path, make_dicom(arr, bits_stored=12))
    a, b = read_image(path), read_image(path.read_bytes())
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert b.modality == "CT" and not leaks_patient(b)


def test_dicom_without_pixel_data(tmp_path):
    ds = make_dicom(None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SR_STORAGE
    path = write_dicom(tmp_path, ds, "report.dcm")
    assert is_dicom(path)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    msg = str(err.value)
    assert "report.dcm` has no pixel data" in msg and "Basic Text SR" in msg
    assert "export the image series" in msg
    assert "Doe" not in msg and "12345" not in msg


def _encapsulated(tsyntax: str) -> Dataset:
    ds = make_dicom(np.zeros((8, 8), np.uint8), tsyntax=tsyntax)
    ds.PixelData = encapsulate([b"\x00\x01junk-not-a-codestream" * 4])
    ds["PixelData"].VR = "OB"
    return ds


def _jpeg_dicom(header: tuple[int, int], frame: tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A DICOM whose Rows/Columns say ``header`` (w, h) over one ``frame``-sized codestream."""
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    ds = make_dicom(
        np.zeros(header[::-1], np.uint8),
        tsyntax=JPEGBaseline8Bit if fmt == "JPEG" else JPEG2000Lossless,
    )
    buf = io.BytesIO()
    ramp = np.tile(np.linspace(0, 255, frame[0]).astype(np.uint8), (frame[1], 1))
    Image.fromarray(ramp).save(buf, format=fmt)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    return dicom_bytes(ds)


def test_an_encapsulated_frame_larger_than_its_header_is_refused_before_decoding():
    ok = read_image(_jpeg_dicom((64, 48), (64, 48)), name="ok.dcm")
    assert ok.pixels.shape == (48, 64) and ok.pixels[:, 0].max() < 10 < 245 < ok.pixels[:, -1].min()
    with pytest.raises(ImageReadError, match="12500x12500 pixels .* more than the 1.0 MP"):
        read_image(_jpeg_dicom((64, 64), (12500, 12500)), name="big.dcm", max_pixels=1_000_000)
    with pytest.raises(
        ImageReadError, match="first frame is 80x64 pixels but the header says 64x64"
    ):
        read_image(_jpeg_dicom((64, 64), (80, 64)), name="odd.dcm")


def test_a_jpeg2000_frame_is_sized_from_its_header():
    from medlens.data.imaging import _codestream_size

    buf = io.BytesIO()
    Image.new("L", (300, 200), 0).save(buf, format="JPEG2000", no_jp2=True)
    assert _codestream_size(buf.getvalue()) == (300, 200)
    buf = io.BytesIO()
    Image.new("L", (300, 200), 0).save(buf, format="JPEG2000")  # JP2 file format
    assert _codestream_size(buf.getvalue()) == (300, 200)
    assert _codestream_size(b"\x00\x01junk") is None


@pytest.mark.parametrize("sof", [0xC0, 0xC1, 0xC2, 0xC3, 0xC7, 0xF7])  # baseline ... JPEG-LS
def test_jpeg_family_frames_are_sized_from_their_start_of_frame(sof):
    from medlens.data.imaging import _codestream_size

    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    frame = b"\xff" + bytes([sof]) + b"\x00\x0b\x08" + (12500).to_bytes(2, "big")
    frame += (9000).to_bytes(2, "big") + b"\x01\x01\x11\x00"
    assert _codestream_size(b"\xff\xd8" + app0 + frame) == (9000, 12500)
    assert _codestream_size(b"\xff\xd8" + app0) is None  # no frame header: unknown


def test_dicom_jpeg2000_junk_names_transfer_syntax(tmp_path):
    path = write_dicom(tmp_path, _encapsulated(JPEG2000Lossless), "j2k.dcm")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    msg = str(err.value)
    assert "j2k.dcm" in msg and "JPEG 2000 Image Compression" in msg
    assert "1.2.840.10008.1.2.4.90" in msg
    assert "\n" not in msg


def test_dicom_undecodable_transfer_syntax_says_what_to_install(tmp_path):
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    if JPEGLSLosslessDecoder.available_plugins:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(ImageReadError) as err:
        read_image(dicom_bytes(_encapsulated(JPEGLSLossless)), name="ls.dcm")
    msg = str(err.value)
    assert f"JPEG-LS Lossless Image Compression ({JPEGLSLossless})" in msg
    assert "cannot decode" in msg and "install pylibjpeg" in msg and "uncompressed DICOM" in msg


def test_corrupt_dicom_is_a_clear_error(tmp_path):
    data = dicom_bytes(make_dicom(np.zeros((64, 64), np.uint16)))
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:-4000])  # pixel data cut short
    with pytest.raises(ImageReadError, match=r"cut\.dcm` is not a readable DICOM file \(.*pixel"):
        read_image(path)
    path.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # cut before the (7FE0,0010) tag
    with pytest.raises(ImageReadError, match=r"cut\.dcm` has no pixel data .*probably truncated"):
        read_image(path)


def test_preamble_less_dicom(tmp_path):
    ds = make_dicom(np.array([[0, 10], [20, 30]], np.uint16))
    del ds.file_meta
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    assert is_dicom(path) and is_dicom(path.read_bytes())
    out = read_image(path)
    assert out.source_format == "DICOM"
    np.testing.assert_array_equal(out.pixels, [[0, 85], [170, 255]])


def test_is_dicom(tmp_path):
    data = dicom_bytes(make_dicom(np.zeros((2, 2), np.uint16)))
    assert is_dicom(data)
    assert is_dicom(write_dicom(tmp_path, make_dicom(np.zeros((2, 2), np.uint8))))
    png = io.BytesIO()
    Image.new("L", (2, 2)).save(png, "PNG")
    assert not is_dicom(png.getvalue())
    assert not is_dicom(b"") and not is_dicom(b"\x02\x00 not really dicom")


def test_16bit_rgb_png_becomes_8bit_rgb():
    chunk = png_chunk
    arr = np.zeros((2, 4, 3), ">u2")  # Pillow cannot write 48-bit PNGs, so build one by hand
    arr[0, 0] = (65535, 0, 0)
    arr[1, 3] = (0x1234, 0x8000, 0xFFFF)
    raw = b"".join(b"\0" + row.tobytes() for row in arr)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 2, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    out = read_image(png)
    assert out.pixels.shape == (2, 4, 3) and out.pixels.dtype == np.uint8
    assert tuple(out.pixels[0, 0]) == (255, 0, 0) and tuple(out.pixels[1, 3]) == (0x12, 0x80, 0xFF)


def test_dicom_ybr_full_converted_to_rgb(tmp_path):
    from pydicom.pixels import convert_color_space

    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[1, 1] = (200, 30, 60), (128, 128, 128), (255, 255, 255)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = make_dicom(ybr, photometric="RGB")
    ds.PhotometricInterpretation = "YBR_FULL"
    out = read_image(write_dicom(tmp_path, ds))
    assert out.pixels.shape == (2, 2, 3)
    assert np.abs(out.pixels.astype(int) - rgb).max() <= 2
    assert "YBR_FULL converted to RGB" in out.notes


def test_dicom_voi_lut_sequence(tmp_path):
    arr = np.array([[0, 1], [2, 3], [10, 3]], np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUTDescriptor: 4 entries, first maps 0, 8 bits
    item.add_new(0x00283006, "US", [0, 40, 120, 200])  # LUTData (ambiguous VR: pin US)
    # A window is present too: the LUT wins, as in pydicom's apply_voi_lut.
    ds = make_dicom(arr, bits_stored=12, WindowCenter=1, WindowWidth=1)
    ds.VOILUTSequence = [item]
    out = read_image(dicom_bytes(ds))
    np.testing.assert_array_equal(out.pixels, [[0, 51], [153, 255], [255, 255]])  # x * 255 / 200
    assert "VOI LUT from the file applied" in out.notes
