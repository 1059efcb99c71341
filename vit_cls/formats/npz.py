"""The published ViT `.npz` format: names, reading, writing, and the architecture an export records.

A published `.npz` is a flat `np.savez` of `/`-joined parameter paths, no optimizer state. The 2020 files
number the sub-modules of an encoder block across classes (pre-linen Flax): `LayerNorm_0,
MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`; later files and this project use the linen
numbering, per class: `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`. Loading
accepts both; export writes the pre-linen numbering because that is what third-party loaders (timm's npz
loader, for one) expect.

The published files store no config: `vit_cls.checkpoint.infer_model_config` reads the architecture from
the shapes. Shapes cannot tell `gap` from `last` pooling, nor a class token appended last from one
prepended, nor exact from approximate GELU, so an export written here also records the model's
architecture fields as JSON bytes under one extra key, `vit_cls_config` (a uint8 array). timm's npz loader
and the original `vit_jax` loader read parameters by name and never look at it; `read_npz` returns it, and
`vit_cls.load` builds the model from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from vit_cls import storage
from vit_cls.formats.common import Params, first_line as _first_line, flatten, plain, unflatten

# The sub-modules of one encoder block, in the order they are created (= pre-linen global numbering).
_BLOCK_ORDER = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
_BLOCK_RE = re.compile(r"encoderblock_\d+")
_NUMBERED_RE = re.compile(r"(.+)_(\d+)")
CONFIG_KEY = "vit_cls_config"
# How a model is computed, not what it computes: never recorded (a reader picks its own).
_COMPUTE_FIELDS = ("dtype", "attention_impl", "fuse_qkv", "remat_policy", "scan_layers", "matmul_dtype")


def _split_numbered(name: str) -> tuple[str, int] | None:
  m = _NUMBERED_RE.fullmatch(name)
  return (m.group(1), int(m.group(2))) if m else None


def _renumber_block_to_linen(block: dict) -> dict:
  """Pre-linen (numbered across classes) -> linen (numbered per class) names of one encoder block.

  Pre-linen numbers are distinct across the block (0..k-1, in creation order); linen numbers restart at 0
  for every class, so with two or more children some repeat. That tells the two apart without guessing;
  linen names come back unchanged.
  """
  numbered = {k: _split_numbered(k) for k in block}
  if len(block) < 2 or any(v is None for v in numbered.values()):
    return dict(block)
  indices = [i for _, i in numbered.values()]
  if len(set(indices)) != len(indices):
    return dict(block)  # already per-class
  counters: dict[str, int] = {}
  out = {}
  for name in sorted(block, key=lambda k: numbered[k][1]):
    cls = numbered[name][0]
    out[f"{cls}_{counters.get(cls, 0)}"] = block[name]
    counters[cls] = counters.get(cls, 0) + 1
  return out


def _renumber_block_to_prelinen(block: dict) -> dict:
  """Linen -> pre-linen names of one encoder block: creation order, one counter across classes."""
  known = [k for k in _BLOCK_ORDER if k in block]
  rest = sorted((k for k in block if k not in _BLOCK_ORDER),
                key=lambda k: (_split_numbered(k) or (k, 0)))
  out = {}
  for i, name in enumerate(known + rest):
    parsed = _split_numbered(name)
    if parsed is None:
      out[name] = block[name]
    else:
      out[f"{parsed[0]}_{i}"] = block[name]
  return out


def _rename_blocks(params: Params, fn) -> Params:
  params = dict(params)
  if isinstance(params.get("Transformer"), dict):
    enc = dict(params["Transformer"])
    for name, block in enc.items():
      if _BLOCK_RE.fullmatch(name) and isinstance(block, dict):
        enc[name] = fn(block)
    params["Transformer"] = enc
  return params


def to_linen_naming(params: Params) -> Params:
  """Any accepted naming -> the linen naming of docs/ARCHITECTURE.md (identity on linen trees)."""
  return _rename_blocks(params, _renumber_block_to_linen)


def to_prelinen_naming(params: Params) -> Params:
  """Linen naming -> the 2020 pre-linen naming that the published files (and timm) use."""
  return _rename_blocks(to_linen_naming(params), _renumber_block_to_prelinen)


def read_npz(path: str | os.PathLike) -> tuple[Params, dict | None]:
  """A published-format `.npz` -> (nested params dict in linen naming, the recorded config or None).

  `allow_pickle=False` always: an npz is a zip of `.npy` files, and a pickled object array inside one
  would run code on load. Anything that is not such a file fails with one ValueError naming it.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file.")
  if os.path.isdir(path):
    raise ValueError(f"{path}: is a directory, not an .npz file.")
  problem = None
  flat = {}
  with open(path, "rb") as f:
    magic = f.read(6)
  data = None
  if magic.startswith(b"\x93NUMPY"):
    problem = "a single .npy array, not an .npz archive"
  elif not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    # Checked before np.load: anything else would reach numpy's pickle branch (refused, but with a
    # message that suggests unpickling the file).
    problem = "not a zip archive"
  else:
    try:
      data = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      problem = _first_line(e)
  if data is not None and not isinstance(data, np.lib.npyio.NpzFile):
    problem = "a single .npy array, not an .npz archive"
  elif data is not None:
    try:
      with data:
        for key in data.files:
          value = data[key]
          if value.dtype.kind not in "biuf":
            raise TypeError(f"array {key!r} has non-numeric dtype {value.dtype}")
          flat[key] = value
    except Exception as e:  # pylint: disable=broad-except
      # A damaged archive fails in zipfile/zlib/numpy's format parser: all mean "not readable".
      problem = _first_line(e)
      if "pickle" in problem:
        problem = "it holds pickled object arrays, which are never loaded"
  if problem is not None:
    raise ValueError(f"{path}: not a readable ViT .npz parameter file ({problem}); expected a flat "
                     f"np.savez of '/'-joined parameter names.") from None
  if not flat:
    raise ValueError(f"{path}: the .npz file holds no arrays.")
  config = _decode_config(path, flat.pop(CONFIG_KEY)) if CONFIG_KEY in flat else None
  if not flat:
    raise ValueError(f"{path}: the .npz file holds no parameter arrays.")
  if all(k.startswith("params/") for k in flat):
    flat = {k[len("params/"):]: v for k, v in flat.items()}
  return to_linen_naming(unflatten(flat, source=path)), config


def load_npz(path: str | os.PathLike) -> Params:
  """A published-format `.npz` -> nested params dict in linen naming (numpy arrays); see `read_npz`."""
  return read_npz(path)[0]


def _decode_config(path: str, raw: np.ndarray) -> dict:
  try:
    config = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
    raise ValueError(f"{path}: the recorded architecture '{CONFIG_KEY}' is not JSON ({e}); "
                     f"delete that key to load the parameters with an inferred architecture.") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: the recorded architecture '{CONFIG_KEY}' is not a JSON object.")
  return config


def export_config(config: Any, image_size=None) -> dict:
  """The JSON-able architecture record of a model config (a dict or a `VisionTransformer`).

  Every architecture field is kept (also defaults, so a later change of a default cannot change what the
  file means); the fields that only choose how it is computed are dropped.
  """
  if dataclasses.is_dataclass(config):
    config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.init and f.name not in ("parent", "name")}
  out = {}
  for key, value in dict(config).items():
    if key in _COMPUTE_FIELDS:
      continue
    out[key] = list(value) if isinstance(value, tuple) else value
  if image_size is not None:
    out["image_size"] = list(image_size) if isinstance(image_size, tuple) else image_size
  json.dumps(out)  # fails here, not in the middle of a write, on a value JSON cannot hold
  return out


def save_npz(params: Mapping, path: str | os.PathLike, config: Any = None,
             image_size=None) -> None:
  """Writes params as a published-format `.npz`: flat, '/'-joined, pre-linen block naming, no prefix.

  Written to a temporary file in the same directory and renamed into place, so a reader (or a crash)
  never sees half a file. Non-numpy float types (bfloat16) are stored as float32, which every npz reader
  understands.

  `config` (the model's config dict, or the `VisionTransformer`) and `image_size` are recorded under
  `vit_cls_config` (see the module docstring), so that `vit_cls.load` rebuilds the same pooling, class
  token position and switches; without them the reader infers the architecture from the shapes.
  """
  import jax  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  flat = {}
  for key, value in flatten(to_prelinen_naming(plain(dict(params)))).items():
    value = np.asarray(jax.device_get(value))
    if value.dtype.kind == "V" or value.dtype.name == "bfloat16":
      value = value.astype(np.float32)
    flat[key] = value
  if config is not None:
    text = json.dumps(export_config(config, image_size), sort_keys=True)
    flat[CONFIG_KEY] = np.frombuffer(text.encode("utf-8"), np.uint8)
  storage.write_atomically(path, lambda f: np.savez(f, **flat))
