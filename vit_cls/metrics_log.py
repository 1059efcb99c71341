"""What users watch during training: a progress line, TensorBoard events, metrics.jsonl and a PNG plot.

Only process 0 writes; the other processes of a multi-host job stay silent.
"""

from __future__ import annotations

import json
import os
import sys
import time

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
  """Appends every logged metric to `workdir/metrics.jsonl` and TensorBoard, and prints progress lines.

  A resumed run appends to the same files; a step logged twice (once before a crash, once after) appears
  twice in metrics.jsonl, and readers keep the last.
  """

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._tb = None
    if not enabled:
      return
    path = os.path.join(workdir, METRICS_FILE)
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
      self._tb = _TensorBoardScalars(os.path.join(workdir, "tensorboard"))
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

  def info(self, message: str) -> None:
    if self.enabled:
      print(message, file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class _TensorBoardScalars:
  """Scalar summaries in TensorBoard event files, written with `tf.summary`.

  What `flax.metrics.tensorboard.SummaryWriter` does for scalars, without its import of TensorBoard's
  hparams plugin, which loads all of Keras (about 1.4 s at every start of train.py).
  """

  def __init__(self, logdir: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._summary = tf.summary
    self._writer = tf.summary.create_file_writer(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    with self._writer.as_default():
      self._summary.scalar(tag, value, step=step)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl, the last one kept where a resumed run logged a step twice."""
  path = os.path.join(workdir, METRICS_FILE)
  latest = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
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
  path = os.path.join(workdir, PLOT_FILE)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
