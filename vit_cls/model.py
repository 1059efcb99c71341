"""The Vision Transformer, in Flax linen, with a learnable [CLS] class token.

Images are cut into patches, each patch is embedded linearly, a learned class token is prepended, learned
position embeddings are added, and a pre-LayerNorm Transformer encoder mixes the tokens. The class token's
final state is the image representation; a head turns it into logits.

The parameter tree is a compatibility contract (shared/DESIGN.md, section 2): with the default pooling it
equals the tree of the original `vit_jax` linen model, names, shapes and initialisers, so checkpoints move
between the two codebases and the published `.npz` files load. Speed options (fused attention, one fused QKV
matmul, bfloat16 matmuls, rematerialisation) change how the forward pass is computed, never that tree. The
one exception is `scan_layers`, which stores the blocks stacked along a leading layer axis (one
`encoderblock` scope instead of `encoderblock_{i}`); `scan_to_unrolled` / `unrolled_to_scan` convert
between the two exactly, so checkpoints and `.npz` files stay in the published layout.

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
ATTENTION_IMPLS = ("fused", "einsum", "cudnn", "xla")
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

  `cudnn`: cuDNN's fused flash-attention kernel (GPU, half precision). `xla`: XLA's generic attention
  (`jax.nn.dot_product_attention`'s XLA path; heads-last products, slow on CPU). `fused`: cuDNN where it
  applies, else the explicit product. `einsum`: the explicit product, heads-first.
  """
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  if impl == "fused" and _use_cudnn(q.dtype):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
      pass  # shapes or cuDNN version not supported: `fused` falls back to the explicit product
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, n, t, h]
  out = _attention_heads_first(q, k, v, matmul=jnp.matmul)[0]
  return jnp.swapaxes(out, 1, 2)


def attention_weights(q: Array, k: Array) -> Array:
  """The [batch, heads, query, key] attention probabilities, softmax taken in float32."""
  scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32)).astype(q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def _use_cudnn(dtype) -> bool:
  """Whether `fused` means cuDNN's kernel: on a GPU, in half precision (it has no float32 kernels)."""
  return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def _attention_heads_first(q, k, v, *, matmul, probs_fn=None):
  """Attention over [batch, heads, tokens, head_dim] arrays: (output, probabilities).

  Both products are plain batched matmuls over (batch, heads), the layout XLA's CPU backend runs fast.
  `probs_fn` (dropout) is applied to the probabilities before they weight the values.
  """
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits = matmul(q * scale, jnp.swapaxes(k, -1, -2))  # [b, n, t, t]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  used = probs if probs_fn is None else probs_fn(probs)
  return matmul(used.astype(v.dtype), v), probs


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head self-attention with the parameter layout of `flax.linen.MultiHeadDotProductAttention`.

  query/key/value kernels are (D, heads, head_dim) with (heads, head_dim) biases; out is (heads, head_dim, D).
  Queries are scaled by 1/sqrt(head_dim).

  Two computations, one function:
  * heads-first (`einsum`, and `fused` off GPU): the projection output is reshaped once to
    [3, batch, heads, tokens, head_dim] (one copy for q, k and v together), both attention products
    are canonical batched matmuls, and the heads are merged back with one copy before the output
    projection. XLA's CPU backend runs a dot fast only on plain row-major (batched) matrices: with the
    original's heads-last einsums (`bqhd,bkhd->bhqk`) it transposes operands around every product and
    runs the products themselves several times slower, partly on one thread.
  * tokens-first [batch, tokens, heads, head_dim] q/k/v, the layout of `jax.nn.dot_product_attention`
    (`cudnn`, `xla`, and `fused` on a GPU in half precision, where it is cuDNN's flash attention).
  """

  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  impl: str = "fused"
  fuse_qkv: bool = True
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool, return_weights: bool = False):
    dtype = _as_dtype(self.dtype)
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"hidden_size={d} is not divisible by num_heads={self.num_heads}.")
    n, h = self.num_heads, d // self.num_heads
    proj = functools.partial(_Projection, (d, n, h), (n, h), 1)
    (wq, bq), (wk, bk), (wv, bv) = (proj(name=name)() for name in ("query", "key", "value"))
    wo, bo = _Projection((n, h, d), (d,), 2, name="out")()
    mm = functools.partial(_matmul, matmul_dtype=self.matmul_dtype)

    x2 = x.astype(dtype).reshape(b * t, d)
    if self.fuse_qkv:
      # One [D, 3 * heads * head_dim] product instead of three: a bigger matmul, one read of x.
      w = jnp.concatenate([wq, wk, wv], axis=1).reshape(d, 3 * n * h).astype(dtype)
      bias = jnp.concatenate([bq, bk, bv], axis=0).reshape(3 * n * h).astype(dtype)
      qkv = (mm(x2, w) + bias).reshape(b, t, 3, n, h)
    else:
      qkv = jnp.stack([(mm(x2, w_.reshape(d, n * h).astype(dtype)) + b_.reshape(n * h).astype(dtype))
                       .reshape(b, t, n, h) for w_, b_ in ((wq, bq), (wk, bk), (wv, bv))], axis=2)

    use_dropout = self.dropout_rate > 0.0 and not deterministic
    tokens_first = self.impl in ("cudnn", "xla") or (self.impl == "fused" and _use_cudnn(dtype))
    weights = None
    if tokens_first and not (return_weights or use_dropout):
      o = attention_core(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.impl)  # [b, t, n, h]
      o = o.reshape(b * t, n * h)
    else:
      q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [b, n, t, h]
      probs_fn = None
      if use_dropout:
        probs_fn = lambda p: nn.Dropout(self.dropout_rate)(p, deterministic=False)
      o, weights = _attention_heads_first(q, k, v, matmul=mm, probs_fn=probs_fn)
      o = jnp.transpose(o, (0, 2, 1, 3)).reshape(b * t, n * h)
    out = (mm(o, wo.reshape(n * h, d).astype(dtype)) + bo.astype(dtype)).reshape(b, t, d)
    return (out, weights) if return_weights else out


def _matmul(x: Array, w: Array, *, matmul_dtype=None) -> Array:
  """x @ w; with `matmul_dtype` (bfloat16), operands in that dtype and a float32 product."""
  if matmul_dtype is None or jnp.dtype(matmul_dtype) == x.dtype:
    return jnp.matmul(x, w)
  if jnp.dtype(matmul_dtype) != jnp.bfloat16:
    raise ValueError(f"matmul_dtype={matmul_dtype!r}: only bfloat16 (or None) is supported")
  return _mm_bf16_f32(x, w).astype(x.dtype)


@jax.custom_vjp
def _mm_bf16_f32(x: Array, w: Array) -> Array:
  """x @ w (x [..., K], w [K, N] or batched like x) with bfloat16 operands and a float32 product.

  On a CPU with AVX512-BF16 (this one), XLA runs a bfloat16 x bfloat16 -> float32 product about twice
  as fast as a float32 one, but a bfloat16 -> bfloat16 product no faster; and the autodiff transpose of
  a mixed product falls back to float32. This keeps all three products of the forward and backward pass
  in the fast form: the incoming gradient is rounded to bfloat16 before each backward product.
  """
  return jnp.matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _mm_bf16_f32_fwd(x, w):
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  # Zero-size arrays carry the primal dtypes (residuals must be arrays).
  return (jnp.matmul(xb, wb, preferred_element_type=jnp.float32),
          (xb, wb, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)))


def _mm_bf16_f32_bwd(res, g):
  xb, wb, x_like, w_like = res
  gb = g.astype(jnp.bfloat16)
  dx = jnp.matmul(gb, jnp.swapaxes(wb, -1, -2), preferred_element_type=jnp.float32)
  if wb.ndim == 2 and xb.ndim > 2:  # a weight: contract over every leading dim of x
    k, n = wb.shape
    dw = jnp.matmul(xb.reshape(-1, k).T, gb.reshape(-1, n), preferred_element_type=jnp.float32)
  else:
    dw = jnp.matmul(jnp.swapaxes(xb, -1, -2), gb, preferred_element_type=jnp.float32)
  return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_mm_bf16_f32.defvjp(_mm_bf16_f32_fwd, _mm_bf16_f32_bwd)


def _dense_dot_general(matmul_dtype):
  """A `dot_general` for `nn.Dense` that routes its product through `_matmul`."""
  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb:
      return jax.lax.dot_general(lhs, rhs, dimension_numbers)
    return _matmul(lhs, rhs, matmul_dtype=matmul_dtype)
  return dot_general


class MlpBlock(nn.Module):
  """Dense, GELU (tanh approximation), Dropout, Dense, Dropout."""

  mlp_dim: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(nn.Dense, dtype=_as_dtype(self.dtype), kernel_init=_xavier_uniform,
                              bias_init=nn.initializers.normal(stddev=1e-6),
                              dot_general=_dense_dot_general(self.matmul_dtype))
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
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool, return_weights: bool = False):
    dtype = _as_dtype(self.dtype)
    y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype)(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=dtype, dropout_rate=self.attention_dropout_rate,
        impl=self.attention_impl, fuse_qkv=self.fuse_qkv, matmul_dtype=self.matmul_dtype)(
            y, deterministic=deterministic, return_weights=return_weights)
    y, weights = y if return_weights else (y, None)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + y
    y = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=dtype)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=dtype, dropout_rate=self.dropout_rate,
                 matmul_dtype=self.matmul_dtype)(y, deterministic=deterministic)
    x = x + y
    return (x, weights) if return_weights else x


class PatchEmbedding(nn.Module):
  """The stride-`patch` VALID convolution of the original, computed as patchify + one matmul.

  Parameters are those of `nn.Conv` (kernel (ph, pw, C, D), lecun normal; bias (D,), zeros: same names,
  shapes, initialisers and random draws). A convolution whose stride equals its kernel size is a matmul
  of non-overlapping patches with the flattened kernel; written that way XLA's CPU backend runs a plain
  matrix product instead of its convolution path, which on this CPU was several times slower than the
  same FLOPs as a matmul (forward and kernel gradient both). Returns [batch, patches, D], row-major
  over the patch grid, as the original's reshape of the conv output.
  """

  features: int
  patch_size: tuple[int, int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    ph, pw = self.patch_size
    n, h, w, c = images.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (ph, pw, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    gh, gw = h // ph, w // pw
    x = images.astype(self.dtype).reshape(n, gh, ph, gw, pw, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(n, gh * gw, ph * pw * c)
    y = x @ kernel.reshape(ph * pw * c, self.features).astype(self.dtype)
    return y + bias.astype(self.dtype)


class AddPositionEmbs(nn.Module):
  """Adds a learned (1, tokens, D) position embedding, initialised normal(0.02)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


REMAT_POLICIES = ("none", "block", "dots")


def _checkpoint_policy(remat_policy: str):
  """The `jax.checkpoint` policy of a `remat_policy` name; None means "save nothing" (recompute all).

  `block`: each encoder block keeps only its input for the backward pass and recomputes everything else
  (least memory, about one extra forward pass of compute). `dots`: the block also keeps the outputs of its
  weight matmuls (QKV, out, MLP; dots without batch dimensions) and recomputes only the cheap element-wise
  work and the attention core, whose [batch, heads, tokens, tokens] arrays are the largest activations.
  """
  if remat_policy == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


class _ScanBlock(Encoder1DBlock):
  """An encoder block with the (carry, x) -> (carry, y) signature that `nn.scan` needs.

  `deterministic` and `return_weights` are fields rather than call arguments so that they stay Python
  values inside the scanned (and rematerialised) function. Its sub-modules are named exactly like
  `Encoder1DBlock`'s, so a scanned parameter tree is the unrolled one with a leading layer axis.
  """

  deterministic: bool = True
  return_weights: bool = False

  def __call__(self, x: Array, _: Any = None):  # pylint: disable=arguments-renamed
    out = super().__call__(x, self.deterministic, self.return_weights)
    return out if self.return_weights else (out, None)


class Encoder(nn.Module):
  """Position embeddings, dropout, `num_layers` blocks and a final LayerNorm (the `Transformer` scope).

  `extra_tokens` (registers) are appended after the position embeddings are added: they carry no position,
  and since self-attention is permutation-equivariant, where they sit in the sequence does not matter.

  `scan_layers` runs one block under `nn.scan` instead of a Python loop: the compiled program holds one
  block instead of `num_layers` copies, so compile time stops growing with depth. Its parameters are the
  blocks' parameters stacked along a leading layer axis under `encoderblock` (see `scan_to_unrolled` and
  `unrolled_to_scan`, which convert exactly between that and the published `encoderblock_{i}` layout).
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = "fused"
  fuse_qkv: bool = True
  remat_policy: str = "none"
  scan_layers: bool = False
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool, extra_tokens: Array | None = None,
               return_weights: bool = False):
    x = AddPositionEmbs(name="posembed_input")(x)
    if extra_tokens is not None:
      x = jnp.concatenate([x, extra_tokens.astype(x.dtype)], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block_fields = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl, fuse_qkv=self.fuse_qkv, matmul_dtype=self.matmul_dtype)
    policy = _checkpoint_policy(self.remat_policy)
    if self.scan_layers:
      block_cls = _ScanBlock
      if self.remat_policy != "none":
        # prevent_cse=False: inside scan the loop already keeps XLA from merging the recomputation
        # with the forward pass, and the CSE barriers would only slow the loop body down.
        block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                          "dropout": True},
                        length=self.num_layers)
      x, stacked = scanned(**block_fields, deterministic=not train, return_weights=return_weights,
                           name="encoderblock")(x, None)
      all_weights = tuple(stacked) if return_weights else ()
    else:
      block_cls = Encoder1DBlock
      if self.remat_policy != "none":
        # Recompute each block's activations in the backward pass: memory for compute.
        block_cls = nn.remat(Encoder1DBlock, policy=policy, static_argnums=(2, 3))
      all_weights = []
      for i in range(self.num_layers):
        x = block_cls(**block_fields, name=f"encoderblock_{i}")(x, not train, return_weights)
        if return_weights:
          x, w = x
          all_weights.append(w)
      all_weights = tuple(all_weights)
    x = nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=_as_dtype(self.dtype), name="encoder_norm")(x)
    return (x, all_weights) if return_weights else x


def _encoder_scope(tree: dict) -> tuple[dict, dict]:
  """(outer, Transformer) dicts of a params tree, accepting either `params` or `{"params": params}`."""
  if "params" in tree and "Transformer" not in tree:
    return tree["params"], tree["params"]["Transformer"]
  return tree, tree["Transformer"]


def _rebuild(tree: dict, transformer: dict) -> dict:
  """`tree` with its Transformer scope replaced (shallow copies: the input tree is left unchanged)."""
  if "params" in tree and "Transformer" not in tree:
    return {**tree, "params": {**tree["params"], "Transformer": transformer}}
  return {**tree, "Transformer": transformer}


def apply_in_chunks(model: nn.Module, variables, images: Array, chunks: int, *, rngs=None, **kwargs):
  """`model.apply(variables, images, ...)` computed as `chunks` independent parts of the batch.

  The same function (outputs in the input order; with dropout, chunk j draws from its rngs folded
  with j), split for speed on a CPU: XLA's CPU runtime runs independent operations concurrently, and
  two independent half-batch chains keep 2 cores busier than one chain whose small ops each use
  them poorly (ViT-Ti/16 training 1.12x, inference 1.23x on this project's 2-core machine; no gain for
  B/16, whose matmuls already fill the cores; pointless on an accelerator). Chunk j takes every
  chunks-th example (j, j + chunks, ...), so a batch sharded over devices splits without moving data,
  when each device's share is divisible by `chunks`.
  """
  if chunks == 1:
    return model.apply(variables, images, rngs=rngs, **kwargs)
  n = images.shape[0]
  if chunks < 1 or n % chunks:
    raise ValueError(f"batch_chunks={chunks} does not divide the batch of {n}: use a divisor of {n}.")
  strided = images.reshape((n // chunks, chunks) + images.shape[1:])
  outs = []
  for j in range(chunks):
    chunk_rngs = None if rngs is None else {k: jax.random.fold_in(r, j) for k, r in rngs.items()}
    outs.append(model.apply(variables, strided[:, j], rngs=chunk_rngs, **kwargs))
  out = jnp.stack(outs, axis=1)
  return out.reshape((n,) + out.shape[2:])


def scan_to_unrolled(params: dict) -> dict:
  """Scanned layout (`Transformer/encoderblock/...` with a leading layer axis) -> published layout.

  Exact: layer i's arrays are slices `[i]` of the stacked ones. Works on a params tree, or on a variables
  dict holding one under "params", or on any tree of the same structure (optimizer moments too). A tree
  that is already unrolled is returned unchanged.
  """
  _, tr = _encoder_scope(params)
  if "encoderblock" not in tr:
    return params
  stacked = tr["encoderblock"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  new_tr = {k: v for k, v in tr.items() if k != "encoderblock"}
  for i in range(num_layers):
    new_tr[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return _rebuild(params, new_tr)


def unrolled_to_scan(params: dict) -> dict:
  """Published layout (`Transformer/encoderblock_{i}/...`) -> scanned layout (stacked on axis 0). Exact."""
  _, tr = _encoder_scope(params)
  names = sorted((k for k in tr if k.startswith("encoderblock_")), key=lambda k: int(k.split("_")[1]))
  if not names:
    return params
  if [int(n.split("_")[1]) for n in names] != list(range(len(names))):
    raise ValueError(f"encoder blocks are not numbered 0..{len(names) - 1}: {names}")
  new_tr = {k: v for k, v in tr.items() if not k.startswith("encoderblock_")}
  new_tr["encoderblock"] = jax.tree.map(lambda *a: jnp.stack(a), *(tr[n] for n in names))
  return _rebuild(params, new_tr)


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

  Speed and memory options (same function, same numbers within rounding):
  * `attention_impl`: "fused" (default: cuDNN flash attention on a GPU in half precision, else the
    heads-first explicit product), "einsum" (heads-first explicit product), "cudnn", "xla" (XLA's generic
    attention, the original's heads-last layout); `fuse_qkv`: one QKV matmul instead of three.
  * `dtype`: compute dtype of activations and matmuls (parameters stay float32); bfloat16 on GPU/TPU.
  * `matmul_dtype`: None, or "bfloat16" for bfloat16 matmul operands with float32 products while
    activations stay in `dtype`: the fast bfloat16 form on a CPU with AVX512-BF16, where bfloat16
    activations (`dtype`) are slower than float32 ones.
  * `remat_policy`: "none", "block" (recompute each block in the backward pass), "dots" (keep the
    weight matmuls' outputs, recompute the rest).
  * `scan_layers`: one block under `nn.scan`: compile time independent of depth; stacked parameter
    layout (`scan_to_unrolled` / `unrolled_to_scan`).
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
  remat_policy: str = "none"
  scan_layers: bool = False
  matmul_dtype: Any = None

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
    x = PatchEmbedding(self.hidden_size, (ph, pw), dtype=dtype, name="embedding")(images)
    n, _, d = x.shape

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
        attention_impl=self.attention_impl, fuse_qkv=self.fuse_qkv, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, matmul_dtype=self.matmul_dtype,
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
  if m.remat_policy not in REMAT_POLICIES:
    bad("remat_policy", m.remat_policy, f"choose one of {', '.join(REMAT_POLICIES)}")
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
  if m.matmul_dtype is not None:
    try:
      ok = jnp.dtype(m.matmul_dtype) == jnp.bfloat16
    except TypeError:
      ok = False
    if not ok:
      bad("matmul_dtype", m.matmul_dtype, "None (matmuls in `dtype`) or bfloat16")

