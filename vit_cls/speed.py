"""How the model's products are computed: attention paths, the QKV projection, bfloat16 matmuls, chunking.

`vit_cls/model.py` says *what* the Vision Transformer computes; this module holds the ways of computing the
same function faster on one kind of hardware or another. Every option here is tested to give the same
outputs and gradients as the plain path (tests/test_speed_options.py), and BENCHMARKS.md says what each one
is worth on the machines it was measured on.

Imports only jax (and flax for `apply_in_chunks`'s type), like the model.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

ATTENTION_IMPLS = ("fused", "einsum", "cudnn", "xla")
REMAT_POLICIES = ("none", "block", "dots")


# ----------------------------------------------------------------------------------------------------
# Attention.


# The platform the step is being compiled for, when that is not the process's own backend: set by
# `compiling_for` while `vit_cls.aot` traces a step for GPUs on a machine without one. The kernel must
# follow the target, not the process, or an ahead-of-time compile for a GPU would build (and measure)
# the CPU's attention instead of what a GPU run builds.
_target_platform: str | None = None


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within the block, attention picks its path for `platform` ("gpu", "tpu", "cpu") instead of
  `jax.default_backend()`. Only tracing happens inside it (jit traces lazily: lower within it)."""
  global _target_platform
  previous, _target_platform = _target_platform, {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
  try:
    yield
  finally:
    _target_platform = previous


def target_platform() -> str:
  return _target_platform or jax.default_backend()


def _use_cudnn(dtype) -> bool:
  """Whether `fused` means cuDNN's kernel: on a GPU, in half precision (it has no float32 kernels)."""
  return target_platform() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def padded_attention(q: Array, k: Array, v: Array, *, causal: bool, implementation: str,
                     multiple: int = 2) -> Array:
  """`jax.nn.dot_product_attention` over [b, t, heads, hd] with the tokens padded to a `multiple`, the
  padding masked through the sequence lengths, and the output cut back to the t real tokens.

  Why: a class-token ViT has an odd number of tokens (197 for B/16 at 224 px: 196 patches + `cls`), and
  jax's cuDNN path refuses odd lengths in training. The rule is in `check_is_flash_attention`
  (jax/_src/cudnn/fused_attention_stablehlo.py, jax 0.10.2): "training with a bias needs even Q and KV
  lengths" -- and the training rule passes `has_bias=bias is not None` after the wrapper has replaced a
  missing bias by a zero-size placeholder array, so every training call counts as biased. Padded to 198
  with query/key lengths 197 (cuDNN's PADDING mask), the padded keys get no weight and the padded query
  rows are dropped, so the function (and its gradient) is the unpadded one; tests/test_aot.py checks it
  on the CPU with the `xla` implementation, which takes the same arguments.
  """
  b, t = q.shape[0], q.shape[1]
  extra = -t % multiple
  if not extra:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  pad = lambda a: jnp.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0)))
  lengths = jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), is_causal=causal,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :t]


def pallas_attention(q: Array, k: Array, v: Array, *, kernel: str = "flash", causal: bool = False,
                     block: int = 128) -> Array:
  """One of jax's Pallas TPU attention kernels over [b, t, heads, hd] arrays, any token count.

  `kernel`: "flash" (`jax.experimental.pallas.ops.tpu.flash_attention`) or "splash"
  (`...splash_attention`, the batch folded into its heads). Both tile the tokens in blocks of 128 (the kv block must
  be a multiple of the TPU's 128 lanes), so an odd length (197, 577, 1,370) is padded to a multiple of
  `block` and the padded keys are masked: flash through segment ids (real tokens 1, padding 0), splash
  through a static mask (key < t, and causal if asked). The padded query rows are cut off, so outputs
  and gradients are the unpadded ones.

  On a CPU the kernels run only in Pallas's TPU interpret mode (slow; for tests): trace the whole forward
  and backward computation inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (the kernels'
  backward passes are traced with the gradient, so a context around this call alone would miss them).

  `attention_impl="fused"` takes splash on TPU from `SPLASH_MIN_TOKENS` tokens on, through
  `sharded_splash_attention` (a Mosaic kernel cannot be partitioned by XLA: "Mosaic kernels cannot be
  automatically partitioned. Please wrap the call in a shard_map."). Called directly, this is one
  device's computation.
  """
  b, t, h, d = q.shape
  tp = -(-t // block) * block
  heads_first = lambda a: jnp.pad(jnp.swapaxes(a, 1, 2), ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
  scale = 1.0 / math.sqrt(d)
  if kernel == "flash":
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
    segments = None
    if tp != t:
      ids = jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (b, tp))
      segments = fa.SegmentIds(q=ids, kv=ids)
    sizes = fa.BlockSizes(**{f: block for f in (
        "block_q", "block_k_major", "block_k", "block_q_major_dkv", "block_k_major_dkv", "block_k_dkv",
        "block_q_dkv", "block_k_major_dq", "block_k_dq", "block_q_dq")}, block_b=1)
    out = fa.flash_attention(qh, kh, vh, segment_ids=segments, causal=causal, sm_scale=scale,
                             block_sizes=sizes)
  elif kernel == "splash":
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    allowed = np.broadcast_to(np.arange(tp)[None, :] < t, (tp, tp))
    if causal:
      allowed = allowed & (np.arange(tp)[None, :] <= np.arange(tp)[:, None])
    # The batch is folded into the heads (one kernel call over b * heads): a vmapped splash kernel
    # does not run in Pallas's TPU interpret mode (jax 0.10.2: its grid gains a dimension that the
    # interpreter's dimension semantics do not), and folding is the same computation on a TPU.
    mask = sm.MultiHeadMask([sm.NumpyMask(allowed)] * (b * h))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                          block_kv_dq=block)
    fn = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
    fold = lambda a: a.reshape(b * h, tp, d)
    out = fn(fold(qh * jnp.asarray(scale, qh.dtype)), fold(kh), fold(vh)).reshape(b, h, tp, d)
  else:
    raise ValueError(f"kernel={kernel!r}: 'flash' or 'splash'")
  return jnp.swapaxes(out[:, :, :t], 1, 2)


# From this many tokens on, `fused` on TPU is splash (in a step traced with a mesh; see `_splash_mesh`).
# Compiled attention alone, forward and backward (benchmarks/tpu_attention_compile.py, BENCHMARKS.md
# "Pallas attention on TPU"), splash needs fewer temporaries than XLA's explicit product at every
# measured length from 577 tokens on (v5e B/16 at 577: 481 against 548 MiB; L/14 at 1,370: 1,753
# against 3,784 MiB) and more at 197 (98 against 0 MiB). Splash tiles the tokens in blocks of 128 and
# masks the padding, so its cost grows in steps of 128 tokens while the explicit product's [t, t] arrays
# grow with t^2: 512 (four blocks) is the round number just under 577 (384 px at patch 16) and far above
# 197 (224 px), so pretraining lengths keep XLA's product and fine-tuning lengths get splash. Lengths
# between 197 and 577 were not compiled; the threshold there is a judgement, not a measurement.
SPLASH_MIN_TOKENS = 512


def _splash_mesh(batch: int):
  """The mesh to run splash over, or None (then `fused` stays XLA's product on TPU).

  The mesh is JAX's ambient one (`jax.sharding.get_abstract_mesh()`), which `sharding.on_mesh` sets
  while train.py's and vit_cls.aot's steps are traced: the model itself never sees a mesh. None when
  there is no ambient mesh (a caller's own `jax.jit`: its inputs may be sharded over devices that
  XLA could not partition a Mosaic kernel across, and the trace cannot tell, so XLA's attention is the
  safe choice), when a mesh axis is already manual (inside a caller's shard_map), or when the batch
  does not split evenly over the mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or batch % mesh.size:
    return None
  if any("manual" in str(t).lower() for t in getattr(mesh, "axis_types", ())):
    return None
  return mesh


def sharded_splash_attention(q: Array, k: Array, v: Array, *, mesh, causal: bool = False) -> Array:
  """`pallas_attention(kernel="splash")` inside a `jax.shard_map` that splits the batch over every
  axis of `mesh`: each device runs the kernel on its own examples (attention never mixes examples, so
  no collective is needed). The project's mesh is 1-D (`sharding.DATA_AXIS`), and both layouts split
  the batch over it: plain data parallelism and fsdp (which shards parameters, not activations, over
  the same axis; `BatchShardedModel` keeps activations split by batch), so the specs hold for both.
  `check_vma=False`: the kernel's custom call has no replication rule to check."""
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
  fn = jax.shard_map(functools.partial(pallas_attention, kernel="splash", causal=causal), mesh=mesh,
                     in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  return fn(q, k, v)


def tokens_first(impl: str, dtype) -> bool:
  """Whether `impl` computes attention through `jax.nn.dot_product_attention` ([b, t, heads, hd] arrays)."""
  return impl in ("cudnn", "xla") or (impl == "fused" and _use_cudnn(dtype))


def attention(q: Array, k: Array, v: Array, *, impl: str, causal: bool = False,
              probs_fn: Callable[[Array], Array] | None = None, need_probs: bool = False,
              matmul_dtype: Any = None) -> tuple[Array, Array | None]:
  """softmax(q k^T / sqrt(d) [+ causal mask]) v over [batch, tokens, heads, head_dim] arrays.

  Returns (output [b, tq, heads, hd], probabilities [b, heads, tq, tk] or None). The probabilities exist
  only on the explicit path, which is taken whenever they are needed (`need_probs`, or `probs_fn`: dropout
  on the probabilities). Paths:
  * `einsum`, and `fused` off a GPU: the explicit product, heads-first: both products are plain batched
    matmuls over (batch, heads), the layout XLA's CPU backend runs fast (the original's heads-last einsums
    make it transpose around every product).
  * `fused` on TPU from `SPLASH_MIN_TOKENS` tokens on (self-attention), in a step traced with an
    ambient mesh (`sharding.on_mesh`): jax's Pallas splash kernel in a shard_map over the batch
    (`sharded_splash_attention`). Without a mesh, or below the threshold, the explicit product.
  * `cudnn`: cuDNN's flash-attention kernel (GPU, half precision); `fused` picks it where it applies.
  * `xla`: XLA's generic attention (`jax.nn.dot_product_attention`, heads-last).
  """
  with jax.named_scope("attention_core"):  # names the ops for profiles (benchmarks/profile_step.py)
    return _attention(q, k, v, impl=impl, causal=causal, probs_fn=probs_fn, need_probs=need_probs,
                      matmul_dtype=matmul_dtype)


def _attention(q, k, v, *, impl, causal, probs_fn, need_probs, matmul_dtype):
  explicit_needed = need_probs or probs_fn is not None
  if (impl == "fused" and not explicit_needed and target_platform() == "tpu"
      and q.shape[1] == k.shape[1] >= SPLASH_MIN_TOKENS):
    mesh = _splash_mesh(q.shape[0])
    if mesh is not None:
      return sharded_splash_attention(q, k, v, mesh=mesh, causal=causal), None
  if tokens_first(impl, q.dtype) and not (need_probs or probs_fn is not None):
    kernel = "cudnn" if impl in ("cudnn", "fused") else "xla"
    # cuDNN: odd token counts (a class token) padded to even, masked; see `padded_attention`.
    call = functools.partial(padded_attention, causal=causal, implementation=kernel,
                             multiple=2 if kernel == "cudnn" else 1)
    if impl == "fused":
      try:
        return call(q, k, v), None
      except (NotImplementedError, ValueError, RuntimeError):
        pass  # shapes or cuDNN version not supported: fall through to the explicit product
    else:
      return call(q, k, v), None
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [b, heads, t, hd]
  mm = lambda a, b: matmul(a, b, matmul_dtype=matmul_dtype)
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits = mm(q * scale, jnp.swapaxes(k, -1, -2)).astype(jnp.float32)  # [b, heads, tq, tk]
  if causal:
    tq, tk = logits.shape[-2:]
    allowed = jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq)
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  used = probs if probs_fn is None else probs_fn(probs)
  out = mm(used.astype(v.dtype), v)
  return jnp.swapaxes(out, 1, 2), probs


def qkv_projection(x: Array, projections, *, fuse: bool, dtype, matmul_dtype=None) -> Array:
  """[b, t, D] -> [b, t, 3, heads, hd] from the stored (kernel (D, heads, hd), bias (heads, hd)) triple.

  `fuse`: one [D, 3 * heads * hd] product instead of three (a bigger matmul, one read of x); the stored
  parameters stay three separate projections, as in the original.
  """
  with jax.named_scope("qkv_projection"):
    return _qkv_projection(x, projections, fuse=fuse, dtype=dtype, matmul_dtype=matmul_dtype)


def _qkv_projection(x, projections, *, fuse, dtype, matmul_dtype):
  b, t, d = x.shape
  n, h = projections[0][1].shape
  x2 = x.astype(dtype).reshape(b * t, d)
  if fuse:
    w = jnp.concatenate([w for w, _ in projections], axis=1).reshape(d, 3 * n * h).astype(dtype)
    bias = jnp.concatenate([b_ for _, b_ in projections], axis=0).reshape(3 * n * h).astype(dtype)
    return (matmul(x2, w, matmul_dtype=matmul_dtype) + bias).reshape(b, t, 3, n, h)
  return jnp.stack([(matmul(x2, w.reshape(d, n * h).astype(dtype), matmul_dtype=matmul_dtype)
                     + b_.reshape(n * h).astype(dtype)).reshape(b, t, n, h)
                    for w, b_ in projections], axis=2)


# ----------------------------------------------------------------------------------------------------
# Matmuls with bfloat16 operands and float32 products.


def matmul(x: Array, w: Array, *, matmul_dtype=None) -> Array:
  """x @ w; with `matmul_dtype` (bfloat16), operands in that dtype and a float32 product."""
  if matmul_dtype is None or jnp.dtype(matmul_dtype) == x.dtype:
    return jnp.matmul(x, w)
  if jnp.dtype(matmul_dtype) != jnp.bfloat16:
    raise ValueError(f"matmul_dtype={matmul_dtype!r}: only bfloat16 (or None) is supported")
  return _mm_bf16_f32(x, w).astype(x.dtype)


@jax.custom_vjp
def _mm_bf16_f32(x: Array, w: Array) -> Array:
  """x @ w (x [..., K], w [K, N] or batched like x) with bfloat16 operands and a float32 product.

  On a CPU with AVX512-BF16, XLA runs a bfloat16 x bfloat16 -> float32 product faster than a float32 one,
  but a bfloat16 -> bfloat16 product no faster; and the autodiff transpose of a mixed product falls back to
  float32. This keeps all three products of the forward and backward pass in the fast form: the incoming
  gradient is rounded to bfloat16 before each backward product.
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


def dense_dot_general(matmul_dtype):
  """A `dot_general` for `nn.Dense` that routes its product through `matmul` (None: flax's default)."""
  if matmul_dtype is None:
    return None

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    del precision, preferred_element_type
    (lc, rc), (lb, rb) = dimension_numbers
    if tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb:
      return jax.lax.dot_general(lhs, rhs, dimension_numbers)
    return matmul(lhs, rhs, matmul_dtype=matmul_dtype)
  return dot_general


# ----------------------------------------------------------------------------------------------------
# Memory: rematerialisation.


def checkpoint_policy(remat_policy: str):
  """The `jax.checkpoint` policy of a `remat_policy` name; None means "save nothing" (recompute all).

  `block`: each encoder block keeps only its input for the backward pass and recomputes everything else
  (least memory, about one extra forward pass of compute). `dots`: the block also keeps the outputs of its
  weight matmuls (QKV, out, MLP; dots without batch dimensions) and recomputes only the cheap element-wise
  work and the attention core, whose [batch, heads, tokens, tokens] arrays are the largest activations.
  """
  if remat_policy == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


# ----------------------------------------------------------------------------------------------------
# Chunked batches (CPU).


def apply_in_chunks(model, variables, images: Array, chunks: int, *, rngs=None, **kwargs):
  """`model.apply(variables, images, ...)` computed as `chunks` independent parts of the batch.

  The same function (outputs in the input order; with dropout, chunk j draws from its rngs folded
  with j), split for speed on a CPU: XLA's CPU runtime runs independent operations concurrently, and
  two independent half-batch chains can keep 2 cores busier than one chain whose small ops each use
  them poorly. Pointless on an accelerator. Chunk j takes every chunks-th example (j, j + chunks, ...),
  so a batch sharded over devices splits without moving data when each device's share is divisible by
  `chunks`.
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
