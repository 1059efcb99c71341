"""The Vision Transformer, in Flax linen, with a learnable [CLS] class token.

Images are cut into patches, each patch is embedded linearly, a learned class token is prepended, learned
position embeddings are added, and a pre-LayerNorm Transformer encoder mixes the tokens. The class token's
final state is the image representation; a head turns it into logits.

With its defaults the parameter tree equals the one of the original `vit_jax` linen model (names, shapes
and initialisers: docs/ARCHITECTURE.md), so checkpoints move between the two codebases and the published
`.npz` files load. The switches for imported timm / Hugging Face checkpoints (exact GELU, LayerNorm epsilon,
LayerScale, a norm before the encoder, a norm after pooling, a class token without a position row) and the
causal mask of the pooling study add or drop parameters only when they are turned on.

How the products are computed (attention paths, one fused QKV product, bfloat16 matmuls, rematerialisation)
lives in `vit_cls/speed.py`: those options change the speed, never the function or the tree. The one that
changes the layout is `scan_layers`: the blocks are stacked along a leading layer axis under one
`encoderblock` scope; `vit_cls.checkpoint` converts to and from the published `encoderblock_{i}` layout.

Intermediates (each block's attention probabilities, the encoded tokens, the pooled vector, the input of the
head) are recorded with `sow` into the "intermediates" collection; `apply_with_aux` collects them.

This module imports only jax and flax: inference, checkpoint loading and benchmarks work without TensorFlow.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_cls import speed

Array = jax.Array

POOLINGS = ("cls", "gap", "map", "last", "none")
CLASS_TOKEN_POSITIONS = ("first", "last")
ATTENTION_IMPLS = speed.ATTENTION_IMPLS
REMAT_POLICIES = speed.REMAT_POLICIES
LAYERNORM_EPS = 1e-6
LAYERSCALE_INIT = 1e-5

# Attention and MLP kernels: xavier uniform, with fan-in/fan-out of (D, heads, head_dim) kernels computed
# on their 2-D view, as flax's DenseGeneral (and so the original) does.
_xavier_uniform = nn.initializers.xavier_uniform()


class _Projection(nn.Module):
  """The kernel and bias of one attention projection, in flax's `MultiHeadDotProductAttention` layout.

  The attention module does the products itself (so query, key and value can be one product) without
  changing how the parameters are stored.
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


def _attention_projections(d: int, num_heads: int):
  """The query/key/value/out projections of a D-wide attention layer with `num_heads` heads."""
  n, h = num_heads, d // num_heads
  qkv = [_Projection((d, n, h), (n, h), 1, name=name)() for name in ("query", "key", "value")]
  return qkv, _Projection((n, h, d), (d,), 2, name="out")()


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention, queries scaled by 1/sqrt(head_dim), optionally causal.

  Parameters as in `flax.linen.MultiHeadDotProductAttention`: query/key/value kernels (D, heads, head_dim)
  with (heads, head_dim) biases; out (heads, head_dim, D) with a (D,) bias. Records its attention
  probabilities ([batch, heads, query, key]) as the intermediate `attention` when asked to.
  """

  num_heads: int
  causal: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  impl: str = "fused"
  fuse_qkv: bool = True
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    b, t, d = x.shape
    qkv_params, (wo, bo) = _attention_projections(d, self.num_heads)
    qkv = speed.qkv_projection(x, qkv_params, fuse=self.fuse_qkv, dtype=self.dtype,
                               matmul_dtype=self.matmul_dtype)
    probs_fn = None
    if self.dropout_rate > 0.0 and not deterministic:
      probs_fn = lambda p: nn.Dropout(self.dropout_rate)(p, deterministic=False)
    record = self.is_mutable_collection("intermediates")
    o, probs = speed.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.impl,
                               causal=self.causal, probs_fn=probs_fn, need_probs=record,
                               matmul_dtype=self.matmul_dtype)
    if record:
      self.sow("intermediates", "attention", probs)
    o = o.reshape(b * t, d)
    out = speed.matmul(o, wo.reshape(d, d).astype(self.dtype), matmul_dtype=self.matmul_dtype)
    return (out + bo.astype(self.dtype)).reshape(b, t, d)


class MlpBlock(nn.Module):
  """Dense, GELU (the tanh approximation of the original, or the exact erf form), Dropout, Dense, Dropout."""

  mlp_dim: int
  gelu_approximate: bool = True
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_xavier_uniform,
                              bias_init=nn.initializers.normal(stddev=1e-6),
                              dot_general=speed.dense_dot_general(self.matmul_dtype))
    out_dim = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim)(x), approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim)(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class LayerScale(nn.Module):
  """A learned per-channel scale on a residual branch (CaiT, DINOv2, timm's `ls1`/`ls2`)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.constant(LAYERSCALE_INIT), (x.shape[-1],))
    return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + Dropout(MHSA(LN(x))), then x + MLP(LN(x)); optionally LayerScale on both branches.

  Returns `(x, None)`: the (carry, output) pair that `nn.scan` expects, so the same class runs unrolled
  and scanned.
  """

  mlp_dim: int
  num_heads: int
  causal: bool = False
  gelu_approximate: bool = True
  layernorm_epsilon: float = LAYERNORM_EPS
  layerscale: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str = "fused"
  fuse_qkv: bool = True
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> tuple[Array, None]:
    norm = functools.partial(nn.LayerNorm, epsilon=self.layernorm_epsilon, dtype=self.dtype)
    scale = (lambda i: LayerScale(name=f"LayerScale_{i}")) if self.layerscale else (lambda i: None)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, causal=self.causal, dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, impl=self.attention_impl, fuse_qkv=self.fuse_qkv,
        matmul_dtype=self.matmul_dtype)(norm()(x), deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + (y if not self.layerscale else scale(0)(y))
    y = MlpBlock(mlp_dim=self.mlp_dim, gelu_approximate=self.gelu_approximate,
                 dropout_rate=self.dropout_rate, dtype=self.dtype,
                 matmul_dtype=self.matmul_dtype)(norm()(x), deterministic=deterministic)
    x = x + (y if not self.layerscale else scale(1)(y))
    return x, None


class AddPositionEmbs(nn.Module):
  """Adds a learned (1, tokens, D) position embedding, initialised normal(0.02)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and a final LayerNorm (the `Transformer` scope).

  `x` gets position embeddings; `prefix` and `suffix` tokens are joined around it afterwards and carry no
  position (registers; a class token without a position row). A bidirectional encoder is
  permutation-equivariant, so where such tokens sit changes nothing; under the causal mask it does.
  `pre_norm` adds a LayerNorm before the first block (CLIP); `final_norm=False` leaves the output
  unnormalised (the model normalises after pooling instead).

  `scan_layers` runs one block under `nn.scan` instead of a Python loop: the compiled program holds one
  block instead of `num_layers` copies, so compile time stops growing with depth; the parameters are the
  blocks' parameters stacked along a leading axis under `encoderblock`.
  """

  num_layers: int
  block: dict  # Encoder1DBlock fields
  dropout_rate: float = 0.0
  layernorm_epsilon: float = LAYERNORM_EPS
  pre_norm: bool = False
  final_norm: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool, prefix: Array | None = None,
               suffix: Array | None = None) -> Array:
    x = AddPositionEmbs(name="posembed_input")(x)
    x = jnp.concatenate([t.astype(x.dtype) for t in (prefix, x, suffix) if t is not None], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    norm = functools.partial(nn.LayerNorm, epsilon=self.layernorm_epsilon, dtype=self.dtype)
    if self.pre_norm:
      x = norm(name="pre_norm")(x)

    block = Encoder1DBlock
    if self.remat_policy != "none":
      # Recompute each block's activations in the backward pass: memory for compute. Inside scan the
      # loop already keeps XLA from merging recomputation and forward pass, so no CSE barriers there.
      block = nn.remat(block, policy=speed.checkpoint_policy(self.remat_policy),
                       prevent_cse=not self.scan_layers, static_argnums=(2,))
    if self.scan_layers:
      block = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                      length=self.num_layers)
      x, _ = block(**self.block, name="encoderblock")(x, not train)
    else:
      for i in range(self.num_layers):
        x, _ = block(**self.block, name=f"encoderblock_{i}")(x, not train)
    return norm(name="encoder_norm")(x) if self.final_norm else x


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens, then a residual MLP."""

  num_heads: int
  mlp_dim: int
  gelu_approximate: bool = True
  layernorm_epsilon: float = LAYERNORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, _, d = x.shape
    dtype = self.dtype
    probe = jnp.broadcast_to(self.param("probe", _xavier_uniform, (1, 1, d)), (n, 1, d))
    ((wq, bq), (wk, bk), (wv, bv)), (wo, bo) = _attention_projections(d, self.num_heads)
    project = lambda t, w, b: jnp.einsum("btd,dnh->btnh", t.astype(dtype), w.astype(dtype)) + b.astype(dtype)
    # Cross-attention: the query comes from the probe, keys and values from the tokens.
    y, _ = speed.attention(project(probe, wq, bq), project(x, wk, bk), project(x, wv, bv), impl="einsum")
    y = jnp.einsum("btnh,nhd->btd", y, wo.astype(dtype)) + bo.astype(dtype)
    z = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=dtype)(y)
    y = y + MlpBlock(mlp_dim=self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     dtype=dtype)(z, deterministic=True)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT: patches -> linear embedding -> [CLS] prepended -> position embeddings -> encoder -> pool -> head.

  Heads: with `representation_size`, the pre-training head `tanh(Dense(pre_logits))` then `head`; without
  it the fine-tuning head, one zero-initialised linear `head`; with `num_classes=0` no head at all (the
  pooled representation, or the token sequence for `pool="none"`, is the output).

  Poolings: `cls` (the class token's output), `gap` (mean over the patch tokens), `map` (attention
  pooling), `last` (the last patch token), `none` (every token). Only `cls` creates the `cls` parameter
  and (with `class_token_posemb`) the class token's position-embedding row. `class_token_position="last"`
  appends the class token instead of prepending it. `num_registers` learned tokens join the sequence
  (without position rows) and are discarded at the output. `causal=True` masks attention so that token i
  sees tokens <= i: the control of the pooling study, where a prepended class token sees only itself.

  Switches for imported checkpoints (defaults are the original): `gelu_approximate=False` (exact GELU),
  `layernorm_epsilon`, `class_token_posemb=False` (position rows for the patches only), `layerscale`,
  `pre_norm` (a LayerNorm before the first block), `fc_norm` (LayerNorm after pooling instead of the
  encoder's final one).

  How it is computed (same function; `vit_cls/speed.py`): `dtype` (activations and matmuls; parameters stay
  float32), `matmul_dtype="bfloat16"` (bf16 operands, float32 products), `attention_impl`
  (fused|einsum|cudnn|xla), `fuse_qkv`, `remat_policy` (none|block|dots), `scan_layers`.
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
  causal: bool = False
  gelu_approximate: bool = True
  layernorm_epsilon: float = LAYERNORM_EPS
  class_token_posemb: bool = True
  layerscale: bool = False
  pre_norm: bool = False
  fc_norm: bool = False
  dtype: Any = jnp.float32
  attention_impl: str = "fused"
  fuse_qkv: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False
  matmul_dtype: Any = None

  def __post_init__(self):
    _validate(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> Array:
    dtype = jnp.dtype(self.dtype)
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}.")
    (ph, pw), (_, h, w, _) = self.patch_size, images.shape
    if h % ph or w % pw:
      raise ValueError(f"image size {h}x{w} is not divisible by patch_size {ph}x{pw}; "
                       f"use an image size that is a multiple of the patch size.")
    x = nn.Conv(self.hidden_size, (ph, pw), strides=(ph, pw), padding="VALID", dtype=dtype,
                name="embedding")(images)  # one linear embedding per non-overlapping patch
    n, gh, gw, d = x.shape
    x = x.reshape(n, gh * gw, d)  # row-major over the patch grid

    prefix, suffix = [], []  # tokens joined without position rows
    first = self.class_token_position == "first"
    if self.pool == "cls":
      cls = jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, d)), (n, 1, d))
      if self.class_token_posemb:
        x = jnp.concatenate([cls.astype(dtype), x] if first else [x, cls.astype(dtype)], axis=1)
      else:
        (prefix if first else suffix).append(cls)
    if self.num_registers:
      registers = self.param("registers", nn.initializers.normal(stddev=0.02),
                             (1, self.num_registers, d))
      suffix.append(jnp.broadcast_to(registers, (n, self.num_registers, d)))

    block = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, causal=self.causal,
        gelu_approximate=self.gelu_approximate, layernorm_epsilon=self.layernorm_epsilon,
        layerscale=self.layerscale, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, dtype=dtype,
        attention_impl=self.attention_impl, fuse_qkv=self.fuse_qkv, matmul_dtype=self.matmul_dtype)
    x = Encoder(
        num_layers=self.num_layers, block=block, dropout_rate=self.dropout_rate,
        layernorm_epsilon=self.layernorm_epsilon, pre_norm=self.pre_norm,
        final_norm=not self.fc_norm, remat_policy=self.remat_policy, scan_layers=self.scan_layers,
        dtype=dtype, name="Transformer")(
            x, train=train, prefix=jnp.concatenate(prefix, 1) if prefix else None,
            suffix=jnp.concatenate(suffix, 1) if suffix else None)
    if self.num_registers:
      x = x[:, :-self.num_registers]
    self.sow("intermediates", "tokens", x)

    if self.pool == "cls":
      x = x[:, 0] if first else x[:, -1]
    elif self.pool == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool == "last":
      x = x[:, -1]
    elif self.pool == "map":
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  gelu_approximate=self.gelu_approximate,
                  layernorm_epsilon=self.layernorm_epsilon, dtype=dtype)(x)
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=dtype, name="fc_norm")(x)
    self.sow("intermediates", "pooled", x)

    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, dtype=dtype, name="pre_logits")(x))
    self.sow("intermediates", "head_input", x)  # ("pre_logits" is the Dense's scope)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=dtype, name="head", kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init))(x)
    # Logits leave in float32 whatever the compute dtype: the loss and softmax need the precision.
    return x.astype(jnp.float32)


def apply_with_aux(model: VisionTransformer, variables, images: Array, **kwargs):
  """`(output, aux)`: `model.apply` plus what users inspect, collected from the `intermediates`.

  aux: `tokens` (the encoded sequence, registers removed), `pooled` (the pooled representation, after
  `fc_norm` if any), `pre_logits` (the input of `head`), `attention` (a tuple with one [batch, heads, q, k]
  array of probabilities per layer, over the whole sequence, registers included).
  """
  out, state = model.apply(variables, images, mutable="intermediates", **kwargs)
  found = state["intermediates"]
  encoder = found["Transformer"]
  if "encoderblock" in encoder:  # scanned: one array stacked over layers
    stacked = encoder["encoderblock"]["MultiHeadDotProductAttention_0"]["attention"][0]
    attention = tuple(stacked[i] for i in range(stacked.shape[0]))
  else:
    attention = tuple(encoder[f"encoderblock_{i}"]["MultiHeadDotProductAttention_0"]["attention"][0]
                      for i in range(model.num_layers))
  return out, {"tokens": found["tokens"][0], "pooled": found["pooled"][0],
               "pre_logits": found["head_input"][0], "attention": attention}


def _validate(m: VisionTransformer) -> None:
  """Bad architecture settings fail when the model is built, with the field, the value and what is allowed."""
  def bad(field, allowed):
    raise ValueError(f"VisionTransformer.{field}={getattr(m, field)!r} is not allowed: {allowed}.")

  for field, allowed in (("pool", POOLINGS), ("class_token_position", CLASS_TOKEN_POSITIONS),
                         ("remat_policy", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS)):
    if getattr(m, field) not in allowed:
      bad(field, f"choose one of {', '.join(allowed)}")
  if len(tuple(m.patch_size)) != 2 or min(m.patch_size) < 1:
    bad("patch_size", "two positive integers (height, width)")
  for field in ("hidden_size", "mlp_dim", "num_heads", "num_layers"):
    if int(getattr(m, field)) < 1:
      bad(field, "a positive integer")
  if m.hidden_size % m.num_heads:
    bad("hidden_size", f"a multiple of num_heads={m.num_heads}")
  if m.num_classes < 0:
    bad("num_classes", "0 (no head) or a positive number of classes")
  if m.representation_size is not None and m.representation_size < 1:
    bad("representation_size", "None (linear head) or a positive integer")
  if m.num_registers < 0:
    bad("num_registers", "0 or more")
  if not m.layernorm_epsilon > 0:
    bad("layernorm_epsilon", "a positive number")
  for field in ("dropout_rate", "attention_dropout_rate"):
    if not 0.0 <= getattr(m, field) < 1.0:
      bad(field, "a rate in [0, 1)")
  try:
    jnp.dtype(m.dtype)
  except TypeError:
    bad("dtype", "a JAX dtype such as float32 or bfloat16")
  if m.matmul_dtype is not None:
    try:
      ok = jnp.dtype(m.matmul_dtype) == jnp.bfloat16
    except TypeError:
      ok = False
    if not ok:
      bad("matmul_dtype", "None (matmuls in `dtype`) or bfloat16")
