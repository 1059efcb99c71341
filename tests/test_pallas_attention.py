"""jax's Pallas TPU attention kernels (flash, splash) as `speed.pallas_attention` runs them: odd token counts
padded to 128 and masked give the explicit product's outputs and gradients.

On this CPU the kernels run in Pallas's TPU interpret mode (`force_tpu_interpret_mode`, no libtpu needed),
which traces the forward and backward kernels into plain CPU programs: slow (seconds per call), hence
small shapes. The forward and backward passes are both traced inside the context.

`attention_impl="fused"` does not take these kernels (BENCHMARKS.md, "Pallas attention on TPU"): this
checks the padding and masking that a TPU default would rest on.
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
