"""jax's Pallas TPU attention kernels (flash, splash) as `speed.pallas_attention` runs them: odd token counts
padded to 128 and masked give the explicit product's outputs and gradients.

On this CPU the kernels run in Pallas's TPU interpret mode (`force_tpu_interpret_mode`, no libtpu needed),
which traces the forward and backward kernels into plain CPU programs: slow (seconds per call), hence
small shapes. The forward and backward passes are both traced inside the context.

`attention_impl="fused"` takes splash on TPU from `speed.SPLASH_MIN_TOKENS` tokens, in a shard_map over
the batch (BENCHMARKS.md, "Pallas attention on TPU"): the last tests check that path on 4 simulated CPU
devices against XLA's attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from vit_cls import speed


def _inputs(t, b=2, h=2, d=64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, g = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in keys)
  return q, k, v, g


def _value_and_grads(fn, q, k, v, g):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(g)


@pytest.mark.parametrize("kernel", ["flash", "splash"])
# 17: one padded block; 130: two blocks, the second mostly padding (slow: about 25 s per kernel here).
@pytest.mark.parametrize("tokens", [17, pytest.param(130, marks=pytest.mark.slow)])
def test_pallas_attention_matches_explicit(kernel, tokens):
  q, k, v, g = _inputs(tokens)
  want, want_grads = _value_and_grads(lambda *a: speed.attention(*a, impl="einsum")[0], q, k, v, g)
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = _value_and_grads(lambda *a: speed.pallas_attention(*a, kernel=kernel), q, k, v, g)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  for name, a, b in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_fused_on_tpu_is_sharded_splash_with_a_mesh(monkeypatch):
  """`attention_impl="fused"` traced for TPU (`compiling_for("tpu")`) with an ambient mesh
  (`sharding.on_mesh`, as train.py's and vit_cls.aot's steps are traced) runs splash in a shard_map over
  the batch, 4 simulated CPU devices here, and gives XLA attention's outputs and gradients. The
  threshold is lowered to 16 tokens so that the interpreted kernel stays small (17 tokens)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from vit_cls import sharding
  monkeypatch.setattr(speed, "SPLASH_MIN_TOKENS", 16)
  mesh = Mesh(np.asarray(jax.devices()[:4]), (sharding.DATA_AXIS,))
  q, k, v, g = _inputs(17, b=8)
  batch = NamedSharding(mesh, P(sharding.DATA_AXIS))
  q, k, v, g = (jax.device_put(a, batch) for a in (q, k, v, g))

  def fused(q, k, v, g):
    out, vjp = jax.vjp(lambda *a: speed.attention(*a, impl="fused")[0], q, k, v)
    return out, vjp(g)

  want = jax.jit(lambda q, k, v, g: _value_and_grads(
      lambda *a: speed.attention(*a, impl="xla")[0], q, k, v, g))(q, k, v, g)
  with speed.compiling_for("tpu"), pltpu.force_tpu_interpret_mode():
    step = jax.jit(sharding.on_mesh(fused, mesh), in_shardings=batch, out_shardings=batch)
    text = str(step.trace(q, k, v, g).jaxpr)
    got = step(q, k, v, g)
    # Without the ambient mesh (a caller's own jit) it stays XLA's product: no shard_map.
    plain = str(jax.jit(fused).trace(q, k, v, g).jaxpr)
  assert "shard_map" in text and "shard_map" not in plain
  for name, a, b in zip(["out", "dq", "dk", "dv"], jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_fused_on_tpu_below_threshold_or_uneven_batch_is_not_splash():
  """Below `SPLASH_MIN_TOKENS`, or with a batch the mesh does not divide, `fused` stays XLA's product."""
  from jax.sharding import Mesh
  from vit_cls import sharding
  mesh = Mesh(np.asarray(jax.devices()[:4]), (sharding.DATA_AXIS,))
  short = _inputs(speed.SPLASH_MIN_TOKENS - 1, b=4, h=1, d=8)[:3]
  uneven = _inputs(speed.SPLASH_MIN_TOKENS, b=6, h=1, d=8)[:3]
  with speed.compiling_for("tpu"):
    for args in (short, uneven):
      f = sharding.on_mesh(lambda *a: speed.attention(*a, impl="fused")[0], mesh)
      assert "shard_map" not in str(jax.jit(f).trace(*args).jaxpr)
