"""Render stage of the procedural backend: Description -> (H, W, 3) uint8 image, with PIL.

Cheap by design (the throughput target is >= 100 samples/s per core at 384 px):
- the background pattern is one vectorised numpy expression over the pixel grid;
- each object / sign is drawn into a small greyscale coverage mask covering only its box at
  `supersample` x resolution and reduced (box filter) back: anti-aliased edges for the cost of
  a few thousand pixels, blended in by `Image.paste(colour, box, mask)`;
- texture noise is low-frequency (bilinear-upsampled random grid, +-6) plus a 2 px grain
  (+-2), added as luminance (same on R, G, B) so hues do not drift and PNG still compresses
  well. Object pixels therefore stay within ~14 (RGB distance) of their palette colour.

Text uses PIL's embedded default font at any size (`ImageFont.load_default(size=...)`, pillow
>= 10.1 with FreeType; no font files needed), drawn near-black on a near-white plate, sized from
the plate height so it stays readable at small resolutions.
"""
from __future__ import annotations

import functools
import io
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from fusion_jax.synth import scene as S

_STAR = tuple(
    ((1.0 if k % 2 == 0 else 0.36) * math.cos(math.radians(-90 + 36 * k)),
     (1.0 if k % 2 == 0 else 0.36) * math.sin(math.radians(-90 + 36 * k))) for k in range(10))
# Shape outlines in the unit box [-1, 1]^2 (y down).
_POLYGONS = {
    "triangle": ((0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)),
    "diamond": ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
    "star": _STAR,
}


@functools.lru_cache(maxsize=64)
def font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
  """PIL's embedded default font at `px` pixels (no font files needed)."""
  return ImageFont.load_default(size=max(1, int(px)))


def _box_px(bbox, size: int, pad: int = 1) -> tuple[int, int, int, int]:
  x0, y0, x1, y1 = bbox
  return (max(0, math.floor(x0 * size) - pad), max(0, math.floor(y0 * size) - pad),
          min(size, math.ceil(x1 * size) + pad), min(size, math.ceil(y1 * size) + pad))


def _shape_mask(shape: str, bbox, box, size: int, ss: int) -> Image.Image:
  """Coverage mask ('L', box size) of a shape filling `bbox` (normalised), via ss supersampling."""
  x0, y0, x1, y1 = box
  mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
  draw = ImageDraw.Draw(mask)
  # Shape box in supersampled mask pixels.
  bx0, by0 = (bbox[0] * size - x0) * ss, (bbox[1] * size - y0) * ss
  bx1, by1 = (bbox[2] * size - x0) * ss, (bbox[3] * size - y0) * ss
  if shape == "circle":
    draw.ellipse((bx0, by0, bx1, by1), fill=255)
  elif shape == "square":
    draw.rectangle((bx0, by0, bx1, by1), fill=255)
  else:
    cx, cy, hx, hy = (bx0 + bx1) / 2, (by0 + by1) / 2, (bx1 - bx0) / 2, (by1 - by0) / 2
    draw.polygon([(cx + u * hx, cy + v * hy) for u, v in _POLYGONS[shape]], fill=255)
  return mask.reduce(ss) if ss > 1 else mask


GRADIENT_LEVELS = 32  # gradient backgrounds are quantised to this many steps


def background(tone: str, pattern: str, size: int, rng: np.random.Generator) -> Image.Image:
  """RGB background of the named tone with the named pattern.

  The pattern is an integer level map over the pixel grid, turned into colours by a palette
  image conversion (C speed, no per-channel float arithmetic).
  """
  base = np.asarray(S.BACKGROUND_TONES[tone], np.float32)
  shade = base + S.PATTERN_SHADE
  if pattern == "plain":
    return Image.new("RGB", (size, size), tuple(int(v) for v in base))
  y, x = np.ogrid[0:size, 0:size]
  x = x.astype(np.float32)
  y = y.astype(np.float32)
  levels = 2
  if pattern == "striped":
    period = size / float(rng.uniform(7, 12))
    angle = float(rng.choice([0.0, 90.0, 45.0, 135.0]))
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    t = np.floor((x * c + y * s) * (2.0 / period)).astype(np.int32) & 1
  elif pattern == "checkered":
    cell = size / float(rng.uniform(6, 10))
    t = (np.floor(x / cell).astype(np.int32) + np.floor(y / cell).astype(np.int32)) & 1
  elif pattern == "dotted":
    step = size / float(rng.uniform(8, 12))
    rad = step * 0.2
    dx = x % step - step / 2
    dy = y % step - step / 2
    t = dx * dx + dy * dy < rad * rad
  elif pattern == "gradient":
    angle = math.radians(float(rng.uniform(0, 360)))
    u = (x - size / 2) * math.cos(angle) + (y - size / 2) * math.sin(angle)
    levels = GRADIENT_LEVELS
    t = np.clip(((u / size + 0.5) * (levels - 1) + 0.5).astype(np.int32), 0, levels - 1)
  else:
    raise ValueError(f"render: unknown background pattern {pattern!r}; valid: {S.PATTERNS}")
  lut = base + (shade - base) * (np.arange(levels, dtype=np.float32) / (levels - 1))[:, None]
  im = Image.fromarray(np.ascontiguousarray(t, dtype=np.uint8), mode="L")
  im = im.convert("P")
  im.putpalette([int(round(v)) for v in lut.reshape(-1)])
  return im.convert("RGB")


def _noise(size: int, rng: np.random.Generator, amp_low: int = 6, amp_grain: int = 2
           ) -> Image.Image:
  """'RGB' luminance noise centred on 128: smooth blotches + 2 px grain."""
  g = max(2, size // 16)
  low = rng.integers(128 - amp_low, 128 + amp_low + 1, size=(g, g), dtype=np.uint8)
  low_im = Image.fromarray(low, mode="L").resize((size, size), Image.BILINEAR)
  half = (size + 1) // 2
  grain = rng.integers(128 - amp_grain, 128 + amp_grain + 1, size=(half, half), dtype=np.uint8)
  grain_im = Image.fromarray(grain, mode="L").resize((2 * half, 2 * half), Image.NEAREST)
  if 2 * half != size:
    grain_im = grain_im.crop((0, 0, size, size))
  n = ImageChops.add(low_im, grain_im, scale=1.0, offset=-128)
  return Image.merge("RGB", (n, n, n))


def _draw_sign(img: Image.Image, sign: S.Sign, size: int, ss: int) -> None:
  box = _box_px(sign.bbox, size)
  x0, y0, x1, y1 = box
  w_px, h_px = sign.w * size, sign.h * size
  border = max(1.0, 0.06 * h_px)
  # Plate: dark border then the light inside.
  for color, inset in ((S.SIGN_BORDER, 0.0), (S.SIGN_PLATE, border)):
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    bx0 = ((sign.bbox[0] * size - x0) + inset) * ss
    by0 = ((sign.bbox[1] * size - y0) + inset) * ss
    bx1 = ((sign.bbox[2] * size - x0) - inset) * ss
    by1 = ((sign.bbox[3] * size - y0) - inset) * ss
    ImageDraw.Draw(mask).rectangle((bx0, by0, bx1, by1), fill=255)
    img.paste(color, box, mask.reduce(ss) if ss > 1 else mask)
  # Text: as large as fits (62% of the plate height, 84% of its width).
  text = sign.text.upper()
  px = int(0.62 * h_px * ss)
  f = font(px)
  while px > ss and f.getlength(text) > 0.84 * w_px * ss:
    px -= max(1, px // 16)
    f = font(px)
  mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
  cx = (sign.cx * size - x0) * ss
  cy = (sign.cy * size - y0) * ss
  ImageDraw.Draw(mask).text((cx, cy), text, fill=255, font=f, anchor="mm")
  img.paste(S.SIGN_INK, box, mask.reduce(ss) if ss > 1 else mask)


class ProceduralRenderer:
  """Procedural `Renderer`: draws a structured Description with PIL + numpy.

  supersample: anti-aliasing factor for object / sign masks (4 below 128 px, else 2 by default).
  noise: add the luminance texture noise.
  """

  def __init__(self, supersample: int | None = None, noise: bool = True):
    self.supersample = supersample
    self.noise = noise

  def render(self, desc: S.Description, size: int, rng: np.random.Generator) -> np.ndarray:
    if not desc.panels:
      raise ValueError("ProceduralRenderer needs a structured Description (panels); a caption-"
                       "only description needs a text-to-image renderer (see docs/synth.md)")
    ss = self.supersample or (4 if size < 128 else 2)
    tone, pattern = desc.background
    img = background(tone, pattern, size, rng)
    if len(desc.panels) > 1:
      # Divider strips between consecutive panels.
      for a, b in zip(desc.panels[:-1], desc.panels[1:]):
        x0, x1 = int(round(a.region[2] * size)), int(round(b.region[0] * size))
        img.paste(S.DIVIDER, (x0, 0, max(x1, x0 + 1), size))
    for panel in desc.panels:
      for o in panel.objects:
        box = _box_px(o.bbox, size)
        if box[2] <= box[0] or box[3] <= box[1]:
          continue  # entirely outside the image (the filter reports it as clipped)
        img.paste(S.PALETTE[o.color], box, _shape_mask(o.shape, o.bbox, box, size, ss))
      for sign in panel.signs:
        _draw_sign(img, sign, size, ss)
    if self.noise:
      img = ImageChops.add(img, _noise(size, rng), scale=1.0, offset=-128)
    return np.asarray(img)


def object_labels(desc: S.Description, size: int, supersample: int = 4) -> np.ndarray:
  """What `render` draws at each pixel, as class ids: (size, size, 2) uint8 =
  (1 + index in S.SHAPES, 1 + index in S.COLORS) of the topmost object covering >= half the
  pixel, (0, 0) where none does (background, divider, signs). Same geometry and paint order as
  `ProceduralRenderer.render`."""
  out = np.zeros((size, size, 2), np.uint8)
  for panel in desc.panels:
    for o in panel.objects:
      box = _box_px(o.bbox, size)
      if box[2] <= box[0] or box[3] <= box[1]:
        continue
      cover = np.asarray(_shape_mask(o.shape, o.bbox, box, size, supersample)) >= 128
      region = out[box[1]:box[3], box[0]:box[2]]
      region[cover] = (1 + S.SHAPES.index(o.shape), 1 + S.COLORS.index(o.color))
  return out


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
  """Minimal deterministic PNG writer for (H, W, 3) uint8: "Up" filter on every row + zlib.

  About twice as fast as PIL's encoder on textured images (the "Up" filter removes the smooth
  texture well, and there is no per-row filter search); no timestamps or text chunks.
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"encode_png needs (H, W, 3) uint8, got {image.shape} {image.dtype}")
  h, w, _ = image.shape
  rows = image.reshape(h, w * 3)
  filt = np.empty((h, w * 3 + 1), np.uint8)
  filt[:, 0] = 2  # filter type Up
  filt[0, 1:] = rows[0]
  np.subtract(rows[1:], rows[:-1], out=filt[1:, 1:])  # uint8 arithmetic wraps mod 256

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
          + chunk(b"IDAT", zlib.compress(filt.tobytes(), level)) + chunk(b"IEND", b""))


def encode_image(image: np.ndarray, fmt: str = "png", png_level: int = 1,
                 jpeg_quality: int = 95) -> bytes:
  """Deterministic PNG (no timestamps or text chunks) or JPEG bytes of an (H, W, 3) uint8 image."""
  if fmt == "png":
    return encode_png(image, png_level)
  if fmt in ("jpg", "jpeg"):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()
  raise ValueError(f"encode_image: unknown format {fmt!r}; use 'png' or 'jpeg'")
