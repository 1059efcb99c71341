"""The safetensors format, read and written with numpy alone: no torch, nothing pickled, ever.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`), then one byte
buffer holding every tensor, row-major, little-endian, at its offsets. Nothing in it can run code, which is
why it is the one foreign weight format read here.

The reader is strict, the way the reference implementation is: the header must fit in the file and stay
under 100 MB, every tensor's byte range must match its shape and dtype, the ranges must tile the buffer
without gaps or overlaps, the buffer must end where the file ends, and no name may appear twice. Each
failure is one `CheckpointError` line naming the file and the tensor. bfloat16 (no numpy dtype) is widened to float32 on read, exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import numpy as np

from vit_cls import storage
from vit_cls.errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "BF16": "<u2"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max


class _DuplicateName(Exception):
  """A JSON object of the header names a key twice (json.loads would keep the last silently)."""


def _refuse_duplicate_names(pairs: list) -> dict:
  seen = {}
  for key, value in pairs:
    if key in seen:
      raise _DuplicateName(key)
    seen[key] = value
  return seen


def is_safetensors(path: str) -> bool:
  """Whether `path` is a file whose first bytes look like a safetensors header (cheap; not a full check)."""
  try:
    with open(path, "rb") as f:
      head = f.read(9)
  except OSError:
    return False
  return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1


def read_header(path: str) -> tuple[dict, dict, int]:
  """(tensor entries, metadata, data start) of a safetensors file, every entry checked against the file."""
  size = os.path.getsize(path)

  def bad(msg):
    return CheckpointError(f"{path}: not a valid safetensors file: {msg}.")

  if size < 8:
    raise bad(f"{size} bytes, shorter than the 8-byte header length (truncated?)")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
      raise bad(f"the header claims {n:,} bytes but the file has {size - 8:,} after the length field "
                f"(truncated, or not safetensors; headers are at most {MAX_HEADER_BYTES:,} bytes)")
    raw = f.read(n)
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicate_names)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"the header is not JSON ({e})") from None
  except RecursionError:  # a deeply nested array or object: no real header nests past 3 levels
    raise bad("the header's JSON nests too deeply") from None
  except _DuplicateName as e:
    raise bad(f"the header names tensor '{e}' twice (a reader would silently keep only one)") from None
  if not isinstance(header, dict):
    raise bad("the header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise bad("'__metadata__' must map strings to strings")
  data_len = size - 8 - n
  spans = []
  for name, entry in header.items():
    where = f"tensor '{name}'"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
      raise bad(f"{where}: expected {{dtype, shape, data_offsets}}, got {entry!r}"[:300])
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
      raise bad(f"{where}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    # `type(d) is int`: JSON's true/false arrive as bool, which isinstance(d, int) accepts.
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
      raise bad(f"{where}: shape {str(shape)[:100]} is not a list of non-negative integers")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    # numpy refuses an array whose extents (zeros counted as 1) need more bytes than an address holds,
    # even when it is empty: [0, 10**30] would pass the byte count below and fail in np.empty.
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_ARRAY_BYTES:
      raise bad(f"{where}: shape {str(shape)[:100]} is larger than any array can be")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(o) is int for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
      raise bad(f"{where}: data_offsets {str(offsets)[:100]} is not [begin, end] with 0 <= begin <= end")
    need = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != need:
      raise bad(f"{where}: shape {shape} of {dtype} needs {need:,} bytes, data_offsets give "
                f"{offsets[1] - offsets[0]:,}")
    if offsets[1] > data_len:
      raise bad(f"{where}: ends at byte {offsets[1]:,} of a data buffer of {data_len:,} bytes "
                f"(truncated file?)")
    spans.append((offsets[0], offsets[1], name))
  end = 0
  for begin, stop, name in sorted(spans):
    if begin != end:
      raise bad(f"tensor '{name}' starts at byte {begin:,}, expected {end:,} (overlapping or gapped "
                f"data_offsets)")
    end = stop
  if end != data_len:
    raise bad(f"the tensors cover {end:,} bytes but the data buffer has {data_len:,}")
  return header, metadata, 8 + n


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """({name: array}, metadata) of a safetensors file; bfloat16 comes back as float32."""
  path = os.fspath(path)
  header, metadata, start = read_header(path)
  tensors = {}
  with open(path, "rb") as f:
    for name, entry in header.items():
      dtype = np.dtype(_DTYPES[entry["dtype"]])
      a = np.empty(entry["shape"], dtype)
      f.seek(start + entry["data_offsets"][0])
      if f.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
        raise CheckpointError(f"{path}: tensor '{name}' could not be read whole (file changed?).")
      if entry["dtype"] == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
      tensors[name] = a.astype(a.dtype.newbyteorder("="), copy=False)
  return tensors, metadata


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (numpy arrays) as safetensors, atomically (a temporary file renamed into place).

  Tensors are laid out in name order; the header is padded with spaces to a multiple of 8 bytes, as the
  reference writer does, so readers that map the file can view every tensor aligned.
  """
  path = os.fspath(path)
  header, arrays, offset = {}, [], 0
  for name in sorted(tensors):
    a = np.asarray(tensors[name])
    if a.dtype not in _NAMES:
      raise CheckpointError(f"{path}: tensor '{name}' has dtype {a.dtype}, which safetensors has no "
                            f"name for here; cast it to float32.")
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<")))
    header[name] = {"dtype": _NAMES[a.dtype.newbyteorder("=")], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    arrays.append(a)
    offset += a.nbytes
  if metadata:
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)

  def write_all(f):
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())

  storage.write_atomically(path, write_all)
