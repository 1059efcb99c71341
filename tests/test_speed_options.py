"""Speed options compute the same function: fused QKV, attention paths, layer scan, remat, bfloat16.

Every option is checked against the plain path (unrolled layers, three separate projections, no remat,
float32) on the outputs and on the gradients of a scalar loss, with non-trivial parameters (the zero-init
head is perturbed, so gradients reach every parameter). Scan <-> unrolled parameter layouts must convert
exactly, both ways, so that checkpoints keep the published layout.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_cls import checkpoint
from vit_cls import model as model_lib
from vit_cls import speed
from tiny_model import images, tiny  # tests/tiny_model.py


def perturbed_params(model, seed=3):
  """Random parameters of the model's tree: non-zero head and biases, so every gradient path is used.

  Shapes come from `eval_shape` (tracing only) and values from numpy: no XLA compile of `init`, which on
  a busy 2-core machine costs more than the checks themselves. LayerNorm scales sit near 1.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images(), train=False))["params"]
  rng = np.random.default_rng(seed)
  def draw(path, s):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    base = 1.0 if name.endswith("scale") else 0.0
    return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def loss_and_grads(model, params, x=None):
  x = images() if x is None else x
  def loss(p):
    logits = model.apply({"params": p}, x, train=False)
    return jnp.sum(jnp.sin(logits))  # non-linear in the logits: gradients differ per class
  return jax.jit(jax.value_and_grad(loss))(params)


def assert_trees_close(a, b, rtol, atol):
  flat_a = flax.traverse_util.flatten_dict(a, sep="/")
  flat_b = flax.traverse_util.flatten_dict(b, sep="/")
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_allclose(np.asarray(flat_a[k]), np.asarray(flat_b[k]), rtol=rtol, atol=atol,
                               err_msg=k)


PLAIN = dict(fuse_qkv=False, attention_impl="einsum")


@pytest.mark.parametrize("option", [
    dict(fuse_qkv=True, attention_impl="einsum"),
    dict(fuse_qkv=True, attention_impl="fused"),
    dict(fuse_qkv=False, attention_impl="fused"),
    dict(fuse_qkv=True, attention_impl="xla"),
    dict(remat_policy="block"),
    dict(remat_policy="dots"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_matches_plain_path_outputs_and_gradients(option):
  plain = tiny(**PLAIN)
  params = perturbed_params(plain)
  want_loss, want_grads = loss_and_grads(plain, params)
  got_loss, got_grads = loss_and_grads(tiny(**{**PLAIN, **option}), params)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  assert_trees_close(got_grads, want_grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("remat_policy", ["none", "block", "dots"])
def test_scan_matches_unrolled_outputs_and_gradients(remat_policy):
  unrolled = tiny(**PLAIN)
  params = perturbed_params(unrolled)
  want_loss, want_grads = loss_and_grads(unrolled, params)
  scanned = tiny(scan_layers=True, remat_policy=remat_policy)
  got_loss, got_grads = loss_and_grads(scanned, checkpoint.unrolled_to_scan(params))
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  # Gradients come back in the scanned layout; converted, they must match the unrolled ones.
  assert_trees_close(checkpoint.scan_to_unrolled(got_grads), want_grads, rtol=1e-4, atol=1e-5)


def test_scan_and_unrolled_layouts_convert_exactly_both_ways():
  unrolled_model, scanned_model = tiny(), tiny(scan_layers=True)
  unrolled = perturbed_params(unrolled_model)
  scanned = perturbed_params(scanned_model, seed=5)
  # The scanned tree is the unrolled one with a leading layer axis under `encoderblock`.
  blk = scanned["Transformer"]["encoderblock"]
  assert blk["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape == (2, 32, 4, 8)
  assert "encoderblock_0" not in scanned["Transformer"]
  # unrolled -> scan -> unrolled and scan -> unrolled -> scan are the identity, bit for bit.
  for tree, there, back in ((unrolled, checkpoint.unrolled_to_scan, checkpoint.scan_to_unrolled),
                            (scanned, checkpoint.scan_to_unrolled, checkpoint.unrolled_to_scan)):
    again = back(there(tree))
    assert jax.tree.structure(again) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, again, tree)
  # A converted scanned tree has the published structure and shapes, and runs in the unrolled model.
  as_unrolled = checkpoint.scan_to_unrolled(scanned)
  assert jax.tree.structure(as_unrolled) == jax.tree.structure(unrolled)
  assert jax.tree.map(jnp.shape, as_unrolled) == jax.tree.map(jnp.shape, unrolled)
  run = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, images(), train=False))(p)
  np.testing.assert_allclose(run(unrolled_model, as_unrolled), run(scanned_model, scanned),
                             rtol=1e-5, atol=1e-6)
  # Also on a variables dict ({"params": ...}), and a no-op on a tree already in the target layout.
  wrapped = checkpoint.unrolled_to_scan({"params": unrolled})
  assert "encoderblock" in wrapped["params"]["Transformer"]
  assert checkpoint.scan_to_unrolled(unrolled) is unrolled
  assert checkpoint.unrolled_to_scan(scanned) is scanned


def test_scan_returns_per_layer_attention_weights():
  m = tiny(scan_layers=True, num_layers=3)
  v = jax.jit(lambda k: m.init(k, images(), train=False))(jax.random.key(0))
  _, aux = jax.jit(lambda v, x: model_lib.apply_with_aux(m, v, x, train=False))(v, images())
  assert len(aux["attention"]) == 3 and aux["attention"][0].shape == (2, 4, 17, 17)


def test_scan_with_dropout_trains_and_differs_per_rng():
  m = tiny(scan_layers=True, dropout_rate=0.3, attention_dropout_rate=0.3, num_classes=0)
  v = jax.jit(lambda k: m.init(k, images(), train=False))(jax.random.key(0))
  f = jax.jit(lambda v, x, k: m.apply(v, x, train=True, rngs={"dropout": k}))
  a, b = f(v, images(), jax.random.key(1)), f(v, images(), jax.random.key(2))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bfloat16_outputs_and_gradients_within_tolerance(scan_layers):
  m32 = tiny(hidden_size=64, mlp_dim=128, scan_layers=scan_layers)
  params = perturbed_params(m32)
  l32, g32 = loss_and_grads(m32, params)
  l16, g16 = loss_and_grads(tiny(hidden_size=64, mlp_dim=128, scan_layers=scan_layers,
                                 dtype="bfloat16"), params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # float32 master gradients
  np.testing.assert_allclose(l16, l32, rtol=3e-2, atol=3e-2)
  # bfloat16 keeps 8 mantissa bits: a few % relative error on the whole gradient.
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)))
  den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(g32))
  assert (num / den) ** 0.5 < 5e-2


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bfloat16_matmuls_within_tolerance_of_float32(scan_layers):
  """matmul_dtype=bfloat16: bf16 operands, float32 products and activations; gradients stay close."""
  m32 = tiny(hidden_size=64, mlp_dim=128, scan_layers=scan_layers)
  params = perturbed_params(m32)
  l32, g32 = loss_and_grads(m32, params)
  l16, g16 = loss_and_grads(tiny(hidden_size=64, mlp_dim=128, scan_layers=scan_layers,
                                 matmul_dtype="bfloat16"), params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  assert float(l16) != float(l32)  # the bf16 path really ran
  np.testing.assert_allclose(l16, l32, rtol=2e-2, atol=2e-2)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)))
  den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(g32))
  assert (num / den) ** 0.5 < 3e-2


def test_bad_remat_policy_names_the_field():
  with pytest.raises(ValueError, match="remat_policy='all'"):
    tiny(remat_policy="all")


def test_apply_in_chunks_gives_the_outputs_in_input_order_and_the_same_gradients():
  m = tiny()
  params = perturbed_params(m)
  x = images(n=6)
  want = m.apply({"params": params}, x, train=False)
  for chunks in (2, 3):
    got = speed.apply_in_chunks(m, {"params": params}, x, chunks, train=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # row i is still example i
  loss = lambda p, k: jnp.sum(jnp.sin(speed.apply_in_chunks(m, {"params": p}, x, k, train=False)))
  g1, g3 = (jax.jit(jax.grad(loss), static_argnums=1)(params, k) for k in (1, 3))
  assert_trees_close(g3, g1, rtol=1e-4, atol=1e-5)
  # Dropout: each chunk draws its own masks (rngs folded with the chunk index), not one shared mask.
  drop = tiny(dropout_rate=0.5, num_classes=0)
  dparams = perturbed_params(drop)
  same = jnp.concatenate([images(n=1)] * 2)
  out = speed.apply_in_chunks(drop, {"params": dparams}, same, 2, train=True,
                                  rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(out[0], out[1])
  with pytest.raises(ValueError, match="batch_chunks=4 does not divide the batch of 6"):
    speed.apply_in_chunks(m, {"params": params}, x, 4, train=False)
