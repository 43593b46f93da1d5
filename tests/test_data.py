"""The shared data path: transform, grid, split, vocabulary, skipped images, datasets."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from n2a_core.data_source import DataSource, DataSourceSpec, Record, Sample
from n2a_core.errors import DataError
from n2a_core.images import image_to_tensor, make_grid_image, open_image, tensor_to_image
from n2a_core.training.batching import (
    LabelVocabulary,
    StreamingSampleDataset,
    collate_samples,
    make_splits,
    report_skipped,
    split_of,
)

Q = 1 / 127.5  # one 8-bit step in [-1, 1]


def v(byte: float) -> float:
    """An 8-bit value as the transform must map it: [0, 255] -> [-1, 1]."""
    return byte / 127.5 - 1


def bands(size: tuple[int, int], colours, vertical: bool = False) -> Image.Image:
    """Equal stripes of the given colours, left to right (or top to bottom)."""
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    n = len(colours)
    for i, colour in enumerate(colours):
        if vertical:
            a[i * h // n:(i + 1) * h // n] = colour
        else:
            a[:, i * w // n:(i + 1) * w // n] = colour
    return Image.fromarray(a)


# -- transform -------------------------------------------------------------------------
@pytest.mark.parametrize("size_in", [(40, 20), (20, 40), (33, 33), (7, 300), (512, 100)])
def test_transform_shape_dtype_range(size_in):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size_in[1], size_in[0], 3), dtype=np.uint8))
    x = image_to_tensor(image, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_transform_maps_black_and_white_to_the_ends():
    assert torch.equal(image_to_tensor(Image.new("RGB", (9, 5), "white"), 4), torch.ones(3, 4, 4))
    assert torch.equal(image_to_tensor(Image.new("RGB", (5, 9), "black"), 4), -torch.ones(3, 4, 4))


@pytest.mark.parametrize("vertical", [False, True])
def test_centre_crop_keeps_the_centre(vertical):
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    # 30 x 10: the centred 10 x 10 square is exactly the green band; at scale 1 nothing blends.
    image = bands((10, 30) if vertical else (30, 10), [red, green, blue], vertical=vertical)
    x = image_to_tensor(image, 10)
    assert torch.allclose(x[1], torch.ones(10, 10), atol=1e-6)
    assert torch.allclose(x[0], -torch.ones(10, 10), atol=1e-6)
    assert torch.allclose(x[2], -torch.ones(10, 10), atol=1e-6)


def test_resize_downscales_smallest_side_and_centre():
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    x = image_to_tensor(bands((120, 40), [red, green, blue]), 8)  # centre 40x40 is green, 5x smaller
    assert x.shape == (3, 8, 8)
    interior = x[:, :, 1:-1]  # the antialiasing filter may reach the neighbouring bands at the edges
    assert torch.allclose(interior[1], torch.ones_like(interior[1]), atol=2 * Q)
    assert interior[0].max() < -1 + 2 * Q and interior[2].max() < -1 + 2 * Q


def test_downscale_is_antialiased():
    # A 1-pixel black/white checkerboard averages to mid grey, not to aliased black or white.
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    x = image_to_tensor(Image.fromarray(checker, "L"), 8)
    assert x.abs().max() < 0.1


def test_rgba_is_composited_on_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = (255, 0, 0, 0)  # fully transparent red: must become white
    a[2:] = (0, 0, 0, 128)  # half-transparent black: white * (1 - 128/255)
    x = image_to_tensor(Image.fromarray(a, "RGBA"), 4)
    assert torch.allclose(x[:, :2], torch.ones(3, 2, 4), atol=1e-6)
    grey = 255 * (1 - 128 / 255)
    assert torch.allclose(x[:, 2:], torch.full((3, 2, 4), v(grey)), atol=Q)


def test_palette_transparency_and_la_are_composited_on_white():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert torch.allclose(image_to_tensor(p, 4), torch.ones(3, 4, 4))
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    assert torch.allclose(image_to_tensor(la, 4), torch.ones(3, 4, 4))


def test_greyscale_cmyk_and_16_bit_become_rgb():
    x = image_to_tensor(Image.new("L", (6, 6), 200), 6)
    assert torch.allclose(x, torch.full((3, 6, 6), v(200)), atol=1e-6)
    x = image_to_tensor(Image.new("1", (6, 6), 1), 6)
    assert torch.allclose(x, torch.ones(3, 6, 6))
    cyan = image_to_tensor(Image.new("CMYK", (6, 6), (255, 0, 0, 0)), 6)
    assert torch.allclose(cyan[0], -torch.ones(6, 6)) and torch.allclose(cyan[1:], torch.ones(2, 6, 6))
    deep = Image.fromarray(np.full((6, 6), 32768, np.uint16))  # mode I;16, half of full scale
    x = image_to_tensor(deep, 6)
    assert torch.allclose(x, torch.full((3, 6, 6), v(round(32768 / 65535 * 255))), atol=Q)


def test_exif_orientation_is_applied():
    image = bands((8, 4), [(0, 0, 0), (255, 255, 255)])  # black left, white right
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down: rotate 180 degrees to show it
    buffer = io.BytesIO()
    image.save(buffer, "PNG", exif=exif)
    x = image_to_tensor(Image.open(buffer), 4)
    assert x[:, :, 0].min() == 1 and x[:, :, -1].max() == -1  # white now on the left


def test_flip_mirrors_left_and_right():
    image = bands((8, 8), [(0, 0, 0), (255, 255, 255)])
    x, y = image_to_tensor(image, 8), image_to_tensor(image, 8, flip=True)
    assert x[:, :, 0].max() == -1 and y[:, :, 0].min() == 1
    assert torch.equal(y, x.flip(-1))


def test_tensor_to_image_inverts_the_transform_and_clamps():
    a = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    back = tensor_to_image(image_to_tensor(Image.fromarray(a), 12))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), a)
    out = np.asarray(tensor_to_image(torch.stack([torch.full((2, 2), 3.0), torch.full((2, 2), -7.0),
                                                  torch.zeros(2, 2)])))
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 128).all()
    with pytest.raises(ValueError):
        tensor_to_image(torch.zeros(4, 2, 2))


def test_grid_places_each_image_in_its_cell():
    colours = torch.linspace(-1, 1, 5)
    images = colours.view(5, 1, 1, 1).expand(5, 3, 8, 8).contiguous()
    sheet = make_grid_image(images)  # 5 images -> ceil(sqrt(5)) = 3 per row, 2 rows, 2 px padding
    assert sheet.size == (3 * 10 + 2, 2 * 10 + 2)
    a = np.asarray(sheet)
    for i, c in enumerate(colours.tolist()):
        r, col = divmod(i, 3)
        cell = a[2 + r * 10:2 + r * 10 + 8, 2 + col * 10:2 + col * 10 + 8]
        assert np.abs(cell.astype(int) - round((c + 1) * 127.5)).max() <= 1
    assert make_grid_image(images, nrow=5).size == (5 * 10 + 2, 12)


def test_grid_with_captions_writes_text_under_cells():
    images = torch.ones(2, 3, 8, 8)  # white images: only the caption can put ink on the sheet
    plain = np.asarray(make_grid_image(images, captions=["", ""]).convert("L"))
    inked = np.asarray(make_grid_image(images, captions=["red apple", "cat"]).convert("L"))
    assert plain.min() == 255 and inked.min() < 128
    with pytest.raises(ValueError):
        make_grid_image(images, captions=["one"])


# -- split -------------------------------------------------------------------------------
def test_split_is_deterministic_and_has_the_requested_share():
    keys = [f"img/{i:05d}.png" for i in range(20000)]
    first = [split_of(k, 0.05, 0) for k in keys]
    assert first == [split_of(k, 0.05, 0) for k in keys]
    share = first.count("val") / len(keys)
    assert abs(share - 0.05) < 3 * math.sqrt(0.05 * 0.95 / len(keys))  # 3 sigma of a binomial
    other_seed = [split_of(k, 0.05, 1) for k in keys]
    assert other_seed != first and abs(other_seed.count("val") / len(keys) - 0.05) < 0.005
    assert all(split_of(k, 0.0, 0) == "train" for k in keys[:500])


class MemorySource(DataSource):
    """Records whose ref is an RGB colour, or None for an unreadable image."""

    def __init__(self, spec, keys, labels=None, streaming=False):
        super().__init__(spec)
        self.keys, self.labels, self.streaming = list(keys), labels, streaming

    def scan(self):
        for i, key in enumerate(self.keys):
            label = self.labels[i] if self.labels else None
            yield Record(key, label, f"caption {key}", ref=None if key.startswith("bad") else (i % 256, 0, 0))

    def load(self, record):
        if record.ref is None:
            return Sample(record.key, None, record.label, record.caption, "unreadable")
        return Sample(record.key, Image.new("RGB", (6, 4), record.ref), record.label, record.caption)


def spec(**kw) -> DataSourceSpec:
    return DataSourceSpec(type="memory", image_size=8, **kw)


def split_keys(splits):
    return {r.key for r in splits.train.records}, {r.key for r in splits.val.records}


def test_splits_are_disjoint_complete_and_stable_when_records_are_added():
    s = spec(val_fraction=0.2, split_seed=3)
    old = [f"a{i}" for i in range(300)]
    train, val = split_keys(make_splits(MemorySource(s, old), s))
    assert not train & val and train | val == set(old)
    assert 30 < len(val) < 90  # ~60 expected
    grown = [f"b{i}" for i in range(300)] + old[::-1]  # new records, and a different order
    train2, val2 = split_keys(make_splits(MemorySource(s, grown), s))
    assert train <= train2 and val <= val2


def test_tiny_dataset_still_gets_a_validation_record():
    s = spec(val_fraction=0.05)
    splits = make_splits(MemorySource(s, ["x", "y", "z"]), s)
    assert len(splits.val) == 1 and len(splits.train) == 2


def test_limit_caps_records_before_the_split():
    s = spec(limit=50, val_fraction=0.2)
    splits = make_splits(MemorySource(s, [f"k{i}" for i in range(500)]), s)
    train, val = split_keys(splits)
    assert train | val == {f"k{i}" for i in range(50)}


def test_empty_source_is_a_data_error():
    s = spec()
    with pytest.raises(DataError, match="empty"):
        make_splits(MemorySource(s, []), s)


# -- vocabulary ------------------------------------------------------------------------
def test_vocabulary_round_trip_and_index(tmp_path):
    vocab = LabelVocabulary.from_labels(["ukiyo-e", "baroque", None, "", "baroque", "cubism"])
    assert vocab.labels == ["baroque", "cubism", "ukiyo-e"] and len(vocab) == 3
    assert [vocab.index(x) for x in ("baroque", "cubism", "ukiyo-e")] == [0, 1, 2]
    assert "cubism" in vocab and "rococo" not in vocab
    vocab.save(tmp_path / "labels.json")
    assert LabelVocabulary.load(tmp_path / "labels.json") == vocab
    with pytest.raises(DataError, match=r"'rococo'.*baroque, cubism, ukiyo-e"):
        vocab.index("rococo")
    assert LabelVocabulary.from_labels([None, ""]) is None


def test_vocabulary_load_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="not found") as missing:
        LabelVocabulary.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a label vocabulary") as bad:
        LabelVocabulary.load(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text('{"labels": [1, 2]}')
    with pytest.raises(DataError):
        LabelVocabulary.load(tmp_path / "wrong.json")
    assert "\n" not in str(missing.value) and "\n" not in str(bad.value)


def test_make_splits_builds_the_vocabulary_from_all_records():
    s = spec(val_fraction=0.3)
    labels = ["dog", "cat", "cat", "eel", "dog", "cat"] * 5
    splits = make_splits(MemorySource(s, [f"r{i}" for i in range(30)], labels), s)
    assert splits.vocabulary.labels == ["cat", "dog", "eel"]
    assert splits.source_name == "memory"
    unlabelled = make_splits(MemorySource(s, ["a", "b"]), s)
    assert unlabelled.vocabulary is None


# -- items, skipped images, collate ------------------------------------------------------
def test_items_and_collate_drop_unreadable_images(caplog):
    s = spec(val_fraction=0.0, random_flip=False)
    source = MemorySource(s, ["ok1", "bad1", "ok2", "bad2", "bad3"], ["a", "b", "a", "b", "b"])
    train = make_splits(source, s).train
    items = [train[i] for i in range(len(train))]
    assert [i is None for i in items] == [False, True, False, True, True]
    assert items[0]["image"].shape == (3, 8, 8) and items[0]["label"] == "a"
    assert items[0]["caption"] == "caption ok1" and items[0]["key"] == "ok1"
    batch = collate_samples(items)
    assert batch["image"].shape == (2, 3, 8, 8) and batch["key"] == ["ok1", "ok2"]
    assert batch["label"] == ["a", "a"] and batch["caption"] == ["caption ok1", "caption ok2"]
    assert train.skipped.count == 3
    with caplog.at_level(logging.WARNING, logger="n2a.data"):
        line = report_skipped(train)
    assert "skipped 3 unreadable images" in line and "bad1" in line and "\n" not in line
    assert [r.getMessage() for r in caplog.records] == [line]
    assert report_skipped(train) is None  # reported once, then reset
    empty = collate_samples([None, None])
    assert empty["image"].shape[0] == 0 and empty["key"] == []


def test_skipped_count_crosses_dataloader_workers():
    s = spec(val_fraction=0.0)
    keys = [f"bad{i}" if i % 4 == 0 else f"ok{i}" for i in range(24)]
    train = make_splits(MemorySource(s, keys), s).train
    loader = torch.utils.data.DataLoader(train, batch_size=5, num_workers=2, collate_fn=collate_samples)
    seen = sum(len(batch["key"]) for batch in loader)
    assert seen == 18 and train.skipped.count == 6


def test_open_image_reports_zero_byte_truncated_and_garbage(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), "red").save(good)
    data = good.read_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    assert open_image(good)[0].size == (32, 32)
    for name in ("zero.png", "trunc.png", "junk.jpg", "missing.png"):
        image, error = open_image(tmp_path / name)
        assert image is None and error, name
    assert open_image(b"")[0] is None and open_image(data)[0] is not None


def test_random_flip_only_in_train():
    s = spec(val_fraction=0.5, random_flip=True)
    source = MemorySource(s, [f"k{i}" for i in range(40)])
    source.load = lambda r: Sample(r.key, bands((4, 4), [(0, 0, 0), (255, 255, 255)]))
    splits = make_splits(source, s)
    torch.manual_seed(0)
    train_left = [splits.train[i]["image"][0, 0, 0].item() for i in range(len(splits.train))]
    val_left = [splits.val[i]["image"][0, 0, 0].item() for i in range(len(splits.val))]
    assert set(train_left) == {-1.0, 1.0}  # some flipped, some not
    assert set(val_left) == {-1.0}
    plain = splits.train.without_flip()
    assert {plain[i]["image"][0, 0, 0].item() for i in range(len(plain))} == {-1.0}
    assert splits.train.random_flip and plain.skipped is splits.train.skipped


# -- streaming -------------------------------------------------------------------------
def test_streaming_split_shards_over_workers_and_resumes():
    s = spec(val_fraction=0.25)
    keys = [f"s{i}" for i in range(80)]
    source = MemorySource(s, keys, streaming=True)
    splits = make_splits(source, s)
    assert isinstance(splits.train, StreamingSampleDataset) and splits.vocabulary is None
    expected = [k for k in keys if split_of(k, 0.25, 0) == "train"]
    in_process = [item["key"] for item in splits.train]
    assert in_process == expected
    val = [item["key"] for item in splits.val]
    assert not set(val) & set(expected) and len(val) + len(expected) == 80
    loader = torch.utils.data.DataLoader(splits.train, batch_size=4, num_workers=2, collate_fn=collate_samples)
    from_workers = [k for batch in loader for k in batch["key"]]
    assert sorted(from_workers) == sorted(expected) and len(from_workers) == len(expected)
    resumed = StreamingSampleDataset(source, "train", s).skip(10)
    assert [item["key"] for item in resumed] == expected[10:]
    with pytest.raises(TypeError):
        len(source)
