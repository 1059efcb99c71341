"""Images/s of the input pipeline (train and eval) at 224x224 on generated JPEGs. Prints numbers.

Why: the design target is a pipeline that feeds at least 3x the images/s the train step consumes
on the same machine; compare this script's train figure with the train-step benchmark's.

The data is an image folder of random smooth "photos" (JPEG, 500x375 by default, about the size
of an ImageNet image) written to a temporary directory, read through ``imagefolder:PATH``: the
same decode / Inception crop / resize / flip path a TFDS JPEG dataset takes. Nothing is
downloaded.

    python benchmarks/input_pipeline_benchmark.py [--images 512] [--batch_size 128] [--steps 20]
"""

import argparse
import io
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vit_cls import input_pipeline  # noqa: E402


def write_jpegs(root: str, num_images: int, num_classes: int, width: int, height: int) -> None:
  """Smooth random images (upsampled noise). Decoding cost grows with pixel count, so it is near
  a photo's of the same size; the files are smaller than photos (about 45 KB vs ~110 KB)."""
  rng = np.random.default_rng(0)
  for split, count in (("train", num_images), ("test", max(num_images // 4, 1))):
    for i in range(count):
      folder = os.path.join(root, split, f"class_{i % num_classes:03d}")
      os.makedirs(folder, exist_ok=True)
      small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
      image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=90)
      with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
        f.write(buffer.getvalue())


def images_per_second(iterator, batch_size: int, steps: int, warmup: int) -> float:
  for _ in range(warmup):  # Fills the shuffle buffer and the prefetch queue.
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  assert batch["image"].shape[0] == batch_size
  return steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(prefix="vit_cls_pipeline_bench_") as root:
    start = time.perf_counter()
    write_jpegs(root, args.images, args.classes, args.width, args.height)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    print(f"data: {args.images} train JPEGs {args.width}x{args.height}, "
          f"{size / 2**20:.1f} MiB in all, written in {time.perf_counter() - start:.1f}s")
    config = ml_collections.ConfigDict({
        "dataset": f"imagefolder:{root}", "image_size": args.image_size,
        "batch_size": args.batch_size, "eval_batch_size": args.batch_size, "seed": 0,
        "shuffle_buffer": 10_000,
        "pp": {"crop": "inception", "flip": True, "eval_crop": "resize"},
    })
    print(f"machine: {os.cpu_count()} CPU cores; batch {args.batch_size}, "
          f"{args.image_size}x{args.image_size}, {args.steps} timed batches")

    train = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
    rate = images_per_second(train, args.batch_size, args.steps, args.warmup)
    print(f"train (decode + inception crop + resize + flip): {rate:8.1f} images/s")

    resume = input_pipeline.create_train_iterator(config, start_step=10_000, process_index=0,
                                                  process_count=1)
    start = time.perf_counter()
    next(resume)
    print(f"resume at step 10,000, first batch after: {time.perf_counter() - start:8.2f} s")

    # A whole evaluation pass (over the larger train split), iterator creation included.
    config.eval_split = "train"
    start = time.perf_counter()
    seen = sum(int(b["mask"].sum()) for b in input_pipeline.create_eval_iterator(
        config, process_index=0, process_count=1))
    rate = seen / (time.perf_counter() - start)
    print(f"eval  (decode + resize, one pass of {seen}):       {rate:8.1f} images/s")


if __name__ == "__main__":
  main()
