"""Dense features for detection / segmentation backbones: chosen blocks' patch tokens as a grid.

    feats = features.dense_features(model, {"params": params}, images, layers=(-4, -1))
    feats.grids[i]   # [N, H/ph, W/pw, D] (or NCHW with layout="NCHW"): block layers[i]'s patch tokens
    feats.prefix[i]  # [N, P, D]: its class token (if any) then its registers, stripped from the grid

What timm's `forward_intermediates` returns, from linen (`dense_features`) and NNX (`dense_features_nnx`)
alike. The model stays architecture-only: the block outputs are read with flax's `capture_intermediates`
(every `Encoder1DBlock.__call__` output, unrolled or stacked by `scan_layers`), so nothing is added to the
model or its parameter tree. `norm=True` applies the encoder's final LayerNorm to every chosen block, as
timm does with `norm=True` (the last block then equals the model's own `tokens` intermediate); a model
without that norm (`fc_norm=True`) returns its blocks' raw outputs either way.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_cls import model as model_lib

LAYOUTS = ("NHWC", "NCHW")


class DenseFeatures(NamedTuple):
  grids: tuple  # one [N, gh, gw, D] (or [N, D, gh, gw]) array per chosen block
  prefix: tuple  # one [N, P, D] array per chosen block: class token (if any), then registers
  layers: tuple  # the chosen blocks, as non-negative indices


def _is_block(module, method_name) -> bool:
  return isinstance(module, model_lib.Encoder1DBlock) and method_name == "__call__"


def _block_outputs(found: dict, num_layers: int) -> list:
  encoder = found["Transformer"]
  if "encoderblock" in encoder:  # scanned: one array stacked over layers
    stacked = encoder["encoderblock"]["__call__"][0][0]
    return [stacked[i] for i in range(num_layers)]
  return [encoder[f"encoderblock_{i}"]["__call__"][0][0] for i in range(num_layers)]


def dense_features(model: model_lib.VisionTransformer, variables, images, *,
                   layers: Sequence[int] = (-1,), norm: bool = True, layout: str = "NHWC"
                   ) -> DenseFeatures:
  """The patch tokens of blocks `layers` (negative counts from the last) as grids, prefix separately.

  Runs the model once in inference mode (the head's output is discarded).
  """
  L = model.num_layers
  chosen = tuple(i % L if -L <= i < L else None for i in layers)
  if None in chosen or not chosen:
    raise ValueError(f"layers={tuple(layers)!r} is not allowed: indices of blocks 0..{L - 1} "
                     f"(or -{L}..-1).")
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not allowed: choose one of {', '.join(LAYOUTS)}.")
  _, state = model.apply(variables, images, train=False, mutable="intermediates",
                         capture_intermediates=_is_block)
  outputs = _block_outputs(state["intermediates"], L)
  params = variables["params"]
  final_norm = params["Transformer"].get("encoder_norm")
  n, h, w, _ = images.shape
  (ph, pw) = model.patch_size
  gh, gw = h // ph, w // pw
  has_cls = model.pool == "cls"
  first = model.class_token_position == "first"
  grids, prefixes = [], []
  for i in chosen:
    x = outputs[i]
    if norm and final_norm is not None:
      x = nn.LayerNorm(epsilon=model.layernorm_epsilon, dtype=x.dtype).apply(
          {"params": final_norm}, x)
    # Sequence layout (model.py): [cls if first] patches [cls if last] [registers].
    start = 1 if has_cls and first else 0
    patches = x[:, start:start + gh * gw]
    rest = x[:, start + gh * gw:]
    prefix = jnp.concatenate([x[:, :start], rest], axis=1) if start else rest
    grid = patches.reshape(n, gh, gw, -1).astype(jnp.float32)
    grids.append(jnp.transpose(grid, (0, 3, 1, 2)) if layout == "NCHW" else grid)
    prefixes.append(prefix.astype(jnp.float32))
  return DenseFeatures(tuple(grids), tuple(prefixes), chosen)


def dense_features_nnx(module, images, **kwargs) -> DenseFeatures:
  """`dense_features` of an NNX module from `vit_cls.load_nnx` (a `flax.nnx.bridge.ToNNX` wrapper)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  return dense_features(module.to_nnx__module, {"params": params}, images, **kwargs)
