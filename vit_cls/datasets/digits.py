"""`digits`: the handwritten digits that ship inside scikit-learn, as a TFDS dataset.

Why this exists: the default job must train and evaluate with no network at all. scikit-learn
carries 1,797 scanned digits (8x8 pixels, intensities 0..16, classes 0..9, from the UCI "Optical
Recognition of Handwritten Digits" set) in its wheel, so preparing this dataset reads a local file
and writes a few hundred KiB of TFRecords: about a second, on first use.

Format, so that everything downstream treats it like any other TFDS image dataset:

* ``image``: uint8, shape (8, 8, 1), PNG-encoded on disk. Intensities are scaled 0..16 -> 0..255
 (``round(v * 255 / 16)``) so that the usual "uint8 image" preprocessing applies unchanged.
* ``label``: ClassLabel with names "0".."9".
* ``id``: the example's row index in ``sklearn.datasets.load_digits()`` (0..1796), so any example
 can be traced back to its source.

The split is fixed forever (changing it would silently change every reported test accuracy):
every row index ``i`` is ranked by ``sha256(f"vit_cls-digits-{i}")``; the 360 lowest-ranked rows
are ``test`` and the other 1,437 are ``train``. A hash ranking, unlike a seeded NumPy permutation,
cannot change with a NumPy release. ``tests/test_input_pipeline.py`` pins a checksum of the split.
Changing the rule requires a new ``VERSION``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TEST = 360
NUM_CLASSES = 10


def split_indices() -> dict[str, np.ndarray]:
  """Row indices of ``load_digits()`` in each split, each sorted ascending.

  A pure function of the constants above (no RNG), so the split is the same on every machine
  and every library version.
  """
  def rank(i: int) -> bytes:
    return hashlib.sha256(f"vit_cls-digits-{i}".encode()).digest()

  order = sorted(range(NUM_EXAMPLES), key=rank)
  test = np.sort(np.asarray(order[:NUM_TEST], dtype=np.int64))
  train = np.sort(np.asarray(order[NUM_TEST:], dtype=np.int64))
  return {"train": train, "test": test}


def load_images() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 images as uint8 (N, 8, 8, 1) scaled to 0..255, and their int64 labels."""
  from sklearn.datasets import load_digits  # Imported late: only preparation needs it.

  bunch = load_digits()
  scaled = np.rint(bunch.images.astype(np.float64) * (255.0 / 16.0))
  images = np.clip(scaled, 0, 255).astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """The scikit-learn handwritten digits: 1,437 train / 360 test, 8x8x1 uint8, 10 classes.

  Registered under the name ``digits`` when ``vit_cls.datasets`` is imported (TFDS registers
  every concrete builder subclass by its snake-cased class name).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: sha256-ranked 1,437 / 360 split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "Handwritten digits 0-9 from scikit-learn (sklearn.datasets.load_digits), 8x8 "
        "grayscale scaled from 0..16 to 0..255. Fixed split: 360 test rows chosen by "
        "sha256 rank of the row index, 1,437 train rows."
      ),
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=[str(d) for d in range(NUM_CLASSES)]),
          "id": np.int64,
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://archive.ics.uci.edu/dataset/80",
      citation=(
        "@misc{alpaydin1998optical, title={Optical Recognition of Handwritten Digits}, "
        "author={Alpaydin, E. and Kaynak, C.}, year={1998}, "
        "howpublished={UCI Machine Learning Repository}}"
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is inside scikit-learn.
    images, labels = load_images()
    return {
      name: self._generate_examples(images, labels, rows)
      for name, rows in split_indices().items()
    }

  def _generate_examples(self, images, labels, rows):
    for i in rows:
      i = int(i)
      yield i, {"image": images[i], "label": int(labels[i]), "id": i}
