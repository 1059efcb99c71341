"""Tests of vit_cls.input_pipeline and the built-in digits dataset. No network, no real downloads.

TFDS datasets other than digits are faked with `tfds.testing.mock_data` over real metadata files
written into a temporary data dir, so the "is it prepared?" check and the split sizes behave as
with a prepared dataset while the records themselves are generated.
"""

import collections
import hashlib
import io
import os
import time

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from vit_cls import input_pipeline as ip  # noqa: E402  (after the importorskip guards)
from vit_cls.datasets import digits  # noqa: E402

# sha256 of "id,label\n" lines (ids ascending) of each digits split, read back from the prepared
# files. If this changes, every reported digits accuracy changes meaning: bump Digits.VERSION.
DIGITS_TEST_SHA256 = "66c726809f1c779934f6101adb7422234494e43f9c73dfc0070092ed7f401a3e"
DIGITS_TRAIN_SHA256 = "dcae0f084c564365be28ef00bb453999fc6a901a49ec6fcca9fdc338df74ec8e"


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """One prepared digits data dir for the whole module (preparing takes a few seconds)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  ip.get_dataset_info(_config(data_dir=data_dir))
  return data_dir


def _config(**overrides):
  """A digits config whose preprocessing is the identity at 8x8 unless a test turns steps on."""
  config = ml_collections.ConfigDict({
      "dataset": "digits", "data_dir": None, "train_split": "train", "eval_split": "test",
      "image_size": 8, "batch_size": 256, "eval_batch_size": 64, "seed": 0,
      "shuffle_buffer": 10_000, "allow_download": False,
      "pp": {"crop": "resize", "flip": False, "pad_crop": 0, "to_rgb": True,
             "eval_crop": "resize", "crop_min_area": 0.05},
  })
  pp = overrides.pop("pp", {})
  config.update(overrides)
  config.pp.update(pp)
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _fingerprints(images, labels):
  """Multiset of (pixels, label): identifies examples without an id feature."""
  return collections.Counter(
      (np.round(img, 4).tobytes(), int(lbl)) for img, lbl in zip(images, labels))


def _split_fingerprints(data_dir, split):
  """What the pipeline's identity preprocessing should give for every example of `split`."""
  builder = tfds.builder("digits", data_dir=data_dir)
  images, labels = [], []
  for ex in builder.as_dataset(split=split).as_numpy_iterator():
    images.append(np.repeat(ex["image"], 3, axis=-1).astype(np.float32) / 127.5 - 1.0)
    labels.append(ex["label"])
  return _fingerprints(images, labels)


# ------------------------------------------------------------------------------------------------
# The built-in digits dataset.


def test_digits_builds_offline_with_a_fixed_split(digits_dir):
  info = ip.get_dataset_info(_config(data_dir=digits_dir))
  assert info == ip.DatasetInfo(num_classes=10, num_train_examples=1437, num_eval_examples=360,
                                label_names=[str(d) for d in range(10)])
  builder = tfds.builder("digits", data_dir=digits_dir)
  assert builder.is_prepared()
  seen = {}
  for split, expected in (("test", DIGITS_TEST_SHA256), ("train", DIGITS_TRAIN_SHA256)):
    rows = sorted((int(ex["id"]), int(ex["label"]))
                  for ex in builder.as_dataset(split=split).as_numpy_iterator())
    seen[split] = [i for i, _ in rows]
    digest = hashlib.sha256("".join(f"{i},{lbl}\n" for i, lbl in rows).encode()).hexdigest()
    assert digest == expected, f"the digits {split} split changed"
  assert seen["test"][:10] == [2, 5, 8, 10, 11, 19, 20, 21, 35, 38]
  assert sorted(seen["test"] + seen["train"]) == list(range(1797))  # Disjoint and complete.
  ex = next(builder.as_dataset(split="test").as_numpy_iterator())
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  images, _ = digits.load_images()
  assert images.max() == 255 and images.min() == 0  # 0..16 scaled to the full uint8 range.


# ------------------------------------------------------------------------------------------------
# Any TFDS dataset by name (mocked records, real metadata).


def _write_metadata(data_dir, name, split_sizes):
  """Writes the dataset_info.json/features.json a prepared dataset would have."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in split_sizes.items()
  ]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize("name,num_classes,eval_split", [
    ("cifar10", 10, "test"), ("imagenet2012", 1000, "validation")])
def test_tfds_pipeline_end_to_end_on_mock_data(tmp_path, name, num_classes, eval_split):
  num = 40  # mock_data yields this many examples for any split; the metadata agrees.
  _write_metadata(str(tmp_path), name, {"train": num, eval_split: num})
  config = _config(dataset=name, data_dir=str(tmp_path), image_size=32, batch_size=16,
                   eval_batch_size=16, eval_split=eval_split,
                   pp={"crop": "inception", "flip": True, "eval_crop": "central_crop"})
  with tfds.testing.mock_data(num_examples=num, data_dir=str(tmp_path),
                              policy=tfds.testing.MockPolicy.USE_FILES):
    info = ip.get_dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (
        num_classes, num, num)
    assert len(info.label_names) == num_classes
    for batch in _take(ip.create_train_iterator(config, process_index=0, process_count=1), 4):
      assert set(batch) == {"image", "label"}
      assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
      assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
      assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
      assert ((0 <= batch["label"]) & (batch["label"] < num_classes)).all()
    evals = list(ip.create_eval_iterator(config, process_index=0, process_count=1))
    assert len(evals) == 3 == ip.num_eval_steps(config, process_count=1)
  assert sum(int(b["mask"].sum()) for b in evals) == num
  for batch in evals:
    assert batch["image"].shape == (16, 32, 32, 3) and batch["mask"].dtype == np.bool_
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_missing_dataset_fails_fast_with_one_actionable_line(tmp_path):
  config = _config(dataset="cifar10", data_dir=str(tmp_path / "empty"))
  start = time.monotonic()
  with pytest.raises(ip.DatasetNotReadyError) as error:
    ip.create_train_iterator(config, process_index=0, process_count=1)
  assert time.monotonic() - start < 5.0
  message = str(error.value)
  assert "\n" not in message
  assert "'cifar10'" in message and str(tmp_path / "empty") in message
  assert f"tfds build cifar10 --data_dir={tmp_path / 'empty'}" in message
  assert "allow_download" in message and "manual_dir" in message
  with pytest.raises(ip.DatasetNotReadyError):
    ip.get_dataset_info(config)


def test_bad_names_give_one_line_errors(digits_dir):
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset_xyz'") as error:
    ip.get_dataset_info(_config(dataset="no_such_dataset_xyz", data_dir=digits_dir))
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="Split 'validation' is not in dataset 'digits'"):
    ip.get_dataset_info(_config(data_dir=digits_dir, eval_split="validation"))


# ------------------------------------------------------------------------------------------------
# Image folders.


def _write_image(path, pixels, fmt):
  from PIL import Image  # Pillow ships with the test dependencies (requirements.txt).
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  path.write_bytes(buffer.getvalue())


def test_imagefolder_labels_follow_sorted_class_names(tmp_path):
  # Each class has its own solid colour, so a label can be checked against the pixels.
  colours = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}
  for split, count in (("train", 4), ("test", 3)):
    for cls, rgb in colours.items():
      folder = tmp_path / split / cls
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.broadcast_to(np.array(rgb, np.uint8), (10 + i, 12, 3)).copy()
        suffix, fmt = [(".png", "PNG"), (".jpg", "JPEG"), (".JPEG", "JPEG")][i % 3]
        _write_image(folder / f"{i}{suffix}", pixels, fmt)
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
  (tmp_path / "test" / "ant" / "notes.txt").write_text("not an image")
  _write_image(tmp_path / "test" / "bee" / "gray.png", np.full((9, 9), 7, np.uint8), "PNG")

  config = _config(dataset=f"imagefolder:{tmp_path}", image_size=8, batch_size=8,
                   eval_batch_size=16, pp={"crop": "inception", "flip": True})
  info = ip.get_dataset_info(config)
  assert info.label_names == ["ant", "bee", "cat"]
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 12, 10)

  evals = list(ip.create_eval_iterator(config, process_index=0, process_count=1))
  mask = np.concatenate([b["mask"] for b in evals])
  images = np.concatenate([b["image"] for b in evals])[mask]
  labels = np.concatenate([b["label"] for b in evals])[mask]
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
  colour = images.mean(axis=(1, 2))  # [N, 3]
  is_gray = np.ptp(colour, axis=-1) < 1e-6
  assert is_gray.sum() == 1 and labels[is_gray] == [1]  # A grayscale file: 3 equal channels.
  np.testing.assert_allclose(images[is_gray], 7 / 127.5 - 1, atol=1e-6)
  # Otherwise the brightest channel (JPEG blurs colours a little) is the class's colour.
  assert (colour[~is_gray].argmax(axis=-1) == labels[~is_gray]).all()

  batch = next(ip.create_train_iterator(config, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
  assert (batch["image"].mean(axis=(1, 2)).argmax(axis=-1) == batch["label"]).all()

  with pytest.raises(ip.DatasetNotReadyError, match="no images"):
    ip.get_dataset_info(_config(dataset=f"imagefolder:{tmp_path}", eval_split="val"))


# ------------------------------------------------------------------------------------------------
# Evaluation covers every example; processes split the data.


def test_eval_counts_every_example_once_across_processes(digits_dir):
  # 357 examples: not a multiple of the batch, and uneven over 2 processes (179 + 178).
  config = _config(data_dir=digits_dir, eval_split="test[:357]", eval_batch_size=64)
  single = list(ip.create_eval_iterator(config, process_index=0, process_count=1))
  assert len(single) == 6 and sum(int(b["mask"].sum()) for b in single) == 357
  assert not single[-1]["mask"][357 - 5 * 64:].any()
  assert (single[-1]["image"][~single[-1]["mask"]] == 0).all()

  expected = _split_fingerprints(digits_dir, "test[:357]")
  per_process = [list(ip.create_eval_iterator(config, process_index=i, process_count=2))
                 for i in range(2)]
  assert [len(batches) for batches in per_process] == [6, 6]  # Same count: no multi-host hang.
  assert ip.num_eval_steps(config, process_count=2) == 6
  combined = collections.Counter()
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (32, 8, 8, 3)
      combined += _fingerprints(b["image"][b["mask"]], b["label"][b["mask"]])
  assert combined == expected  # Disjoint, and together exactly the split.


def test_train_processes_read_disjoint_parts(digits_dir):
  config = _config(data_dir=digits_dir, batch_size=256)  # 128 per process.
  steps = ip.num_steps_per_epoch(config, process_count=2)
  assert steps == 718 // 128 == 5
  split = _split_fingerprints(digits_dir, "train")
  parts = []
  for i in range(2):
    batches = _take(ip.create_train_iterator(config, process_index=i, process_count=2), steps)
    assert batches[0]["image"].shape == (128, 8, 8, 3)
    parts.append(_fingerprints(np.concatenate([b["image"] for b in batches]),
                               np.concatenate([b["label"] for b in batches])))
  both = parts[0] + parts[1]
  assert sum(both.values()) == 2 * steps * 128
  assert all(both[k] <= split[k] for k in both)  # Nothing read twice, nothing from elsewhere.
  # Each process's part is its own tfds.even_splits slice.
  halves = [_split_fingerprints(digits_dir, s) for s in tfds.even_splits("train", 2)]
  assert all(parts[i][k] <= halves[i][k] for i in range(2) for k in parts[i])


def test_batch_must_divide_over_processes_and_devices():
  ip.check_batch_divisibility(32, num_devices=8, num_processes=2)
  with pytest.raises(ValueError, match=r"config.eval_batch_size=12 .* multiple of 8") as error:
    ip.check_batch_divisibility(12, num_devices=8, num_processes=2, name="eval_batch_size")
  assert "\n" not in str(error.value) and "eval_batch_size=16" in str(error.value)
  with pytest.raises(ValueError, match="multiple of 6"):
    ip.check_batch_divisibility(16, num_devices=2, num_processes=3)
  with pytest.raises(ValueError, match="batch_size=24"):
    ip.create_train_iterator(_config(batch_size=24), process_index=0, process_count=16)


# ------------------------------------------------------------------------------------------------
# Determinism and resume, with every augmentation on.


def _augmented(data_dir, **overrides):
  return _config(data_dir=data_dir, image_size=12, batch_size=256,
                 pp={"crop": "inception", "flip": True, "pad_crop": 2}, **overrides)


def test_same_seed_same_batches(digits_dir):
  first = _take(ip.create_train_iterator(_augmented(digits_dir), process_index=0,
                                         process_count=1), 3)
  again = _take(ip.create_train_iterator(_augmented(digits_dir), process_index=0,
                                         process_count=1), 3)
  other = _take(ip.create_train_iterator(_augmented(digits_dir, seed=1), process_index=0,
                                         process_count=1), 1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["label"], other[0]["label"])
  assert not np.array_equal(first[0]["image"], first[1]["image"])
  # Augmentation is on: the same example looks different in different epochs.
  assert first[0]["image"].std() > 0.1


def test_resume_at_step_n_reproduces_the_uninterrupted_batches(digits_dir):
  config = _augmented(digits_dir)
  steps = ip.num_steps_per_epoch(config, process_count=1)
  assert steps == 1437 // 256 == 5
  full = _take(ip.create_train_iterator(config, process_index=0, process_count=1), 12)
  assert not np.array_equal(full[0]["label"], full[steps]["label"])  # Epochs differ in order.
  for start in (3, steps, 7):  # Mid-epoch, on an epoch boundary, in a later epoch.
    resumed = _take(ip.create_train_iterator(config, start_step=start, process_index=0,
                                             process_count=1), 12 - start)
    for offset, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch["label"], full[start + offset]["label"])
      np.testing.assert_array_equal(batch["image"], full[start + offset]["image"])


def test_resume_far_ahead_does_not_replay_the_steps(digits_dir):
  config = _augmented(digits_dir)
  start = time.monotonic()
  batch = next(ip.create_train_iterator(config, start_step=1_000_003, process_index=0,
                                        process_count=1))
  assert time.monotonic() - start < 5.0  # Replaying a million steps would take hours.
  assert batch["image"].shape == (256, 12, 12, 3)


# ------------------------------------------------------------------------------------------------
# Preprocessing switches.


def test_preprocessing_switches(digits_dir):
  gray = next(ip.create_eval_iterator(_config(data_dir=digits_dir, pp={"to_rgb": False}),
                                      process_index=0, process_count=1))
  assert gray["image"].shape == (64, 8, 8, 1)
  rgb = next(ip.create_eval_iterator(_config(data_dir=digits_dir), process_index=0,
                                     process_count=1))
  np.testing.assert_array_equal(rgb["image"], np.repeat(gray["image"], 3, axis=-1))
  assert rgb["image"].min() == -1.0 and rgb["image"].max() == 1.0

  scaled = next(ip.create_eval_iterator(
      _config(data_dir=digits_dir, pp={"value_range": (0.0, 1.0)}), process_index=0,
      process_count=1))
  np.testing.assert_allclose(scaled["image"], (rgb["image"] + 1) / 2, atol=1e-6)

  big = next(ip.create_eval_iterator(_config(data_dir=digits_dir, image_size=16,
                                             pp={"eval_crop": "central_crop"}),
                                     process_index=0, process_count=1))
  assert big["image"].shape == (64, 16, 16, 3)

  plain = next(ip.create_train_iterator(_config(data_dir=digits_dir), process_index=0,
                                        process_count=1))
  flipped = next(ip.create_train_iterator(_config(data_dir=digits_dir, pp={"flip": True}),
                                          process_index=0, process_count=1))
  np.testing.assert_array_equal(plain["label"], flipped["label"])  # Order is independent of pp.
  same = [np.array_equal(a, b) for a, b in zip(plain["image"], flipped["image"])]
  mirrored = [np.array_equal(a[:, ::-1], b) for a, b in zip(plain["image"], flipped["image"])]
  assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < len(mirrored)

  with pytest.raises(ValueError, match="pp.crop='bogus'"):
    ip.create_train_iterator(_config(data_dir=digits_dir, pp={"crop": "bogus"}),
                             process_index=0, process_count=1)


@pytest.fixture(scope="module")
def sharded_digits_dir(tmp_path_factory):
  """The digits in 8 TFDS shards per split, so that the order the files are read in shows."""
  data_dir = str(tmp_path_factory.mktemp("tfds_sharded"))
  builder = tfds.builder("digits", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=8))
  assert len(builder.info.splits["train"].file_instructions) == 8
  return data_dir


def test_file_order_is_reshuffled_every_epoch_and_resumes_exactly(sharded_digits_dir):
  """With a shuffle buffer of 1 the example order is the file order: it must differ from epoch to
  epoch (a fixed file order would repeat it), be the same for the same seed, and resume mid-epoch."""
  config = _config(data_dir=sharded_digits_dir, shuffle_buffer=1)
  steps = ip.num_steps_per_epoch(config, process_count=1)
  assert steps == 5
  full = _take(ip.create_train_iterator(config, process_index=0, process_count=1), 3 * steps)
  epochs = [np.concatenate([b["label"] for b in full[e * steps:(e + 1) * steps]]) for e in range(3)]
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  again = _take(ip.create_train_iterator(config, process_index=0, process_count=1), 3 * steps)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for start in (7, 2 * steps):  # mid-epoch 1, the start of epoch 2
    resumed = _take(ip.create_train_iterator(config, start_step=start, process_index=0,
                                             process_count=1), 3 * steps - start)
    for offset, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch["label"], full[start + offset]["label"])
      np.testing.assert_array_equal(batch["image"], full[start + offset]["image"])


def test_a_one_shard_split_streams_every_epoch_from_one_pipeline_with_the_per_epoch_batches(
    digits_dir, monkeypatch):
  """One shard has one file order, so all epochs come from one tf.data pipeline (building one per epoch
  cost ~0.3 s every 11 steps of the digits job); its batches are those of the per-epoch pipelines."""
  config = _augmented(digits_dir)
  steps = ip.num_steps_per_epoch(config, process_count=1)
  reads = []
  real_read = ip._TfdsSource.read  # pylint: disable=protected-access

  def counting_read(self, *args, **kwargs):
    reads.append(kwargs.get("shuffle_seed"))
    return real_read(self, *args, **kwargs)

  monkeypatch.setattr(ip._TfdsSource, "read", counting_read)  # pylint: disable=protected-access
  for start in (0, 7):  # from the start; resumed mid-epoch 1
    one = _take(ip.create_train_iterator(config, start_step=start, process_index=0,
                                         process_count=1), 3 * steps - start)
    assert len(reads) == 1, reads
    with monkeypatch.context() as m:
      m.setattr(ip._TfdsSource, "reorders_files", lambda *a: True)  # pylint: disable=protected-access
      per_epoch = _take(ip.create_train_iterator(config, start_step=start, process_index=0,
                                                 process_count=1), 3 * steps - start)
    assert len(reads) == 4  # 1, then the per-epoch path's: its first part, and epochs 1 and 2 again
    reads.clear()
    for a, b in zip(one, per_epoch, strict=True):
      np.testing.assert_array_equal(a["label"], b["label"])
      np.testing.assert_array_equal(a["image"], b["image"])


def test_the_eval_dataset_is_built_once_and_read_in_full_every_pass(digits_dir, monkeypatch):
  config = _config(data_dir=digits_dir)
  data = ip.create_eval_dataset(config, process_index=0, process_count=1)
  opened = []
  monkeypatch.setattr(ip, "_make_source", lambda *a: opened.append(a))  # nothing may reopen it
  passes = [[(b["label"], b["mask"]) for b in data] for _ in range(2)]
  assert not opened and len(passes[0]) == data.num_batches == 6
  for (la, ma), (lb, mb) in zip(*passes):
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ma, mb)
  assert sum(int(m.sum()) for _, m in passes[0]) == 360
