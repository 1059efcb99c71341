"""The Vision Transformer, in Flax linen, with a learnable [CLS] class token.

Images are cut into patches, each patch is embedded linearly, a learned class token is prepended, learned
position embeddings are added, and a pre-LayerNorm Transformer encoder mixes the tokens. The class token's
final state is the image representation; a head turns it into logits.

The parameter tree is a compatibility contract (shared/DESIGN.md, section 2): with the default pooling it
equals the tree of the original `vit_jax` linen model, names, shapes and initialisers, so checkpoints move
between the two codebases and the published `.npz` files load. Speed options (fused attention, one fused QKV
matmul, bfloat16 matmuls, rematerialisation) change how the forward pass is computed, never that tree.

This module imports only jax and flax: inference, checkpoint loading and benchmarks must work without
TensorFlow.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

POOLINGS = ("cls", "gap", "map", "last", "none")
CLASS_TOKEN_POSITIONS = ("first", "last")
ATTENTION_IMPLS = ("fused", "einsum")
LAYERNORM_EPS = 1e-6

# Attention and MLP kernels: xavier uniform. Flax computes fan-in/fan-out for DenseGeneral-shaped kernels
# (D, heads, head_dim) on their 2-D view, which is what the original does; `_Projection` does the same.
_xavier_uniform = nn.initializers.xavier_uniform()


def _as_dtype(dtype: Any) -> jnp.dtype:
  """Accepts dtypes and their names ("bfloat16"), so configs stored as JSON rebuild the same model."""
  return jnp.dtype(dtype)


class _Projection(nn.Module):
  """Holds the kernel and bias of one attention projection, in the original layout, and returns them.

  The attention module does the matmul itself, so it can fuse query, key and value into one product
  without changing how the parameters are stored.
  """

  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  in_axes: int  # how many leading kernel axes are contracted with the input

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    def init_on_2d_view(key, shape, dtype=jnp.float32):
      flat_shape = (math.prod(shape[: self.in_axes]), math.prod(shape[self.in_axes:]))
      return _xavier_uniform(key, flat_shape, dtype).reshape(shape)

    kernel = self.param("kernel", init_on_2d_view, self.kernel_shape)
    bias = self.param("bias", nn.initializers.zeros, self.bias_shape)
    return kernel, bias


def attention_core(q: Array, k: Array, v: Array, *, impl: str) -> Array:
  """softmax(q k^T / sqrt(d)) v over [batch, tokens, heads, head_dim] arrays.

  `fused` goes through `jax.nn.dot_product_attention`, which picks a fused kernel (cuDNN flash attention on
  GPU) where one exists. `einsum` is the explicit product, written heads-first so that both matmuls are
  plain batched matmuls (on CPU the heads-last einsum of the original runs several times slower).
  """
  if impl == "fused":
    return jax.nn.dot_product_attention(q, k, v)
  weights = attention_weights(q, k)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def attention_weights(q: Array, k: Array) -> Array:
  """The [batch, heads, query, key] attention probabilities, softmax taken in float32."""
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)).astype(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the parameter layout of `flax.linen.MultiHeadDotProductAttention`.

  query/key/value kernels are (D, heads, head_dim) with (heads, head_dim) biases; out is (heads, head_dim, D).
  Queries are scaled by 1/sqrt(head_dim).
  """

  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  impl: str = "fused"
  fuse_qkv: bool = True

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool, return_weights: bool = False):
    dtype = _as_dtype(self.dtype)
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"hidden_size={d} is not divisible by num_heads={self.num_heads}.")
    head_dim = d // self.num_heads
    proj = functools.partial(_Projection, (d, self.num_heads, head_dim), (self.num_heads, head_dim), 1)
    (wq, bq), (wk, bk), (wv, bv) = (proj(name=n)() for n in ("query", "key", "value"))
    wo, bo = _Projection((self.num_heads, head_dim, d), (d,), 2, name="out")()

    x = x.astype(dtype)
    if self.fuse_qkv:
      # One (D, 3*heads, head_dim) product instead of three: bigger matmuls, one read of x.
      w = jnp.concatenate([wq, wk, wv], axis=1).astype(dtype)
      b = jnp.concatenate([bq, bk, bv], axis=0).astype(dtype)
      qkv = jnp.einsum("btd,dnh->btnh", x, w) + b
      q, k, v = jnp.split(qkv, 3, axis=2)
    else:
      q, k, v = (jnp.einsum("btd,dnh->btnh", x, w.astype(dtype)) + b.astype(dtype)
                 for w, b in ((wq, bq), (wk, bk), (wv, bv)))

    weights = None
    use_dropout = self.dropout_rate > 0.0 and not deterministic
    if return_weights or use_dropout:
      # The fused kernel neither returns the probabilities nor drops them out: compute them explicitly.
      weights = attention_weights(q, k)
      probs = weights
      if use_dropout:
        probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v)
    else:
      out = attention_core(q, k, v, impl=self.impl)
    out = jnp.einsum("btnh,nhd->btd", out, wo.astype(dtype)) + bo.astype(dtype)
    return (out, weights) if return_weights else out


class MlpBlock(nn.Module):
  """Dense, GELU (tanh approximation), Dropout, Dense, Dropout."""

  mlp_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(nn.Dense, dtype=_as_dtype(self.dtype), kernel_init=_xavier_uniform,
                              bias_init=nn.initializers.normal(stddev=1e-6))
    out_dim = x.shape[-1]
    x = dense(self.mlp_dim)(x)
    x = nn.gelu(x, approximate=True)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + Dropout(MHSA(LN(x))), then x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "fused"
  fuse_qkv: bool = True

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, return_weights: bool = False):
    dtype = _as_dtype(self.dtype)
    y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype)(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=dtype, dropout_rate=self.attention_dropout_rate,
        impl=self.attention_impl, fuse_qkv=self.fuse_qkv)(
            y, deterministic=deterministic, return_weights=return_weights)
    y, weights = y if return_weights else (y, None)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + y
    y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=dtype, dropout_rate=self.dropout_rate)(
        y, deterministic=deterministic)
    x = x + y
    return (x, weights) if return_weights else x


class AddPositionEmbs(nn.Module):
  """Adds a learned (1, tokens, D) position embedding, initialised normal(0.02)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and a final LayerNorm (the `Transformer` scope).

  `extra_tokens` (registers) are appended after the position embeddings are added: they carry no position,
  and since self-attention is permutation-equivariant, where they sit in the sequence does not matter.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "fused"
  fuse_qkv: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool, extra_tokens: Array | None = None,
               return_weights: bool = False):
    x = AddPositionEmbs(name="posembed_input")(x)
    if extra_tokens is not None:
      x = jnp.concatenate([x, extra_tokens.astype(x.dtype)], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block_cls = Encoder1DBlock
    if self.remat:
      # Recompute each block's activations in the backward pass: memory for compute.
      block_cls = nn.remat(Encoder1DBlock, static_argnums=(2, 3))
    all_weights = []
    for i in range(self.num_layers):
      x = block_cls(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
          dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
          attention_impl=self.attention_impl, fuse_qkv=self.fuse_qkv,
          name=f"encoderblock_{i}")(x, not train, return_weights)
      if return_weights:
        x, w = x
        all_weights.append(w)
    x = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=_as_dtype(self.dtype), name="encoder_norm")(x)
    return (x, tuple(all_weights)) if return_weights else x


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned query attends over all tokens, then an MLP (residual)."""

  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dtype = _as_dtype(self.dtype)
    d = x.shape[-1]
    probe = self.param("probe", _xavier_uniform, (1, 1, d))
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, d)).astype(dtype)
    # Cross-attention: queries from the probe, keys/values from the tokens.
    head_dim = d // self.num_heads
    proj = functools.partial(_Projection, (d, self.num_heads, head_dim), (self.num_heads, head_dim), 1)
    (wq, bq), (wk, bk), (wv, bv) = (proj(name=n)() for n in ("query", "key", "value"))
    wo, bo = _Projection((self.num_heads, head_dim, d), (d,), 2, name="out")()
    x = x.astype(dtype)
    q = jnp.einsum("btd,dnh->btnh", probe, wq.astype(dtype)) + bq.astype(dtype)
    k = jnp.einsum("btd,dnh->btnh", x, wk.astype(dtype)) + bk.astype(dtype)
    v = jnp.einsum("btd,dnh->btnh", x, wv.astype(dtype)) + bv.astype(dtype)
    y = attention_core(q, k, v, impl="einsum")
    y = jnp.einsum("btnh,nhd->btd", y, wo.astype(dtype)) + bo.astype(dtype)
    z = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype)(y)
    y = y + MlpBlock(mlp_dim=self.mlp_dim, dtype=dtype)(z, deterministic=True)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT: patches -> linear embedding -> [CLS] prepended -> position embeddings -> encoder -> pool -> head.

  Heads: with `representation_size` the pre-training head, `tanh(Dense(pre_logits))` then `head`; without
  it the fine-tuning head, a single zero-initialised linear `head`; with `num_classes=0` no head at all (the
  pooled representation, or the token sequence for `pool="none"`, is the output).

  Poolings: `cls` (the class token's output), `gap` (mean over tokens), `map` (attention pooling), `last`
  (the last patch token), `none` (every token). Only `cls` creates the `cls` parameter and the class
  token's position-embedding row. `class_token_position="last"` appends the class token instead of
  prepending it (its position-embedding row is then the last one): in a bidirectional encoder that is the
  same function up to a permutation, which the pooling study checks.

  `num_registers` learned tokens join the sequence and are discarded at the output.
  """

  num_classes: int
  patch_size: Sequence[int] = (16, 16)
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  pool: str = "cls"
  representation_size: int | None = None
  num_registers: int = 0
  class_token_position: str = "first"
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = "fused"
  fuse_qkv: bool = True
  remat: bool = False

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, *, train: bool, return_aux: bool = False):
    """Returns logits (or features without a head); with `return_aux`, also a dict of what users inspect.

    aux: `tokens` (encoded sequence after the final LayerNorm, registers removed), `pooled` (the pooled
    representation), `pre_logits` (the input of `head`), `attention` (per layer, [batch, heads, q, k]
    probabilities over the whole sequence, registers included).
    """
    dtype = _as_dtype(self.dtype)
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}.")
    ph, pw = self.patch_size
    _, h, w, _ = images.shape
    if h % ph or w % pw:
      raise ValueError(f"image size {h}x{w} is not divisible by patch_size {ph}x{pw}; "
                       f"use an image size that is a multiple of the patch size.")
    x = nn.Conv(self.hidden_size, kernel_size=(ph, pw), strides=(ph, pw), padding="VALID",
                dtype=dtype, name="embedding")(images.astype(dtype))
    n, gh, gw, d = x.shape
    x = x.reshape(n, gh * gw, d)

    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      cls = jnp.broadcast_to(cls, (n, 1, d)).astype(x.dtype)
      x = jnp.concatenate([cls, x] if self.class_token_position == "first" else [x, cls], axis=1)

    registers = None
    if self.num_registers:
      registers = self.param("registers", nn.initializers.normal(stddev=0.02),
                             (1, self.num_registers, d))
      registers = jnp.broadcast_to(registers, (n, self.num_registers, d))

    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=dtype,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl, fuse_qkv=self.fuse_qkv, remat=self.remat,
        name="Transformer")(x, train=train, extra_tokens=registers, return_weights=return_aux)
    attention = None
    if return_aux:
      x, attention = x
    if self.num_registers:
      x = x[:, :-self.num_registers]

    if self.pool == "cls":
      pooled = x[:, 0] if self.class_token_position == "first" else x[:, -1]
    elif self.pool == "gap":
      pooled = jnp.mean(x, axis=1)
    elif self.pool == "last":
      pooled = x[:, -1]
    elif self.pool == "map":
      pooled = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=dtype)(x)
    else:  # none
      pooled = x

    y = pooled
    if self.representation_size is not None:
      y = nn.Dense(self.representation_size, dtype=dtype, name="pre_logits")(y)
      y = jnp.tanh(y)
    pre_logits = y
    if self.num_classes:
      y = nn.Dense(self.num_classes, dtype=dtype, name="head",
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init))(y)
    # Logits leave in float32 whatever the compute dtype: the loss and softmax need the precision.
    y = y.astype(jnp.float32)
    if not return_aux:
      return y
    return y, {"tokens": x, "pooled": pooled, "pre_logits": pre_logits, "attention": attention}


def _validate(m: VisionTransformer) -> None:
  """Bad architecture settings fail when the model is built, with the field, the value and what is allowed."""
  def bad(field, value, allowed):
    raise ValueError(f"VisionTransformer.{field}={value!r} is not allowed: {allowed}.")

  if m.pool not in POOLINGS:
    bad("pool", m.pool, f"choose one of {', '.join(POOLINGS)}")
  if m.class_token_position not in CLASS_TOKEN_POSITIONS:
    bad("class_token_position", m.class_token_position, f"choose one of {CLASS_TOKEN_POSITIONS}")
  if m.attention_impl not in ATTENTION_IMPLS:
    bad("attention_impl", m.attention_impl, f"choose one of {ATTENTION_IMPLS}")
  if len(tuple(m.patch_size)) != 2 or min(m.patch_size) < 1:
    bad("patch_size", m.patch_size, "two positive integers (height, width)")
  for field in ("hidden_size", "mlp_dim", "num_heads", "num_layers"):
    if int(getattr(m, field)) < 1:
      bad(field, getattr(m, field), "a positive integer")
  if m.hidden_size % m.num_heads:
    bad("hidden_size", m.hidden_size, f"a multiple of num_heads={m.num_heads}")
  if m.num_classes < 0:
    bad("num_classes", m.num_classes, "0 (no head) or a positive number of classes")
  if m.representation_size is not None and m.representation_size < 1:
    bad("representation_size", m.representation_size, "None (linear head) or a positive integer")
  if m.num_registers < 0:
    bad("num_registers", m.num_registers, "0 or more")
  for field in ("dropout_rate", "attention_dropout_rate"):
    if not 0.0 <= getattr(m, field) < 1.0:
      bad(field, getattr(m, field), "a rate in [0, 1)")
  try:
    _as_dtype(m.dtype)
  except TypeError:
    bad("dtype", m.dtype, "a JAX dtype such as float32 or bfloat16")

