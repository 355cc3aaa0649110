"""Image decoding and the static_hd crops (docs/model.md §5), as uint8 HWC arrays.

`static_hd_crops(img, S)` -> (5, S, S, 3) uint8 [TL, TR, BL, BR, full], as the authors'
`split_image` + SigLIP processor: the ORIGINAL image resized (bicubic, aspect ignored) to
2S x 2S and cut row-major into four S x S tiles; the full view is the ORIGINAL image resized
(bicubic) to S x S, not a downscale of the 2S image. The SigLIP processor resizes uint8 PIL
images with `Image.resize(size, BICUBIC)` and no reducing_gap; the default path here does
exactly that, so pixels match the authors' preprocessing before x/255 and (x-0.5)/0.5, which
happen on device inside the model.

`fast=True` trades exactness for speed on large images: JPEG DCT-domain downscaling
(`Image.draft`, never below 2S per side) and `reducing_gap=3.0` (a box pre-reduction) in the
resizes. Measured at S=384 on a 4000x3000 JPEG (a natural photo tiled at native resolution,
2 CPU cores): exact 267 ms, fast 81 ms (3.3x); mean |diff| 0.47 / 255, p99 3, max 12 levels on
sharp edges. Images under ~1500 px per side come out identical (neither trick triggers) and
barely faster. Off by default: training of imported checkpoints should see the authors' pixels;
turn it on where decoding big images dominates.

`load_image` -> RGB PIL image. Decisions:
  * EXIF orientation is applied (`ImageOps.exif_transpose`): the authors' `Image.open(p)
    .convert('RGB')` ignores it, so a rotated phone photo trained sideways there. Pass
    `exif_transpose=False` for the authors' behaviour.
  * Alpha (RGBA, LA, palette with transparency) is DROPPED by default, keeping the stored colour
    of transparent pixels, exactly `.convert('RGB')` as the authors; `alpha='white'`
    composites on white instead (icons with black-but-transparent backgrounds then look right).
  * Grayscale, palette and CMYK images go through PIL's RGB conversion. 16-bit gray is
    rescaled to 8 bits (65535 -> 255); PIL's convert('RGB') would clip it at 255 and turn
    most of the image white. Float ('F') images are read as [0, 1] (or [0, 255] if larger).
  * Truncated files are errors (`corrupt_image`): the authors set LOAD_TRUNCATED_IMAGES=True
    and trained on grey-filled remains; we skip and count them instead. Images above PIL's
    decompression-bomb limit raise `image_too_large`.
Errors are `BadSample` with the path (or the given source) in the message.

`resolve_image_path` confines a record's image path to its image root: absolute paths and
paths that leave the root (`../x.jpg`, a symlink pointing outside) are `image_outside_root`
skips, so a hostile or sloppy corpus cannot make the trainer read arbitrary files.
Absolute paths are allowed only when the caller says so (data.allow_absolute_image_paths).
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fusion_jax.data.errors import BadSample

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]
FAST_REDUCING_GAP = 3.0


def resolve_image_path(image: str, root: str, *, allow_absolute: bool = False,
                       source: str = "") -> str:
  """The file a record's `image` names, inside `root` ('' = the working directory).

  Both are resolved with symlinks followed (os.path.realpath), so a link inside the root that
  points outside it is caught like `../`.

  Raises:
    BadSample('image_outside_root'): `image` is absolute (unless `allow_absolute`) or
      resolves outside `root`.
  """
  if os.path.isabs(image):
    if allow_absolute:
      return image
    raise BadSample("image_outside_root",
                    f"absolute image path {image!r}; give it relative to the image root, or "
                    "set data.allow_absolute_image_paths=True to allow absolute paths", source)
  base = os.path.realpath(root or os.getcwd())
  path = os.path.realpath(os.path.join(base, image))
  if os.path.commonpath([base, path]) != base:
    lexical = os.path.normpath(os.path.join(base, image))
    how = (" through a symlink (point data.image_root at the real folder, or put the data "
           "under it)" if os.path.commonpath([base, lexical]) == base else "")
    raise BadSample("image_outside_root",
                    f"image path {image!r} resolves to {path}, outside the image root "
                    f"{base}{how}", source)
  return path


def load_image(path_or_bytes: PathOrBytes, source: str = "", *, exif_transpose: bool = True,
               alpha: str = "drop", draft_size: int | None = None) -> Image.Image:
  """Decodes an image file or encoded bytes to an RGB PIL image.

  Args:
    path_or_bytes: a file path or the encoded bytes (ArrayRecord / TFDS payloads).
    source: shown in errors (defaults to the path).
    exif_transpose: apply the EXIF orientation tag.
    alpha: 'drop' (the authors' convert('RGB')) or 'white' (composite on white).
    draft_size: JPEG only: let the decoder downscale in the DCT domain while both sides stay
      >= draft_size (see the module docstring, `fast`). None decodes at full size.

  Raises:
    BadSample: 'missing_image' (no such file), 'corrupt_image' (undecodable, truncated),
      'image_too_large' (decompression-bomb limit).
  """
  if alpha not in ("drop", "white"):
    raise ValueError(f"load_image: alpha={alpha!r}; use 'drop' or 'white'")
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    where = source or "<bytes>"
    fp = io.BytesIO(bytes(path_or_bytes))
  else:
    path = os.fspath(path_or_bytes)
    where = f"{source} ({path})" if source and source != path else path
    if not os.path.isfile(path):
      raise BadSample("missing_image", f"no image file {path}", where)
    fp = path
  try:
    with warnings.catch_warnings():
      # PIL warns for palette transparency and large images; both are handled below.
      warnings.simplefilter("ignore", UserWarning)
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(fp) as im:
        if draft_size is not None and im.format == "JPEG":
          im.draft("RGB", (draft_size, draft_size))
        im.load()
        if exif_transpose:
          im = ImageOps.exif_transpose(im)
        return _to_rgb(im, alpha)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadSample("image_too_large", str(e), where) from e
  except FileNotFoundError as e:
    raise BadSample("missing_image", str(e), where) from e
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    # PIL signals truncated / malformed data with OSError (and SyntaxError in some plugins).
    raise BadSample("corrupt_image", f"{type(e).__name__}: {e}", where) from e


def _to_rgb(im: Image.Image, alpha: str) -> Image.Image:
  if im.mode == "RGB":
    return im.copy()
  has_alpha = im.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
      im.mode == "P" and "transparency" in im.info)
  if not has_alpha:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
      # 16/32-bit gray: PIL's RGB conversion clips at 255; rescale the range to 8 bits first.
      arr = np.asarray(im, dtype=np.float64)
      hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
      arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
      return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
      arr = np.asarray(im, dtype=np.float64)
      hi = 1.0 if arr.max() <= 1.0 else 255.0
      arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
      return Image.fromarray(arr, "L").convert("RGB")
    return im.convert("RGB")
  rgba = im.convert("RGBA")
  if alpha == "drop":
    return rgba.convert("RGB")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba).convert("RGB")


def static_hd_crops(img: Image.Image, size: int, *, fast: bool = False) -> np.ndarray:
  """(5, size, size, 3) uint8: [TL, TR, BL, BR] of the 2S x 2S resize, then the S x S resize.

  Both resizes start from the original image (bicubic, aspect ratio ignored), as the authors'
  `split_image`. `fast` adds reducing_gap (see the module docstring).
  """
  if img.mode != "RGB":
    img = img.convert("RGB")
  gap = FAST_REDUCING_GAP if fast else None
  s = int(size)
  big = np.asarray(img.resize((2 * s, 2 * s), Image.Resampling.BICUBIC, reducing_gap=gap))
  full = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC, reducing_gap=gap))
  out = np.empty((5, s, s, 3), np.uint8)
  out[0] = big[:s, :s]
  out[1] = big[:s, s:]
  out[2] = big[s:, :s]
  out[3] = big[s:, s:]
  out[4] = full
  return out


def load_static_hd(path_or_bytes: PathOrBytes, size: int, source: str = "", *,
                   fast: bool = False, exif_transpose: bool = True,
                   alpha: str = "drop") -> np.ndarray:
  """`load_image` + `static_hd_crops` in one call (fast also enables JPEG draft decoding)."""
  img = load_image(path_or_bytes, source, exif_transpose=exif_transpose, alpha=alpha,
                   draft_size=2 * size if fast else None)
  return static_hd_crops(img, size, fast=fast)


def text_only_images(size: int) -> np.ndarray:
  """(5, size, size, 3) uint8 zeros: the images entry of a text-only sample.

  Note: the authors feed zeros AFTER normalisation (pixel 127.5, not representable in uint8);
  uint8 zeros normalise to -1. The model must therefore use `has_image` to replace a text-only
  sample's normalised images by zeros (docs/model.md §5).
  """
  return np.zeros((5, size, size, 3), np.uint8)


def record_images(rec: Mapping[str, Any], size: int, *, image_root: str = "",
                  source: str = "") -> np.ndarray:
  """uint8 (5, size, size, 3) crops of a record as evaluation and inference take it: its
  already decoded `images`, else its `image` file (joined to image_root), else text-only zeros.

  (The training pipeline reads images itself: embedded bytes, paths confined to the root.)
  """
  if rec.get("images") is not None:
    images = np.asarray(rec["images"], np.uint8)
    if images.shape != (5, size, size, 3):
      raise ValueError(f"{source}: decoded images {images.shape}, expected (5, {size}, "
                       f"{size}, 3) (fusion_jax.data.images.load_static_hd)")
    return images
  if rec.get("image"):
    return load_static_hd(os.path.join(image_root, rec["image"]), size, source=source)
  return text_only_images(size)

