"""The embedded OpenMoji dataset: captions, groups, rendering, cache."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from n2a_core import BuildContext, get_registry
from n2a_core.training.batching import make_splits
from n2a_plugins.data import openmoji
from n2a_plugins.data.emoji_groups import GROUPS, group_of
from n2a_plugins.data.openmoji import Renderer, caption_of, font_path

SIZE = 32


def seq(key: str) -> tuple[int, ...]:
    return tuple(int(p, 16) for p in key.split("-"))


@pytest.mark.parametrize("key, caption", [
    ("1F34E", "red apple"),
    ("1F468-200D-1F373", "man cooking"),
    ("1F44D-1F3FD", "thumbs up sign, medium skin tone"),
    ("1F46E-1F3FD-200D-2640-FE0F", "woman police officer, medium skin tone"),
    ("0023-FE0F-20E3", "keycap number sign"),
    ("1F1EB-1F1F7", "flag FR"),
    ("1F3F4-E0067-E0062-E0077-E006C-E0073-E007F", "flag GB-WLS"),
    ("2764-FE0F", "heavy black heart"),
    ("1FAE8", "shaking face"),  # Unicode 15: newer than Python 3.11's unicodedata
    ("E000", None),  # OpenMoji's private-use extras have no Unicode name
])
def test_caption_from_unicode_names(key, caption):
    assert caption_of(seq(key)) == caption


@pytest.mark.parametrize("key, group", [
    # The first emoji of each group in Unicode's emoji-test.txt, and a few known members.
    ("1F600", "smileys-emotion"), ("1F44B", "people-body"), ("1F3FB", "component"),
    ("1F435", "animals-nature"), ("1F347", "food-drink"), ("1F30D", "travel-places"),
    ("1F383", "activities"), ("1F453", "objects"), ("1F3E7", "symbols"), ("1F3C1", "flags"),
    ("1F34E", "food-drink"), ("1F468-200D-1F373", "people-body"), ("1F1EB-1F1F7", "flags"),
    ("1F1EB", "extras-unicode"), ("2654", "extras-unicode"), ("E000", "extras-openmoji"),
    ("1F980", "food-drink"), ("2764-FE0F", "smileys-emotion"), ("26A1", "travel-places"),
])
def test_group_of_sequences(key, group):
    assert group_of(seq(key)) == group


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("n2a-cache")


@pytest.fixture(scope="module")
def rendered(cache):
    """Every artwork rendered once at 32 px into a fresh cache; returns (source, seconds)."""
    registry = get_registry()
    spec = registry.validate_spec("data", {"type": "openmoji", "image_size": SIZE, "random_flip": False})
    start = time.perf_counter()
    source = registry.build("data", spec, BuildContext(cache_dir=cache))
    source.record_list()
    return source, time.perf_counter() - start


def test_renders_about_four_thousand_labelled_captioned_artworks(rendered):
    source, seconds = rendered
    records = source.record_list()
    assert 3500 < len(records) < 6000
    assert seconds < 60, f"rendering took {seconds:.1f} s"
    assert {r.label for r in records} <= set(GROUPS) - {"extras-openmoji"}
    assert all(r.caption for r in records)  # extras (no caption) are off by default
    assert len({r.key for r in records}) == len(records)


def test_red_apple_is_red_and_green_apple_is_green(rendered):
    source, _ = rendered
    by_caption = {r.caption: r for r in source.record_list()}
    # OpenMoji's palette: the red apple is #ea5a47/#d22f27, the green one #b1cc33 (yellow-green).
    tests = {"red apple": lambda r, g, b: (r - np.maximum(g, b)) > 60,
             "green apple": lambda r, g, b: (g - b > 60) & (g > r)}
    shares = {}
    for caption in tests:
        image = np.asarray(source.load(by_caption[caption]).image.convert("RGB")).astype(int)
        assert image.shape == (SIZE, SIZE, 3) and by_caption[caption].label == "food-drink"
        shares[caption] = {name: is_hue(*image.transpose(2, 0, 1)).mean() for name, is_hue in tests.items()}
    assert shares["red apple"]["red apple"] > 0.2 and shares["red apple"]["green apple"] < 0.05
    assert shares["green apple"]["green apple"] > 0.2 and shares["green apple"]["red apple"] < 0.05


def test_rendered_glyphs_are_not_blank(rendered):
    source, _ = rendered
    records = random.Random(0).sample(source.record_list(), 60)
    for record in records:
        image = np.asarray(source.load(record).image.convert("L"))
        assert (image < 200).mean() > 0.01, record.key


def test_blank_and_unshaped_sequences_are_skipped():
    renderer = Renderer(font_path(), SIZE)
    assert renderer.render((0x20,)) is None  # a space draws nothing
    assert renderer.render((0x1F34E, 0x1F34F)) is None  # two glyphs, not one artwork
    assert renderer.render((0x1F34E,)) is not None


def test_rendering_is_deterministic_and_cached(rendered, cache, monkeypatch):
    source, _ = rendered
    renderer = Renderer(font_path(), SIZE)
    for record in source.record_list()[::400]:
        fresh = renderer.render(seq(record.key))
        assert fresh.tobytes() == renderer.render(seq(record.key)).tobytes()
        assert np.array_equal(np.asarray(fresh), np.asarray(source.load(record).image.convert("RGB")))
    monkeypatch.setattr(openmoji.Renderer, "render", lambda *a: pytest.fail("cache was not used"))
    spec = get_registry().validate_spec("data", {"type": "openmoji", "image_size": SIZE})
    again = get_registry().build("data", spec, BuildContext(cache_dir=cache))
    start = time.perf_counter()
    assert [r.key for r in again.record_list()] == [r.key for r in source.record_list()]
    assert time.perf_counter() - start < 5


def test_options_restrict_the_artworks(rendered, cache, monkeypatch):
    source, _ = rendered
    registry = get_registry()
    monkeypatch.setattr(openmoji.Renderer, "render", lambda *a: pytest.fail("cache was not used"))

    def records(**options):
        spec = registry.validate_spec("data", {"type": "openmoji", "image_size": SIZE, **options})
        return registry.build("data", spec, BuildContext(cache_dir=cache)).record_list()

    food = records(groups=["food-drink", "animals-nature"])
    assert {r.label for r in food} == {"food-drink", "animals-nature"} and len(food) > 200
    with_extras = records(include_extras=True)
    extras = [r for r in with_extras if r.label == "extras-openmoji"]
    assert len(extras) > 100 and len(with_extras) == len(source.record_list()) + len(extras)
    plain = records(skin_tone_variants=False)
    assert len(plain) < len(source.record_list()) / 1.5
    assert not any(cp in openmoji.SKIN_TONES for r in plain for cp in seq(r.key)[1:])


def test_label_vocabulary_needs_no_rendering(rendered, tmp_path, monkeypatch):
    source, _ = rendered
    monkeypatch.setattr(openmoji.Renderer, "render", lambda *a: pytest.fail("rendered"))
    spec = get_registry().validate_spec("data", {"type": "openmoji", "image_size": 64})
    fresh = get_registry().build("data", spec, BuildContext(cache_dir=tmp_path))
    start = time.perf_counter()
    vocabulary = fresh.label_vocabulary()
    assert time.perf_counter() - start < 2
    assert vocabulary == make_splits(source, source.spec).vocabulary.labels
    assert "food-drink" in vocabulary and "extras-openmoji" not in vocabulary


def test_unknown_group_is_a_one_line_spec_error():
    from n2a_core.errors import SpecError

    with pytest.raises(SpecError, match=r"data.groups.*unknown OpenMoji group 'food'.*food-drink") as err:
        get_registry().validate_spec("data", {"type": "openmoji", "groups": ["food"]})
    assert "\n" not in str(err.value)


def test_items_are_tensors_in_range(rendered):
    source, _ = rendered
    splits = make_splits(source, source.spec)
    item = splits.val[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["caption"] and item["label"]
