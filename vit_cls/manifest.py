"""What a checkpoint save wrote, recorded, so that damage is proven rather than guessed.

A checkpoint step that fails to read back is either damaged (its bytes are not the ones the save wrote:
truncated, flipped, deleted) or unreadable for a reason that says nothing about its bytes (a permission,
a flaky disk, a stale NFS handle, a bucket that is briefly unavailable). Only the first may cost the
user the step: `vit_cls.train.restore_latest` then falls back to an older step and moves the damaged one
aside. The second must stop the run and touch nothing, or a passing I/O error would throw away the
newest progress.

`write(step_dir)` records the size and CRC-32 of every file of the step's items in
`<step>/vit_cls_manifest.json` (written to a temporary name and renamed, so it is whole or absent):
for an asynchronous save into orbax's temporary directory once every item is written and before it is
renamed, so that it is committed with the step; for a blocking save right after the commit.
`damage_evidence(step_dir, error)` returns the proof that a step is damaged, or None when there is
none. Evidence is:

* the step was never finalised (orbax's commit marker or rename did not happen);
* a file the manifest lists is missing, has another size, or another checksum;
* an item (`state`, `meta`) or a metadata file is missing, or a metadata file does not parse as JSON;
* tensorstore's own check of what the save recorded failed: a `DATA_LOSS` status (the CRC-32C its OCDBT
  files store did not match) or a byte range beyond the end of a file that the save's index points into.

Only "no such file" counts as missing: whether a file exists is asked with
`storage.exists_or_raise`, because `os.path.exists` (and epath's `exists` for local paths) answers False
on EACCES, EIO and ESTALE, which would turn an unreadable step into a "missing" one. Reading the evidence
can fail too (the same bad disk, a permission, a 403): that error propagates, and the caller stops
without renaming anything. The checksums cost a read of the step once per save (in the background
with asynchronous saves) and once more only when a restore fails.
"""

from __future__ import annotations

import json
import re
import zlib

from etils import epath

from vit_cls import storage

NAME = "vit_cls_manifest.json"
_CHUNK = 8 << 20
# The JSON files a step of vit_cls.train holds: orbax's step metadata, the state's tree metadata, the
# JSON `meta` item. Each must exist (but _CHECKPOINT_METADATA, absent in older orbax) and parse.
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")
_REQUIRED = ("state/_METADATA", "meta/metadata")
# tensorstore statuses that report a mismatch against what the save itself recorded.
_RECORDED_MISMATCH = (
    re.compile(r"\bDATA_LOSS\b"),  # e.g. "CRC-32C checksum verification failed"
    re.compile(r"\bOUT_OF_RANGE\b.*is not valid for value of size \d+"),  # shorter than its index says
)


def _files(step_dir: epath.Path) -> list[str]:
  """Every file of the step's items (`state/...`, `meta/...`), as '/'-joined paths relative to it.

  The step's own top-level files are left out: orbax may still write them as it commits the step
  (after an asynchronous save's manifest is written), and they are checked by parsing instead.
  """
  out = []
  for root, _, names in step_dir.walk():
    for name in names:
      rel = (epath.Path(root) / name).relative_to(step_dir).as_posix()
      if "/" in rel:
        out.append(rel)
  return sorted(out)


def _exists(path: epath.Path) -> bool:
  return storage.exists_or_raise(str(path))


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def write(step_dir) -> None:
  """Records the size and CRC-32 of every file of a committed step (call on one process only)."""
  step_dir = epath.Path(step_dir)
  files = {rel: [(step_dir / rel).stat().length, _crc32(step_dir / rel)] for rel in _files(step_dir)}
  tmp = step_dir / (NAME + ".tmp")
  tmp.write_text(json.dumps({"version": 1, "files": files}, indent=0, sort_keys=True))
  tmp.replace(step_dir / NAME)


def read(step_dir) -> dict | None:
  """The recorded {path: (size, crc32)}, or None for a step saved without one (older versions, or a
  kill between the commit and the manifest). A manifest that does not parse counts as none: it is
  written whole or not at all, so it proves nothing about the step's other files."""
  path = epath.Path(step_dir) / NAME
  if not _exists(path):
    return None
  try:
    return {k: tuple(v) for k, v in json.loads(path.read_text())["files"].items()}
  except (ValueError, KeyError, TypeError, AttributeError):
    return None


def damage_evidence(step_dir, error: BaseException | None = None) -> str | None:
  """Why the step is damaged, in a few words, or None when nothing shows it is.

  `error` is what reading the step raised; only tensorstore's reports of a mismatch against the
  save's own records count from it. An error reading the evidence itself (an OSError, or Cloud
  Storage's own error types: `storage.is_io_failure`) propagates.
  """
  step_dir = epath.Path(step_dir)
  from orbax.checkpoint._src.path import step as step_lib  # pylint: disable=g-import-not-at-top
  if not step_lib.is_path_finalized(step_dir):
    return "the save never finished (not finalised)"
  recorded = read(step_dir)
  if recorded is not None:
    problems = []
    for rel, (size, crc) in sorted(recorded.items()):
      path = step_dir / rel
      if not _exists(path):
        problems.append(f"{rel} is missing")
        continue
      got = path.stat().length
      if got != size:
        problems.append(f"{rel} has {got} bytes, the save wrote {size}")
      elif _crc32(path) != crc:
        problems.append(f"{rel} does not match the checksum the save recorded")
    if problems:
      more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
      return f"{problems[0]}{more}"
  for rel in _REQUIRED:
    if not _exists(step_dir / rel):
      return f"{rel} is missing"
  for rel in _JSON_FILES:
    path = step_dir / rel
    if _exists(path):
      try:
        json.loads(path.read_bytes().decode("utf-8"))
      except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
        return f"{rel} does not parse ({type(e).__name__})"
  # Without a manifest, tensorstore's own records are the evidence. With one that verified, the bytes
  # on disk are the ones the save wrote, and a failed check came from the read, not the files.
  text = " ".join(str(error).split()) if error is not None else ""
  if recorded is None and any(p.search(text) for p in _RECORDED_MISMATCH):
    return "tensorstore: " + text[:200] + ("..." if len(text) > 200 else "")
  return None
