"""This project's orbax checkpoints, the architecture of a params tree, and `load`.

Parameters come from (the tree and the naming: docs/ARCHITECTURE.md):

* a published `.npz` (vit_cls/formats/npz.py: names, reading, writing; re-exported here as `load_npz`,
  `save_npz`, `to_linen_naming`, `to_prelinen_naming`). Without a recorded config, the architecture is
  inferred from the array shapes (`infer_model_config`);
* a timm or Hugging Face ViT checkpoint in safetensors: a file, a model folder, or a hub id in the local
  Hugging Face cache (vit_cls/formats/timm.py, hf.py: the architecture from the tensors and config.json);
* a training checkpoint: `workdir/checkpoints/<step>/{state,meta}` written by an orbax `CheckpointManager`;
  `state` holds params and optimizer state, `meta` a JSON dict with the model config, image size and label
  names. Only the params are read back, so loading needs neither the optimizer nor its structure.

Which of these a path holds is decided once, by `open_source`: its `CheckpointSource` is what `load`,
`convert`, `predict`, export and `config.init_from` take. `load(path)` is the one call for users' own Flax
code: it returns a ready `(model, params)` pair whatever the kind of file. Nothing here imports
TensorFlow; orbax is imported only when an orbax checkpoint is read.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from typing import Any, Mapping

import numpy as np

from vit_cls import storage

# The format modules hold the tree helpers and the npz format; re-exported: callers use them from here.
from vit_cls.formats.common import (Params, first_line as _first_line, flatten, hw, plain,  # pylint: disable=g-bad-import-order
                                    square_grid, unflatten)
from vit_cls.formats.npz import (load_npz, read_npz, save_npz, to_linen_naming,  # pylint: disable=g-bad-import-order
                                 to_prelinen_naming)

_BLOCK_RE = re.compile(r"encoderblock_\d+")
# Keys of a stored model config that are not `VisionTransformer` fields but describe the checkpoint.
_NON_MODEL_KEYS = ("image_size",)


# ----------------------------------------------------------------------------------------------------
# Layer-scan layout


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
# orbax


def _find_step_dir(path: str) -> str:
  """workdir | workdir/checkpoints | a step dir -> the step dir to read (latest finalized step)."""
  if storage.isdir(storage.join(path, "state")):
    return path
  ckpt_dir = storage.join(path, "checkpoints")
  if not storage.isdir(ckpt_dir):
    ckpt_dir = path
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = ocp.utils.checkpoint_steps(ckpt_dir)
  steps = [s for s in steps if storage.isdir(storage.join(ckpt_dir, str(s), "state"))]
  if not steps:
    raise ValueError(f"{path}: no checkpoint found (expected an .npz file, a workdir, "
                     f"workdir/checkpoints, or a step directory holding 'state').")
  return storage.join(ckpt_dir, str(max(steps)))


def _restore_orbax(step_dir: str) -> tuple[Params, dict | None]:
  """Params (numpy, host memory) and meta of one step; only `params` is read from `state`.

  A partial restore against the stored metadata skips the optimizer state: it is never read, and its
  structure need not be known. Arrays come back as numpy so a checkpoint written on 8 devices or a GPU
  loads on one CPU.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vit_cls import orbax_fix  # pylint: disable=g-import-not-at-top
  orbax_fix.apply()

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
  g = square_grid(rows - (1 if has_cls else 0))
  image_size = None
  if g is not None:
    image_size = g * ph if ph == pw else [g * ph, g * pw]
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


def abstract_params(model, image_size) -> dict:
  """The params shapes `model` expects at `image_size`, traced without computing anything."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h, w = hw(image_size)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, 3), jnp.float32), train=False))
  return plain(dict(variables["params"]))


# ----------------------------------------------------------------------------------------------------
# Opening a checkpoint: once, into one object that every entry point takes


class CheckpointNotFound(FileNotFoundError):
  """The path names nothing (no file, folder, object, nor cached hub model): its own type, so that
  `config.init_from` can say "does not exist" apart from a checkpoint that does not read."""


@dataclasses.dataclass(frozen=True, eq=False)
class CheckpointSource:
  """An opened checkpoint: its kind, params (host numpy, `encoderblock_{i}` layout), architecture,
  preprocessing and labels. Read once, so that the checkpoint `config.init_from` checked is the one
  it uses and no layer asks the next what a path is; overrides given later change only the model."""

  path: str  # as given: messages name it
  kind: str  # "orbax" | "npz" | "timm" | "hf"
  params: Params = dataclasses.field(repr=False)
  meta: dict | None = dataclasses.field(repr=False)  # None for an .npz without a record
  # Model fields put over the checkpoint's own; a foreign file without a config is read with them
  # (`num_heads`, ...: vit_cls.formats.read).
  overrides: dict = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def own_config(self) -> dict:
    """The architecture the checkpoint records (an `.npz` without one: its shapes), with image_size."""
    if self.meta and isinstance(self.meta.get("model"), Mapping):
      return {"image_size": self.meta.get("image_size"), **self.meta["model"]}
    return infer_model_config(self.params)

  @property
  def config(self) -> dict:
    """The model to build: `own_config` with the overrides on top."""
    return {**self.own_config, **self.overrides}

  @property
  def image_size(self):
    return self.config.get("image_size")

  @property
  def preprocessing(self) -> dict:
    """mean/std of [0, 1] pixels, interpolation, crop_pct: an import's own, else this project's."""
    from vit_cls.formats import OWN_PREPROCESSING  # pylint: disable=g-import-not-at-top
    return dict(self._meta("preprocessing") or OWN_PREPROCESSING)

  @property
  def label_names(self) -> list | None:
    return list(self._meta("label_names") or []) or None

  def _meta(self, key: str):
    return (self.meta or {}).get(key)


def open_source(path: str | os.PathLike | CheckpointSource, *, what: str = "checkpoint",
                **overrides) -> CheckpointSource:
  """`path`, local or gs://: an `.npz` file, a training workdir, its `checkpoints` directory (the latest
  step), one step directory, a timm or Hugging Face `.safetensors` file or model folder, or the hub id of
  a model in the local Hugging Face cache (`google/vit-base-patch16-224`, `timm/<model>`; never
  downloaded). `what` names the setting in a Cloud Storage access error. An open source is not read
  again: it comes back as it is, with any new overrides added.
  """
  if isinstance(path, CheckpointSource):
    new = {k: v for k, v in overrides.items() if k not in path.overrides or path.overrides[k] != v}
    return dataclasses.replace(path, overrides={**path.overrides, **new}) if new else path
  path = os.fspath(path)
  return CheckpointSource(path, *_read(path, overrides, what), overrides=dict(overrides))


def _read(path: str, hints: dict, what: str) -> tuple[str, Params, dict | None]:
  """(kind, params, meta): the one place that decides what a path holds."""
  from vit_cls import formats  # pylint: disable=g-import-not-at-top
  if storage.is_gcs(path):
    # orbax reads Cloud Storage itself; numpy and safetensors read a temporary local copy.
    storage.check_access(path, write=False, what=what)
    if storage.isdir(path):
      names = storage.listdir(path)
      if "state" in names or "checkpoints" in names or any(n.isdigit() for n in names):
        return ("orbax", *_restore_orbax(_find_step_dir(path)))
    elif not storage.exists(path):
      raise CheckpointNotFound(f"{path}: no such object or folder in Cloud Storage.")
    with storage.local_copy(path) as local:
      return _read(local, hints, what)
  if not os.path.exists(path):
    cached = formats.find_in_hub_cache(path)
    if cached is None:
      raise CheckpointNotFound(f"{path}: no such file or directory (nor a model id in the local Hugging "
                               f"Face cache {formats.hub_cache_dir()}).")
    path = cached
  imported = formats.read(path, dict(hints))
  if imported is not None:  # (params, meta)
    return imported[1]["format"], imported[0], {**imported[1], "source": path}
  if os.path.isfile(path):
    params, record = read_npz(path)
    return "npz", params, (None if record is None else
                           {"model": record, "image_size": record.get("image_size")})
  return ("orbax", *_restore_orbax(_find_step_dir(os.path.abspath(path))))  # orbax wants absolute paths


def restore_params(path: str | os.PathLike, hints: Mapping | None = None) -> tuple[Params, dict | None]:
  """(params, meta) of `open_source(path, **hints)`."""
  source = open_source(path, **(hints or {}))
  return source.params, source.meta


@dataclasses.dataclass
class LoadedCheckpoint:
  """Everything `load_with_info` found: the model, its params, and what the checkpoint says about them."""

  model: Any
  params: Params
  config: dict  # model config used, with image_size
  image_size: Any  # int or (h, w)
  label_names: list | None
  meta: dict | None  # None for an .npz
  # What the model expects of an image: mean/std of [0, 1] pixels, interpolation, crop_pct (None: resize
  # the whole image); this project's own: [-1, 1] pixels, a plain resize (vit_cls.formats).
  preprocessing: dict | None = None
  source: CheckpointSource | None = None  # what all this came from


def load_with_info(path, **overrides) -> LoadedCheckpoint:
  """`load`, plus the image size, label names and meta (what `predict` needs to preprocess and print).

  `path`: a path, or a `CheckpointSource` already open (not read again).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  source = open_source(path, **overrides)
  # An import's guesses (vit_cls.formats): a wrong one loads without error and computes something else.
  for guess in source._meta("import_assumed") or []:  # not only convert / init_from should hear it
    warnings.warn(f"{source.path}: {guess}", stacklevel=3)
  config, image_size, params = source.config, source.image_size, source.params
  if image_size is None:
    rows = _shape(params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding", ()))
    raise ValueError(f"{source.path}: cannot tell the image size from the position embedding {rows} "
                     f"(not a square grid); give the image size: image_size=(height, width), or --image_size HxW.")
  model = build_model(config)
  if model.scan_layers:  # trained with, or asked for, layer scan: the blocks stacked again
    params = unrolled_to_scan(params)
  check_param_shapes(params, abstract_params(model, image_size), got_from=f"checkpoint {source.path}",
                     want_from="model built from its config",
                     hint="fix: load with the architecture the checkpoint was trained with, or "
                          "convert it with vit_cls.convert")
  params = jax.tree.map(jnp.asarray, params)
  return LoadedCheckpoint(model=model, params=params, config=config, image_size=image_size,
                          label_names=source.label_names, meta=source.meta,
                          preprocessing=source.preprocessing, source=source)


def load(path: str | os.PathLike, **overrides):
  """`model, params = load(path)`, then `model.apply({"params": params}, images, train=False)`.

  `path` is anything `open_source` opens, or an open `CheckpointSource`. The architecture comes
  from the checkpoint's stored config (this project's checkpoints) or is inferred from the shapes
  (`.npz`). `overrides` replace config fields, e.g. `dtype="bfloat16"` or `attention_impl="einsum"`, or
  give `image_size` where it cannot be inferred; params are checked against the resulting model, so a
  wrong checkpoint fails here, naming the parameter and both shapes.
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
