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
  a newcomer takes its lease over once it has seen the object unchanged for 120 s on its own
  monotonic clock (no wall clock is trusted), or at once when the owner ran in the newcomer's own
  host, boot and pid namespace and its pid is gone. An owner that could not renew for 90 s exits
  before anybody may take over. A preempted Cloud TPU run ends through SIGTERM and deletes it.
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
import uuid

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


def _busy(workdir: str, record: dict | None, now: float | None = None) -> WorkdirBusyError:
  lease = ""
  if record and record.get("heartbeat"):  # a gs:// lease
    age = max(0.0, (time.time() if now is None else now) - float(record["heartbeat"]))
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


class Clock:
  """Where the lease reads time; tests inject one that runs ahead or sleeps in no time.

  Only the monotonic clock takes decisions: machines' wall clocks disagree (a newcomer whose clock
  ran 130 s ahead once took a live lease). The wall clock only dates the heartbeat shown to people,
  and may make a newcomer refuse at once, never take over.
  """

  def time(self) -> float:
    return time.time()

  def monotonic(self) -> float:
    return time.monotonic()

  def sleep(self, seconds: float) -> None:
    time.sleep(seconds)


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip() or None
  except OSError:
    return None


def _pid_space() -> dict:
  """What makes a pid on "this host" the same process: the boot and the pid namespace too.

  Containers with host networking share the hostname while each has its own pid namespace, so a
  hostname alone would let a run in one container judge a live run in another dead ("no such pid").
  """
  try:
    pid_ns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_ns = None
  return {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


class _GcsLock:
  """A lease on the object `<workdir>/.lock` in Cloud Storage, taken and kept with preconditions.

  Created only if absent (`ifGenerationMatch=0`), so of two runs that start together exactly one
  gets it; renewed every `HEARTBEAT_S` seconds by rewriting it on the condition that it is still the
  generation this run wrote; deleted (on the same condition) when the run ends.

  Taking over. A holder that died stops renewing; a newcomer takes the lease over only once it has
  seen the object's generation unchanged for the holder's `lease_s` (`LEASE_S`), measured on its
  own monotonic clock: the storage's generation, not anybody's wall clock, says whether the holder
  still renews. A heartbeat that looks recent by the newcomer's wall clock refuses at once (a
  second launch learns it in a second); one that looks old only starts the watch. The one shortcut:
  a holder whose pid is gone on the newcomer's own host, boot and pid namespace (a killed run
  restarted in the same container) is taken over at once.

  Keeping it. Every record carries a token unique to the run, so a renewal that landed but whose
  answer was lost (or was sent twice) is recognised on the next precondition failure: the object
  still holds this run's own record, and the run adopts its generation. A run that cannot renew
  stops writing before anybody may take the lease: when its last successful renewal (timed from
  when it was sent) is `LEASE_S - MARGIN_S` old, it exits with one line, whatever it was doing. A
  holder that finds another run's record has lost the workdir: it exits at once, with one line.
  """

  HEARTBEAT_S = 30.0  # how often a renewal is sent
  RETRY_S = 5.0  # how soon a failed renewal is tried again
  LEASE_S = 120.0  # how long a newcomer must see the lease unchanged before taking it
  MARGIN_S = 30.0  # a holder stops this long before that: writes in flight land in time
  POLL_S = 5.0  # how often a newcomer re-reads a lease it is waiting out

  def __init__(self, workdir: str, clock: Clock | None = None):
    self.workdir = workdir.rstrip("/")
    self.clock = clock or Clock()
    self._kv = None
    self._generation = None
    self._record = None
    self._renewed_at = None  # monotonic time the last successful write was sent
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

  def _write(self, record: dict | None, if_equal, timeout: float | None = None) -> bytes:
    """The new generation, or b"" when the condition failed (the object is not what we thought)."""
    value = None if record is None else (json.dumps(record) + "\n").encode()
    return self._store().write(LOCK_FILE, value, if_equal=if_equal).result(
        timeout=timeout).generation

  def _adopt(self) -> bytes:
    """After a failed precondition: the object's generation when it holds this run's own record
    (a write that landed but whose answer was lost, or that was retried), else b"". """
    current = self._read()
    if current.state != "value":
      return b""
    record = _parse(current.value.decode(errors="replace")) or {}
    if all(record.get(k) == self._record.get(k) for k in ("host", "pid", "token")):
      return current.stamp.generation
    return b""

  def _owner_gone(self, record: dict) -> bool:
    """The holder ran in this very pid space (host, boot, pid namespace) and its pid is gone."""
    mine = {"host": socket.gethostname(), **_pid_space()}
    if any(mine[k] is None or record.get(k) != mine[k] for k in mine):
      return False
    try:
      os.kill(int(record.get("pid", -1)), 0)
    except ProcessLookupError:
      return True
    except (OSError, ValueError):
      return False
    return False

  def _lease_s(self, record: dict) -> float:
    try:
      return float(record.get("lease_s", self.LEASE_S))
    except (TypeError, ValueError):
      return self.LEASE_S

  def _looks_live(self, record: dict) -> bool:
    """By this machine's wall clock, renewed within its lease: enough to refuse, never to take."""
    try:
      heartbeat = float(record["heartbeat"])
    except (KeyError, TypeError, ValueError):
      return False
    return self.clock.time() - heartbeat <= self._lease_s(record)

  def _unchanged_for_lease(self, generation, record: dict):
    """Watches the object for the holder's lease on this machine's monotonic clock. Returns
    (True, None) when its generation never changed (the holder stopped renewing), else (False,
    what it holds now: None when it is gone)."""
    lease = self._lease_s(record)
    print(f"workdir {self.workdir}: its lock names {_describe(record)}, with no heartbeat this "
          f"machine's clock shows as recent; taking it over if it stays unchanged for "
          f"{lease:.0f} s.", flush=True)
    start = self.clock.monotonic()
    while True:
      waited = self.clock.monotonic() - start
      if waited > lease:
        return True, None
      self.clock.sleep(min(self.POLL_S, lease - waited + 0.01))
      current = self._read()
      if current.stamp.generation != generation:
        return False, current

  def acquire(self) -> "_GcsLock":
    record = None
    for _ in range(3):  # a lost race re-reads: the winner is then the holder to name
      current = self._read()
      record = _parse(current.value.decode(errors="replace")) if current.state == "value" else None
      if current.state == "value" and record is not None and not self._owner_gone(record):
        # A record of this program whose holder may live: watched, never judged by clocks.
        if self._looks_live(record):
          raise _busy(self.workdir, record, self.clock.time())
        unchanged, now = self._unchanged_for_lease(current.stamp.generation, record)
        if not unchanged:
          if now.state == "value":  # renewed (or taken by a third run): a live holder
            raise _busy(self.workdir, _parse(now.value.decode(errors="replace")),
                        self.clock.time())
          continue  # released meanwhile: try to create it
      self._record = {**_owner_record(), **_pid_space(), "token": uuid.uuid4().hex,
                      "heartbeat": self.clock.time(), "lease_s": self.LEASE_S}
      sent = self.clock.monotonic()
      generation = self._write(self._record, current.stamp.generation) or self._adopt()
      if generation:
        self._generation, self._renewed_at = generation, sent
        self._start_heartbeat()
        return self
    raise _busy(self.workdir, record, self.clock.time())

  def _start_heartbeat(self) -> None:
    import threading  # pylint: disable=g-import-not-at-top
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._thread.start()

  def _deadline(self) -> float:
    """The monotonic time past which this run may no longer write: a newcomer that started
    watching the generation of the last renewal this run knows landed may take over at
    `LEASE_S` after it; `MARGIN_S` is left for writes already in flight."""
    return self._renewed_at + self.LEASE_S - self.MARGIN_S

  def _renew(self) -> None:
    wait = self.HEARTBEAT_S
    while not self._stop.wait(max(0.0, min(wait, self._deadline() - self.clock.monotonic()))):
      sent = self.clock.monotonic()
      if sent >= self._deadline():
        self._expired()
      self._record = {**self._record, "heartbeat": self.clock.time()}
      try:  # bounded: a renewal that hangs must not hold the thread past the deadline
        generation = self._write(self._record, self._generation, self._deadline() - sent)
      except Exception:  # pylint: disable=broad-except
        wait = self.RETRY_S  # a failed renewal (network): the next one may succeed in time
        continue
      if not generation:
        adopted = self._adopt()
        if not adopted:
          self._lost()
        # Our own record, written by a renewal whose answer never came: when it landed is not
        # known, so it does not count as renewed; renew again from its generation at once.
        self._generation, wait = adopted, 0.0
        continue
      self._generation, self._renewed_at, wait = generation, sent, self.HEARTBEAT_S

  def _exit(self, message: str) -> None:
    """One line, then the process ends at once: no thread of it writes anything more."""
    import sys  # pylint: disable=g-import-not-at-top
    print(f"error: workdir {self.workdir}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access

  def _expired(self) -> None:
    self._exit(
        f"this run could not renew its lock for {self.LEASE_S - self.MARGIN_S:.0f} s (another run "
        f"may take it over after {self.LEASE_S:.0f} s); stopping without writing anything more.")

  def _lost(self) -> None:
    try:
      holder = _describe(_parse(self._read().value.decode(errors="replace")))
    except Exception:  # pylint: disable=broad-except
      holder = "another run"
    self._exit(f"this run could not renew its lock for {self.LEASE_S:.0f} s and {holder} has "
               f"taken it over; stopping without writing anything more.")

  def release(self) -> None:
    if self._generation is None:
      return
    self._stop.set()
    self._thread.join(timeout=60)
    try:  # only if it is still ours (a deletion whose answer was lost has nothing left to adopt)
      if not self._write(None, self._generation):
        adopted = self._adopt()
        if adopted:
          self._write(None, adopted)
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
