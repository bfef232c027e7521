"""Tests for medlens.preprocess (the one preprocessing spec, augmentation) and medlens.cache
(decode-once preparation, the optional on-disk copy)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.config import AugmentSpec
from medlens.data.augment import augment
from medlens.data.cache import is_colour, prepare_samples
from medlens.data.datasets import Sample
from medlens.data.imaging import read_image
from medlens.data.preprocess import Preprocess, compute_mean_std


def _grey(h=40, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(h=40, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("source", ["grey", "rgb"])
@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_prepare_shape_and_dtype(channels, source, resize):
    pre = Preprocess(
        image_size=24,
        channels=channels,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        resize=resize,
    )
    pixels = _grey() if source == "grey" else _rgb()
    out = pre.prepare(pixels)
    assert out.dtype == np.uint8
    assert out.shape == (channels, 24, 24)
    assert out.flags.c_contiguous
    x = pre(pixels)
    assert x.dtype == torch.float32 and x.shape == (channels, 24, 24)


def test_prepare_grey_to_rgb_replicates_and_rgb_to_grey_uses_luma():
    grey = _grey(24, 24)
    pre3 = Preprocess(image_size=24, channels=3)
    out = pre3.prepare(grey)
    assert np.array_equal(out[0], grey) and np.array_equal(out[1], grey)
    assert np.array_equal(out[2], grey)

    rgb = np.zeros((24, 24, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: ITU-R 601 luma 0.299 * 255 = 76
    pre1 = Preprocess(image_size=24, channels=1, mean=(0.5,), std=(0.25,))
    out1 = pre1.prepare(rgb)
    assert out1.shape == (1, 24, 24)
    assert np.all(np.abs(out1.astype(int) - 76) <= 1)


def test_prepare_same_size_is_exact_and_keeps_rgb_channel_order():
    rgb = _rgb(16, 16)
    out = Preprocess(image_size=16, channels=3).prepare(rgb)
    assert np.array_equal(out, rgb.transpose(2, 0, 1))


def test_pad_keeps_aspect_ratio_with_black_bars():
    white = np.full((50, 100), 255, np.uint8)  # 100 wide, 50 high
    pre = Preprocess(image_size=64, channels=1, mean=(0.5,), std=(0.25,), resize="pad")
    out = pre.prepare(white)[0]
    assert out.shape == (64, 64)
    assert np.all(out[:16] == 0) and np.all(out[48:] == 0)  # black rows top and bottom
    assert np.all(out[16:48] == 255)  # the image, full width
    # A tall image gets bars left and right instead.
    tall = pre.prepare(np.full((100, 50), 255, np.uint8))[0]
    assert np.all(tall[:, :16] == 0) and np.all(tall[:, 48:] == 0)
    assert np.all(tall[:, 16:48] == 255)

    stretched = Preprocess(image_size=64, channels=1, mean=(0.5,), std=(0.25,)).prepare(white)
    assert np.all(stretched == 255)


def test_prepare_rejects_non_uint8_and_bad_ndim():
    pre = Preprocess(image_size=16)
    with pytest.raises(ValueError, match="uint8"):
        pre.prepare(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        pre.prepare(np.zeros((2, 8, 8, 3), np.uint8))


def test_prepare_output_is_writable_so_torch_does_not_warn():
    pre = Preprocess(image_size=16, channels=1, mean=(0.5,), std=(0.25,))
    assert pre.prepare(_grey()).flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre(_grey())


# --------------------------------------------------------------------------- normalize


def test_normalize_is_exactly_scaled_and_standardised():
    mean, std = (0.1, 0.4, 0.7), (0.2, 0.3, 0.5)
    pre = Preprocess(image_size=8, channels=3, mean=mean, std=std)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    out = pre.normalize(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    expected = (
        x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    ) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    # Known values: 0 -> -mean/std, 255 -> (1-mean)/std.
    edge = pre.normalize(
        torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2).contiguous()
    )
    for c in range(3):
        assert edge[0, c, 0, 0].item() == pytest.approx(-mean[c] / std[c], abs=1e-6)
        assert edge[0, c, 0, 1].item() == pytest.approx((1 - mean[c]) / std[c], abs=1e-6)
    # (C,S,S) input gives (C,S,S) output, same values; the input is not modified.
    single = x[0].clone()
    torch.testing.assert_close(pre.normalize(single), out[0])
    assert torch.equal(single, x[0])


def test_call_equals_prepare_then_normalize():
    pre = Preprocess(image_size=20, channels=1, mean=(0.3,), std=(0.2,))
    pixels = _grey()
    torch.testing.assert_close(pre(pixels), pre.normalize(torch.from_numpy(pre.prepare(pixels))))


# --------------------------------------------------------------------------- spec


def test_to_dict_from_dict_round_trip():
    pre = Preprocess(
        image_size=96,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        resize="pad",
    )
    d = pre.to_dict()
    assert d == {
        "image_size": 96,
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize": "pad",
        "grayscale": False,
    }
    import json

    back = Preprocess.from_dict(json.loads(json.dumps(d)))
    assert back == pre
    # Unknown keys (a newer model.json) are ignored; missing ones take defaults.
    assert Preprocess.from_dict({**d, "future": 1}) == pre
    assert Preprocess.from_dict({"image_size": 32}) == Preprocess(image_size=32)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(channels=2), "preprocess.channels"),
        (dict(channels=1), "preprocess.mean/std"),  # 3 default means for 1 channel
        (dict(std=(0.2, 0.0, 0.2)), "preprocess.std"),
        (dict(resize="fit"), "preprocess.resize"),
        (dict(image_size=4), "preprocess.image_size"),
        (dict(image_size=4096), "preprocess.image_size"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        Preprocess(**kwargs)
    assert field in str(e.value)


def test_geometry_key_depends_on_geometry_only():
    a = Preprocess(image_size=32, channels=1, mean=(0.5,), std=(0.25,))
    assert (
        a.geometry_key()
        == Preprocess(image_size=32, channels=1, mean=(0.1,), std=(0.9,)).geometry_key()
    )
    assert (
        a.geometry_key()
        != Preprocess(image_size=33, channels=1, mean=(0.5,), std=(0.25,)).geometry_key()
    )
    assert a.geometry_key() != Preprocess(image_size=32, channels=3).geometry_key()
    assert (
        a.geometry_key()
        != Preprocess(
            image_size=32, channels=1, mean=(0.5,), std=(0.25,), resize="pad"
        ).geometry_key()
    )
    assert (
        Preprocess(image_size=32, grayscale=True).geometry_key()
        != Preprocess(image_size=32).geometry_key()
    )


def test_crop_keeps_the_centre_square_without_distortion_or_bars():
    img = np.zeros((60, 100), np.uint8)
    img[:, 20:80] = 200  # the centre 60x60 square is bright; the sides are black
    out = Preprocess(image_size=30, channels=1, mean=(0.5,), std=(0.25,), resize="crop").prepare(
        img
    )
    assert out.shape == (1, 30, 30) and out.min() == 200  # the sides were cut off
    pad = Preprocess(image_size=30, channels=1, mean=(0.5,), std=(0.25,), resize="pad").prepare(img)
    assert pad.min() == 0  # letterboxing keeps them (and adds bars)


def test_grayscale_makes_rgb_and_grey_files_of_one_picture_identical():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).copy()
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 3, 0, 255)  # JPEG-like chroma noise
    pre = Preprocess(image_size=32, grayscale=True)
    a, b = pre.prepare(grey), pre.prepare(rgb)
    assert a.shape == (3, 32, 32)
    assert (a[0] == a[1]).all() and (b[0] == b[2]).all()  # three equal channels
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert not (
        Preprocess(image_size=32).prepare(rgb)[0] == Preprocess(image_size=32).prepare(rgb)[1]
    ).all()  # without it the cue survives


def test_compute_mean_std():
    x = np.zeros((4, 2, 8, 8), np.uint8)
    x[:, 0] = 51  # constant channel: mean 0.2, std floored at 1e-3
    x[:2, 1] = 255  # half white, half black: mean 0.5, std 0.5
    mean, std = compute_mean_std(x, chunk=3)  # chunking must not change the result
    assert mean == pytest.approx([0.2, 0.5], abs=1e-6)
    assert std == pytest.approx([1e-3, 0.5], abs=1e-6)


def test_is_colour():
    grey = _grey(16, 16)
    assert not is_colour(grey)
    assert not is_colour(np.stack([grey] * 3, -1))
    assert is_colour(_rgb(16, 16))


# --------------------------------------------------------------------------- augment


def _batch(seed=0):
    return torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


def test_augment_is_deterministic_given_a_generator_seed():
    x, spec = _batch(), AugmentSpec()
    a = augment(x.clone(), spec, torch.Generator().manual_seed(7))
    b = augment(x.clone(), spec, torch.Generator().manual_seed(7))
    c = augment(x.clone(), spec, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, x)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1


def test_augment_keeps_range_under_strong_settings():
    spec = AugmentSpec(rotation=45, shift=0.3, zoom=0.5, brightness=0.8, contrast=0.8)
    out = augment(_batch(), spec, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 24, 24)
    assert out.min() >= 0 and out.max() <= 1


def test_augment_disabled_returns_the_input_unchanged():
    x = _batch()
    out = augment(x, AugmentSpec(enabled=False), torch.Generator().manual_seed(0))
    assert out is x


def test_augment_with_zero_ranges_is_the_identity_and_flip_only_flips():
    x = _batch()
    still = AugmentSpec(rotation=0, shift=0, zoom=0, hflip=False, brightness=0, contrast=0)
    torch.testing.assert_close(
        augment(x, still, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0
    )
    flip_only = AugmentSpec(rotation=0, shift=0, zoom=0, hflip=True, brightness=0, contrast=0)
    x = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    out = augment(x, flip_only, torch.Generator().manual_seed(3))
    flipped = 0
    for i in range(len(x)):
        if torch.allclose(out[i], x[i], atol=1e-5):
            continue
        torch.testing.assert_close(out[i], x[i].flip(-1), atol=1e-5, rtol=0)
        flipped += 1
    assert 0 < flipped < len(x)  # p = 0.5 each: both outcomes occur among 16 draws


def test_augment_spec_round_trip():
    spec = AugmentSpec(rotation=5, hflip=False)
    assert AugmentSpec.from_dict(spec.to_dict()) == spec
    assert AugmentSpec.from_dict(None) == AugmentSpec()


# --------------------------------------------------------------------------- cache


def _write_pngs(folder: Path, n: int, colour: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = _rgb(30 + i, 40, seed=i) if colour else _grey(30 + i, 40, seed=i)
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("channels, colour", [(1, False), (3, True), (3, False)])
def test_cached_and_uncached_paths_give_identical_inputs(tmp_path, channels, colour):
    paths = _write_pngs(tmp_path / "imgs", 5, colour)
    pre = Preprocess(
        image_size=24, channels=channels, mean=(0.4,) * channels, std=(0.3,) * channels
    )
    samples = [Sample(str(p), 0) for p in paths]
    res = prepare_samples(samples, pre, workers=1, progress=False)
    assert res.errors == [] and res.keep == list(range(5))
    assert res.pixels.shape == (5, channels, 24, 24) and res.pixels.dtype == np.uint8
    cached = pre.normalize(torch.from_numpy(np.ascontiguousarray(res.pixels)))
    direct = torch.stack([pre(read_image(p).pixels) for p in paths])
    assert torch.equal(cached, direct)


def test_prepare_samples_cache_dir_writes_npy_and_reuses_it(tmp_path):
    paths = _write_pngs(tmp_path / "imgs", 4)
    empty = tmp_path / "imgs" / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "imgs" / "notes.png"
    text.write_text("not an image")
    samples = [Sample(str(p), 0) for p in [paths[0], empty, *paths[1:3], text, paths[3]]]
    pre = Preprocess(image_size=16, channels=1, mean=(0.5,), std=(0.25,))
    cache = tmp_path / "cache"

    first = prepare_samples(samples, pre, workers=1, progress=False, cache_dir=cache)
    assert first.keep == [0, 2, 3, 5]
    assert [src for src, _ in first.errors] == [str(empty), str(text)]
    assert "empty" in first.errors[0][1] and "not an image" in first.errors[1][1]
    assert first.pixels.shape == (4, 1, 16, 16)
    npys = list(cache.glob("*.npy"))
    assert len(npys) == 1 and len(list(cache.glob("*.json"))) == 1
    assert not list(cache.glob(".*.tmp"))
    assert np.array_equal(np.load(npys[0]), first.pixels)

    second = prepare_samples(samples, pre, workers=1, progress=False, cache_dir=cache)
    assert isinstance(second.pixels, np.memmap)  # read back, not decoded again
    assert np.array_equal(second.pixels, first.pixels)
    assert second.keep == first.keep and second.errors == first.errors
    # Writable for torch without a warning, yet writes never reach the cache file.
    assert second.pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.as_tensor(second.pixels[:2])
    second.pixels[0] = 7
    assert np.array_equal(np.load(npys[0]), first.pixels)

    # Another geometry is another cache entry.
    other = prepare_samples(
        samples,
        Preprocess(image_size=20, channels=1, mean=(0.5,), std=(0.25,)),
        workers=1,
        progress=False,
        cache_dir=cache,
    )
    assert other.pixels.shape == (4, 1, 20, 20)
    assert len(list(cache.glob("*.npy"))) == 2


def test_prepare_samples_cache_invalidated_when_a_file_changes(tmp_path):
    import os

    paths = _write_pngs(tmp_path / "imgs", 2)
    pre = Preprocess(image_size=16, channels=1, mean=(0.5,), std=(0.25,))
    samples = [Sample(str(p), 0) for p in paths]
    first = prepare_samples(samples, pre, workers=1, progress=False, cache_dir=tmp_path / "c")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(paths[0])
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = prepare_samples(samples, pre, workers=1, progress=False, cache_dir=tmp_path / "c")
    assert np.all(second.pixels[0] == 0)
    assert np.array_equal(second.pixels[1], first.pixels[1])


def test_prepare_samples_without_cache_dir_writes_nothing(tmp_path):
    paths = _write_pngs(tmp_path / "imgs", 2)
    before = sorted(tmp_path.rglob("*"))
    prepare_samples(
        [Sample(str(p), 0) for p in paths], Preprocess(image_size=16), workers=1, progress=False
    )
    assert sorted(tmp_path.rglob("*")) == before


def test_training_decodes_a_large_jpeg_as_the_web_app_does(tmp_path):
    """Training (prepare_samples) and serving (read_image of the upload bytes with the model's
    size) decode a large JPEG at the same reduced scale, so the network sees the same pixels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:800, :1000]
    arr = np.stack(
        [(xx / 4) % 256, (yy / 4) % 256, rng.integers(0, 256, (800, 1000))], axis=2
    ).astype(np.uint8)
    path = tmp_path / "throat.jpg"
    Image.fromarray(arr).save(path, quality=90)
    pre = Preprocess(image_size=64, resize="crop")
    res = prepare_samples([Sample(str(path), 0)], pre, workers=1, progress=False)
    served = pre.prepare(read_image(path.read_bytes(), target_size=64).pixels)
    assert np.array_equal(res.pixels[0], served)
    full = pre.prepare(read_image(path).pixels)  # without the hint: full-size decode
    assert not np.array_equal(full, served)


# --------------------------------------------------------------------------- acquisition shift

SHIFT_OFF = dict(rotation=0, shift=0, zoom=0, hflip=False, brightness=0, contrast=0)


def test_acquisition_shift_transforms_are_off_by_default(monkeypatch):
    import medlens.data.augment as aug_mod

    def boom(*a, **k):
        raise AssertionError("kornia pipeline used although every shift transform is off")

    monkeypatch.setattr(aug_mod, "_acquisition_shift", boom)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    augment(x, AugmentSpec(), torch.Generator().manual_seed(1))  # must not call kornia


@pytest.mark.parametrize("field", ["crop_scale", "gamma", "blur", "sharpen", "noise", "clahe"])
def test_each_acquisition_shift_transform_changes_images_reproducibly(field):
    x = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    spec = AugmentSpec(**SHIFT_OFF, **{field: 0.3 if field != "noise" else 0.05})
    global_state = torch.random.get_rng_state()
    a = augment(x.clone(), spec, torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), global_state)  # kornia's draws are forked
    b = augment(x.clone(), spec, torch.Generator().manual_seed(5))
    c = augment(x.clone(), spec, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x) or not torch.equal(c, x)  # something was changed
    assert not torch.equal(a, c)  # other draws, other images


def test_gamma_moves_a_grey_level_within_its_range():
    x = torch.full((8, 1, 16, 16), 0.25)
    out = augment(x, AugmentSpec(**SHIFT_OFF, gamma=0.3), torch.Generator().manual_seed(2))
    per_image = out.mean((1, 2, 3))
    assert torch.allclose(out, per_image.view(-1, 1, 1, 1).expand_as(out))  # one gamma per image
    assert float(per_image.min()) >= 0.25**1.3 - 1e-4 and float(per_image.max()) <= 0.25**0.7 + 1e-4
    assert len(set(per_image.round(decimals=4).tolist())) > 1


def test_noise_has_the_asked_standard_deviation():
    x = torch.full((40, 1, 32, 32), 0.5)
    out = augment(x, AugmentSpec(**SHIFT_OFF, noise=0.05), torch.Generator().manual_seed(3))
    sd = (out - x).std(dim=(1, 2, 3))
    noisy = sd > 0.01
    assert 5 < int(noisy.sum()) < 35  # about half the images (p = 0.5)
    assert float(sd[noisy].mean()) == pytest.approx(0.05, rel=0.1)


def test_stamp_puts_one_solid_white_box_near_an_edge_on_the_chosen_share():
    x = torch.full((40, 1, 64, 64), 0.3)
    out = augment(x, AugmentSpec(**SHIFT_OFF, stamp=0.5), torch.Generator().manual_seed(4))
    stamped = (out == 1.0).flatten(1).any(1)
    assert 10 < int(stamped.sum()) < 30  # about half the images
    assert torch.equal(out[~stamped], x[~stamped])  # the others are untouched
    for img in out[stamped][:, 0]:
        rows = torch.nonzero((img == 1.0).any(1)).flatten()
        cols = torch.nonzero((img == 1.0).any(0)).flatten()
        box = img[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert bool((box == 1.0).all())  # one solid rectangle
        assert 16 <= len(cols) <= 36 and 3 <= len(rows) <= 12
        assert rows.max() >= 64 - 8 or rows.min() <= 7  # touching the bottom or top band
    again = augment(x, AugmentSpec(**SHIFT_OFF, stamp=0.5), torch.Generator().manual_seed(4))
    assert torch.equal(out, again)


def test_downscale_loses_fine_detail_but_keeps_the_picture():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 64, 64, generator=g)
    out = augment(x, AugmentSpec(**SHIFT_OFF, downscale=1.0), torch.Generator().manual_seed(1))

    # fine (pixel-to-pixel) variation shrinks; the mean level stays
    def detail(t):
        return (t[..., 1:] - t[..., :-1]).abs().mean()

    assert float(detail(out)) < 0.7 * float(detail(x))
    assert float((out.mean() - x.mean()).abs()) < 0.01
    assert float(out.min()) >= 0 and float(out.max()) <= 1
