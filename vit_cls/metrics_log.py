"""What users watch during training: a progress line, TensorBoard events, metrics.jsonl and a PNG plot.

Only process 0 writes; the other processes of a multi-host job stay silent.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

from vit_cls import storage

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CONFIG_FILE = "config.json"
# A gs:// metrics file or event file is uploaded whole at most this often (GCS allows about one
# write per second to one object), and always before a checkpoint is saved and at the end.
GCS_UPLOAD_EVERY_S = 15.0


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
  """Appends every logged metric to `workdir/metrics.jsonl` and TensorBoard, and prints progress lines.

  A resumed run appends to the same files; a step logged twice (once before a crash, once after) appears
  twice in metrics.jsonl, and readers keep the last. In a gs:// workdir the file is kept in memory
  and uploaded whole (`GCS_UPLOAD_EVERY_S`, and by `sync` before every checkpoint): a run killed
  between uploads loses the lines since the last one, never the lines up to its last checkpoint.
  """

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._tb = None
    if not enabled:
      return
    self._workdir = workdir
    path = storage.join(workdir, METRICS_FILE)
    if storage.is_gcs(path):
      self._jsonl = _ObjectAppender(path)
    else:
      # A run killed (or out of disk) mid-write left a partial last line: end it, or the next record
      # would be glued onto it and lost too.
      if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
          f.seek(-1, os.SEEK_END)
          torn = f.read(1) != b"\n"
      else:
        torn = False
      self._jsonl = open(path, "a", encoding="utf-8")
      if torn:
        self._jsonl.write("\n")
    try:
      self._tb = _TensorBoardScalars(storage.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard needs TensorFlow; training without it still logs the rest.
      self._tb = None

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.scalar(f"{split}/{k}", float(v), int(step))
      self._tb.flush()

  def progress(self, step: int, metrics: dict, images_per_sec: float, steps_per_sec: float) -> None:
    if not self.enabled:
      return
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    print(f"step {step:>6}/{self.total_steps}  loss {metrics['loss']:.4f}  "
          f"acc {metrics['accuracy']:.4f}  lr {metrics['learning_rate']:.3g}  "
          f"{images_per_sec:,.0f} img/s  ETA {_format_duration(eta)}", flush=True)

  def write_config(self, config) -> None:
    """The run's config as JSON (`config.json`; a resumed run writes the config it runs with)."""
    if self.enabled:
      if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
      else:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
      storage.write_bytes(storage.join(self._workdir, CONFIG_FILE), (text + "\n").encode())

  def sync(self) -> None:
    """Everything logged so far reaches the workdir now (a gs:// one uploads; locally a no-op)."""
    if self.enabled:
      if isinstance(self._jsonl, _ObjectAppender):
        self._jsonl.flush(force=True)
      if self._tb is not None:
        self._tb.flush(force=True)

  def info(self, message: str) -> None:
    if self.enabled:
      print(message, file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class _ObjectAppender:
  """An append-only text file in Cloud Storage: held in memory, uploaded whole (GCS objects cannot
  be appended to), at most every `GCS_UPLOAD_EVERY_S` seconds unless forced."""

  def __init__(self, path: str):
    self._path = path
    self._text = storage.read_bytes(path).decode("utf-8") if storage.exists(path) else ""
    if self._text and not self._text.endswith("\n"):
      self._text += "\n"
    self._uploaded = len(self._text)
    self._last = 0.0

  def write(self, text: str) -> None:
    self._text += text

  def flush(self, force: bool = False) -> None:
    if len(self._text) != self._uploaded and (
        force or time.monotonic() - self._last >= GCS_UPLOAD_EVERY_S):
      storage.write_bytes(self._path, self._text.encode("utf-8"))
      self._uploaded, self._last = len(self._text), time.monotonic()

  def close(self) -> None:
    self.flush(force=True)


class _TensorBoardScalars:
  """Scalar summaries in TensorBoard event files, written with `tf.summary`.

  What `flax.metrics.tensorboard.SummaryWriter` does for scalars, without its import of
  TensorBoard's hparams plugin, which loads all of Keras (about 1.4 s at every start of train.py).
  TensorFlow writes a gs:// logdir itself; each flush there uploads the whole event file, so it is
  throttled like the metrics file.
  """

  def __init__(self, logdir: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._summary = tf.summary
    self._remote = storage.is_gcs(logdir)
    self._last = 0.0
    if self._remote:  # the writer's own flushes: by time only, not every 10 events
      self._writer = tf.summary.create_file_writer(
          logdir, max_queue=100_000, flush_millis=int(GCS_UPLOAD_EVERY_S * 1000))
    else:
      self._writer = tf.summary.create_file_writer(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    with self._writer.as_default():
      self._summary.scalar(tag, value, step=step)

  def flush(self, force: bool = False) -> None:
    if self._remote and not force and time.monotonic() - self._last < GCS_UPLOAD_EVERY_S:
      return
    self._writer.flush()
    self._last = time.monotonic()

  def close(self) -> None:
    self._writer.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl, the last one kept where a resumed run logged a step twice."""
  text = storage.read_bytes(storage.join(workdir, METRICS_FILE)).decode("utf-8", errors="replace")
  latest = {}
  for line in text.splitlines():
    try:
      r = json.loads(line)
    except ValueError:
      continue  # blank, or the partial line of a run that was killed mid-write
    latest[(r["split"], r["step"])] = r
  return sorted(latest.values(), key=lambda r: (r["split"], r["step"]))


def plot_curves(workdir: str) -> str:
  """Writes the loss and accuracy curves of train and eval to `workdir/curves.png`; returns the path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  for split in ("train", "eval"):
    rows = [r for r in records if r["split"] == split]
    if not rows:
      continue
    steps = [r["step"] for r in rows]
    ax_loss.plot(steps, [r["loss"] for r in rows], label=split, marker="." if split == "eval" else None)
    ax_acc.plot(steps, [r["accuracy"] for r in rows], label=split,
                marker="." if split == "eval" else None)
  for ax, title in ((ax_loss, "loss"), (ax_acc, "top-1 accuracy")):
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = storage.join(workdir, PLOT_FILE)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, png.getvalue())
  return path
