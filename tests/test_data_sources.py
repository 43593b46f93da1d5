"""The `imagefolder` and `hf` data sources on folders and parquet files made in the test."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from n2a_core import BuildContext, get_registry
from n2a_core.errors import DataError, SpecError
from n2a_core.training.batching import make_splits, report_skipped

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def build(data: dict, tmp_path):
    registry = get_registry()
    spec = registry.validate_spec("data", data)
    return registry.build("data", spec, BuildContext(cache_dir=tmp_path / "cache")), spec


def png(path, colour, size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def mean_colour(item) -> tuple[float, ...]:
    return tuple(round((c + 1) * 127.5) for c in item["image"].mean(dim=(1, 2)).tolist())


# -- imagefolder ---------------------------------------------------------------------------
@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "art"
    png(root / "cats" / "a.png", (200, 0, 0))
    png(root / "cats" / "sub" / "b.jpg", (0, 200, 0))
    png(root / "dogs" / "c.png", (0, 0, 200))
    (root / "dogs" / "c.txt").write_text("a brown dog\n")
    png(root / "top.png", (90, 90, 90))
    png(root / "dogs" / "d.png", (10, 10, 10))
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "top.png", "caption": "top image", "label": "misc"}) + "\n"
        + json.dumps({"file_name": "dogs/d.png", "text": "a black dog"}) + "\n")
    png(root / ".hidden" / "x.png", (1, 2, 3))
    png(root / "cats" / ".y.png", (1, 2, 3))
    (root / "notes.md").write_text("not an image")
    return root


def test_imagefolder_labels_captions_and_keys(folder, tmp_path):
    source, _ = build({"type": "imagefolder", "path": str(folder), "image_size": 8}, tmp_path)
    records = {r.key: r for r in source.record_list()}
    assert set(records) == {"cats/a.png", "cats/sub/b.jpg", "dogs/c.png", "dogs/d.png", "top.png"}
    assert {k: r.label for k, r in records.items()} == {
        "cats/a.png": "cats", "cats/sub/b.jpg": "cats", "dogs/c.png": "dogs", "dogs/d.png": "dogs", "top.png": "misc"}
    assert records["dogs/c.png"].caption == "a brown dog"  # sidecar .txt
    assert records["dogs/d.png"].caption == "a black dog"  # metadata.jsonl 'text'
    assert records["top.png"].caption == "top image"
    assert records["cats/a.png"].caption is None
    assert source.label_vocabulary() == ["cats", "dogs", "misc"]
    sample = source.load(records["cats/sub/b.jpg"])
    assert sample.image.size == (12, 8) and sample.error is None


def test_imagefolder_items_have_the_image_colours(folder, tmp_path):
    source, spec = build({"type": "imagefolder", "path": str(folder), "image_size": 8, "val_fraction": 0.0,
                          "random_flip": False}, tmp_path)
    train = make_splits(source, spec).train
    by_key = {train[i]["key"]: train[i] for i in range(len(train))}
    assert mean_colour(by_key["cats/a.png"]) == (200, 0, 0)
    assert mean_colour(by_key["dogs/c.png"]) == (0, 0, 200)
    assert by_key["dogs/c.png"]["label"] == "dogs" and by_key["dogs/c.png"]["caption"] == "a brown dog"


def test_imagefolder_without_folder_labels(folder, tmp_path):
    source, _ = build({"type": "imagefolder", "path": str(folder), "label_from_folder": False}, tmp_path)
    labels = {r.key: r.label for r in source.record_list()}
    assert labels["top.png"] == "misc" and labels["cats/a.png"] is None


def test_imagefolder_skips_and_counts_broken_files(folder, tmp_path, caplog):
    (folder / "cats" / "zero.png").write_bytes(b"")
    data = (folder / "cats" / "a.png").read_bytes()
    (folder / "dogs" / "trunc.png").write_bytes(data[: len(data) // 2])
    (folder / "dogs" / "junk.jpg").write_bytes(b"\x00" * 100)
    source, spec = build({"type": "imagefolder", "path": str(folder), "image_size": 8, "val_fraction": 0.0}, tmp_path)
    train = make_splits(source, spec).train
    items = [train[i] for i in range(len(train))]
    assert sum(item is None for item in items) == 3 and len(items) == 8
    line = report_skipped(train)
    assert "skipped 3 unreadable images" in line and "zero.png" in line


@pytest.mark.parametrize("path, message", [
    ("does/not/exist", "does not exist"),
    ("__file__", "is a file"),
    ("__empty__", "no images"),
])
def test_imagefolder_errors_are_one_line(tmp_path, path, message):
    if path == "__file__":
        path = str(png(tmp_path / "one.png", (0, 0, 0)))
    elif path == "__empty__":
        (tmp_path / "empty").mkdir()
        path = str(tmp_path / "empty")
    with pytest.raises(DataError, match=message) as err:
        source, spec = build({"type": "imagefolder", "path": path}, tmp_path)
        make_splits(source, spec)
    assert "\n" not in str(err.value) and str(err.value).startswith("data.path")


def test_imagefolder_bad_metadata_names_file_and_line(folder, tmp_path):
    (folder / "metadata.jsonl").write_text('{"file_name": "top.png"}\n{oops\n')
    source, _ = build({"type": "imagefolder", "path": str(folder)}, tmp_path)
    with pytest.raises(DataError, match=r"metadata.jsonl:2"):
        source.record_list()


# -- hf ------------------------------------------------------------------------------------
STYLES = ["baroque", "cubism", "impressionism"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A parquet file of 24 rows: images (a colour per row), ClassLabel styles, captions, scores."""
    import datasets

    root = tmp_path_factory.mktemp("parquet")
    rng = np.random.default_rng(0)
    rows = {
        "image": [Image.new("RGB", (10, 6), (i * 10, 255 - i * 10, 7)) for i in range(24)],
        "style": [i % 3 for i in range(24)],
        "text": [f"painting {i}" for i in range(24)],
        "pwatermark": rng.uniform(0, 1, 24).round(3).tolist(),
        "punsafe": rng.uniform(0, 1, 24).round(3).tolist(),
        "uid": [f"id-{i:03d}" for i in range(24)],
    }
    features = datasets.Features({
        "image": datasets.Image(), "style": datasets.ClassLabel(names=STYLES), "text": datasets.Value("string"),
        "pwatermark": datasets.Value("float64"), "punsafe": datasets.Value("float64"), "uid": datasets.Value("string"),
    })
    path = root / "art.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path, rows


def test_hf_parquet_labels_captions_and_filters(table, tmp_path):
    path, rows = table
    source, spec = build({"type": "hf", "path": str(path), "label_column": "style", "caption_column": "text",
                          "filters": ["pwatermark < 0.8", "punsafe < 0.5"], "image_size": 8}, tmp_path)
    kept = [i for i in range(24) if rows["pwatermark"][i] < 0.8 and rows["punsafe"][i] < 0.5]
    records = source.record_list()
    assert [r.key for r in records] == [str(i) for i in kept]  # row numbers of the kept rows
    assert [r.label for r in records] == [STYLES[i % 3] for i in kept]  # ClassLabel ints -> names
    assert [r.caption for r in records] == [f"painting {i}" for i in kept]
    assert source.label_vocabulary() == sorted({STYLES[i % 3] for i in kept})
    splits = make_splits(source, spec.model_copy(update={"val_fraction": 0.0, "random_flip": False}))
    first = splits.train[0]
    i = kept[0]
    assert mean_colour(first) == (i * 10, 255 - i * 10, 7)
    assert first["label"] == STYLES[i % 3] and first["caption"] == f"painting {i}"


def test_hf_key_column_and_equality_filter(table, tmp_path):
    path, _ = table
    source, _ = build({"type": "hf", "path": str(path), "key_column": "uid", "filters": ["uid == 'id-005'"]}, tmp_path)
    assert [r.key for r in source.record_list()] == ["id-005"]


@pytest.mark.parametrize("data, message", [
    ({"label_column": "genre"}, r"data.label_column: column 'genre' not found.*columns: image, style, text"),
    ({"caption_column": "caption"}, r"data.caption_column: column 'caption' not found"),
    ({"filters": ["aesthetic > 5"]}, r"data.filters: column 'aesthetic' not found"),
    ({"image_column": "text", "split": "test"}, r"data.split"),
])
def test_hf_bad_columns_are_one_line(table, tmp_path, data, message):
    path, _ = table
    with pytest.raises(DataError, match=message) as err:
        build({"type": "hf", "path": str(path), **data}, tmp_path)
    assert "\n" not in str(err.value)


def test_hf_filter_type_mismatch_and_syntax(table, tmp_path):
    path, _ = table
    source, _ = build({"type": "hf", "path": str(path), "filters": ["text > 3"]}, tmp_path)
    with pytest.raises(DataError, match=r"'text > 3'.*str"):
        source.record_list()
    with pytest.raises(SpecError, match="data.filters") as err:
        get_registry().validate_spec("data", {"type": "hf", "path": str(path), "filters": ["__import__('os')"]})
    assert "\n" not in str(err.value)


def test_hf_hub_name_offline_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError, match="HF_HUB_OFFLINE") as err:
        build({"type": "hf", "path": "someone/laion-art-that-is-not-cached"}, tmp_path)
    assert time.monotonic() - start < 20
    assert "\n" not in str(err.value) and "local path" in str(err.value)


def test_hf_missing_local_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build({"type": "hf", "path": str(tmp_path / "nope" / "x.parquet")}, tmp_path)


def test_hf_image_folder_maps_folder_labels_and_keys_by_path(tmp_path):
    root = tmp_path / "folder"
    for name, colour in (("cats/a.png", (255, 0, 0)), ("cats/b.png", (250, 0, 0)), ("dogs/c.png", (0, 0, 255))):
        png(root / name, colour)
    source, spec = build({"type": "hf", "path": str(root), "label_column": "label", "image_size": 8}, tmp_path)
    records = source.record_list()
    assert sorted((r.key, r.label) for r in records) == [
        ("cats/a.png", "cats"), ("cats/b.png", "cats"), ("dogs/c.png", "dogs")]
    item = make_splits(source, spec.model_copy(update={"val_fraction": 0.0})).train[2]
    assert item["label"] == "dogs" and mean_colour(item) == (0, 0, 255)


def test_hf_corrupt_image_bytes_are_skipped(tmp_path):
    import datasets

    good = tmp_path / "g.png"
    png(good, (0, 255, 0))
    features = datasets.Features({"image": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good.read_bytes(), "path": None}, {"bytes": b"garbage", "path": None},
                   {"bytes": good.read_bytes()[:40], "path": None}]}, features=features)
    path = tmp_path / "broken.parquet"
    ds.to_parquet(str(path))
    source, spec = build({"type": "hf", "path": str(path), "image_size": 8, "val_fraction": 0.0}, tmp_path)
    train = make_splits(source, spec).train
    assert [train[i] is None for i in range(3)] == [False, True, True]
    assert train.skipped.count == 2


def test_hf_streaming_parquet(table, tmp_path):
    path, rows = table
    source, spec = build({"type": "hf", "path": str(path), "streaming": True, "label_column": "style",
                          "filters": ["punsafe < 0.5"], "val_fraction": 0.25, "image_size": 8}, tmp_path)
    assert source.streaming and source.label_vocabulary() == STYLES
    splits = make_splits(source, spec)
    keys = [item["key"] for item in splits.train] + [item["key"] for item in splits.val]
    assert sorted(keys, key=int) == [str(i) for i in range(24) if rows["punsafe"][i] < 0.5]
    assert splits.vocabulary.labels == STYLES


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    features = datasets.Features({"img": datasets.Image(), "genre": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (4, 4), "red")] * 3, "genre": ["a", "b", "a"]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    source, _ = build({"type": "hf", "path": str(tmp_path / "saved"), "label_column": "genre"}, tmp_path)
    assert source.image_column == "img" and [r.label for r in source.record_list()] == ["a", "b", "a"]
    assert source.load(source.record_list()[0]).image.size == (4, 4)
