"""Tests for medlens.data.datasets (and splits): layouts, patient-grouped splits, errors, unreadable images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.data import datasets as data
from medlens.data.datasets import Sample, load_dataset
from medlens.data.splits import patient_id, split_grouped
from medlens.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- fixtures


def _img(path: Path, value: int = 0) -> Path:
    """Write an 8x8 grayscale image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _kermany(root: Path, n_patients: int = 20, first: int = 0) -> list[Path]:
    """Kermany-like class folders: every patient has 2-3 images, so grouping matters."""
    files = []
    for p in range(first, first + n_patients):
        files += [
            _img(root / "NORMAL" / f"IM-{p:04d}-0001.jpeg"),
            _img(root / "NORMAL" / f"IM-{p:04d}-0002.jpeg"),
        ]
        files.append(_img(root / "NORMAL" / f"NORMAL2-IM-{p:04d}-0001.jpeg"))  # a different patient
        files += [
            _img(root / "PNEUMONIA" / f"person{p}_bacteria_{p * 10}.jpeg", 200),
            _img(root / "PNEUMONIA" / f"person{p}_virus_{p * 10 + 1}.jpeg", 200),
        ]
    return files


def _patients(samples) -> set[str]:
    return {s.patient for s in samples if s.patient is not None}


def _assert_partition(ds, files):
    """Splits hold every file exactly once and no patient straddles two splits."""
    sources = [s.source for split in ds.splits.values() for s in split]
    assert sorted(sources) == sorted(str(f) for f in files)
    names = list(ds.splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not _patients(ds.splits[a]) & _patients(ds.splits[b]), (a, b)


# --------------------------------------------------------------------------- patient ids


@pytest.mark.parametrize(
    "name, expected",
    [
        ("person1234_bacteria_5678.jpeg", "person1234"),
        ("person1234_virus_99.jpeg", "person1234"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0115-0001.jpeg", "NORMAL2-IM-0115"),  # another series: not IM-0115
        ("00001280_004.png", "00001280"),  # NIH ChestX-ray8
        ("Tr-glTr_0000.jpg", None),
        ("scan.png", None),
    ],
)
def test_patient_id_default_reads_kermany_names(name, expected):
    assert patient_id(f"/some/folder/{name}") == expected


def test_patient_id_custom_regex_and_bad_regex(tmp_path):
    assert patient_id("/x/sub-07_ses-2.png", r"sub-(\d+)") == "07"
    assert patient_id("/x/a_P12_b.png", r"(?P<site>a)_(?P<patient>P\d+)") == "P12"
    assert patient_id("/x/P12.png", r"P\d+") == "P12"  # no group: the whole match
    assert patient_id("/sub-07/scan.png", r"sub-(\d+)") is None  # file name only
    with pytest.raises(DataError, match="--patient-regex"):
        patient_id("a.png", "person(")
    _kermany(tmp_path, 3)
    with pytest.raises(DataError, match="--patient-regex"):
        load_dataset(tmp_path, patient_regex="(unclosed")


# --------------------------------------------------------------------------- listing


def test_list_images_recursive_sorted_skips_hidden(tmp_path):
    _img(tmp_path / "b" / "deep" / "x.PNG")
    _img(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    _img(tmp_path / ".hidden" / "h.png")
    _img(tmp_path / "__MACOSX" / "._a.jpg")
    assert data.list_images(tmp_path) == [
        str(tmp_path / "a.jpg"),
        str(tmp_path / "b" / "deep" / "x.PNG"),
    ]
    with pytest.raises(DataError, match="nope"):
        data.list_images(tmp_path / "nope")


# --------------------------------------------------------------------------- splitting


def test_class_folders_split_is_stratified_grouped_and_deterministic(tmp_path):
    files = _kermany(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.layout == "class_folders"
    assert ds.classes == ["NORMAL", "PNEUMONIA"]
    assert list(ds.splits) == ["train", "val", "test"]
    _assert_partition(ds, files)
    for split, counts in ds.counts().items():
        assert all(n > 0 for n in counts.values()), split
    n = len(files)
    assert 0.07 * n <= len(ds.splits["test"]) <= 0.25 * n
    assert 0.07 * n <= len(ds.splits["val"]) <= 0.25 * n
    assert any("class_folders" in note for note in ds.notes)
    assert any("test carved" in note and "seed 0" in note for note in ds.notes)

    again = load_dataset(tmp_path)
    assert again.splits == ds.splits
    other = load_dataset(tmp_path, seed=1)
    assert other.splits["test"] != ds.splits["test"]
    _assert_partition(other, files)


def test_split_grouped_keeps_patients_together_and_ungrouped_samples_alone():
    samples = [Sample(f"p{i // 3}_{i}.png", i % 2, f"p{i // 3}") for i in range(60)]
    samples += [Sample(f"u{i}.png", i % 2, None) for i in range(40)]
    rest, held = split_grouped(samples, 0.2, seed=3)
    assert sorted(rest + held, key=lambda s: s.source) == sorted(samples, key=lambda s: s.source)
    assert not _patients(rest) & _patients(held)
    assert 10 <= len(held) <= 30
    assert any(s.patient is None for s in held) and any(s.patient is None for s in rest)
    assert split_grouped(samples, 0.2, seed=3) == (rest, held)
    # A single group cannot be split: nothing is held out rather than leaking.
    assert split_grouped([Sample(f"{i}.png", i % 2, "same") for i in range(10)], 0.2)[1] == []


def test_split_folders_val_present_missing_tiny_and_aliases(tmp_path):
    train = _kermany(tmp_path / "a" / "train", 20)
    test = _kermany(tmp_path / "a" / "test", 4, first=100)
    val = _kermany(tmp_path / "a" / "val", 8, first=200)  # 40 images >= min_val
    ds = load_dataset(tmp_path / "a")
    assert ds.layout == "split_folders"
    assert [s.source for s in ds.splits["val"]] == sorted(str(f) for f in val)
    assert len(ds.splits["train"]) == len(train) and len(ds.splits["test"]) == len(test)

    # Missing val: carved from train patients, test untouched.
    _kermany(tmp_path / "b" / "train", 20)
    _kermany(tmp_path / "b" / "test", 4, first=100)
    ds = load_dataset(tmp_path / "b")
    assert set(ds.splits) == {"train", "val", "test"}
    _assert_partition(ds, data.list_images(tmp_path / "b"))
    assert any("val carved from train" in n for n in ds.notes)

    # Tiny val: merged into train first, then carved.
    _kermany(tmp_path / "c" / "train", 20)
    tiny = _kermany(tmp_path / "c" / "validation", 1, first=300)  # "validation" accepted
    ds = load_dataset(tmp_path / "c")
    assert any("only 5 images" in n and "merged into train" in n for n in ds.notes)
    assert any("val carved from train" in n for n in ds.notes)
    _assert_partition(ds, data.list_images(tmp_path / "c"))
    assert {str(f) for f in tiny} <= {s.source for s in ds.splits["train"] + ds.splits["val"]}

    # "valid" is val too, and a large enough one is kept as given.
    _kermany(tmp_path / "d" / "train", 10)
    _kermany(tmp_path / "d" / "valid", 8, first=200)
    assert len(load_dataset(tmp_path / "d").splits["val"]) == 40


def test_split_folders_warn_about_patients_shared_between_given_splits(tmp_path):
    _kermany(tmp_path / "train", 10)
    _kermany(tmp_path / "test", 2)  # patients 0 and 1 again
    ds = load_dataset(tmp_path)
    assert any("WARNING: 6 patients appear in more than one given split" in n for n in ds.notes)


def test_split_folders_mixed_with_other_folders_is_an_error(tmp_path):
    _kermany(tmp_path / "train", 3)
    _kermany(tmp_path / "NORMAL_extra", 1)
    with pytest.raises(DataError, match="mixes split folders.*NORMAL_extra"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- CSV manifests


def _manifest(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_with_patient_and_split_columns(tmp_path):
    rows = []
    for p in range(30):
        split = "test" if p < 6 else "val" if p < 14 else "train"
        for k in range(2):
            f = _img(tmp_path / "imgs" / f"scan{p}_{k}.png")
            rows.append(f"imgs/{f.name},{'sick' if p % 2 else 'healthy'},P{p},{split}")
    rows[0] = f"{tmp_path / 'imgs' / 'scan0_0.png'},healthy,P0,test"  # absolute paths work too
    ds = load_dataset(
        _manifest(tmp_path / "m.csv", "path,label,patient_id,split", rows), min_val=10
    )
    assert ds.layout == "csv" and ds.classes == ["healthy", "sick"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 32, "val": 16, "test": 12}
    assert ds.splits["test"][0] == Sample(str(tmp_path / "imgs" / "scan0_0.png"), 0, "P0")
    assert any("patient_id column" in n for n in ds.notes)

    every = load_dataset(tmp_path / "m.csv", mode="all")
    assert list(every.splits) == ["all"] and len(every.splits["all"]) == 60


def test_csv_without_patient_or_split_columns_is_split_here(tmp_path):
    files = _kermany(tmp_path / "imgs", 20)
    rows = [f"imgs/{f.parent.name}/{f.name},{f.parent.name}" for f in files]
    ds = load_dataset(_manifest(tmp_path / "m.csv", "path,label", rows))
    assert list(ds.splits) == ["train", "val", "test"]
    _assert_partition(ds, files)
    assert ds.splits["train"][0].patient is not None  # from the file name


def test_csv_integer_labels_sort_numerically(tmp_path):
    rows = [f"{_img(tmp_path / f'{i}.png').name},{i % 11}" for i in range(33)]
    ds = load_dataset(_manifest(tmp_path / "m.csv", "path,label", rows), mode="all")
    assert ds.classes == [str(i) for i in range(11)]


def test_csv_errors_name_file_line_and_column(tmp_path):
    _img(tmp_path / "ok.png")
    m = _manifest(tmp_path / "m.csv", "path,label", ["ok.png,a", "gone.png,b", "ok.png,b"])
    with pytest.raises(
        DataError, match=r"m\.csv: 1 listed files do not exist \(line 3: gone\.png\)"
    ):
        load_dataset(m)
    m = _manifest(tmp_path / "m2.csv", "path,patient_id", ["ok.png,P1"])
    with pytest.raises(
        DataError, match=r"m2\.csv has no 'label' column \(columns: path, patient_id\)"
    ):
        load_dataset(m)
    m = _manifest(tmp_path / "m3.csv", "path,label,split", ["ok.png,a,training-ish"])
    with pytest.raises(DataError, match=r"m3\.csv line 2: split 'training-ish'"):
        load_dataset(m)
    rows = [f"missing{i}.png,a" for i in range(12)]
    with pytest.raises(DataError, match="12 listed files.*and 2 more"):
        load_dataset(_manifest(tmp_path / "m4.csv", "path,label", rows))


# --------------------------------------------------------------------------- npz


def _npz(path: Path, sizes=(40, 10, 12), flat_labels=False, **drop) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 2).astype(np.uint8)
        arrays[f"{split}_labels"] = labels if flat_labels else labels[:, None]
    for key in drop:
        arrays.pop(key)
    np.savez_compressed(path, **arrays)
    return path


def test_npz_official_splits_and_loading(tmp_path):
    f = _npz(tmp_path / "mini.npz")
    ds = load_dataset(f)
    assert ds.layout == "npz" and ds.classes == ["0", "1"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 40, "val": 10, "test": 12}
    s = ds.splits["val"][3]
    assert s.source == f"npz:{f}#val/3" and s.label == 1 and s.patient is None
    with np.load(f) as z:
        np.testing.assert_array_equal(s.load(), z["val_images"][3])
    assert str(f) in data._NPZ_CACHE  # opened once, reused by every sample

    named = load_dataset(
        _npz(tmp_path / "flat.npz", flat_labels=True), classes=["normal", "pneumonia"]
    )
    assert named.classes == ["normal", "pneumonia"] and named.splits["train"][1].label == 1

    every = load_dataset(f, mode="all")
    assert list(every.splits) == ["all"] and len(every.splits["all"]) == 12
    assert every.splits["all"][0].source.endswith("#test/0")
    assert any("test split only" in n for n in every.notes)


def test_npz_errors(tmp_path):
    f = _npz(tmp_path / "partial.npz", val_images=1, val_labels=1)
    with pytest.raises(
        DataError,
        match=r"lacks arrays val_images, val_labels \(present: test_images, test_labels, "
        r"train_images, train_labels\)",
    ):
        load_dataset(f)
    assert len(load_dataset(f, mode="all").splits["all"]) == 12  # evaluation needs test only

    rng = np.random.default_rng(0)
    bad = tmp_path / "mismatch.npz"
    np.savez(
        bad,
        **{
            f"{s}_images": rng.integers(0, 255, (5, 4, 4), dtype=np.uint8)
            for s in ("train", "val", "test")
        },
        **{f"{s}_labels": np.zeros((4, 1), np.uint8) for s in ("train", "val", "test")},
    )
    with pytest.raises(DataError, match="mismatch.npz: train_images has shape"):
        load_dataset(bad)
    with pytest.raises(DataError, match="only 1 classes were given"):
        load_dataset(_npz(tmp_path / "ok.npz"), classes=["one"])


# --------------------------------------------------------------------------- modes and classes


def test_mode_all_and_class_mapping(tmp_path):
    files = _kermany(tmp_path / "train", 5) + _kermany(tmp_path / "test", 2, first=50)
    ds = load_dataset(tmp_path, mode="all")
    assert list(ds.splits) == ["all"]
    assert sorted(s.source for s in ds.splits["all"]) == sorted(str(f) for f in files)
    assert any("merged train, test" in n for n in ds.notes)

    mapped = load_dataset(tmp_path / "test", mode="all", classes=["PNEUMONIA", "NORMAL", "COVID"])
    assert mapped.classes == ["PNEUMONIA", "NORMAL", "COVID"]
    assert {Path(s.source).parent.name: s.label for s in mapped.splits["all"]} == {
        "PNEUMONIA": 0,
        "NORMAL": 1,
    }

    with pytest.raises(
        DataError, match=r"unknown class names in .*test: NORMAL; expected: PNEUMONIA, COVID"
    ):
        load_dataset(tmp_path / "test", mode="all", classes=["PNEUMONIA", "COVID"])

    # Evaluating a model on one class's images is allowed when the classes are known.
    only = load_dataset(tmp_path / "test", mode="all", classes=["NORMAL", "PNEUMONIA"])
    assert len(only.splits["all"]) == 10


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} does not exist"):
        load_dataset(tmp_path / "missing")

    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"no images found under .*empty; expected <root>/<class>/<image>"
    ):
        load_dataset(tmp_path / "empty")

    _img(tmp_path / "loose" / "a.png")
    with pytest.raises(DataError, match="1 images directly in .*loose but no class folders"):
        load_dataset(tmp_path / "loose")

    _kermany(tmp_path / "hollow", 2)
    (tmp_path / "hollow" / "COVID").mkdir()
    (tmp_path / "hollow" / "COVID" / "readme.txt").write_text("x")
    with pytest.raises(
        DataError, match=r"class folder .*hollow/COVID has no images; remove it or add images"
    ):
        load_dataset(tmp_path / "hollow")

    _img(tmp_path / "single" / "NORMAL" / "a.png")
    with pytest.raises(
        DataError, match=r"only one class \(NORMAL\) found in .*single; .*at least two"
    ):
        load_dataset(tmp_path / "single")

    _kermany(tmp_path / "nested" / "chest_xray", 2)
    with pytest.raises(DataError, match="one level down"):
        load_dataset(tmp_path / "nested")

    with pytest.raises(DataError, match="val_fraction"):
        load_dataset(tmp_path / "hollow", val_fraction=1.5)


def test_counts_and_summary(tmp_path):
    _kermany(tmp_path, 20)
    ds = load_dataset(tmp_path)
    counts = ds.counts()
    assert sum(sum(c.values()) for c in counts.values()) == 100
    text = ds.summary()
    assert "layout: class_folders" in text and "NORMAL" in text and "notes:" in text
    for split in ("train", "val", "test"):
        assert split in text


# --------------------------------------------------------------------------- unreadable images


@pytest.mark.slow
def test_real_kermany_and_pneumoniamnist():
    ds = load_dataset(SHARED / "chest_xray" / "train")
    assert ds.classes == ["NORMAL", "PNEUMONIA"]
    totals = {c: sum(counts[c] for counts in ds.counts().values()) for c in ds.classes}
    assert totals == {"NORMAL": 1341, "PNEUMONIA": 3875}
    assert all(s.patient is not None for split in ds.splits.values() for s in split)
    train, val, test = (_patients(ds.splits[k]) for k in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)

    npz = load_dataset(SHARED / "pneumoniamnist.npz")
    assert {k: len(v) for k, v in npz.splits.items()} == {"train": 4708, "val": 524, "test": 624}
    assert npz.splits["train"][0].load().shape == (28, 28)


def test_split_folders_without_train_is_an_error(tmp_path):
    _kermany(tmp_path / "test", 2)
    with pytest.raises(DataError, match=f"no train split in {tmp_path}"):
        load_dataset(tmp_path)
    assert len(load_dataset(tmp_path, mode="all").splits["all"]) == 10  # fine for evaluation
