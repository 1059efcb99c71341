"""Paths that are either local or in Cloud Storage (`gs://bucket/...`), with one set of functions.

Every place that takes a path (the workdir, `config.init_from`, `config.data_dir`, `imagefolder:`,
`vit_cls.load`, `convert`, `predict`) goes through here, so a `gs://` path works natively, without a
gcsfuse mount. Which client does what for a `gs://` path:

* orbax writes and reads checkpoint arrays with tensorstore's GCS driver, and its directories (and
  everything else here: metrics.jsonl, curves.png, image folders, small files) go through
  `etils.epath`, which uses TensorFlow's GCS file system when TensorFlow is installed (gcsfs
  otherwise); TFDS, tf.data and the TensorBoard writer use TensorFlow's GCS file system directly.
* `check_access` and the workdir lock (`vit_cls.workdir`) use tensorstore: its retries can be
  bounded, so a missing network or missing credentials cost one line and seconds, not minutes of
  retries, and it writes with preconditions (`ifGenerationMatch`), which a lock needs.

Credentials are the usual Google ones, found by each client the same way: a service account on the
VM (Cloud TPU, GCE), `gcloud auth application-default login`, or `GOOGLE_APPLICATION_CREDENTIALS`.
Local paths keep plain `os` semantics (small files are written atomically: temporary file + rename).
Only the standard library is imported here at start; TensorFlow and tensorstore load on first use.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import sys
import tempfile
import uuid
from typing import Iterator

from vit_cls import errors

GCS_PREFIX = "gs://"
# How long a reachability check may take, and how often tensorstore retries inside it.
PROBE_TIMEOUT_S = 20.0
_PROBE_RETRIES = {"max_retries": 2, "initial_delay": "0.2s", "max_delay": "1s"}


def is_gcs(path) -> bool:
  return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(GCS_PREFIX)


def join(path: str, *parts: str) -> str:
  """`os.path.join` for local paths, '/' joins for gs:// ones (never the OS separator)."""
  return posixpath.join(path, *parts) if is_gcs(path) else os.path.join(path, *parts)


def absolute(path: str) -> str:
  """An absolute local path (orbax wants them); a gs:// URL as it is."""
  return path if is_gcs(path) else os.path.abspath(path)


def split_gcs(path: str) -> tuple[str, str]:
  """gs://bucket/a/b -> ("bucket", "a/b"); a one-line error for a URL without a bucket."""
  rest = os.fspath(path)[len(GCS_PREFIX):]
  bucket, _, key = rest.partition("/")
  if not bucket:
    raise errors.StorageError(f"{path}: a Cloud Storage path needs a bucket: gs://BUCKET/PATH.")
  return bucket, key.strip("/")


def _epath(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


# ----------------------------------------------------------------------------------------------------
# Files and directories.


def exists(path: str) -> bool:
  return _epath(path).exists() if is_gcs(path) else os.path.exists(path)


def exists_or_raise(path: str) -> bool:
  """Whether `path` exists, where only "no such file" answers False: any other failure to find out
  (a permission, EIO, a stale NFS handle, a 403 from Cloud Storage) raises.

  `os.path.exists` answers False on every error, so a step that merely cannot be read would look like a
  step whose files are missing, which is proof of damage; this is the check evidence may use.
  """
  if is_gcs(path):
    # TensorFlow's `exists` (epath's gs:// backend) answers False only on NOT_FOUND and raises the rest.
    return _epath(path).exists()
  try:
    os.stat(path)
  except (FileNotFoundError, NotADirectoryError):
    return False
  return True


# The status codes (tensorstore, TensorFlow, gRPC share them) that describe the storage or the network,
# never the bytes or the caller: a read failing with one of them proves nothing about a checkpoint.
_IO_STATUS_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")
_IO_HTTP_CODES = (401, 403, 408, 429, 500, 502, 503, 504)


def is_io_failure(error: BaseException) -> bool:
  """Whether `error` (or an exception it was raised from) is the storage failing, decided by type, errno
  and status code, never by searching the message: an OSError; TensorFlow's errors of the I/O codes
  above; google-cloud-storage's HTTP errors of those kinds; and tensorstore's errors, which are all
  ValueError and carry their status code only as the message's first word (`PERMISSION_DENIED: ...`).
  An INVALID_ARGUMENT or FAILED_PRECONDITION (a sharding or shape mismatch) is not I/O: it keeps its
  traceback wherever this is asked.
  """
  seen, visited = error, set()
  while seen is not None and id(seen) not in visited:
    visited.add(id(seen))
    if isinstance(seen, OSError):
      return True
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(seen, tuple(getattr(tf.errors, n) for n in _TF_IO_ERRORS)):
      return True
    api = sys.modules.get("google.api_core.exceptions")
    if api is not None and isinstance(seen, api.GoogleAPICallError) and seen.code in _IO_HTTP_CODES:
      return True
    if type(seen) is ValueError and str(seen).split(":", 1)[0] in _IO_STATUS_CODES:
      return True  # tensorstore's status, as its Python binding raises it
    seen = seen.__cause__ or seen.__context__
  return False


_TF_IO_ERRORS = ("PermissionDeniedError", "UnauthenticatedError", "UnavailableError",
                 "DeadlineExceededError", "ResourceExhaustedError", "AbortedError", "CancelledError")


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_gcs(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  if is_gcs(path):
    p = _epath(path)
    return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Entry names (no trailing '/'), sorted."""
  if is_gcs(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def walk(path: str) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk` (top-down: pruning `dirs` in place prunes the walk), for gs:// too."""
  if not is_gcs(path):
    yield from os.walk(path)
    return
  # One listing of every object below `path` (a request per thousand objects), not a request per
  # entry as a directory-by-directory walk would make.
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  kv = ts.KvStore.open(kvstore_spec(path)).result()
  tree: dict[str, tuple[set, list]] = {"": (set(), [])}
  for key in sorted(k.decode() for k in kv.list().result()):
    marker = key.endswith("/")  # a folder marker object ("a/b/"), no file
    parts = [p for p in key.split("/") if p]
    folders = parts if marker else parts[:-1]
    for depth, name in enumerate(folders):  # every folder on the way
      tree.setdefault("/".join(folders[:depth]), (set(), []))[0].add(name)
      tree.setdefault("/".join(folders[:depth + 1]), (set(), []))
    if parts and not marker:
      tree["/".join(folders)][1].append(parts[-1])

  def visit(rel: str):
    sub_dirs, files = tree[rel]
    dirs = sorted(sub_dirs)
    yield join(path, rel) if rel else path, dirs, sorted(files)
    for d in list(dirs):  # the caller may have pruned some
      yield from visit(f"{rel}/{d}" if rel else d)

  yield from visit("")


def makedirs(path: str) -> None:
  if is_gcs(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "rb"):
  """A file object; on gs:// a write becomes visible, whole, when the file is closed."""
  if is_gcs(path):
    return _epath(path).open(mode)
  return open(path, mode)  # pylint: disable=consider-using-with


def read_bytes(path: str, limit: int | None = None) -> bytes:
  with open_file(path, "rb") as f:
    return f.read() if limit is None else f.read(limit)


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` whole with `data` (see `write_atomically`)."""
  write_atomically(path, lambda f: f.write(data))


def write_atomically(path: str, write) -> None:
  """`write(file)`, then `path` replaced whole: a reader or a crash sees the old or the new content,
  never a part. A GCS object is uploaded in one request; a local file is written beside `path`, synced
  and renamed into place (a failed write leaves no temporary file behind)."""
  if is_gcs(path):
    buffer = io.BytesIO()
    write(buffer)
    with _epath(path).open("wb") as f:
      f.write(buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def remove(path: str) -> None:
  if is_gcs(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path: str) -> None:
  """Removes a directory and everything under it; nothing when it is not there."""
  if is_gcs(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
  else:
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """A rename; on gs:// a directory is copied object by object, then removed (GCS has no directory
  rename outside hierarchical-namespace buckets), so it is not atomic there."""
  if is_gcs(src) and isdir(src):  # TensorFlow's GCS rename takes a folder by its trailing '/'
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.io.gfile.rename(src.rstrip("/") + "/", dst.rstrip("/") + "/")
  elif is_gcs(src) or is_gcs(dst):
    _epath(src).rename(dst)
  else:
    os.rename(src, dst)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local path holding `path`'s content: the path itself when it is local, else a temporary copy
  of the object (or of a folder's files) that is removed afterwards. For readers that need a real
  file (numpy's zip reader, safetensors' memory map)."""
  if not is_gcs(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="vit_cls_gcs_") as tmp:
    target = os.path.join(tmp, posixpath.basename(path.rstrip("/")) or "object")
    if isdir(path):
      for root, _, files in walk(path):
        local_root = os.path.join(target, posixpath.relpath(root, path))
        os.makedirs(local_root, exist_ok=True)
        for name in files:
          with open(os.path.join(local_root, name), "wb") as f:
            f.write(read_bytes(join(root, name)))
    else:
      with open(target, "wb") as f:
        f.write(read_bytes(path))
    yield target


def upload(local_path: str, path: str) -> None:
  """Copies a local file to `path` (local or gs://), replacing it whole."""
  with open(local_path, "rb") as f:
    write_bytes(path, f.read())


# ----------------------------------------------------------------------------------------------------
# Reaching Cloud Storage at all: one line within seconds, before anything is compiled.


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
  """What C++ code writes to file descriptor 2 inside the block, kept out of the terminal and handed
  back (as the list's one element) once the block ends. Tensorstore logs a missing credentials file
  there, a line of its own in front of the one-line error."""
  import sys  # pylint: disable=g-import-not-at-top
  captured: list[str] = []
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield captured
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      captured.append(held.read().decode(errors="replace"))


def kvstore_spec(path: str, *, probe: bool = False) -> dict:
  """Tensorstore's spec for the GCS "directory" `path` (its keys are the names below it)."""
  bucket, key = split_gcs(path)
  spec = {"driver": "gcs", "bucket": bucket, "path": key + "/" if key else ""}
  if probe:
    spec["context"] = {"gcs_request_retries": dict(_PROBE_RETRIES)}
  return spec


def _why(error: BaseException, native: str) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, TimeoutError):
    text = f"no answer within {PROBE_TIMEOUT_S:.0f} s"
  for marker, reason in (("Could not resolve host",
                          "no network: cannot resolve the Cloud Storage host"),
                         ("Could not connect", "no network: cannot connect to Cloud Storage"),
                         ("PERMISSION_DENIED", "permission denied"),
                         ("UNAUTHENTICATED", "not authenticated"), ("NOT_FOUND", "no such bucket")):
    if marker in text:
      text = reason
      break
  if "Could not find the credentials file" in native or "credentials" in text.lower():
    text += ("; no Google credentials found (run `gcloud auth application-default login`, set "
             "GOOGLE_APPLICATION_CREDENTIALS, or use a VM with a service account)")
  return text if len(text) <= 300 else text[:300] + "..."


def check_access(path: str, *, write: bool, what: str) -> None:
  """Raises a one-line StorageError unless Cloud Storage answers for `path` within seconds: read
  access (one object read: found or not found both prove it), and with `write`, a probe object
  written and removed. Local paths are not checked here. `what` names the setting in the message."""
  if not is_gcs(path):
    return
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  error, native = None, ""
  with native_stderr_captured() as captured:
    try:
      kv = ts.KvStore.open(kvstore_spec(path, probe=True)).result(timeout=PROBE_TIMEOUT_S)
      kv.read(".vit_cls_probe").result(timeout=PROBE_TIMEOUT_S)
      if write:
        key = f".write_test-{uuid.uuid4().hex}"
        kv.write(key, b"probe").result(timeout=PROBE_TIMEOUT_S)
        kv.write(key, None).result(timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  native = captured[0] if captured else ""
  if error is not None:
    raise errors.StorageError(
        f"{what} {path}: cannot {'write to' if write else 'read from'} Cloud Storage "
        f"({_why(error, native)}).") from None
