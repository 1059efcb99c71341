"""A minimal re-statement of the original `vit_jax` linen ViT, as a speed anchor for the benchmarks.

Why this file exists: the issue's targets are ratios against the original model measured on the same
machine in the same run. Importing the original repository would drag in its TensorFlow / ml_collections
dependencies (the GPU machine has neither), so this module re-states its compute in plain flax linen:
the same layers in the same order, computed the way the original computes them. In particular attention
is `flax.linen.MultiHeadDotProductAttention`, i.e. three separate `DenseGeneral` projections and flax's
heads-last einsum attention core (`...qhd,...khd->...hqk`); that layout is what makes the original slow on
CPU, so it must be kept as it is and not "improved" here.

It builds the same parameter tree as `vit_cls.model.VisionTransformer` with the default `cls` pooling (the
tree is the compatibility contract of docs/ARCHITECTURE.md), so the same parameters can be fed to
both models, and a test checks that they compute the same function.

Only the pieces the benchmark needs are here: `cls` pooling, optional pre-logits, a linear head, dropout.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class AddPositionEmbs(nn.Module):
  """Learned position embedding added to the token sequence (normal(0.02) init)."""

  @nn.compact
  def __call__(self, x):
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe


class MlpBlock(nn.Module):
  """Dense, GELU (flax default: tanh approximation), Dropout, Dense, Dropout."""

  mlp_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, deterministic):
    out_dim = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    x = nn.gelu(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(out_dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6))(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN block with flax's stock multi-head attention, as the original writes it."""

  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, inputs, *, deterministic):
    x = nn.LayerNorm(dtype=self.dtype)(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        broadcast_dropout=False, dropout_rate=self.attention_dropout_rate,
        deterministic=deterministic)(x, x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, dropout_rate=self.dropout_rate)(
        y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Position embeddings, dropout, the blocks (a Python loop: one copy per layer in the HLO), LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train):
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.num_layers):
      x = Encoder1DBlock(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
                         dropout_rate=self.dropout_rate,
                         attention_dropout_rate=self.attention_dropout_rate,
                         name=f"encoderblock_{i}")(x, deterministic=not train)
    return nn.LayerNorm(name="encoder_norm")(x)


class VisionTransformer(nn.Module):
  """The original's ViT: conv patch embedding, class token, encoder, class-token output, head."""

  num_classes: int
  patch_size: Sequence[int] = (16, 16)
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  representation_size: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(self.hidden_size, kernel_size=tuple(self.patch_size), strides=tuple(self.patch_size),
                padding="VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = jnp.reshape(x, (n, h * w, c))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                dtype=self.dtype, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate, name="Transformer")(x, train=train)
    x = x[:, 0]
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    if self.num_classes:
      x = nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.zeros)(x)
    return x


def from_vit_cls(model) -> VisionTransformer:
  """The reference model with the architecture of a `vit_cls.model.VisionTransformer` (cls pooling only)."""
  if model.pool != "cls" or model.num_registers or model.class_token_position != "first":
    raise ValueError("the vit_jax reference model supports pool='cls', no registers, class token first.")
  return VisionTransformer(
      num_classes=model.num_classes, patch_size=tuple(model.patch_size),
      hidden_size=model.hidden_size, mlp_dim=model.mlp_dim, num_heads=model.num_heads,
      num_layers=model.num_layers, dropout_rate=model.dropout_rate,
      attention_dropout_rate=model.attention_dropout_rate,
      representation_size=model.representation_size, dtype=jnp.dtype(model.dtype))
