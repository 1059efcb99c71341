"""Reading and writing ViT parameters: the published `.npz` format, and this project's orbax checkpoints.

Two kinds of file hold parameters (the tree and the naming: docs/ARCHITECTURE.md):

* a published `.npz`: a flat `np.savez` of `/`-joined parameter paths, no optimizer state, no model
  config. The 2020 files number the sub-modules of an encoder block across classes (pre-linen Flax):
  `LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3`; later files and this project use
  the linen numbering, per class: `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`.
  Loading accepts both; export writes the pre-linen numbering because that is what third-party loaders
  (timm's npz loader, for one) expect. The architecture is inferred from the array shapes.
* a training checkpoint: `workdir/checkpoints/<step>/{state,meta}` written by an orbax `CheckpointManager`;
  `state` holds params and optimizer state, `meta` a JSON dict with the model config, image size and label
  names. Only the params are read back, so loading needs neither the optimizer nor its structure.

`load(path)` is the one call for users' own Flax code: it returns a ready `(model, params)` pair whatever
the kind of file. Nothing here imports TensorFlow; orbax is imported only when an orbax checkpoint is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import warnings
from typing import Any, Mapping

import numpy as np

Params = dict  # nested {name: {name: ... np.ndarray}}

# The sub-modules of one encoder block, in the order they are created (= pre-linen global numbering).
_BLOCK_ORDER = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
_BLOCK_RE = re.compile(r"encoderblock_\d+")
_NUMBERED_RE = re.compile(r"(.+)_(\d+)")
# Keys of a stored model config that are not `VisionTransformer` fields but describe the checkpoint.
_NON_MODEL_KEYS = ("image_size",)


# ----------------------------------------------------------------------------------------------------
# Tree helpers


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}: the npz key format, and an easy way to compare two trees."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any], *, source: str = "parameters") -> Params:
  """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix of another is an error."""
  tree: dict = {}
  for path, value in flat.items():
    parts = path.split("/")
    if not all(parts):
      raise ValueError(f"{source}: bad parameter name {path!r} (empty path component).")
    node = tree
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"{source}: parameter {path!r} lies under another parameter's name.")
    if parts[-1] in node:
      raise ValueError(f"{source}: parameter {path!r} is given twice (or is also a sub-tree).")
    node[parts[-1]] = value
  return tree


def plain(tree: Any) -> Any:
  """FrozenDicts / `{'params': ...}` variable dicts -> the plain nested-dict params tree."""
  if isinstance(tree, Mapping):
    tree = {k: plain(v) for k, v in tree.items()}
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
      tree = tree["params"]
  return tree


def _encoder_scope(tree: dict) -> dict:
  """The `Transformer` dict of a params tree, or of a variables dict holding one under "params"."""
  return tree["params"]["Transformer"] if "params" in tree and "Transformer" not in tree else tree["Transformer"]


def _with_encoder(tree: dict, transformer: dict) -> dict:
  """`tree` with its `Transformer` dict replaced (shallow copies: the input tree is left unchanged)."""
  if "params" in tree and "Transformer" not in tree:
    return {**tree, "params": {**tree["params"], "Transformer": transformer}}
  return {**tree, "Transformer": transformer}


def scan_to_unrolled(params: dict) -> dict:
  """Layer-scan layout (`Transformer/encoderblock/...`, a leading layer axis) -> published layout.

  A model built with `scan_layers=True` stores its blocks stacked; checkpoints, `.npz` files and every
  reader get `encoderblock_{i}`. Exact: layer i's arrays are the slices `[i]`. Works on a params tree, a
  variables dict holding one under "params", or any tree of the same structure (optimizer moments). A
  tree that is already unrolled is returned unchanged.
  """
  import jax  # pylint: disable=g-import-not-at-top
  encoder = _encoder_scope(params)
  if "encoderblock" not in encoder:
    return params
  stacked = encoder["encoderblock"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  unrolled = {k: v for k, v in encoder.items() if k != "encoderblock"}
  for i in range(num_layers):
    unrolled[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return _with_encoder(params, unrolled)


def unrolled_to_scan(params: dict) -> dict:
  """Published layout (`Transformer/encoderblock_{i}/...`) -> layer-scan layout (stacked on axis 0). Exact."""
  encoder = _encoder_scope(params)
  names = sorted((k for k in encoder if k.startswith("encoderblock_")),
                 key=lambda k: int(k.split("_")[1]))
  if not names:
    return params
  if [int(n.split("_")[1]) for n in names] != list(range(len(names))):
    raise ValueError(f"encoder blocks are not numbered 0..{len(names) - 1}: {names}")
  stacked = {k: v for k, v in encoder.items() if not k.startswith("encoderblock_")}
  import jax  # pylint: disable=g-import-not-at-top
  stacked["encoderblock"] = jax.tree.map(lambda *a: jax.numpy.stack(a), *(encoder[n] for n in names))
  return _with_encoder(params, stacked)


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


# ----------------------------------------------------------------------------------------------------
# Shape checks


def shape_mismatch_error(path: str, got: tuple, want: tuple, *, got_from: str = "checkpoint",
                         want_from: str = "model", hint: str = "") -> ValueError:
  """The one message for a shape disagreement: which parameter, and both shapes with their owners."""
  msg = (f"parameter '{path}' has shape {tuple(got)} in the {got_from} but {tuple(want)} in the "
         f"{want_from}")
  return ValueError(msg + (f"; {hint}" if hint else "."))


def check_param_shapes(params: Mapping, expected: Mapping, *, got_from: str = "checkpoint",
                       want_from: str = "model", hint: str = "") -> None:
  """Raises a one-line ValueError on the first missing, extra or differently shaped parameter.

  `expected` may hold arrays or `jax.ShapeDtypeStruct`s. Used before handing params to a model, so that a
  wrong checkpoint fails with the parameter's name instead of deep inside `apply`.
  """
  got, want = flatten(plain(params)), flatten(plain(expected))
  problems = []
  for path in sorted(set(got) | set(want)):
    if path not in got:
      problems.append(f"parameter '{path}' {tuple(want[path].shape)} is missing from the {got_from}")
    elif path not in want:
      problems.append(f"the {got_from} has parameter '{path}' {tuple(np.shape(got[path]))} that the "
                      f"{want_from} does not have")
    elif tuple(np.shape(got[path])) != tuple(want[path].shape):
      problems.append(str(shape_mismatch_error(path, np.shape(got[path]), want[path].shape,
                                               got_from=got_from, want_from=want_from)).rstrip("."))
  if problems:
    more = f" (and {len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
    raise ValueError(f"{got_from} does not match the {want_from}: {problems[0]}{more}"
                     + (f"; {hint}" if hint else "."))


# ----------------------------------------------------------------------------------------------------
# npz


def load_npz(path: str | os.PathLike) -> Params:
  """A published-format `.npz` -> nested params dict in linen naming (numpy arrays).

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
  if all(k.startswith("params/") for k in flat):
    flat = {k[len("params/"):]: v for k, v in flat.items()}
  return to_linen_naming(unflatten(flat, source=path))


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def save_npz(params: Mapping, path: str | os.PathLike) -> None:
  """Writes params as a published-format `.npz`: flat, '/'-joined, pre-linen block naming, no prefix.

  Written to a temporary file in the same directory and renamed into place, so a reader (or a crash)
  never sees half a file. Non-numpy float types (bfloat16) are stored as float32, which every npz reader
  understands.
  """
  import jax  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  flat = {}
  for key, value in flatten(to_prelinen_naming(plain(dict(params)))).items():
    value = np.asarray(jax.device_get(value))
    if value.dtype.kind == "V" or value.dtype.name == "bfloat16":
      value = value.astype(np.float32)
    flat[key] = value
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ----------------------------------------------------------------------------------------------------
# orbax


def _find_step_dir(path: str) -> str:
  """workdir | workdir/checkpoints | a step dir -> the step dir to read (latest finalized step)."""
  if os.path.isdir(os.path.join(path, "state")):
    return path
  ckpt_dir = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    ckpt_dir = path
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = ocp.utils.checkpoint_steps(ckpt_dir)
  steps = [s for s in steps if os.path.isdir(os.path.join(ckpt_dir, str(s), "state"))]
  if not steps:
    raise ValueError(f"{path}: no checkpoint found (expected an .npz file, a workdir, "
                     f"workdir/checkpoints, or a step directory holding 'state').")
  return os.path.join(ckpt_dir, str(max(steps)))


def _restore_orbax(step_dir: str) -> tuple[Params, dict | None]:
  """Params (numpy, host memory) and meta of one step; only `params` is read from `state`.

  A partial restore against the stored metadata skips the optimizer state: it is never read, and its
  structure need not be known. Arrays come back as numpy so a checkpoint written on 8 devices or a GPU
  loads on one CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  state_dir = epath.Path(step_dir) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  problem, restored = None, None
  try:
    tree = handler.metadata(state_dir)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or "params" not in tree:
      problem = "the saved state has no 'params' entry"
    else:
      item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                     tree["params"])}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      restored = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    # Closed on success only: after a failed read, close() makes tensorstore's pending callbacks print
    # "Event loop is closed" tracebacks, burying the one-line error below.
    handler.close()
  except Exception as e:  # pylint: disable=broad-except
    # Missing or damaged files surface as many exception types from orbax/tensorstore.
    problem = f"{type(e).__name__}: {_first_line(e)}"
    if len(problem) > 300:
      problem = problem[:300] + "..."
  if problem is not None:
    raise ValueError(f"{state_dir}: cannot read params from the orbax checkpoint ({problem}); "
                     f"pass another step directory to load that step instead.")
  # A run trained with `scan_layers` stores its blocks stacked; readers get the published layout.
  params = scan_to_unrolled(to_linen_naming(plain(restored["params"])))

  meta = None
  meta_dir = epath.Path(step_dir) / "meta"
  if meta_dir.is_dir():
    try:
      meta = dict(ocp.JsonCheckpointHandler().restore(meta_dir))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{meta_dir}: cannot read the checkpoint meta "
                       f"({type(e).__name__}: {_first_line(e)}).") from None
    name = os.path.basename(os.path.normpath(step_dir))
    if name.isdigit():
      meta.setdefault("step", int(name))
  return params, meta


def restore_params(path: str | os.PathLike) -> tuple[Params, dict | None]:
  """Params (nested dict of numpy arrays, linen naming) and meta (None for an `.npz`) from any source.

  `path`: an `.npz` file, a training workdir, its `checkpoints` directory (the latest step is read) or
  one step directory. Always in the published layout (`encoderblock_{i}`), also for a run trained with
  `scan_layers` (stacked blocks in its checkpoints).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory.")
  if os.path.isfile(path):
    return load_npz(path), None
  return _restore_orbax(_find_step_dir(os.path.abspath(path)))  # orbax wants absolute paths


# ----------------------------------------------------------------------------------------------------
# Model config


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def infer_model_config(params: Mapping) -> dict:
  """The `VisionTransformer` fields (plus `image_size`) that a params tree was built with.

  For an `.npz`, which stores no config. Read from shapes: patch size and width from the patch
  embedding, heads from the attention kernel (D, heads, head_dim), MLP width, depth (number of blocks),
  `pre_logits` width, classes (0 without a head), pooling (`cls` with a class token, `map` with an
  attention-pooling head, else `gap`; `last` and `none` store the same parameters as `gap`), registers,
  and the image size from the position-embedding rows (a square grid; the class token's row does not
  count). A non-square grid gives `image_size=None`: pass the size explicitly.
  """
  p = to_linen_naming(plain(dict(params)))
  where = "parameters"

  def get(path):
    node = p
    for part in path.split("/"):
      if not isinstance(node, Mapping) or part not in node:
        raise ValueError(f"{where}: not a ViT parameter tree: '{path}' is missing.")
      node = node[part]
    return node

  emb = _shape(get("embedding/kernel"))
  if len(emb) != 4:
    raise ValueError(f"{where}: 'embedding/kernel' has shape {emb}; expected a (patch_h, patch_w, "
                     f"channels, hidden) convolution kernel.")
  ph, pw, _, hidden = emb
  enc = get("Transformer")
  blocks = sorted(int(k.split("_")[1]) for k in enc if _BLOCK_RE.fullmatch(k))
  if not blocks:
    raise ValueError(f"{where}: not a ViT parameter tree: no 'Transformer/encoderblock_N'.")
  if blocks != list(range(len(blocks))):
    raise ValueError(f"{where}: encoder blocks are not numbered 0..{len(blocks) - 1}: {blocks}.")
  qk = _shape(get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"))
  if len(qk) != 3 or qk[0] != hidden or qk[1] * qk[2] != hidden:
    raise ValueError(f"{where}: attention query kernel has shape {qk}; expected (hidden={hidden}, "
                     f"heads, head_dim).")
  mlp_dim = _shape(get("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"))[1]
  has_cls = "cls" in p
  pool = "cls" if has_cls else ("map" if "MAPHead_0" in p else "gap")
  num_registers = _shape(p["registers"])[1] if "registers" in p else 0
  representation_size = _shape(p["pre_logits"]["kernel"])[1] if "pre_logits" in p else None
  num_classes = _shape(p["head"]["kernel"])[1] if "head" in p else 0

  rows = _shape(get("Transformer/posembed_input/pos_embedding"))[-2]
  n = rows - (1 if has_cls else 0)
  g = math.isqrt(max(n, 0))
  if n > 0 and g * g == n:
    image_size = g * ph if ph == pw else [g * ph, g * pw]
  else:
    image_size = None
  return dict(
      num_classes=int(num_classes), patch_size=[int(ph), int(pw)], hidden_size=int(hidden),
      mlp_dim=int(mlp_dim), num_heads=int(qk[1]), num_layers=len(blocks), pool=pool,
      representation_size=None if representation_size is None else int(representation_size),
      num_registers=int(num_registers), dtype="float32", image_size=image_size)


def model_fields() -> tuple[str, ...]:
  """The constructor fields of `VisionTransformer` (linen's `parent`/`name` excluded)."""
  from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top
  return tuple(f.name for f in dataclasses.fields(VisionTransformer)
               if f.init and f.name not in ("parent", "name"))


def build_model(config: Mapping):
  """A JSON model config (VisionTransformer fields, dtype as a string) -> `VisionTransformer`.

  Keys that are not fields are dropped with a warning: a newer checkpoint may carry fields this version
  does not know, and the shape check in `load` still catches any that change the parameters.
  """
  from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top
  fields = set(model_fields())
  config = {k: v for k, v in config.items() if k not in _NON_MODEL_KEYS}
  unknown = sorted(set(config) - fields)
  if unknown:
    warnings.warn(f"ignoring model config keys that VisionTransformer does not have: {unknown}")
  kwargs = {k: v for k, v in config.items() if k in fields}
  if "patch_size" in kwargs:
    kwargs["patch_size"] = tuple(int(x) for x in kwargs["patch_size"])
  return VisionTransformer(**kwargs)


def hw(image_size) -> tuple[int, int]:
  """An image size as stored in configs (N, or [H, W] from JSON) -> (H, W)."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def abstract_params(model, image_size) -> dict:
  """The params shapes `model` expects at `image_size`, traced without computing anything."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h, w = hw(image_size)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3), jnp.float32), train=False))
  return plain(dict(variables["params"]))


@dataclasses.dataclass
class LoadedCheckpoint:
  """Everything `load_with_info` found: the model, its params, and what the checkpoint says about them."""

  model: Any
  params: Params
  config: dict  # model config used, with image_size
  image_size: Any  # int or (h, w)
  label_names: list | None
  meta: dict | None  # None for an .npz


def load_with_info(path: str | os.PathLike, **overrides) -> LoadedCheckpoint:
  """`load`, plus the image size, label names and meta (what `predict` needs to preprocess and print)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  params, meta = restore_params(path)
  if meta and isinstance(meta.get("model"), Mapping):
    config = dict(meta["model"])
    config.setdefault("image_size", meta.get("image_size"))
  else:
    config = infer_model_config(params)
  config.update(overrides)
  image_size = config.get("image_size")
  if image_size is None:
    rows = _shape(params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding", ()))
    raise ValueError(f"{path}: cannot tell the image size from the position embedding {rows} "
                     f"(not a square grid); give the image size: image_size=(height, width), or --image_size HxW.")
  model = build_model(config)
  if model.scan_layers:  # trained with, or asked for, layer scan: the blocks stacked again
    params = unrolled_to_scan(params)
  check_param_shapes(params, abstract_params(model, image_size), got_from=f"checkpoint {path}",
                     want_from="model built from its config",
                     hint="fix: load with the architecture the checkpoint was trained with, or "
                          "convert it with vit_cls.convert")
  params = jax.tree.map(jnp.asarray, params)
  label_names = list(meta["label_names"]) if meta and meta.get("label_names") else None
  return LoadedCheckpoint(model=model, params=params, config=config, image_size=image_size,
                          label_names=label_names, meta=meta)


def load(path: str | os.PathLike, **overrides):
  """`model, params = load(path)`, then `model.apply({"params": params}, images, train=False)`.

  `path` is anything `restore_params` reads. The architecture comes from the checkpoint's stored config
  (this project's checkpoints) or is inferred from the shapes (`.npz`). `overrides` replace config
  fields, e.g. `dtype="bfloat16"` or `attention_impl="einsum"`, or give `image_size` where it cannot be
  inferred; params are checked against the resulting model, so a wrong checkpoint fails here, naming the
  parameter and both shapes.
  """
  loaded = load_with_info(path, **overrides)
  return loaded.model, loaded.params


def load_nnx(path: str | os.PathLike, **overrides):
  """The same checkpoint as a Flax NNX module: `m = load_nnx(path); logits = m(images, train=False)`.

  Wraps the linen model with `flax.nnx.bridge.ToNNX`. Its variables are created abstractly
  (`nnx.eval_shape`, no random init of a full model) and then replaced by the checkpoint's params, so
  loading costs no more than `load`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  loaded = load_with_info(path, **overrides)
  h, w = hw(loaded.image_size)
  sample = jnp.zeros((1, h, w, 3), jnp.float32)
  module = nnx.eval_shape(lambda: nnx.bridge.lazy_init(
      nnx.bridge.ToNNX(loaded.model, rngs=nnx.Rngs(0)), sample, train=False))
  nnx.update(module, loaded.params)
  # The abstract init left abstract RNG state behind; give it a real one (dropout when train=True).
  module.to_nnx__rngs = nnx.Rngs(0)
  return module
