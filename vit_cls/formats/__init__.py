"""Foreign checkpoint formats: one small module per format, each a pure mapping to vit_cls's parameter tree.

* `npz`: the published ViT `.npz` files (the original `vit_jax` names), read and written.
* `timm`: timm `VisionTransformer` state dicts (`model.safetensors`, a timm hub folder with `config.json`).
* `hf`: Hugging Face Transformers ViT (`ViTForImageClassification`, `ViTModel` with its pooler), a
  `save_pretrained` folder or a model in the local Hugging Face cache, found offline by its hub id.
* `safetensors`: the file format both use, read and written with numpy alone (never torch, never pickle).

`read(path)` is what `vit_cls.checkpoint.open_source` calls for anything that is not an `.npz` or
an orbax checkpoint: it returns (params in vit_cls's tree, meta) or None when `path` holds none of these
formats. The meta has the keys of an orbax checkpoint's (`model`: the `VisionTransformer` fields and image
size the tensors and config imply; `image_size`, `label_names`, the `preprocessing` the source expects)
and `format` ("timm" | "hf"), `import_notes` (what was assumed or changed on the way) and `import_assumed`
(the notes that are guesses, which `vit_cls.load` warns with: a wrong guess loads without error and
computes something else).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from vit_cls.errors import CheckpointError

# Pickled PyTorch files: never opened (loading one runs arbitrary code).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Mean/std of the project's own checkpoints: pixels scaled to [-1, 1], resized to the model's size.
OWN_PREPROCESSING = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                     "crop_pct": None, "source": "vit_cls"}


def read(path: str, hints: dict | None = None) -> tuple[dict, dict] | None:
  """`path` (a file or folder) as (params, meta), or None when it is not a timm / Hugging Face checkpoint.

  `hints`: VisionTransformer fields the caller knows (`num_heads`, `layernorm_epsilon`,
  `gelu_approximate`, `image_size`, ...) for a bare `.safetensors` file that has no config.json beside it,
  or a timm architecture name vit_cls's table lacks; they override the config. `num_heads_fallback`: heads
  to use only where neither a config nor the table says them (`config.init_from`: the fine-tuned model's,
  whose shapes must match the source's anyway).
  """
  from vit_cls.formats import safetensors as st  # pylint: disable=g-import-not-at-top
  hints = dict(hints or {})
  if os.path.isdir(path):
    folder, weights = path, _weights_in(path)
    if weights is None:
      return None
  elif os.path.isfile(path) and (path.endswith(".safetensors") or st.is_safetensors(path)):
    folder, weights = os.path.dirname(os.path.abspath(path)), [path]
  elif os.path.isfile(path) and path.endswith(_PICKLE_SUFFIXES):
    raise CheckpointError(f"{path}: a pickled PyTorch file, which is never loaded (unpickling runs "
                          f"code); expected a .safetensors file (timm and Hugging Face publish both).")
  else:
    return None
  tensors: dict = {}
  for file in weights:
    tensors.update(st.read(file)[0])
  source = path if len(weights) > 1 or os.path.isfile(path) else weights[0]
  config = _json(os.path.join(folder, "config.json"))
  from vit_cls.formats import hf, timm  # pylint: disable=g-import-not-at-top
  _refuse_other_architectures(tensors, source)
  if config is not None and "architecture" in config or timm.is_state_dict(tensors):
    return timm.to_vit_cls(tensors, config if config and "architecture" in config else None,
                           source=source, hints=hints)
  if hf.is_state_dict(tensors):
    preprocessor = _json(os.path.join(folder, "preprocessor_config.json"))
    return hf.to_vit_cls(tensors, config, preprocessor, source=source, hints=hints)
  first = sorted(tensors)[:3]
  raise CheckpointError(
      f"{source}: tensor 'patch_embed.proj.weight' (timm) or 'embeddings.patch_embeddings.projection."
      f"weight' (Hugging Face) is missing: not a ViT state dict (its tensors begin {first}).")


def _weights_in(folder: str) -> list[str] | None:
  """The safetensors files of a model folder (one, or the shards of an index), None if not a model."""
  single = os.path.join(folder, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = (_json(index) or {}).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index}: expected a 'weight_map' of tensor names to shard files.")
    return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
  config = _json(os.path.join(folder, "config.json"))
  # A timm / Hugging Face model config names its architecture; a training workdir's config.json does not.
  if isinstance(config, dict) and {"architecture", "architectures", "model_type"} & set(config):
    pickled = [f for f in os.listdir(folder) if f.endswith(_PICKLE_SUFFIXES)]
    raise CheckpointError(
        f"{os.path.join(folder, 'model.safetensors')}: missing" + (
            f"; the folder has only pickled PyTorch weights ({pickled[0]}), which are never loaded"
            if pickled else "") + "; expected the model's weights as safetensors.")
  return None


def _json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not readable JSON ({e}).") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: expected a JSON object.")
  return value


# Tensors that only other architectures have: (name fragment, what it is). A ViT import of these would
# fail on some missing tensor; saying what the file is instead is more useful.
_OTHER_ARCHITECTURES = (
    ("relative_position_bias_table", "a Swin Transformer (windowed attention)"),
    ("stages.", "a ConvNeXt (or another convolutional network)"),
    ("stem.", "a convolutional network"),
    ("layers.0.blocks.", "a Swin Transformer"),
    ("downsample", "a hierarchical (pyramid) network"),
)


def _refuse_other_architectures(tensors: dict, source: str) -> None:
  for name in sorted(tensors):
    for fragment, what in _OTHER_ARCHITECTURES:
      if fragment in name:
        raise CheckpointError(
            f"{source}: tensor '{name}' {tuple(tensors[name].shape)} belongs to {what}, not a ViT; "
            f"expected a timm or Hugging Face Vision Transformer state dict.")


def full_config(config: Any) -> dict:
  """Every VisionTransformer field of a model config (dict or module): given values, else the defaults."""
  from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top
  if dataclasses.is_dataclass(config):
    config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  out = {}
  for f in dataclasses.fields(VisionTransformer):
    if f.init and f.name not in ("parent", "name"):
      out[f.name] = config.get(f.name, f.default)
  out["image_size"] = config.get("image_size")
  return out


def hub_cache_dir() -> str:
  """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.environ["HF_HUB_CACHE"]
  home = os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
  return os.path.join(home, "hub")


def find_in_hub_cache(model_id: str) -> str | None:
  """The local snapshot folder of hub model `org/name` (or `org/name@revision`), without any network.

  The cache layout that `huggingface_hub` writes: `models--org--name/refs/<revision>` holds a commit
  hash, `models--org--name/snapshots/<hash>/` the files. A `timm/` model id works the same way.
  None when `model_id` does not look like a hub id or is not in the cache.
  """
  name, _, revision = model_id.partition("@")
  parts = name.split("/")
  if len(parts) != 2 or not all(parts) or any(p.startswith(".") for p in parts):
    return None
  repo = os.path.join(hub_cache_dir(), "models--" + "--".join(parts))
  revision = revision or "main"
  ref = os.path.join(repo, "refs", revision)
  commit = revision
  if os.path.isfile(ref):
    with open(ref, encoding="utf-8") as f:
      commit = f.read().strip()
  snapshot = os.path.join(repo, "snapshots", commit)
  return snapshot if os.path.isdir(snapshot) else None
