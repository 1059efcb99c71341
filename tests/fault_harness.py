"""Fault injection for the reliability tests: run train.py, kill it on cue, break its files and its disk.

Two roles in one file:

* imported by tests/test_reliability.py: `TrainRun` (train.py as a child process whose output lines are
  collected as they come, so a test can signal it after the k-th step), `tiny_train_args`, checkpoint
  helpers, `corrupt` (damage one checkpoint file in a chosen way) and `disk_full` (make a write inside
  orbax's save fail with ENOSPC);
* run as a script it is train.py with a fault inside checkpoint saving: `python tests/fault_harness.py
  <train.py args>`. VIT_FAULT_ENOSPC=<point>:<n> fails every write at that point after the first n with
  ENOSPC (a disk that fills up); VIT_FAULT_PAUSE=<point>:<k>:<marker> pauses at the k-th call of it, writes
  the marker file and sleeps, so that the harness can send SIGKILL while a checkpoint is half written (a
  big checkpoint takes seconds to write; the tiny test model's takes milliseconds, too short to hit by
  chance). Points, in the order a save reaches them: `state` (arrays written, the state's metadata not
  yet), `meta` (the state item done, the JSON meta not yet), `finalize` (every item written in
  `<step>.orbax-checkpoint-tmp`, not yet renamed to `<step>`).

The hooks name orbax 0.12's internal functions; a missing one fails loudly rather than silently testing
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import queue
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, "train.py")

# The tiny model of tests/test_train.py's _train_cmd: a 1-layer width-32 ViT on the digits.
TINY_MODEL = ("--config.model.hidden_size=32", "--config.model.mlp_dim=64", "--config.model.num_heads=2",
              "--config.model.num_layers=1", "--config.model.representation_size=32",
              "--config.batch_size=32", "--config.eval_batch_size=64", "--config.warmup_steps=2",
              "--config.shuffle_buffer=256")

# (module, class, method) of each pause point, orbax 0.12.
_PAUSE_POINTS = {
    "state": ("orbax.checkpoint._src.handlers.base_pytree_checkpoint_handler",
              "BasePyTreeCheckpointHandler", "_write_metadata_file"),
    "meta": ("orbax.checkpoint._src.handlers.json_checkpoint_handler", "JsonCheckpointHandler",
             "_save_fn"),
    "finalize": ("orbax.checkpoint._src.path.atomicity", "AtomicRenameTemporaryPath", "finalize"),
}
PAUSE_POINTS = tuple(_PAUSE_POINTS)


def tiny_train_args(workdir, *overrides, config=None) -> list[str]:
  return ["--config", config or os.path.join(REPO, "configs", "default.py"), "--workdir", str(workdir),
          *TINY_MODEL, *overrides]


def child_env(cache_dir: str | None = None, **extra) -> dict:
  """The test process's environment (8 CPU devices, caches in a temp dir: tests/conftest.py), plus a
  persistent XLA compilation cache: every restart would otherwise recompile the same steps."""
  env = dict(os.environ)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


# ----------------------------------------------------------------------------------------------------
# A training run as a child process.


class TrainRun:
  """train.py (or this file's pausing wrapper) as a child; stdout and stderr lines collected as they come.

  `lines` holds (seconds since start, stream, text). Signals go to the child by its pid only.
  """

  def __init__(self, args, env=None, pause=None, enospc=None, cwd=None):
    script = TRAIN_PY
    env = dict(env or os.environ)
    if pause is not None:
      point, k, marker = pause
      script = os.path.abspath(__file__)
      env["VIT_FAULT_PAUSE"] = f"{point}:{k}:{marker}"
    if enospc is not None:
      point, after = enospc
      script = os.path.abspath(__file__)
      env["VIT_FAULT_ENOSPC"] = f"{point}:{after}"
    self.t0 = time.monotonic()
    self.proc = subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    self.lines: list[tuple[float, str, str]] = []
    self._new = queue.Queue()
    self._readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                     for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
    for r in self._readers:
      r.start()

  def _read(self, stream, name):
    for line in stream:
      item = (time.monotonic() - self.t0, name, line.rstrip("\n"))
      self.lines.append(item)
      self._new.put(item)

  def wait_for(self, predicate, timeout: float) -> tuple | None:
    """The first new output line that satisfies `predicate`, or None if the child exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      try:
        item = self._new.get(timeout=0.05)
      except queue.Empty:
        if self.proc.poll() is not None and self._new.empty():
          return None
        continue
      if predicate(item[2]):
        return item
    return None

  def steps_printed(self) -> list[int]:
    return [int(text.split()[1].split("/")[0]) for _, stream, text in self.lines
            if stream == "out" and text.startswith("step ")]

  def signal(self, sig) -> bool:
    """Sends `sig`; False if the child had already exited."""
    if self.proc.poll() is not None:
      return False
    self.proc.send_signal(sig)
    return True

  def wait(self, timeout: float = 300) -> int:
    rc = self.proc.wait(timeout=timeout)
    for r in self._readers:
      r.join(timeout=10)
    return rc

  def text(self, stream: str | None = None) -> str:
    return "\n".join(t for _, s, t in self.lines if stream in (None, s))


def wait_for_path(pattern: str, proc: subprocess.Popen, timeout: float, poll: float = 0.001) -> bool:
  """Polls until a file matching `pattern` exists (True) or the child exits or time runs out (False)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if glob.glob(pattern):
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  return False


# ----------------------------------------------------------------------------------------------------
# Checkpoints on disk.


def step_dirs(workdir) -> list[int]:
  """Finalized checkpoint steps: the all-digit names orbax lists."""
  ckpt = os.path.join(str(workdir), "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())


def tmp_dirs(workdir, settle: float = 0.0) -> list[str]:
  """Temporary checkpoint directories (saves that never finished). `settle`: seconds to allow for the
  cleanup a new CheckpointManager starts in the background to remove them."""
  deadline = time.monotonic() + settle
  while True:
    found = glob.glob(os.path.join(str(workdir), "checkpoints", "*.orbax-checkpoint-tmp*"))
    if not found or time.monotonic() >= deadline:
      return found
    time.sleep(0.05)


def params_of(path):
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.restore_params(str(path))[0]


def same_params(a, b) -> bool:
  """Bit-for-bit equality of two params trees (same names, shapes, dtypes, values)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  fa, fb = checkpoint.flatten(a), checkpoint.flatten(b)
  return fa.keys() == fb.keys() and all(
      np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k]) for k in fa)


CORRUPTIONS = ("truncate", "zero_length", "flip_bytes", "garbage_metadata", "delete_state", "garbage_meta")


def corrupt(step_dir: str, kind: str, rng) -> str:
  """Damages one checkpoint step the way a crash, a bad disk or a bad copy does; returns what it did.

  truncate / zero_length / flip_bytes hit the largest array data file (where most parameters are);
  garbage_metadata overwrites the state's tree metadata, garbage_meta the JSON meta item;
  delete_state removes the state item (a half-finished copy).
  """
  import shutil  # pylint: disable=g-import-not-at-top
  # The arrays live in the OCDBT data files under state/d/ (what state/ocdbt.process_*/ holds is
  # what each process wrote before the merge; a restore does not read it).
  data = [p for p in glob.glob(os.path.join(step_dir, "state", "d", "*")) if os.path.isfile(p)]
  biggest = max(data, key=os.path.getsize) if data else None
  if kind == "truncate":
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:
      f.truncate(int(rng.integers(1, size)))
    return f"truncated {biggest}"
  if kind == "zero_length":
    open(biggest, "wb").close()
    return f"emptied {biggest}"
  if kind == "flip_bytes":
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:
      for offset in rng.integers(0, size, 3):
        f.seek(int(offset))
        byte = f.read(1)
        f.seek(int(offset))
        f.write(bytes([byte[0] ^ 0xFF]))
    return f"flipped 3 bytes of {biggest}"
  if kind == "garbage_metadata":
    with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:
      f.write(rng.bytes(200))
    return "overwrote state/_METADATA"
  if kind == "garbage_meta":
    with open(os.path.join(step_dir, "meta", "metadata"), "wb") as f:
      f.write(b'{"model": {"hidden_size": 3')
    return "truncated meta/metadata"
  if kind == "delete_state":
    shutil.rmtree(os.path.join(step_dir, "state"))
    return "deleted state/"
  raise ValueError(f"unknown corruption {kind!r}: one of {CORRUPTIONS}")


# ----------------------------------------------------------------------------------------------------
# A full disk.


@contextlib.contextmanager
def disk_full(point: str = "meta", after: int = 0):
  """Makes every write at `point` of orbax's save after the first `after` raise OSError(ENOSPC).

  The same places as the pause points: `state` (the state's metadata, after its arrays), `meta` (the
  JSON meta item) or `finalize` (the commit). What a full disk does to the Python-side writes of a save;
  tensorstore's own writes fail the same way one level down and orbax reports them alike.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  module, cls_name, method = _PAUSE_POINTS[point]
  cls = getattr(importlib.import_module(module), cls_name)
  original = getattr(cls, method)
  calls = [0]

  async def failing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > after:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return await original(self, *args, **kwargs)

  setattr(cls, method, failing)
  try:
    yield calls
  finally:
    setattr(cls, method, original)


# ----------------------------------------------------------------------------------------------------
# As a script: train.py with a pause inside a checkpoint save.


def _install_pause(spec: str) -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  point, k, marker = spec.split(":", 2)
  module, cls_name, method = _PAUSE_POINTS[point]
  cls = getattr(importlib.import_module(module), cls_name)
  original = getattr(cls, method)
  calls = [0]

  async def paused(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(k):
      with open(marker, "w") as f:
        f.write(f"{point} {calls[0]}\n")
      # Blocks orbax's writer thread until the harness kills this process; goes on if it never does.
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline:
        time.sleep(0.05)
    return await original(self, *args, **kwargs)

  setattr(cls, method, paused)


_DISK_FULL = None


def _main() -> None:
  import runpy  # pylint: disable=g-import-not-at-top
  spec = os.environ.get("VIT_FAULT_PAUSE")
  if spec:
    _install_pause(spec)
  spec = os.environ.get("VIT_FAULT_ENOSPC")
  if spec:
    point, after = spec.split(":")
    global _DISK_FULL  # pylint: disable=global-statement
    _DISK_FULL = disk_full(point, int(after))  # held, or collecting it would undo the patch
    _DISK_FULL.__enter__()
  sys.argv = [TRAIN_PY, *sys.argv[1:]]
  sys.path.insert(0, REPO)
  runpy.run_path(TRAIN_PY, run_name="__main__")


if __name__ == "__main__":
  _main()
