"""Input pipeline: a dataset name in the config -> tf.data -> this process's numpy batches.

Three kinds of dataset, chosen by ``config.dataset``:

* any TFDS image-classification dataset, ``"cifar10"``, ``"oxford_iiit_pet:3.2.0"``,
  ``"imagenet2012"``... read from ``config.data_dir``. Class count, class names and split sizes
  come from the dataset's own metadata.
* ``"digits"``: the built-in offline dataset (``vit_cls.datasets.digits``), prepared from the copy
  inside scikit-learn into the data dir on first use. What the default config trains on.
* ``"imagefolder:PATH"``: your own photos, ``PATH/<split>/<class>/*.{jpg,jpeg,png}``. Class
  names are the sorted class folder names of the train and eval splits together; label = index.

Config fields read (``config`` is an ``ml_collections.ConfigDict``; optional ones via ``.get``):

===========================  ================================================================
``dataset``                  str, as above. Required.
``data_dir``                 str or None: TFDS data dir; None = the TFDS default
                             (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), also for digits.
``train_split``              str, default ``"train"``. TFDS slicing works (``"train[:90%]"``);
                             for an image folder it is a sub-folder name.
``eval_split``               str, default ``"test"``.
``image_size``               int: the square resolution fed to the model. Required.
``batch_size``               int: global train batch (all processes together). Required.
``eval_batch_size``          int: global eval batch. Default: ``batch_size``.
``seed``                     int: data order and augmentation. Default 0.
``shuffle_buffer``           int: examples (still encoded) in the shuffle buffer. Default 10,000.
``allow_download``           bool, default False: download/prepare a missing TFDS dataset
                             (minutes to hours). When False a missing dataset fails at once.
``pp.crop``                  train crop: ``"inception"`` (random crop of ``pp.crop_min_area``..
                             100% of the area, aspect 3/4..4/3, then resize; default),
                             ``"resize"`` (resize the whole image), ``"none"`` (the image must
                             already be ``image_size``).
``pp.crop_min_area``         float, default 0.05.
``pp.pad_crop``              int pixels, default 0 (off): after the resize, pad by this many
                             black pixels on every side and randomly crop back (translation).
``pp.flip``                  bool, default True: random left-right flip (train only).
``pp.eval_crop``             ``"resize"`` (default), ``"central_crop"`` (resize the short side to
                             ``image_size / pp.central_fraction`` (default 0.875) then take the
                             centre), ``"none"``.
``pp.to_rgb``                bool, default True: decode every image to 3 channels (grayscale is
                             replicated, alpha dropped). False keeps a TFDS dataset's own
                             channel count (e.g. 1 for digits); image folders always give 3.
``pp.value_range``           (lo, hi), default (-1.0, 1.0): uint8 0..255 maps linearly onto it.
===========================  ================================================================

Properties the training loop relies on, and how they are kept:

* Multi-host: each process reads only its own slice of every split (``tfds.even_splits``: sizes
  differ by at most one). Global batches must divide evenly over processes and devices
  (``check_batch_divisibility``).
* Determinism and resume: the train stream is a sequence of epochs. Epoch ``e`` is this
  process's slice, its files (TFDS shards) read in an order seeded by ``(seed, process, e)``, passed
  through a shuffle buffer seeded by ``(seed, process, e)``, cut to ``steps_per_epoch *
  local_batch`` examples (the few left over are dropped, a different few each epoch). So the
  example at step ``s`` is a pure function of ``(seed, s)``: resuming at step N starts at epoch
  ``N // steps_per_epoch`` and skips the rest while the images are still encoded bytes (no
  decoding). Augmentation randomness is stateless, keyed by ``(seed, process, position in the
  stream)``, so it resumes exactly too. When the slice has one file (the digits) or is an image
  folder, the file order cannot change and every epoch comes from one tf.data pipeline; with several
  TFDS shards each epoch builds its own, since TFDS fixes the file order when it builds one.
* Memory: shuffling happens on encoded bytes (or, for an image folder, on file names); images are
  decoded after the buffer, in a parallel map; batches are prefetched.
* Evaluation scores every example once: the last batch is padded and ``mask`` marks real
  examples; every process yields the same number of batches (the largest slice's count), so
  multi-host jitted steps stay in lock step.
* Offline: a TFDS dataset that is not prepared in the data dir raises ``DatasetNotReadyError`` at
  once, naming the dataset, the data dir and how to prepare it, unless ``allow_download``.

TensorFlow is imported here and in ``vit_cls.datasets`` only, and is kept off accelerators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import os
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
from absl import logging
import tensorflow_datasets as tfds

from vit_cls import datasets as builtin_datasets  # Registers the offline builders ("digits").
from vit_cls import errors
from vit_cls import storage

try:  # JAX owns the accelerators; tf.data runs on the host.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Already initialised, or no such device type: nothing to do.
  pass

IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
AUTOTUNE = tf.data.AUTOTUNE
_MAX_EPOCHS = 2**40  # "Forever" for the train stream, kept well inside int64.
# Wraps every function this module hands to tf.data (map, filter, flat_map). They are plain graph code
# (Python `if`s on config values, tf.cond where a tensor decides), so AutoGraph, which tf.data otherwise
# runs on each of them and on every function they call, rewrites nothing: skipping it gives the same
# graph without re-parsing their source each time a pipeline is built. On Python 3.13 that parse is what
# warned ~1,200 times per test module (gast building ast nodes with AutoGraph's '___pyct_anno' field:
# "... got an unexpected keyword argument", a DeprecationWarning).
_no_autograph = tf.autograph.experimental.do_not_convert


class DatasetNotReadyError(errors.DataError, FileNotFoundError):
  """A dataset is not prepared in the data dir and downloading is off. The message says how."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know before reading any example."""

  num_classes: int
  num_train_examples: int  # Whole train split (all processes).
  num_eval_examples: int  # Whole eval split.
  label_names: list[str]  # Class names, index = label.


# ------------------------------------------------------------------------------------------------
# Small public helpers.


def check_batch_divisibility(global_batch: int, num_devices: int, num_processes: int,
                             name: str = "batch_size") -> None:
  """Raises ValueError (one line) unless `global_batch` splits evenly over processes and devices.

  Checked before any data is read: a batch that does not divide fails later inside a sharded jit
  step with a far less readable message.
  """
  need = math.lcm(max(1, num_devices), max(1, num_processes))
  if global_batch <= 0 or global_batch % need:
    hint = max(need, (max(global_batch, 1) + need - 1) // need * need)
    raise errors.ConfigError(
        f"config.{name}={global_batch} must be a positive multiple of {need} (it is split over "
        f"{num_processes} process(es) and {num_devices} device(s)); use e.g. {name}={hint}.")


TRAIN_CROPS = ("inception", "resize", "none")
EVAL_CROPS = ("resize", "central_crop", "none")


def check_preprocessing(config) -> None:
  """The ``config.pp`` switches, as one-line ValueErrors before anything is read or compiled.

  The same values are checked again where the graph is built; here they fail in the first second.
  """
  def bad(field, value, allowed):
    raise errors.ConfigError(f"config.pp.{field}={value!r} is not allowed: {allowed}.")

  crop = _pp(config, "crop", "inception")
  if crop not in TRAIN_CROPS:
    bad("crop", crop, f"choose one of {', '.join(TRAIN_CROPS)}")
  eval_crop = _pp(config, "eval_crop", "resize")
  if eval_crop not in EVAL_CROPS:
    bad("eval_crop", eval_crop, f"choose one of {', '.join(EVAL_CROPS)}")
  min_area = _pp(config, "crop_min_area", 0.05)
  if not 0.0 < float(min_area) <= 1.0:
    bad("crop_min_area", min_area, "a fraction of the area in (0, 1]")
  fraction = _pp(config, "central_fraction", 0.875)
  if not 0.0 < float(fraction) <= 1.0:
    bad("central_fraction", fraction, "a fraction in (0, 1]")
  pad = _pp(config, "pad_crop", 0)
  if int(pad) < 0:
    bad("pad_crop", pad, "0 (off) or a positive number of pixels")
  value_range = _pp(config, "value_range", (-1.0, 1.0))
  if len(tuple(value_range)) != 2 or float(value_range[0]) == float(value_range[1]):
    bad("value_range", value_range, "two different numbers (lo, hi)")


def num_steps_per_epoch(config, info: DatasetInfo | None = None,
                        process_count: int | None = None) -> int:
  """Train steps per epoch: what every process can fill from its own slice of the train split.

  The smallest process slice has ``num_train_examples // process_count`` examples; all processes
  use that count so that they take the same number of steps per epoch.
  """
  info = info or get_dataset_info(config)
  _, process_count = _process(None, process_count)
  local_batch = config.batch_size // process_count
  steps = (info.num_train_examples // process_count) // max(local_batch, 1)
  if steps < 1:
    raise errors.ConfigError(
        f"config.batch_size={config.batch_size} is larger than the train split "
        f"{_train_split(config)!r} of {config.dataset!r} ({info.num_train_examples} examples "
        f"over {process_count} process(es)); lower batch_size.")
  return steps


def num_eval_steps(config, process_count: int | None = None) -> int:
  """Batches that `create_eval_iterator` yields on every process (the same on all of them)."""
  _, process_count = _process(None, process_count)
  source = _make_source(config)
  local_batch = _eval_batch_size(config) // process_count
  largest = max(source.count(_eval_split(config), i, process_count) for i in range(process_count))
  return -(-largest // local_batch)


def get_dataset_info(config) -> DatasetInfo:
  """Class count, names and split sizes; prepares the built-in dataset if it is missing."""
  return _make_source(config).info


# ------------------------------------------------------------------------------------------------
# Iterators.


def create_train_iterator(config, *, start_step: int = 0, process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless train batches for this process, beginning with the batch of step `start_step`.

  Yields ``{"image": float32 [local_batch, S, S, C], "label": int32 [local_batch]}`` with
  ``local_batch = config.batch_size // process_count``. The batch at step ``s`` depends only on
  ``config`` (notably ``seed``), the process index and ``s``, so a run resumed at step N sees
  exactly the batches an uninterrupted run would have.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  process_index, process_count = _process(process_index, process_count)
  check_batch_divisibility(config.batch_size, _device_count(), process_count, "batch_size")
  local_batch = config.batch_size // process_count
  source = _make_source(config)
  steps_per_epoch = num_steps_per_epoch(config, source.info, process_count)
  seed = int(config.get("seed", 0))
  split = _train_split(config)
  first_part = source.read(split, process_index, process_count,
                           shuffle_seed=_file_order_seed(seed, process_index, 0))
  per_epoch = steps_per_epoch * local_batch
  buffer = max(1, min(int(config.get("shuffle_buffer", 10_000)), first_part.num_examples))
  preprocess = _train_preprocess(config, source.channels)

  first_epoch, first_offset = divmod(start_step, steps_per_epoch)

  def positioned(part: _Part, e, offset) -> tf.data.Dataset:
    """(position, example) of epoch `e` from its batch `offset` on; `e` and `offset` may be tensors.
    The epoch's order is fixed by (seed, process, e) alone, for the files (when the source reorders
    them, `part` is read for this epoch) and the shuffle buffer: any epoch can be rebuilt without
    replaying the ones before it."""
    order_seed = tf.random.stateless_uniform(
        [], seed=_fold(seed, process_index, e), minval=None, maxval=None, dtype=tf.int64)
    ds = part.examples.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
    # Cut the epoch to whole batches. A filter rather than take() reads the input to its end,
    # which lets TFDS's in-memory cache of small datasets complete instead of restarting.
    ds = ds.enumerate().filter(_no_autograph(lambda i, _: i < per_epoch))
    ds = ds.map(_no_autograph(lambda _, ex: ex))
    e, offset = tf.cast(e, tf.int64), tf.cast(offset, tf.int64)
    ds = ds.skip(offset * local_batch)  # Encoded bytes only: cheap.
    # Position in the uninterrupted stream: the key of the example's augmentation.
    return ds.enumerate(start=e * per_epoch + offset * local_batch)

  def batches(ds: tf.data.Dataset, part: _Part) -> Iterator[dict[str, np.ndarray]]:
    fetch = part.fetch

    @_no_autograph
    def prepare(position, ex):
      key = _fold(seed, process_index, position)
      return {"image": preprocess(fetch(ex["image"]), key), "label": tf.cast(ex["label"], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)
    return _as_numpy(ds, part.files)

  if not source.reorders_files(split, process_index, process_count):
    # One pipeline for every epoch: building one (reading the split into the shuffle buffer, tracing
    # the preprocessing) took ~0.3 s, every 11 steps on the digits, most of the job's input time.
    @_no_autograph
    def epoch(e):
      return positioned(first_part, e, tf.where(e == first_epoch, first_offset, 0))

    return batches(tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch), first_part)

  def epochs():
    # The file order of TFDS shards is set when the pipeline is built, so a per-epoch order needs one
    # pipeline per epoch, chained here (its reshuffle_each_iteration would also restart from the first
    # epoch's order on resume).
    for e in range(first_epoch, _MAX_EPOCHS):
      part = first_part
      if e:
        part = source.read(split, process_index, process_count,
                           shuffle_seed=_file_order_seed(seed, process_index, e))
      yield from batches(positioned(part, e, first_offset if e == first_epoch else 0), part)

  return epochs()


def _file_order_seed(seed: int, process_index: int, epoch: int) -> int:
  """The seed of epoch `epoch`'s file order on one process: a pure function of its arguments (a
  hash, not an RNG stream, so it never depends on the epochs before it or on a library version)."""
  digest = hashlib.sha256(f"vit_cls-file-order-{seed}-{process_index}-{epoch}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def create_eval_iterator(config, *, process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's slice of the eval split, every example exactly once.

  Yields ``{"image", "label", "mask": bool [local_batch]}``, ``local_batch =
  config.eval_batch_size // process_count``. Padding examples (zeros, label 0) have mask False;
  every process yields ``num_eval_steps(config)`` batches.
  """
  return iter(create_eval_dataset(config, process_index=process_index, process_count=process_count))


@dataclasses.dataclass(frozen=True)
class EvalDataset:
  """This process's eval batches as a pipeline built once: every iteration is a new pass over the
  split, without opening the dataset, listing its files or tracing the preprocessing again."""

  dataset: tf.data.Dataset
  num_batches: int
  files: tuple[str, ...] | None = None

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return _as_numpy(self.dataset, self.files)


def create_eval_dataset(config, *, process_index: int | None = None,
                        process_count: int | None = None, split: str | None = None) -> EvalDataset:
  """The eval split for `create_eval_iterator`, built once per run (see EvalDataset).

  `split`: another split of the dataset read the same way (eval preprocessing, every example once, the
  last batch padded and masked); the few-shot and kNN evaluators read their support set like this.
  """
  process_index, process_count = _process(process_index, process_count)
  eval_batch = _eval_batch_size(config)
  check_batch_divisibility(eval_batch, _device_count(), process_count, "eval_batch_size")
  local_batch = eval_batch // process_count
  source = _make_source(config)
  split = split or _eval_split(config)
  largest = max(source.count(split, i, process_count) for i in range(process_count))
  num_batches = -(-largest // local_batch)
  part = source.read(split, process_index, process_count, shuffle_seed=None)

  preprocess = _eval_preprocess(config, source.channels)
  fetch = part.fetch

  @_no_autograph
  def prepare(ex):
    return {"image": preprocess(fetch(ex["image"])), "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(True)}

  ds = part.examples.map(prepare, num_parallel_calls=AUTOTUNE)
  pad = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)).repeat()
  ds = ds.concatenate(pad).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)
  return EvalDataset(ds, num_batches, part.files)


def label_counts(config, split: str, *, process_index: int | None = None,
                 process_count: int | None = None) -> np.ndarray:
  """Examples per class (int64 [num_classes]) in this process's slice of `split`, read without decoding
  a single image (an image folder's labels come from its listing; a TFDS split's records are read once).
  The few-shot evaluator checks its shot counts against these before training starts."""
  process_index, process_count = _process(process_index, process_count)
  source = _make_source(config)
  part = source.read(split, process_index, process_count, shuffle_seed=None)
  counts = np.zeros(source.info.num_classes, np.int64)
  labels = part.examples.map(_no_autograph(lambda ex: ex["label"])).batch(8192)
  for batch in labels.as_numpy_iterator():
    counts += np.bincount(batch, minlength=source.info.num_classes)[:source.info.num_classes]
  return counts


# ------------------------------------------------------------------------------------------------
# Config access.


def _train_split(config) -> str:
  return config.get("train_split", "train") or "train"


def _eval_split(config) -> str:
  return config.get("eval_split", "test") or "test"


def _eval_batch_size(config) -> int:
  return int(config.get("eval_batch_size", None) or config.batch_size)


def _pp(config, name: str, default: Any) -> Any:
  pp = config.get("pp", None)
  if pp is None:
    return default
  value = pp.get(name, default) if hasattr(pp, "get") else getattr(pp, name, default)
  return default if value is None else value


def _process(process_index, process_count) -> tuple[int, int]:
  """Defaults from JAX, imported only when needed (tests pass both explicitly)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")
  return int(process_index), int(process_count)


def _device_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.device_count()


def _as_numpy(ds: tf.data.Dataset, files=None) -> Iterator[dict[str, np.ndarray]]:
  options = tf.data.Options()
  options.deterministic = True  # Parallel map/interleave keep input order: same seed, same data.
  it = iter(ds.with_options(options).as_numpy_iterator())
  return _naming_bad_images(it, files) if files else it


def _naming_bad_images(it, files) -> Iterator[dict[str, np.ndarray]]:
  """`it`, with an image that fails to decode inside tf.data reported as a ValueError naming its file.

  TensorFlow's own error names no file. The header check of `_FolderSource` catches files that are not
  images at all; this catches the rest (a truncated JPEG or PNG) by decoding `files` one by one, which
  costs time only on that error path.
  """
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError:
      for path in files:
        try:
          tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
          reason = e.message.split("}}")[-1].strip().splitlines()[0] if e.message else type(e).__name__
          raise errors.DataError(f"Image folder file {path!r} cannot be decoded ({reason}): remove or "
                           f"replace it.") from None
      raise
    yield batch


def _fold(seed: int, *data) -> tf.Tensor:
  """A stateless-RNG key (int64 [2]) from the seed and any number of integers, order-sensitive."""
  key = tf.constant([seed, 0x5EED], tf.int64)
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


# ------------------------------------------------------------------------------------------------
# Sources: where encoded examples come from.


@dataclasses.dataclass(frozen=True)
class _Part:
  """One process's slice of a split, still encoded, in a fixed order.

  ``examples`` yields ``{"image": tf.string, "label": tf.int64}``; "image" is either the encoded
  image or a file name, and ``fetch`` turns it into encoded bytes. Fetching is separate so that
  image-folder files are read only after the shuffle (and the resume skip).
  """
  examples: tf.data.Dataset
  num_examples: int
  fetch: Callable[[tf.Tensor], tf.Tensor]
  files: tuple[str, ...] | None = None  # An image folder's files: a decode error can name the bad one.


class _TfdsSource:
  """A TFDS dataset (the built-in digits included) that is prepared in the data dir."""


  def __init__(self, config):
    self._name = config.dataset
    if config.get("data_dir", None):  # gs://: one line within seconds when it cannot be reached
      storage.check_access(config.data_dir, write=False, what="config.data_dir")
    self._builder = _prepared_builder(self._name, config.get("data_dir", None),
                                      bool(config.get("allow_download", False)))
    info = self._builder.info
    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
      self._image_key, self._label_key = keys
    else:
      self._image_key, self._label_key = "image", "label"
    features = info.features
    image = features[self._image_key] if self._image_key in features else None
    label = features[self._label_key] if self._label_key in features else None
    if not isinstance(image, tfds.features.Image) or not isinstance(label,
                                                                    tfds.features.ClassLabel):
      raise errors.DataError(
          f"Dataset {self._name!r} is not image classification: need an Image feature "
          f"{self._image_key!r} and a ClassLabel {self._label_key!r}, got {list(features)}.")
    self.channels = image.shape[-1] if image.shape[-1] in (1, 3, 4) else None
    self.info = DatasetInfo(
        num_classes=label.num_classes,
        num_train_examples=self._split_size(_train_split(config)),
        num_eval_examples=self._split_size(_eval_split(config)),
        label_names=[str(n) for n in label.names])

  def _split_size(self, split) -> int:
    try:
      return int(self._builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError) as e:
      reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
      raise errors.ConfigError(
          f"Split {split!r} is not in dataset {self._name!r} (its splits: "
          f"{sorted(self._builder.info.splits)}; slices like 'train[:90%]' work); fix "
          f"config.train_split/eval_split. TFDS said: {reason}") from None

  def count(self, split: str, process_index: int, process_count: int) -> int:
    sub = tfds.even_splits(split, process_count)[process_index]
    return int(self._builder.info.splits[sub].num_examples)

  def reorders_files(self, split: str, process_index: int, process_count: int) -> bool:
    """Whether `read`'s shuffle_seed changes anything: it orders the shards this process reads, and
    the train stream varies it per epoch. One shard (the digits) has a single order."""
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
    return len(self._builder.info.splits[sub].file_instructions) > 1

  def read(self, split: str, process_index: int, process_count: int, *,
           shuffle_seed: int | None) -> _Part:
    sub = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
    # Every image feature stays encoded (the pipeline decodes after the shuffle; an unused
    # one, e.g. a segmentation mask, is never decoded). tfds.decode.PartialDecoding would skip
    # parsing them too, but logs deprecation warnings on every call in this TFDS version.
    decoders = {k: tfds.decode.SkipDecoding() for k, f in self._builder.info.features.items()
                if isinstance(f, tfds.features.Image)}
    read_config = tfds.ReadConfig(
        shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
        skip_prefetch=True)  # We prefetch batches at the end instead.
    ds = self._builder.as_dataset(split=sub, shuffle_files=shuffle_seed is not None,
                                  decoders=decoders, read_config=read_config)
    image_key, label_key = self._image_key, self._label_key
    ds = ds.map(_no_autograph(
        lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int64)}))
    return _Part(ds, self.count(split, process_index, process_count), fetch=lambda x: x)


def _prepared_builder(name: str, data_dir: str | None, allow_download: bool):
  """The TFDS builder for `name`, prepared in `data_dir`, or a one-line error at once.

  An unprepared dataset is never downloaded silently: offline, TFDS retries a download for
  minutes before it fails. The built-in offline builders are the exception (they read local data).
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.ConfigError(
        f"Unknown dataset {name!r}: config.dataset must be a TFDS dataset name (e.g. cifar10), "
        f"'digits', or '{IMAGEFOLDER_PREFIX}PATH'.") from None
  except AssertionError as e:  # TFDS reports an unknown version this way.
    raise errors.ConfigError(f"Dataset {name!r}: {str(e).splitlines()[-1]}") from None
  with _tfds_quiet(stdout=False):  # an unprepared one: "Variant folder ... has no dataset_info.json"
    if builder.is_prepared():
      return builder
  base_name = name.split(":")[0].split("/")[0]
  builtin = base_name in builtin_datasets.OFFLINE_BUILDERS
  if builtin or allow_download:
    if builtin:  # TFDS would announce a download ("Unknown size") with progress bars; nothing is.
      print(f"preparing the built-in {base_name} dataset once in {builder.data_dir}", flush=True)
    try:
      with _tfds_quiet(stdout=True) if builtin else contextlib.nullcontext():
        builder.download_and_prepare()
    except Exception:  # Another process may have prepared the same data dir meanwhile.
      if not builder.is_prepared():
        raise
    return tfds.builder(name, data_dir=data_dir)  # Re-read the info that was just written.
  root = data_dir or tfds.core.constants.DATA_DIR
  raise DatasetNotReadyError(
      f"Dataset {name!r} is not prepared in data_dir {root!r} (no {builder.data_dir}) and "
      f"config.allow_download is False: on a machine with network run "
      f"`tfds build {base_name} --data_dir={root}` and copy {root}/{base_name} here (for "
      f"manually downloaded data, add --manual_dir=DIR), or set config.allow_download=True.")


@contextlib.contextmanager
def _tfds_quiet(stdout: bool):
  """TFDS without its warnings (absl logging), its progress bars and, with `stdout`, the lines it
  prints to stdout (what it would download, where it prepared)."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  verbosity, bars = logging.get_verbosity(), getattr(tqdm_utils, "_active", True)
  logging.set_verbosity(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()) if stdout else contextlib.nullcontext():
      yield
  finally:
    logging.set_verbosity(verbosity)
    tfds.display_progress_bar(bars)


class _FolderSource:
  """``imagefolder:PATH``: ``PATH/<split>/<class>/<image>`` files, read with plain tf.data.

  Files are listed once, then ordered by a hash of their path relative to PATH: a fixed order
  that mixes the classes (so each process's slice has all of them) and does not depend on the
  order the file system lists them in.
  """


  def __init__(self, config):
    root = config.dataset[len(IMAGEFOLDER_PREFIX):]
    self._root = root if storage.is_gcs(root) else os.path.expanduser(root)
    storage.check_access(self._root, write=False, what="image folder")  # gs://: one line, seconds
    if not storage.isdir(self._root):
      raise DatasetNotReadyError(
          f"Image folder {self._root!r} (config.dataset={config.dataset!r}) does not exist; "
          f"it must hold <split>/<class>/*.jpg|jpeg|png, e.g. train/cat/1.jpg.")
    splits = [_train_split(config), _eval_split(config)]
    found = {s: self._list(s) for s in splits}
    names = sorted({cls for files in found.values() for cls, _ in files})
    if len(names) < 2:
      raise errors.DataError(
          f"Image folder {self._root!r} has {len(names)} class ({', '.join(names)}): classification "
          f"needs at least 2 class folders, <split>/<class>/*.jpg|jpeg|png.")
    index = {n: i for i, n in enumerate(names)}
    self._files = {s: ([p for _, p in f], [index[c] for c, _ in f]) for s, f in found.items()}
    self.channels = 3
    self.info = DatasetInfo(
        num_classes=len(names), num_train_examples=len(found[splits[0]]),
        num_eval_examples=len(found[splits[1]]), label_names=names)

  def _list(self, split: str) -> list[tuple[str, str]]:
    """(class, path) of every image of a split, each file's header checked once (while unchanged).

    Errors before training starts: an empty class folder (its label would never occur), a file with an
    image extension that cannot be read or is not an image. Other files are skipped with a warning;
    hidden ones (``.DS_Store``, ``.ipynb_checkpoints/``) silently.
    """
    split_dir = os.path.join(self._root, split)
    files, skipped, signature = [], [], []
    remote = storage.is_gcs(split_dir)  # Cloud Storage has no directory mtimes
    mtime = (lambda path: None) if remote else (lambda path: os.stat(path).st_mtime_ns)
    if storage.isdir(split_dir):
      signature.append(mtime(split_dir))
      for cls in storage.listdir(split_dir):
        cls_dir = os.path.join(split_dir, cls)
        if cls.startswith(".") or not storage.isdir(cls_dir):
          continue
        found = []
        for dirpath, dirnames, filenames in storage.walk(cls_dir):
          dirnames[:] = [d for d in dirnames if not d.startswith(".")]
          signature.append((dirpath, mtime(dirpath)))
          for f in filenames:
            if f.lower().endswith(IMAGE_EXTENSIONS):
              found.append((cls, os.path.join(dirpath, f)))
            elif not f.startswith("."):
              skipped.append(os.path.join(dirpath, f))
        if not found:
          raise errors.DataError(
              f"Image folder class {cls_dir!r} has no images (*.jpg|jpeg|png): add images or remove "
              f"the folder (an empty class gets a label that never occurs).")
        files += found
    if files and _CHECKED_FOLDERS.get(split_dir) != signature:
      if skipped:
        logging.warning("Image folder %r: skipping %d file(s) that are not .jpg/.jpeg/.png, e.g. %s",
                        split_dir, len(skipped), ", ".join(repr(p) for p in skipped[:3]))
      # In Cloud Storage a header costs a request per file: a bad image there is named when it fails
      # to decode (`_naming_bad_images`), not before training.
      checked = () if remote else ((p, _not_an_image(p)) for _, p in files)
      bad = [(p, why) for p, why in checked if why]
      if bad:
        more = f" (and {len(bad) - 1} more such files)" if len(bad) > 1 else ""
        raise errors.DataError(f"Image folder file {bad[0][0]!r} {bad[0][1]}{more}: remove or replace it.")
      _CHECKED_FOLDERS[split_dir] = signature
    if not files:
      raise DatasetNotReadyError(
          f"Image folder split {split_dir!r} has no images: expected "
          f"{split_dir}/<class>/*.jpg|jpeg|png (split names come from config.train_split and "
          f"config.eval_split).")

    def key(item):
      return hashlib.sha256(os.path.relpath(item[1], self._root).encode()).digest()

    return sorted(files, key=key)

  def count(self, split: str, process_index: int, process_count: int) -> int:
    start, stop = _even_slice(len(self._files[split][0]), process_index, process_count)
    return stop - start

  def reorders_files(self, split: str, process_index: int, process_count: int) -> bool:
    del split, process_index, process_count
    return False  # one file per example: the train stream's shuffle buffer orders them

  def read(self, split: str, process_index: int, process_count: int, *,
           shuffle_seed: int | None) -> _Part:
    del shuffle_seed  # The order is already fixed; the train stream shuffles file names.
    paths, labels = self._files[split]
    start, stop = _even_slice(len(paths), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant(paths[start:stop], tf.string),
         "label": tf.constant(labels[start:stop], tf.int64)})
    return _Part(ds, stop - start, fetch=tf.io.read_file, files=tuple(paths[start:stop]))


# split dir -> the directory mtimes it had when every file's header passed: evaluation builds a new
# source each time, and a large folder need not be re-read while nothing in it changed.
_CHECKED_FOLDERS: dict[str, list] = {}
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def _not_an_image(path: str) -> str | None:
  """Why `path` cannot be an image that tf.io.decode_image reads, from its first bytes; None if it can."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    return f"cannot be read ({e.strerror})"
  if not head:
    return "is empty (0 bytes)"
  if not head.startswith(_IMAGE_MAGIC):
    return f"is not a JPEG, PNG, GIF or BMP image (it starts with {head!r})"
  return None


def _even_slice(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of `count`: sizes differ by at most one, first parts larger.

  The same rule as ``tfds.even_splits``, so both kinds of source divide alike.
  """
  base, extra = divmod(n, count)
  start = index * base + min(index, extra)
  return start, start + base + (1 if index < extra else 0)


def _make_source(config):
  name = config.dataset
  if not isinstance(name, str) or not name:
    raise errors.ConfigError(f"config.dataset must be a non-empty string, got {name!r}.")
  if name.startswith(IMAGEFOLDER_PREFIX):
    return _FolderSource(config)
  return _TfdsSource(config)


# ------------------------------------------------------------------------------------------------
# Preprocessing (the ViT recipes' "inception crop / resize, flip, scale to [-1, 1]").


def _channels(config, stored: int | None) -> int:
  if _pp(config, "to_rgb", True) or stored not in (1, 3, 4):
    return 3
  return int(stored)


def _decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """Any JPEG/PNG/GIF/BMP -> uint8 [h, w, channels]."""
  image = tf.io.decode_image(encoded, channels=channels, dtype=tf.uint8, expand_animations=False)
  image.set_shape([None, None, channels])
  return image


def _decode_random_crop(encoded, channels, key, min_area) -> tf.Tensor:
  """Inception-style crop: a random window of `min_area`..1 of the area, aspect 3/4..4/3.

  JPEGs decode only the window (much less work for large photos); other formats decode fully
  and are sliced. Both draw the window from the same key, so the crop does not depend on the
  format.
  """
  def window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=key, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(min_area, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():
    begin, size = window(tf.image.extract_jpeg_shape(encoded))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(encoded, crop, channels=channels)

  def other():
    image = _decode(encoded, channels)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape([None, None, channels])
  return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  return tf.image.resize(image, [size, size], method="bilinear")


def _to_range(image: tf.Tensor, config) -> tf.Tensor:
  lo, hi = (float(v) for v in _pp(config, "value_range", (-1.0, 1.0)))
  image = tf.cast(image, tf.float32) * ((hi - lo) / 255.0) + lo
  return tf.clip_by_value(image, min(lo, hi), max(lo, hi))


def _train_preprocess(config, stored_channels):
  """encoded bytes, key -> float32 [S, S, C]. Each step is a config switch (module docstring)."""
  size = int(config.image_size)
  channels = _channels(config, stored_channels)
  crop = _pp(config, "crop", "inception")
  if crop not in ("inception", "resize", "none"):
    raise errors.ConfigError(f"config.pp.crop={crop!r} must be 'inception', 'resize' or 'none'.")
  min_area = float(_pp(config, "crop_min_area", 0.05))
  pad = int(_pp(config, "pad_crop", 0))
  flip = bool(_pp(config, "flip", True))

  def preprocess(encoded, key):
    crop_key, pad_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    if crop == "inception":
      image = _resize(_decode_random_crop(encoded, channels, crop_key, min_area), size)
    elif crop == "resize":
      image = _resize(_decode(encoded, channels), size)
    else:
      image = tf.ensure_shape(tf.cast(_decode(encoded, channels), tf.float32),
                              [size, size, channels])
    if pad > 0:
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, [size, size, channels], seed=pad_key)
    if flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
    image.set_shape([size, size, channels])
    return _to_range(image, config)

  return preprocess


def _eval_preprocess(config, stored_channels):
  """encoded bytes -> float32 [S, S, C], deterministic."""
  size = int(config.image_size)
  channels = _channels(config, stored_channels)
  crop = _pp(config, "eval_crop", "resize")
  if crop not in ("resize", "central_crop", "none"):
    raise errors.ConfigError(
        f"config.pp.eval_crop={crop!r} must be 'resize', 'central_crop' or 'none'.")
  fraction = float(_pp(config, "central_fraction", 0.875))

  def preprocess(encoded):
    image = _decode(encoded, channels)
    if crop == "resize":
      image = _resize(image, size)
    elif crop == "central_crop":
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = (size / fraction) / tf.reduce_min(shape)
      new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
      image = tf.image.resize(image, new, method="bilinear")
      top, left = (new[0] - size) // 2, (new[1] - size) // 2
      image = image[top:top + size, left:left + size]
    else:
      image = tf.ensure_shape(tf.cast(image, tf.float32), [size, size, channels])
    image.set_shape([size, size, channels])
    return _to_range(image, config)

  return preprocess
