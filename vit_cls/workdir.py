"""One owner per workdir: a lock that a second run on the same workdir meets at once.

Two runs on one workdir (a double launch, or a restarted job whose old process still lives) would
write the same checkpoint steps over each other and interleave their lines in one metrics.jsonl. The
first run to start holds `<workdir>/.lock`; a second one stops before it reads data, compiles, or
touches a file, with one line naming the workdir and the process that holds it (host and pid,
written into the file).

How it is held, and why an owner that died never blocks:

* A workdir on a local disk or NFS: `fcntl.flock` on `.lock`. The kernel drops the lock when the
  holder's process ends in any way (exit, exception, SIGKILL, OOM kill), so there is nothing stale
  to clean up after a crash; a power loss takes the lock with the machine. The file itself stays
  (deleting a lock file races with the next owner's open), and its text is only the last owner's
  name for the message. Linux NFS clients turn `flock` into an NFS byte-range lock that the server
  enforces for every client; a mount with `local_lock=flock|all` (or `nolock`) keeps it per machine
  instead.
* A FUSE mount that implements no locking (gcsfuse): the kernel still enforces `flock`, but only
  between processes of the same machine. A double launch on one VM is refused; two VMs writing one
  mounted path are not.
* Multi-process jobs: the chief's lock covers the job. Process 0 takes it; the outcome is
  broadcast, so every process of a second job stops together with the same line (the others never
  wait in a collective for a chief that left). The other processes of one job share the chief's
  workdir; they take no lock of their own.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time

from vit_cls import errors

LOCK_FILE = ".lock"


class WorkdirBusyError(errors.VitClsError, RuntimeError):
  """Another live run holds the workdir; the message names the workdir and the holder."""


def _owner_record() -> dict:
  now = datetime.datetime.now(datetime.timezone.utc)
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": now.strftime("%Y-%m-%d %H:%M:%S UTC")}


def _describe(record: dict | None) -> str:
  if not record:
    return "a process that has not written its name yet"
  return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"
          + (f" (started {record['started']})" if record.get("started") else ""))


def _busy(workdir: str, record: dict | None) -> WorkdirBusyError:
  return WorkdirBusyError(
      f"workdir {workdir} is in use by another run: {_describe(record)}; wait for it to end or "
      f"stop it, or pass another --workdir.")


def _parse(text: str) -> dict | None:
  try:
    record = json.loads(text)
  except ValueError:
    return None
  return record if isinstance(record, dict) else None


class _FileLock:
  """`flock` on `<workdir>/.lock`, with the owner's host and pid written inside."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> "_FileLock":
    import fcntl  # pylint: disable=g-import-not-at-top
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise _busy(self.workdir, self.holder()) from None
    except OSError as e:
      os.close(fd)
      raise errors.StorageError(
          f"workdir {self.workdir}: cannot lock {self.path} ({e.strerror}); its file system "
          f"refuses flock: use a local disk, NFS with locking, or a gs:// workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_owner_record()) + "\n").encode(), 0)
    self._fd = fd
    return self

  def holder(self, wait: float = 2.0) -> dict | None:
    """The holder's record; an owner that has just taken the lock gets `wait` s to write it."""
    deadline = time.monotonic() + wait
    while True:
      try:
        with open(self.path, encoding="utf-8") as f:
          record = _parse(f.read())
      except OSError:
        record = None
      if record or time.monotonic() >= deadline:
        return record
      time.sleep(0.05)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None


def lock_for(workdir: str):
  """The lock object for `workdir` (not yet acquired)."""
  return _FileLock(workdir)


class JobLock:
  """The workdir lock of a whole job: taken by process 0, its outcome shared with every process.

  A context manager: `with JobLock(workdir): ...` raises WorkdirBusyError on every process when
  another run holds the workdir, and releases the lock on the way out, whatever ends the block.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._lock = None

  def __enter__(self) -> "JobLock":
    import jax  # pylint: disable=g-import-not-at-top
    error = None
    if jax.process_index() == 0:
      try:
        self._lock = lock_for(self.workdir).acquire()
      except WorkdirBusyError as e:
        error = e
    if jax.process_count() > 1:
      import numpy as np  # pylint: disable=g-import-not-at-top
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not held and error is None:  # not the chief: the holder's name is in the lock file
        error = _busy(self.workdir, lock_for(self.workdir).holder(wait=0))
    if error is not None:
      raise error
    return self

  def __exit__(self, *exc) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None
