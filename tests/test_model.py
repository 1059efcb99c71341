"""The model: the parameter-tree contract, poolings and heads, and that speed options keep the numbers."""

import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import vit_cls
from vit_cls import checkpoint
from vit_cls import model as model_lib
from tiny_model import images, tiny  # tests/tiny_model.py

PUBLISHED_COUNTS = {
    "Ti/16": 5_717_416, "S/16": 22_050_664, "S/32": 22_878_952, "B/16": 86_567_656,
    "B/32": 88_224_232, "B/8": 86_576_872, "L/16": 304_326_632, "L/32": 306_535_400,
    "H/14": 632_045_800,
}


def abstract_params(model, size=224):
  """Parameter shapes without allocating anything: eval_shape traces init only."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))["params"]


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def flat_shapes(params):
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
  assert count(abstract_params(vit_cls.create_model(name, num_classes=1000))) == PUBLISHED_COUNTS[name]


def test_i21k_pretraining_shape_count():
  m = vit_cls.create_model("B/16", num_classes=21843, representation_size=768)
  assert count(abstract_params(m)) == 103_186_515


def _expected_b16_tree(with_pre_logits):
  d, mlp, h, hd = 768, 3072, 12, 64
  tree = {
      "cls": (1, 1, d),
      "embedding/kernel": (16, 16, 3, d),
      "embedding/bias": (d,),
      "Transformer/posembed_input/pos_embedding": (1, 197, d),
      "Transformer/encoder_norm/scale": (d,),
      "Transformer/encoder_norm/bias": (d,),
  }
  for i in range(12):
    b = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      tree[f"{b}/{ln}/scale"] = (d,)
      tree[f"{b}/{ln}/bias"] = (d,)
    for p in ("query", "key", "value"):
      tree[f"{b}/MultiHeadDotProductAttention_0/{p}/kernel"] = (d, h, hd)
      tree[f"{b}/MultiHeadDotProductAttention_0/{p}/bias"] = (h, hd)
    tree[f"{b}/MultiHeadDotProductAttention_0/out/kernel"] = (h, hd, d)
    tree[f"{b}/MultiHeadDotProductAttention_0/out/bias"] = (d,)
    tree[f"{b}/MlpBlock_0/Dense_0/kernel"] = (d, mlp)
    tree[f"{b}/MlpBlock_0/Dense_0/bias"] = (mlp,)
    tree[f"{b}/MlpBlock_0/Dense_1/kernel"] = (mlp, d)
    tree[f"{b}/MlpBlock_0/Dense_1/bias"] = (d,)
  if with_pre_logits:
    tree["pre_logits/kernel"] = (d, d)
    tree["pre_logits/bias"] = (d,)
    tree["head/kernel"] = (d, 1000)
  else:
    tree["head/kernel"] = (d, 1000)
  tree["head/bias"] = (1000,)
  return tree


@pytest.mark.parametrize("with_pre_logits", [False, True])
def test_b16_parameter_tree_is_the_published_one(with_pre_logits):
  m = vit_cls.create_model("B/16", num_classes=1000,
                           representation_size=768 if with_pre_logits else None)
  assert flat_shapes(abstract_params(m)) == _expected_b16_tree(with_pre_logits)


def test_initialisers_follow_the_original():
  m = tiny(representation_size=16, hidden_size=64, mlp_dim=128)
  p = flax.traverse_util.flatten_dict(
      m.init(jax.random.key(0), images(1), train=False)["params"], sep="/")
  assert not np.any(p["cls"]) and not np.any(p["head/kernel"]) and not np.any(p["head/bias"])
  pe = p["Transformer/posembed_input/pos_embedding"]
  assert pe.shape == (1, 17, 64) and 0.015 < float(np.std(pe)) < 0.025
  blk = "Transformer/encoderblock_0"
  # xavier uniform on the 2-D (64, 64) view of a (64, 4, 16) kernel: bound sqrt(6 / 128).
  q = p[f"{blk}/MultiHeadDotProductAttention_0/query/kernel"]
  bound = np.sqrt(6 / (64 + 64))
  assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound
  mlp_bias = p[f"{blk}/MlpBlock_0/Dense_0/bias"]
  assert 0 < np.abs(mlp_bias).max() < 1e-5
  assert np.all(p[f"{blk}/LayerNorm_0/scale"] == 1) and not np.any(p[f"{blk}/LayerNorm_0/bias"])
  assert not np.any(p["pre_logits/bias"])


def test_layernorm_epsilon_and_gelu_tanh():
  assert model_lib.LAYERNORM_EPS == 1e-6
  m = tiny()
  x = jnp.ones((1, 3, 32))
  blk = model_lib.MlpBlock(mlp_dim=8)
  v = blk.init(jax.random.key(0), x, deterministic=True)
  out = blk.apply(v, x, deterministic=True)
  k0, b0 = v["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["bias"]
  k1, b1 = v["params"]["Dense_1"]["kernel"], v["params"]["Dense_1"]["bias"]
  h = x @ k0 + b0
  gelu_tanh = 0.5 * h * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  np.testing.assert_allclose(out, gelu_tanh @ k1 + b1, rtol=1e-5, atol=1e-6)
  del m


@pytest.mark.parametrize("pool,rep,classes,expected", [
    ("cls", None, 5, (2, 5)),
    ("cls", 16, 5, (2, 5)),
    ("cls", None, 0, (2, 32)),
    ("cls", 16, 0, (2, 16)),
    ("gap", None, 5, (2, 5)),
    ("map", None, 5, (2, 5)),
    ("last", None, 5, (2, 5)),
    ("none", None, 5, (2, 16, 5)),
    ("none", None, 0, (2, 16, 32)),
])
@pytest.mark.parametrize("registers", [0, 3])
def test_output_shapes_of_poolings_and_heads(pool, rep, classes, expected, registers):
  m = tiny(pool=pool, representation_size=rep, num_classes=classes, num_registers=registers)
  variables = m.init(jax.random.key(0), images(), train=False)
  out, aux = model_lib.apply_with_aux(m, variables, images(), train=False)
  assert out.shape == expected
  assert ("cls" in variables["params"]) == (pool == "cls")
  assert ("pre_logits" in variables["params"]) == (rep is not None)
  assert ("head" in variables["params"]) == (classes > 0)
  seq = 16 + (pool == "cls")
  assert aux["tokens"].shape == (2, seq, 32)
  # Registers join the sequence that attention sees, and leave before the output.
  assert len(aux["attention"]) == 2
  assert aux["attention"][0].shape == (2, 4, seq + registers, seq + registers)
  np.testing.assert_allclose(aux["attention"][1].sum(-1), 1.0, rtol=1e-5)
  pe = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, seq, 32)


def test_features_head_returns_the_class_token_state():
  m = tiny(num_classes=0)
  v = m.init(jax.random.key(0), images(), train=False)
  out, aux = model_lib.apply_with_aux(m, v, images(), train=False)
  np.testing.assert_array_equal(out, aux["tokens"][:, 0])


def _plain_attention_forward(params, x, num_heads):
  """Reference multi-head attention: three einsum projections, explicit softmax, heads-last."""
  def proj(name):
    return jnp.einsum("btd,dnh->btnh", x, params[name]["kernel"]) + params[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  logits = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
  w = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bnqk,bknh->bqnh", w, v)
  return jnp.einsum("bqnh,nhd->bqd", out, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("impl,fuse", [("fused", True), ("fused", False), ("einsum", True)])
def test_attention_paths_equal_plain_einsum_softmax(impl, fuse):
  x = jax.random.normal(jax.random.key(1), (2, 17, 32))
  attn = model_lib.MultiHeadDotProductAttention(num_heads=4, impl=impl, fuse_qkv=fuse)
  v = attn.init(jax.random.key(0), x, deterministic=True)
  # Non-zero biases, so that fusing them is checked too.
  v = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)
  got = attn.apply(v, x, deterministic=True)
  want = _plain_attention_forward(v["params"], x, 4)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_whole_model_same_output_for_every_attention_path():
  outs = []
  for impl, fuse in [("fused", True), ("einsum", False)]:
    m = tiny(num_classes=0, attention_impl=impl, fuse_qkv=fuse)
    v = m.init(jax.random.key(0), images(), train=False)
    outs.append(m.apply(v, images(), train=False))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_bfloat16_forward_within_tolerance_of_float32():
  m32 = tiny(num_classes=0, hidden_size=64, mlp_dim=128)
  v = m32.init(jax.random.key(0), images(), train=False)
  f32 = m32.apply(v, images(), train=False)
  bf16 = tiny(num_classes=0, hidden_size=64, mlp_dim=128, dtype="bfloat16").apply(
      v, images(), train=False)
  assert bf16.dtype == jnp.float32  # outputs leave in float32
  # bfloat16 keeps 8 bits of mantissa: relative error ~0.4% per op, a few % through 2 layers.
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 0.03, rel
  # Parameters stay float32 whatever the compute dtype.
  v16 = tiny(dtype="bfloat16").init(jax.random.key(0), images(), train=False)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v16))


@pytest.mark.parametrize("policy", ["block", "dots"])
def test_remat_computes_the_same_outputs_and_gradients(policy):
  def loss(m, p):
    return jnp.sum(m.apply({"params": p}, images(), train=False) ** 2)
  m, mr = tiny(num_classes=0), tiny(num_classes=0, remat_policy=policy)
  p = m.init(jax.random.key(0), images(), train=False)["params"]
  np.testing.assert_allclose(loss(m, p), loss(mr, p), rtol=1e-6)
  g, gr = jax.grad(lambda p: loss(m, p))(p), jax.grad(lambda p: loss(mr, p))(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, gr)


def test_dropout_is_active_only_in_training():
  m = tiny(dropout_rate=0.5, attention_dropout_rate=0.5, num_classes=0)
  v = m.init(jax.random.key(0), images(), train=False)
  a = m.apply(v, images(), train=False)
  np.testing.assert_array_equal(a, m.apply(v, images(), train=False))
  t1 = m.apply(v, images(), train=True, rngs={"dropout": jax.random.key(1)})
  t2 = m.apply(v, images(), train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(t1, t2) and not np.allclose(t1, a)


def test_sharded_forward_over_8_devices_equals_single_device():
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  m = tiny()
  v = m.init(jax.random.key(0), images(), train=False)
  v = jax.tree.map(lambda a: a + 0.01, v)  # a non-zero head
  x = images(16)
  single = jax.jit(lambda v, x: m.apply(v, x, train=False))(v, x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  vs = jax.device_put(v, NamedSharding(mesh, P()))
  sharded = jax.jit(lambda v, x: m.apply(v, x, train=False))(vs, xs)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-6)


def test_appended_class_token_is_the_prepended_one_permuted():
  first = tiny(class_token_position="first")
  last = tiny(class_token_position="last")
  p = first.init(jax.random.key(0), images(), train=False)["params"]
  p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), p)
  pe = p["Transformer"]["posembed_input"]["pos_embedding"]
  p_last = flax.core.copy(p, {})
  p_last["Transformer"] = dict(p["Transformer"])
  p_last["Transformer"]["posembed_input"] = {
      "pos_embedding": jnp.concatenate([pe[:, 1:], pe[:, :1]], axis=1)}
  np.testing.assert_allclose(last.apply({"params": p_last}, images(), train=False),
                             first.apply({"params": p}, images(), train=False),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,message", [
    (dict(pool="mean"), "pool='mean'"),
    (dict(hidden_size=30, num_heads=4), "hidden_size=30"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(remat_policy="all"), "remat_policy"),
    (dict(num_classes=-1), "num_classes"),
    (dict(dropout_rate=1.5), "dropout_rate"),
])
def test_bad_architecture_fails_with_the_field_named(kw, message):
  with pytest.raises(ValueError, match=message):
    tiny(**kw)


def test_image_not_divisible_by_patch_is_a_clear_error():
  m = tiny()
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    m.init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)), train=False)


def test_unknown_variant_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown model name 'B/15'.*B/16"):
    vit_cls.create_model("B/15")


def test_create_model_overrides():
  m = vit_cls.create_model("B/16", num_classes=10, pool="gap")
  assert (m.hidden_size, m.num_layers, m.num_classes, m.pool) == (768, 12, 10, "gap")


def test_model_and_loading_modules_import_no_tensorflow():
  code = ("import sys, vit_cls, vit_cls.model, vit_cls.variants;"
          "import importlib.util as u;"
          "[__import__(m) for m in ('vit_cls.checkpoint', 'vit_cls.convert') if u.find_spec(m)];"
          "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')];"
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------
# The causal mask (the pooling study's control) and the switches for imported checkpoints.


def random_params(model, seed=3, size=16):
  """Random values in the model's tree (LayerNorm and layer scales near 1, everything else non-zero)."""
  rng = np.random.default_rng(seed)
  def draw(path, s):
    base = 1.0 if str(getattr(path[-1], "key", path[-1])) == "scale" else 0.0
    return jnp.asarray(base + 0.2 * rng.normal(size=s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract_params(model, size))


def test_causal_prepended_class_token_sees_only_itself_and_the_last_token_sees_the_image():
  first = tiny(causal=True, num_classes=0)
  p = random_params(first)
  x1, x2 = images(seed=1), images(seed=2)
  tokens = jax.jit(lambda p, x: model_lib.apply_with_aux(first, {"params": p}, x, train=False)[1]
                   ["tokens"])
  t1, t2 = tokens(p, x1), tokens(p, x2)
  # Token 0 (the prepended class token) attends to itself only: the image cannot reach it.
  np.testing.assert_array_equal(t1[:, 0], t2[:, 0])
  # The last token attends to everything before it: it depends on the image.
  assert not np.allclose(t1[:, -1], t2[:, -1], atol=1e-3)
  # A prefix of the sequence does not depend on what comes after it: change only the last patch.
  x3 = x1.at[:, -4:, -4:].set(0.5)
  t3 = tokens(p, x3)
  np.testing.assert_allclose(t3[:, :-1], t1[:, :-1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(t3[:, -1], t1[:, -1], atol=1e-4)
  # With the bidirectional default the class token does see the image.
  bidirectional = tiny(num_classes=0)
  b = jax.jit(lambda p, x: bidirectional.apply({"params": p}, x, train=False))
  assert not np.allclose(b(p, x1), b(p, x2), atol=1e-3)


@pytest.mark.parametrize("option", [dict(attention_impl="xla"), dict(fuse_qkv=False),
                                    dict(scan_layers=True)], ids=str)
def test_causal_mask_is_the_same_on_every_path(option):
  plain = tiny(causal=True, attention_impl="einsum")
  p = random_params(plain)
  want, aux = jax.jit(lambda p: model_lib.apply_with_aux(plain, {"params": p}, images(),
                                                         train=False))(p)
  # The probabilities are lower-triangular: no weight on a later token.
  a = np.asarray(aux["attention"][0])
  assert np.all(np.triu(a[0, 0], k=1) == 0) and np.allclose(a.sum(-1), 1, atol=1e-5)
  other = tiny(causal=True, **option)
  q = checkpoint.unrolled_to_scan(p) if option.get("scan_layers") else p
  got = jax.jit(lambda p: other.apply({"params": p}, images(), train=False))(q)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_exact_gelu_is_the_erf_form():
  x = jnp.linspace(-4, 4, 33).reshape(1, 1, 33)
  blk = model_lib.MlpBlock(mlp_dim=8, gelu_approximate=False)
  v = blk.init(jax.random.key(0), x, deterministic=True)
  p = v["params"]
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  erf_gelu = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2)))
  np.testing.assert_allclose(blk.apply(v, x, deterministic=True),
                             erf_gelu @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], rtol=1e-5,
                             atol=1e-6)
  approx = model_lib.MlpBlock(mlp_dim=8).apply(v, x, deterministic=True)
  assert not np.allclose(approx, blk.apply(v, x, deterministic=True), atol=1e-6)


def test_switches_add_only_their_own_parameters():
  base = flat_shapes(abstract_params(tiny(), 16))
  on = flat_shapes(abstract_params(tiny(layerscale=True, pre_norm=True, fc_norm=True,
                                        class_token_posemb=False), 16))
  added, removed = sorted(set(on) - set(base)), sorted(set(base) - set(on))
  assert added == sorted(
      ["Transformer/pre_norm/bias", "Transformer/pre_norm/scale", "fc_norm/bias", "fc_norm/scale"]
      + [f"Transformer/encoderblock_{i}/LayerScale_{j}/scale" for i in range(2) for j in range(2)])
  assert removed == ["Transformer/encoder_norm/bias", "Transformer/encoder_norm/scale"]
  assert on["Transformer/posembed_input/pos_embedding"] == (1, 16, 32)  # patches only
  assert base["Transformer/posembed_input/pos_embedding"] == (1, 17, 32)
  assert on["Transformer/encoderblock_0/LayerScale_1/scale"] == (32,)


def _apply(model, p, x=None):
  return jax.jit(lambda p: model.apply({"params": p}, images() if x is None else x, train=False))(p)


def test_class_token_without_position_row_is_a_zero_row():
  with_row = tiny(pool="cls")
  p = random_params(with_row)
  pe = p["Transformer"]["posembed_input"]["pos_embedding"]
  p = {**p, "Transformer": {**p["Transformer"], "posembed_input": {
      "pos_embedding": pe.at[:, 0].set(0.0)}}}
  without = tiny(pool="cls", class_token_posemb=False, num_registers=2)
  q = {**p, "registers": jnp.ones((1, 2, 32)),
       "Transformer": {**p["Transformer"], "posembed_input": {"pos_embedding": pe[:, 1:]}}}
  no_registers = tiny(pool="cls", class_token_posemb=False)
  q0 = {k: v for k, v in q.items() if k != "registers"}
  np.testing.assert_allclose(_apply(no_registers, q0), _apply(with_row, p), rtol=1e-5, atol=1e-5)
  assert not np.allclose(_apply(without, q), _apply(with_row, p), atol=1e-4)  # registers do matter


def test_layerscale_of_one_and_fc_norm_after_class_pooling_are_the_plain_model():
  plain = tiny()
  p = random_params(plain)
  scaled = tiny(layerscale=True)
  ones = {f"LayerScale_{j}": {"scale": jnp.ones((32,))} for j in range(2)}
  q = {**p, "Transformer": {**p["Transformer"], **{
      f"encoderblock_{i}": {**p["Transformer"][f"encoderblock_{i}"], **ones} for i in range(2)}}}
  np.testing.assert_allclose(_apply(scaled, q), _apply(plain, p), rtol=1e-5, atol=1e-5)
  half = {f"LayerScale_{j}": {"scale": jnp.full((32,), 0.5)} for j in range(2)}
  q_half = {**q, "Transformer": {**q["Transformer"], "encoderblock_0": {
      **q["Transformer"]["encoderblock_0"], **half}}}
  assert not np.allclose(_apply(scaled, q_half), _apply(plain, p), atol=1e-4)
  # A LayerNorm applied per token and then the class token picked = picked, then normalised.
  fc = tiny(fc_norm=True)
  encoder = {k: v for k, v in p["Transformer"].items() if k != "encoder_norm"}
  r = {**p, "Transformer": encoder, "fc_norm": p["Transformer"]["encoder_norm"]}
  np.testing.assert_allclose(_apply(fc, r), _apply(plain, p), rtol=1e-5, atol=1e-5)


def test_pre_norm_normalises_the_first_block_input():
  pre = tiny(pre_norm=True, num_classes=0, pool="none")
  p = random_params(pre)
  without = tiny(num_classes=0, pool="none")
  q = {**p, "Transformer": {k: v for k, v in p["Transformer"].items() if k != "pre_norm"}}
  assert not np.allclose(_apply(without, q), _apply(pre, p), atol=1e-3)
  # With a huge input scale, a model with pre_norm is invariant to rescaling the patch embedding.
  big = {**p, "embedding": jax.tree.map(lambda a: 3.0 * a, p["embedding"])}
  big["Transformer"] = {**p["Transformer"], "posembed_input": {
      "pos_embedding": 3.0 * p["Transformer"]["posembed_input"]["pos_embedding"]}}
  np.testing.assert_allclose(_apply(pre, big), _apply(pre, p), rtol=1e-4, atol=1e-4)
