"""Classify image files with a checkpoint: the top classes and their probabilities, per image.

  python -m vit_cls.predict --checkpoint WORKDIR_OR_NPZ image.jpg [image2.png ...] [--top_k 5]

Images are preprocessed the way evaluation sees them (the default `pp.eval_crop="resize"`): decoded
with PIL (grayscale, palette and alpha images become RGB), resized bilinearly to the checkpoint's image
size, scaled to [-1, 1]; an imported timm or Hugging Face checkpoint gets its own transform instead (the
mean/std, interpolation and crop it reports: `LoadedCheckpoint.preprocessing`). Class names come from
the checkpoint's meta (`label_names`); an `.npz` has none, so classes print as indices. No TensorFlow.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import Sequence

if __name__ == "__main__":  # before numpy and JAX: the memory allocator (stderr: stdout is the answer)
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup(file=sys.stderr)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_cls import checkpoint as ckpt_lib
from vit_cls import storage
from vit_cls.convert import image_size_arg


def load_image(path: str, image_size, preprocessing: dict | None = None) -> np.ndarray:
  """One image file -> float32 (H, W, 3) in [-1, 1] at the model's input size.

  PIL decodes; the resize is `jax.image.resize` bilinear without antialiasing, which samples like the
  eval pipeline's `tf.image.resize(method="bilinear")` (half-pixel centres; PIL's own bilinear resize
  antialiases when shrinking, which the model never saw in evaluation).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = ckpt_lib.hw(image_size)
  try:
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_gcs(path) else path
    with Image.open(source) as img:
      img = img.convert("RGB")
      if preprocessing and preprocessing.get("source") != "vit_cls":
        return _foreign_preprocess(img, h, w, preprocessing)
      x = np.asarray(img, dtype=np.float32)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the image ({e}).") from None
  if x.shape[:2] != (h, w):
    x = np.asarray(jax.image.resize(x, (h, w, 3), "linear", antialias=False))
  return normalize(x, preprocessing)


def normalize(x, preprocessing: dict | None, xp=np):
  """float32 [0, 255] pixels (resized and cropped) -> the model's input values.

  This project's checkpoints see [-1, 1]; an imported one its own mean/std of [0, 1] pixels. One
  function for both `load_image` and the serving exports (vit_cls.export_serving runs it inside the
  exported program with `xp=jax.numpy`), so that the two cannot drift apart.
  """
  if not preprocessing or preprocessing.get("source") == "vit_cls":
    return xp.clip(x / 127.5 - 1.0, -1.0, 1.0)
  x = x / 255.0
  return ((x - xp.asarray(preprocessing["mean"], xp.float32)) /
          xp.asarray(preprocessing["std"], xp.float32)).astype(xp.float32)


def eval_resize(image_wh: tuple[int, int], h: int, w: int, pp: dict) -> tuple[int, int]:
  """The (width, height) an imported checkpoint's transform resizes an image of `image_wh` to, before
  its (w, h) centre crop: the crop is `crop_pct` of the resized image (the shorter side to
  floor(size / crop_pct) for a square input), or no crop at all without `crop_pct`.
  """
  crop = pp.get("crop_pct")
  if not crop:
    return w, h
  if h == w:
    short, (iw, ih) = int(h / crop), image_wh  # torchvision's Resize(int): the shorter side
    return (short, int(short * ih / iw)) if iw <= ih else (int(short * iw / ih), short)
  return int(w / crop), int(h / crop)


def _foreign_preprocess(img, h: int, w: int, pp: dict) -> np.ndarray:
  """An imported checkpoint's own evaluation transform, as timm / Transformers apply it with PIL.

  With `crop_pct`: resize so the crop is that fraction of the image (the shorter side to
  floor(size / crop_pct) for a square input), then a centre crop; without: resize to (h, w). Then
  [0, 1] pixels normalised by the checkpoint's mean and std.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
              "lanczos": Image.LANCZOS}.get(pp.get("interpolation"), Image.BILINEAR)
  img = img.resize(eval_resize(img.size, h, w, pp), resample)  # PIL: the same size -> a copy
  if img.size != (w, h):
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    img = img.crop((left, top, left + w, top + h))
  return normalize(np.asarray(img, dtype=np.float32), pp)


def top_k(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
  """The k most probable classes, best first, as (class index, probability)."""
  order = np.argsort(-probs, kind="stable")[:k]
  return [(int(i), float(probs[i])) for i in order]


def predict(checkpoint, image_paths: Sequence[str], *, k: int = 5, batch_size: int = 32,
            image_size=None, num_heads: int | None = None):
  """[(path, [(label, probability), ...]), ...] for each image; `label` is a name or a class index.

  `checkpoint`: a path or a `CheckpointSource` (it knows the preprocessing its images need).
  `image_size` overrides the checkpoint's (needed for an `.npz` with a non-square patch grid);
  `num_heads` gives the heads of a timm / HF file that does not say them (see `vit_cls.formats.read`).
  """
  import jax  # pylint: disable=g-import-not-at-top

  overrides = {} if image_size is None else {"image_size": image_size}
  if num_heads:
    overrides["num_heads"] = int(num_heads)
  loaded = ckpt_lib.load_with_info(checkpoint, **overrides)
  model = loaded.model
  if not model.num_classes or model.pool == "none":
    raise ValueError(f"{loaded.source.path}: the model has no classification head (num_classes=0 or "
                     f"pool='none'); predict needs logits.")
  names = loaded.label_names
  apply = jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x, train=False), axis=-1))
  results = []
  for start in range(0, len(image_paths), batch_size):
    paths = list(image_paths[start:start + batch_size])
    batch = np.stack([load_image(p, loaded.image_size, loaded.preprocessing) for p in paths])
    probs = np.asarray(apply(loaded.params, batch))
    for path, row in zip(paths, probs):
      ranked = top_k(row, k)
      results.append((path, [(names[i] if names and i < len(names) else i, p) for i, p in ranked]))
  return results


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_cls.predict",
                                   description="Top-k classes of image files under a ViT checkpoint.")
  parser.add_argument("--checkpoint", required=True, help=".npz file, workdir, or orbax step dir")
  parser.add_argument("--top_k", type=int, default=5, help="classes to print per image")
  parser.add_argument("--image_size", type=image_size_arg, default=None,
                      help="N or HxW (default: the checkpoint's)")
  parser.add_argument("--num_heads", type=int, default=None,
                      help="attention heads of a timm / HF file that does not say them")
  parser.add_argument("images", nargs="+", help="image files (anything PIL reads)")
  args = parser.parse_args(argv)
  try:
    results = predict(args.checkpoint, args.images, k=args.top_k, image_size=args.image_size,
                      num_heads=args.num_heads)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for path, ranked in results:
    print(path)
    for rank, (label, prob) in enumerate(ranked, 1):
      print(f"  {rank}. {label}: {prob:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
