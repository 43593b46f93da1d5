"""Image I/O and grids: decode a file or bytes, the one image transform, and contact sheets.

- `open_image` decodes fully and returns (None, reason) for unreadable files instead of raising;
- `image_to_tensor`: RGB on white, smallest-side resize, centre crop, optional flip,
  3xSxS float32 in [-1, 1]; `tensor_to_image` is its inverse;
- `make_grid_image` lays out B images (with optional captions) as one sheet.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageFont, ImageOps

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, EOFError, Image.DecompressionBombError)
"""What Pillow raises for unreadable, truncated or hostile files (OSError covers
UnidentifiedImageError); anything else is a bug and keeps its traceback."""


def open_image(source: str | os.PathLike | bytes) -> tuple[Image.Image | None, str | None]:
    """Open and fully decode an image file or bytes; (None, reason) when it is unreadable.

    Pillow decodes lazily, so a truncated file only fails on `load()`: force it here so
    the failure is caught and counted instead of surfacing inside a DataLoader worker.
    """
    try:
        if isinstance(source, bytes | bytearray):
            if not source:
                return None, "empty image bytes"
            image = Image.open(io.BytesIO(source))
        else:
            if os.path.getsize(source) == 0:
                return None, "zero-byte file"
            image = Image.open(source)
        image.load()
        return image, None
    except IMAGE_ERRORS as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


# -- the transform ---------------------------------------------------------------------
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; greyscale, palette, CMYK, 16-bit -> RGB."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)  # phone photos store their rotation as a tag
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # Pillow's convert clips these to 0..255, which turns 16-bit greyscale white.
        a = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            peak = 65535.0
        elif image.mode == "F":
            peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        else:  # 32-bit "I": 16-bit data unless every value fits in 8 bits
            peak = 255.0 if a.max(initial=0) <= 255 else 65535.0
        image = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    transparent = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info
    if transparent:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_tensor(image: Image.Image, size: int, flip: bool = False) -> torch.Tensor:
    """A 3 x size x size float32 tensor in [-1, 1]: smallest side resized to `size`, centre-cropped.

    Resize and crop are one resampling step: the centred square of side min(w, h) is
    mapped onto size x size with Pillow's antialiased bicubic filter (its kernel widens
    when downscaling, so no aliasing), which equals "resize smallest side, then centre
    crop" without rounding the intermediate size.
    """
    image = to_rgb(image)
    w, h = image.size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.to(torch.float32).div_(127.5).sub_(1.0)
    return x.flip(-1) if flip else x


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """The inverse of `image_to_tensor` for a 3xHxW (or 1xHxW) tensor in [-1, 1], clamped."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"tensor_to_image expects 3xHxW or 1xHxW, got shape {tuple(x.shape)}")
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if a.shape[0] == 1:
        return Image.fromarray(a[0].numpy(), "L").convert("RGB")
    return Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB")


def _caption_font(height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=height)  # Pillow's bundled font: no download
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text` on one line (newlines and tabs become spaces) cut with '…' to fit `width`.

    A font that cannot measure a character (the bitmap fallback knows Latin-1 only) gets
    the text with such characters as '?'."""
    text = " ".join(str(text).split())[:1000]  # no caption cell is wider than 1000 characters

    def length(t: str) -> float:
        return draw.textlength(t, font=font)

    try:
        length(text + "…")
    except (UnicodeError, ValueError, OSError):
        text = text.encode("latin-1", "replace").decode("latin-1").replace("…", "...")
        ellipsis = "..."
    else:
        ellipsis = "…"
    if length(text) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if length(text[:mid] + ellipsis) <= width:
            low = mid
        else:
            high = mid - 1
    return text[:low] + ellipsis


def make_grid_image(
    images: torch.Tensor, nrow: int | None = None, captions: list[str] | None = None
) -> Image.Image:
    """A contact sheet of B x 3 x H x W images in [-1, 1], `nrow` images per row.

    `nrow` defaults to ceil(sqrt(B)), the squarest grid. With captions, small cells are
    enlarged (nearest neighbour, whole factors) to at least 96 px so the text is legible.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid_image expects B x 3 x H x W, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"make_grid_image got {b} images but {len(captions)} captions")
    ncol = max(1, min(b, nrow or math.ceil(math.sqrt(max(b, 1)))))
    nrows = max(1, math.ceil(b / ncol))
    scale = max(1, math.ceil(96 / w)) if captions is not None else 1
    cw, ch = w * scale, h * scale
    pad = 2
    text_h = 14 if captions is not None else 0
    sheet = Image.new("RGB", (ncol * (cw + pad) + pad, nrows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = _caption_font(11) if captions is not None else None
    for i in range(b):
        r, c = divmod(i, ncol)
        x0, y0 = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        tile = tensor_to_image(images[i])
        if scale > 1:
            tile = tile.resize((cw, ch), Image.Resampling.NEAREST)
        sheet.paste(tile, (x0, y0))
        if captions is not None and captions[i]:
            draw.text((x0 + 1, y0 + ch + 1), _fit_text(draw, captions[i], font, cw - 2), fill="black", font=font)
    return sheet
