"""static_hd crop geometry, image modes, EXIF orientation, and BadSample on broken files."""
import io

import numpy as np
import pytest
from PIL import Image

from fusion_jax.data.errors import BadSample
from fusion_jax.data.images import (
    load_image, load_static_hd, static_hd_crops, text_only_images)

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants(w, h):
  """TL red, TR green, BL blue, BR yellow."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:h // 2, :w // 2] = RED
  a[:h // 2, w // 2:] = GREEN
  a[h // 2:, :w // 2] = BLUE
  a[h // 2:, w // 2:] = YELLOW
  return Image.fromarray(a)


def encode(img, fmt, **kw):
  b = io.BytesIO()
  img.save(b, fmt, **kw)
  return b.getvalue()


def test_static_hd_geometry():
  img = quadrants(120, 60)  # aspect is ignored
  s = 32
  crops = static_hd_crops(img, s)
  assert crops.shape == (5, s, s, 3) and crops.dtype == np.uint8
  for k, colour in enumerate((RED, GREEN, BLUE, YELLOW)):
    # Tiles are uniform (away from the bicubic seam at the tile border).
    assert (crops[k][4:-4, 4:-4] == colour).all(), k
  full = crops[4]
  for (r, c), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), (RED, GREEN, BLUE, YELLOW)):
    blk = full[r * s // 2:(r + 1) * s // 2, c * s // 2:(c + 1) * s // 2]
    assert (blk[3:-3, 3:-3] == colour).all()


def test_static_hd_is_pil_bicubic_of_the_original():
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
  s = 24
  crops = static_hd_crops(img, s)
  big = np.asarray(img.resize((2 * s, 2 * s), Image.Resampling.BICUBIC))
  assert (crops[0] == big[:s, :s]).all() and (crops[1] == big[:s, s:]).all()
  assert (crops[2] == big[s:, :s]).all() and (crops[3] == big[s:, s:]).all()
  # Full view from the ORIGINAL image, not a downscale of the 2S resize.
  full = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC))
  assert (crops[4] == full).all()
  half = np.asarray(Image.fromarray(big).resize((s, s), Image.Resampling.BICUBIC))
  assert not (crops[4] == half).all()


def test_exif_orientation(tmp_path):
  img = quadrants(40, 20)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  p = tmp_path / "rot.jpg"
  img.save(p, "JPEG", exif=exif, quality=95)
  out = load_image(str(p))
  assert out.mode == "RGB" and out.size == (20, 40)
  a = np.asarray(out).astype(int)
  # After a clockwise turn the old bottom-left (blue) is the new top-left.
  assert np.abs(a[5, 5] - BLUE).max() < 40 and np.abs(a[5, 15] - RED).max() < 40
  raw = load_image(str(p), exif_transpose=False)
  assert raw.size == (40, 20)


def test_modes():
  gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
  out = np.asarray(load_image(encode(gray, "PNG")))
  assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()
  assert (out[..., 0] == np.asarray(gray)).all()

  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 2] = 200  # stored colour blue-ish, fully transparent
  rgba[0, 0] = (10, 20, 30, 255)
  data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
  drop = np.asarray(load_image(data))
  assert tuple(drop[1, 1]) == (0, 0, 200) and tuple(drop[0, 0]) == (10, 20, 30)
  white = np.asarray(load_image(data, alpha="white"))
  assert tuple(white[1, 1]) == (255, 255, 255) and tuple(white[0, 0]) == (10, 20, 30)

  pal = Image.new("P", (4, 4), 1)
  pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
  pal.info["transparency"] = 0
  out = np.asarray(load_image(encode(pal, "PNG", transparency=0)))
  assert tuple(out[0, 0]) == (250, 10, 10)

  la = Image.fromarray(np.stack([np.full((2, 2), 90, np.uint8), np.zeros((2, 2), np.uint8)], -1),
                       "LA")
  assert tuple(np.asarray(load_image(encode(la, "PNG"), alpha="white"))[0, 0]) == (255,) * 3

  cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red
  out = np.asarray(load_image(encode(cmyk, "JPEG", quality=100))).astype(int)
  assert np.abs(out[2, 2] - RED).max() < 8

  g16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  assert np.asarray(load_image(encode(g16, "PNG"))).min() == 255


def test_errors(tmp_path):
  with pytest.raises(BadSample) as e:
    load_image(str(tmp_path / "nope.jpg"))
  assert e.value.reason == "missing_image" and "nope.jpg" in str(e.value)

  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG not really an image")
  with pytest.raises(BadSample) as e:
    load_image(str(bad), source="train.jsonl:12")
  assert e.value.reason == "corrupt_image"
  assert "bad.png" in str(e.value) and "train.jsonl:12" in str(e.value)

  data = encode(quadrants(64, 64), "JPEG")
  trunc = tmp_path / "trunc.jpg"
  trunc.write_bytes(data[:len(data) // 2])
  with pytest.raises(BadSample) as e:
    load_image(str(trunc))
  assert e.value.reason == "corrupt_image" and "trunc.jpg" in str(e.value)

  with pytest.raises(BadSample) as e:
    load_image(b"garbage", source="rec-7")
  assert e.value.reason == "corrupt_image" and "rec-7" in str(e.value)
  with pytest.raises(ValueError, match="alpha"):
    load_image(data, alpha="black")


def test_fast_path_close_to_exact():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  img = Image.fromarray(base).resize((1600, 1600), Image.Resampling.BICUBIC)
  data = encode(img, "JPEG", quality=90)
  exact = load_static_hd(data, 64)
  fast = load_static_hd(data, 64, fast=True)
  assert exact.shape == fast.shape == (5, 64, 64, 3)
  assert np.abs(exact.astype(int) - fast.astype(int)).mean() < 3.0
  assert (exact == static_hd_crops(load_image(data), 64)).all()


def test_text_only_images():
  z = text_only_images(16)
  assert z.shape == (5, 16, 16, 3) and z.dtype == np.uint8 and not z.any()
