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
  mounted path are not: give such jobs the bucket itself (`--workdir=gs://...`).
* A workdir in Cloud Storage (`gs://`): a lease object `.lock`, created only if absent
  (`ifGenerationMatch=0`: of two runs starting together exactly one gets it), renewed every 30 s
  under the same kind of precondition, deleted when the run ends. An owner that died stops renewing;
  its lease is taken over after 120 s without a heartbeat, or at once by a run on the same host when
  the owner's pid is gone. A preempted Cloud TPU run ends through SIGTERM and deletes it.
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
  return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}" +
          (f" (started {record['started']})" if record.get("started") else ""))


def _busy(workdir: str, record: dict | None) -> WorkdirBusyError:
  lease = ""
  if record and record.get("heartbeat"):  # a gs:// lease
    age = max(0.0, time.time() - float(record["heartbeat"]))
    lease = (f", last heartbeat {age:.0f} s ago (taken over after "
             f"{float(record.get('lease_s', _GcsLock.LEASE_S)):.0f} s without one)")
  return WorkdirBusyError(
      f"workdir {workdir} is in use by another run: {_describe(record)}{lease}; wait for it to end "
      f"or stop it, or pass another --workdir.")


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


class _GcsLock:
  """A lease on the object `<workdir>/.lock` in Cloud Storage, taken and kept with preconditions.

  Created only if absent (`ifGenerationMatch=0`), so of two runs that start together exactly one
  gets it; renewed every `HEARTBEAT_S` seconds by rewriting it on the condition that it is still the
  generation this run wrote; deleted (on the same condition) when the run ends. A holder that died
  stops renewing: a newcomer takes the lease over when its last heartbeat is older than
  `LEASE_S`, or at once when the holder ran on the newcomer's own host and its pid is gone (a
  killed run restarted on the same VM). A holder that finds its lease taken over (it could not
  renew it for `LEASE_S`, a network partition) has lost the workdir: it stops at once, without
  writing anything more, with one line saying so.
  """

  HEARTBEAT_S = 30.0
  LEASE_S = 120.0

  def __init__(self, workdir: str):
    self.workdir = workdir.rstrip("/")
    self._kv = None
    self._generation = None
    self._record = None
    self._stop = None
    self._thread = None

  def _store(self):
    if self._kv is None:
      import tensorstore as ts  # pylint: disable=g-import-not-at-top
      from vit_cls import storage  # pylint: disable=g-import-not-at-top
      self._kv = ts.KvStore.open(storage.kvstore_spec(self.workdir)).result()
    return self._kv

  def _read(self):
    return self._store().read(LOCK_FILE).result()

  def holder(self, wait: float = 0.0) -> dict | None:  # pylint: disable=unused-argument
    current = self._read()
    return _parse(current.value.decode(errors="replace")) if current.state == "value" else None

  def _write(self, record: dict | None, if_equal) -> bytes:
    """The new generation, or b"" when the condition failed (the object is not what we thought)."""
    value = None if record is None else (json.dumps(record) + "\n").encode()
    return self._store().write(LOCK_FILE, value, if_equal=if_equal).result().generation

  def _stale(self, record: dict | None, read_time: float) -> bool:
    if record is None:
      return True  # not written by this program: nothing to respect
    if read_time - float(record.get("heartbeat", 0)) > float(record.get("lease_s", self.LEASE_S)):
      return True
    if record.get("host") == socket.gethostname():
      try:
        os.kill(int(record.get("pid", -1)), 0)
      except ProcessLookupError:
        return True
      except (OSError, ValueError):
        return False
    return False

  def acquire(self) -> "_GcsLock":
    for _ in range(3):  # a lost race re-reads: the winner is then the holder to name
      current = self._read()
      record = _parse(current.value.decode(errors="replace")) if current.state == "value" else None
      if current.state == "value" and not self._stale(record, time.time()):
        raise _busy(self.workdir, record)
      mine = {**_owner_record(), "heartbeat": time.time(), "lease_s": self.LEASE_S}
      generation = self._write(mine, current.stamp.generation)
      if generation:
        self._generation, self._record = generation, mine
        self._start_heartbeat()
        return self
    raise _busy(self.workdir, record)

  def _start_heartbeat(self) -> None:
    import threading  # pylint: disable=g-import-not-at-top
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.HEARTBEAT_S):
      self._record = {**self._record, "heartbeat": time.time()}
      try:
        generation = self._write(self._record, self._generation)
      except Exception:  # pylint: disable=broad-except
        continue  # a failed renewal (network): the next one may succeed, within the lease
      if not generation:
        self._lost()
      self._generation = generation

  def _lost(self) -> None:
    import sys  # pylint: disable=g-import-not-at-top
    try:
      holder = _describe(_parse(self._read().value.decode(errors="replace")))
    except Exception:  # pylint: disable=broad-except
      holder = "another run"
    print(
        f"error: workdir {self.workdir}: this run could not renew its lock for "
        f"{self.LEASE_S:.0f} s and {holder} has taken it over; stopping without writing "
        f"anything more.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access

  def release(self) -> None:
    if self._generation is None:
      return
    self._stop.set()
    self._thread.join(timeout=60)
    try:
      self._write(None, self._generation)  # only if it is still ours
    except Exception:  # pylint: disable=broad-except
      pass  # unreachable now: the lease expires by itself
    self._generation = None


def lock_for(workdir: str):
  """The lock object for `workdir` (not yet acquired): a lease object on gs://, flock elsewhere."""
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  return _GcsLock(workdir) if storage.is_gcs(workdir) else _FileLock(workdir)


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
