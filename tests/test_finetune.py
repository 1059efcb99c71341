"""Fine-tuning tools (issue 25): layer-wise lr decay, frozen parameters, dense features, patch resize.

Tiny models only (tests/tiny_model.py): every test runs in seconds on a CPU.
"""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from tests import tiny_model
from vit_cls import checkpoint
from vit_cls import errors
from vit_cls import optim
from vit_cls import train


def _config(**kw):
  """The digits config with a 2-layer tiny model (tests/tiny_model.py's), a constant learning rate."""
  config = default.get_config()
  config.model.update(dict(patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_heads=4, num_layers=2,
                           representation_size=None, attention_impl="einsum"))
  config.update(dict(optimizer="sgd", momentum=0.0, learning_rate=0.1, warmup_steps=0,
                     decay_type="constant", weight_decay=0.0, grad_clip_norm=0.0, label_smoothing=0.0,
                     total_steps=10, batch_size=8))
  config.update(kw)
  return config


def _params(scan=False, **kw):
  m = tiny_model.tiny(scan_layers=scan, **kw)
  return m, m.init(jax.random.key(0), tiny_model.images(), train=False)["params"]


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _expected_id(name, L):
  """The BEiT/timm layer id written out by hand, for the published names."""
  if name.split("/")[0] in ("embedding", "cls", "registers") or "posembed_input" in name:
    return 0
  m = re.search(r"encoderblock_(\d+)/", name)
  return int(m.group(1)) + 1 if m else L + 1


# ----------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay.


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("decay", [0.5, 0.75])
def test_layer_decay_effective_rate_is_the_formula(scan, decay):
  """SGD without momentum, gradient 1: -update / lr is each parameter's factor d ** (L + 1 - id)."""
  _, params = _params(scan, num_registers=1)
  config = _config(layer_decay=decay)
  tx, _ = optim.create_optimizer(config)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  rate = checkpoint.scan_to_unrolled(jax.tree.map(lambda u: -u / config.learning_rate, updates))
  L = 2
  flat = _flat(rate)
  assert "registers" in flat and "cls" in flat and "Transformer/encoderblock_1/LayerNorm_0/scale" in flat
  for name, r in flat.items():
    np.testing.assert_allclose(r, decay ** (L + 1 - _expected_id(name, L)), rtol=1e-6, err_msg=name)
  assert np.all(flat["head/kernel"] == 1.0)
  np.testing.assert_allclose(flat["embedding/kernel"], decay ** 3, rtol=1e-6)


def test_layer_decay_one_adamw_update_matches_hand_computation():
  """One AdamW step of a 2-layer model, with clipping and weight decay, computed by hand in numpy."""
  model, params = _params()
  lr, wd, d, clip, eps = 0.01, 0.1, 0.6, 0.5, 1e-8
  config = _config(optimizer="adamw", learning_rate=lr, weight_decay=wd, layer_decay=d,
                   grad_clip_norm=clip)
  tx, _ = optim.create_optimizer(config)
  images = tiny_model.images()
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images, train=False) ** 2
                                     + 0.1 * jnp.sum(p["embedding"]["kernel"])))(params)
  grads = jax.tree.map(lambda g: g + 0.01, grads)  # every gradient non-zero (the head's are zero)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = _flat(optax.apply_updates(params, updates))

  g_flat, p_flat = _flat(jax.device_get(grads)), _flat(jax.device_get(params))
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in g_flat.values()))
  k = min(1.0, clip / norm)
  for name, p in p_flat.items():
    g = np.asarray(g_flat[name], np.float64) * k
    adam = g / (np.abs(g) + eps)  # first step: bias-corrected m / sqrt(v) = g / |g|
    if name.endswith("kernel"):
      adam = adam + wd * p
    want = p - lr * d ** (3 - _expected_id(name, 2)) * adam
    np.testing.assert_allclose(new[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_layer_decay_off_leaves_the_optimizer_as_before():
  _, params = _params()
  for decay in (None, 1.0):
    tx, _ = optim.create_optimizer(_config(layer_decay=decay))
    base, _ = optim.create_optimizer(_config())
    g = jax.tree.map(jnp.ones_like, params)
    a, _ = tx.update(g, tx.init(params), params)
    b, _ = base.update(g, base.init(params), params)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b))


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_outside_unit_interval_is_one_line(value):
  with pytest.raises(errors.ConfigError, match=r"^config\.layer_decay=.*\(0, 1\]") as e:
    train.validate_config(_config(layer_decay=value))
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Frozen parameters.

_BACKBONE = "^(?!head/)"  # everything but the head: configs/linear_probe.py


def _train_steps(config, params, model, steps=3):
  tx, schedule = optim.create_optimizer(config)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   config=config, num_classes=5))
  rng = np.random.default_rng(0)
  for _ in range(steps):
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 5, (8,)))}
    state, metrics = step(state, batch)
    assert bool(metrics["finite"])
  return state


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("pattern", [_BACKBONE, "^(embedding|cls|Transformer/posembed_input|"
                                                "Transformer/encoderblock_0/)"])
def test_frozen_parameters_bit_identical_and_without_optimizer_state(scan, pattern):
  model, params = _params(scan)
  params = jax.tree.map(lambda x: x + 0.01, params)  # a non-zero head, so gradients reach the backbone
  config = _config(optimizer="adamw", weight_decay=0.1, grad_clip_norm=1.0, frozen=pattern,
                   layer_decay=0.8)
  config.model.scan_layers = scan
  state = _train_steps(config, params, model)
  before = _flat(checkpoint.scan_to_unrolled(jax.device_get(params)))
  after = _flat(checkpoint.scan_to_unrolled(jax.device_get(state.params)))
  frozen = {k for k in before if re.search(pattern, k)}
  assert frozen and frozen != set(before)
  for k in before:
    same = np.array_equal(before[k], after[k])
    assert same == (k in frozen), k  # frozen: bit-identical; trained: moved

  # Frozen leaves have no moments: the saved optimizer state shrinks.
  free_config = _config(optimizer="adamw", weight_decay=0.1, grad_clip_norm=1.0)
  free_tx, _ = optim.create_optimizer(free_config)
  full = _nbytes(free_tx.init(params))
  assert _nbytes(state.opt_state) < full
  if not scan or pattern == _BACKBONE:  # whole leaves frozen: exactly the trained leaves' two moments
    trained_bytes = sum(v.size * 4 for k, v in _flat(jax.device_get(params)).items()
                        if not np.all([re.search(pattern, n)
                                       for n in optim.unrolled_names(tuple(k.split("/")), 2)]))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # not the step counts
    assert _nbytes(moments) == 2 * trained_bytes


def test_frozen_state_saved_smaller(tmp_path):
  """The checkpoint written for a linear probe holds no moments for the backbone."""
  import orbax.checkpoint as ocp
  _, params = _params(hidden_size=128, mlp_dim=512)  # arrays, not orbax's metadata, dominate the size
  sizes = {}
  for pattern in ("", _BACKBONE):
    tx, _ = optim.create_optimizer(_config(optimizer="adamw", frozen=pattern))
    path = tmp_path / (pattern and "probe" or "full")
    with ocp.StandardCheckpointer() as ckpt:
      # Random moments: orbax compresses, and fresh (zero) moments would cost nothing either way.
      state = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape) if x.ndim else x,
                           tx.init(params))
      ckpt.save(path, {"params": params, "opt_state": state})
    sizes[pattern] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
  head = sum(x.size * 4 for x in jax.tree.leaves(params["head"]))
  moments = 2 * sum(x.size * 4 for x in jax.tree.leaves(params))
  assert sizes[""] - sizes[_BACKBONE] > 0.8 * (moments - 2 * head), sizes


@pytest.mark.parametrize("pattern, message", [
    ("^nothing_like_this", r"^config\.frozen='\^nothing_like_this' matches no parameter"),
    ("^head/", r"^config\.frozen='\^head/' freezes the head \(head/bias, head/kernel\)"),
    (".", r"^config\.frozen='\.' freezes the head"),
    ("(", r"^config\.frozen='\(' is not a valid regular expression"),
])
def test_bad_frozen_pattern_is_one_line(pattern, message):
  with pytest.raises(errors.ConfigError, match=message) as e:
    train.validate_config(_config(frozen=pattern))
  assert "\n" not in str(e.value)


def test_linear_probe_config_freezes_all_but_the_head():
  from configs import linear_probe
  config = linear_probe.get_config()
  train.validate_config(config)
  model = train.create_model(config, 10)
  size = config.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))["params"]
  mask = _flat(optim.frozen_mask(shapes, config.frozen, config.model.num_layers))
  assert {k for k, v in mask.items() if not v} == {"head/kernel", "head/bias"}


# ----------------------------------------------------------------------------------------------------
# Dense features.


@pytest.mark.parametrize("kw", [
    dict(),
    dict(patch_size=(2, 2), num_registers=3),
    dict(patch_size=(8, 4), pool="gap", num_registers=1),
    dict(pool="map", scan_layers=True),
    dict(class_token_position="last", num_registers=2, scan_layers=True),
    dict(class_token_posemb=False, num_registers=2),
])
def test_dense_features_shapes_and_equal_to_sowed_tokens(kw):
  from vit_cls import features
  from vit_cls import model as model_lib
  model = tiny_model.tiny(**kw)
  images = tiny_model.images()
  variables = model.init(jax.random.key(0), images, train=False)
  ph, pw = model.patch_size
  gh, gw, regs = 16 // ph, 16 // pw, model.num_registers
  n_cls = int(model.pool == "cls")
  out = features.dense_features(model, variables, images, layers=(0, -1))
  assert out.layers == (0, 1)
  for grid, prefix in zip(out.grids, out.prefix):
    assert grid.shape == (2, gh, gw, 32)
    assert prefix.shape == (2, n_cls + regs, 32)
  nchw = features.dense_features(model, variables, images, layers=(-1,), layout="NCHW")
  np.testing.assert_array_equal(nchw.grids[0], jnp.transpose(out.grids[1], (0, 3, 1, 2)))

  # The last block, normalised, is the model's own `tokens` intermediate (registers already removed).
  _, aux = model_lib.apply_with_aux(model, variables, images, train=False)
  tokens = aux["tokens"]
  first = model.class_token_position == "first"
  patches = tokens[:, n_cls:] if first else tokens[:, :gh * gw]
  np.testing.assert_allclose(out.grids[1].reshape(2, gh * gw, 32), patches, atol=1e-6)
  if n_cls:
    np.testing.assert_allclose(out.prefix[1][:, 0], tokens[:, 0] if first else tokens[:, -1],
                               atol=1e-6)
  # Unnormalised, an intermediate block differs from its normalised twin.
  raw = features.dense_features(model, variables, images, layers=(0,), norm=False)
  assert not np.allclose(raw.grids[0], out.grids[0])


def test_dense_features_nnx_equals_linen():
  from flax import nnx
  from vit_cls import features
  model = tiny_model.tiny(num_registers=1)
  images = tiny_model.images()
  variables = model.init(jax.random.key(0), images, train=False)
  module = nnx.bridge.lazy_init(nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0)), images, train=False)
  nnx.update(module, variables["params"])
  a = features.dense_features(model, variables, images, layers=(0, 1))
  b = features.dense_features_nnx(module, images, layers=(0, 1))
  for x, y in zip(a.grids + a.prefix, b.grids + b.prefix):
    np.testing.assert_array_equal(x, y)


def test_dense_features_bad_layers():
  from vit_cls import features
  model = tiny_model.tiny()
  variables = model.init(jax.random.key(0), tiny_model.images(), train=False)
  with pytest.raises(ValueError, match=r"layers=\(2,\) is not allowed"):
    features.dense_features(model, variables, tiny_model.images(), layers=(2,))


# ----------------------------------------------------------------------------------------------------
# Patch-size change (FlexiViT).


def _resize_patches(images, patch, new_patch):
  """Each patch resized on its own (bilinear, no antialias): what the resampled kernel is exact for."""
  n, h, w, c = images.shape
  (ph, pw), (qh, qw) = patch, new_patch
  x = images.reshape(n, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  x = jax.vmap(jax.vmap(jax.vmap(lambda p: jax.image.resize(p, (qh, qw, c), "bilinear",
                                                            antialias=False))))(x)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // ph * qh, w // pw * qw, c)


@pytest.mark.parametrize("old, new", [((4, 4), (8, 8)), ((4, 4), (6, 5)), ((2, 3), (7, 7)),
                                      ((14, 14), (16, 16))])
def test_resampled_kernel_on_resized_patch_gives_original_embedding(old, new):
  """FlexiViT's guarantee for an upward resize: <resize(x), resampled w> = <x, w>, every patch x."""
  from vit_cls import convert
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=old + (3, 16)).astype(np.float32)
  x = rng.uniform(-1, 1, size=(5,) + old + (3,)).astype(np.float32)
  resized = jax.vmap(lambda p: jax.image.resize(p, new + (3,), "bilinear", antialias=False))(x)
  new_kernel = convert.resample_patch_embedding(kernel, new)
  assert new_kernel.shape == new + (3, 16) and new_kernel.dtype == np.float32
  want = np.einsum("nhwc,hwcd->nd", x, kernel)
  np.testing.assert_allclose(np.einsum("nhwc,hwcd->nd", resized, new_kernel), want,
                             rtol=1e-4, atol=1e-4)
  # The assertion can fail: a plain resize of the kernel (what FlexiViT replaces) is far off.
  naive = np.asarray(jax.image.resize(kernel, new + (3, 16), "bilinear"))
  assert np.max(np.abs(np.einsum("nhwc,hwcd->nd", resized, naive) - want)) > 0.1


def test_resampled_kernel_same_size_is_the_kernel_and_downward_is_not_exact():
  """An unchanged patch is the identity; a smaller patch loses pixels, so only a least-squares fit."""
  from vit_cls import convert
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(8, 8, 3, 4)).astype(np.float32)
  np.testing.assert_array_equal(convert.resample_patch_embedding(kernel, (8, 8)), kernel)
  x = rng.uniform(-1, 1, size=(5, 8, 8, 3)).astype(np.float32)
  resized = jax.vmap(lambda p: jax.image.resize(p, (4, 4, 3), "bilinear", antialias=False))(x)
  small = convert.resample_patch_embedding(kernel, (4, 4))
  assert small.shape == (4, 4, 3, 4)
  err = np.abs(np.einsum("nhwc,hwcd->nd", resized, small) - np.einsum("nhwc,hwcd->nd", x, kernel))
  assert np.max(err) > 1e-2


def test_init_from_resampled_patch_keeps_the_function(tmp_path):
  """Source /4 on 16x16 -> target /8 on 32x32 (same 4x4 grid): the target on per-patch upsampled images
  gives the source's logits; the report lists the kernel as resized, not kept."""
  from vit_cls import convert
  src_model, src = _params()
  src = jax.tree.map(lambda x: x + 0.05, src)  # a non-zero head
  path = str(tmp_path / "src.npz")
  checkpoint.save_npz(jax.device_get(src), path, config=src_model, image_size=16)
  tgt_model = tiny_model.tiny(patch_size=(8, 8))
  target = tgt_model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  with pytest.raises(ValueError, match=r"^parameter 'embedding/kernel' has patch size \(4, 4\) in the "
                                       r"source checkpoint but patch_size=\(8, 8\) was asked for "
                                       r"\(--patch_size / config.init_patch_size resample it"):
    convert.init_from_checkpoint(path, target, patch_size=(8, 8), image_size=32)
  params, report = convert.init_from_checkpoint(path, target, patch_size=(8, 8), image_size=32,
                                                resample_patch=True)
  assert [(p, old, new) for p, old, new, _ in report.resized] == [
      ("embedding/kernel", (4, 4, 3, 32), (8, 8, 3, 32))]
  assert "FlexiViT" in report.resized[0][3] and "embedding/kernel" not in report.kept
  assert convert.POSEMB in report.kept  # the grid is 4x4 on both sides
  images = tiny_model.images()
  want = src_model.apply({"params": src}, images, train=False)
  got = tgt_model.apply({"params": params}, _resize_patches(images, (4, 4), (8, 8)), train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_convert_command_patch_size(tmp_path, capsys):
  """/4 at 16 -> --patch_size 6 at 24 (the 4x4 grid kept): the written model on per-patch resized
  images computes the source's logits; at 36 the position embeddings go to the 6x6 grid."""
  from vit_cls import convert
  src_model, src = _params()
  src = jax.tree.map(lambda x: x + 0.05, src)  # a non-zero head, kept (5 classes on both sides)
  path, out = str(tmp_path / "src.npz"), str(tmp_path / "out.npz")
  checkpoint.save_npz(jax.device_get(src), path, config=src_model, image_size=16)
  assert convert.main(["--checkpoint", path, "--out", out, "--num_classes", "5", "--image_size", "24",
                       "--patch_size", "6"]) == 0
  assert "embedding/kernel: (4, 4, 3, 32) -> (6, 6, 3, 32) (patch 4x4 -> 6x6, FlexiViT" in (
      capsys.readouterr().out)
  model, params = checkpoint.load(out)
  assert tuple(model.patch_size) == (6, 6) and params["embedding"]["kernel"].shape[:2] == (6, 6)
  images = tiny_model.images()
  np.testing.assert_allclose(
      model.apply({"params": params}, _resize_patches(images, (4, 4), (6, 6)), train=False),
      src_model.apply({"params": src}, images, train=False), rtol=1e-4, atol=1e-4)

  # Another grid too: the source grid is its image over its own patch (16 / 4), resized to 36 / 6.
  assert convert.main(["--checkpoint", path, "--out", out, "--num_classes", "5", "--image_size", "36",
                       "--patch_size", "6"]) == 0
  assert "(1, 17, 32) -> (1, 37, 32) (patch grid 4x4 -> 6x6" in capsys.readouterr().out
  _, params = checkpoint.load(out)
  np.testing.assert_allclose(params["Transformer"]["posembed_input"]["pos_embedding"],
                             convert.resize_posemb(src["Transformer"]["posembed_input"]["pos_embedding"],
                                                   (6, 6), (4, 4)), rtol=1e-6)


def test_convert_command_patch_size_that_does_not_divide_the_image(tmp_path, capsys):
  from vit_cls import convert
  src_model, src = _params()
  path, out = str(tmp_path / "src.npz"), str(tmp_path / "out.npz")
  checkpoint.save_npz(jax.device_get(src), path, config=src_model, image_size=16)
  assert convert.main(["--checkpoint", path, "--out", out, "--num_classes", "5", "--image_size", "24",
                       "--patch_size", "5"]) == 2
  err = capsys.readouterr().err
  assert err == "error: patch_size=5 is not allowed: a positive divisor of image_size=24x24.\n"
  assert not (tmp_path / "out.npz").exists()


def test_convert_help_shows_patch_size():
  """The command as a user runs it (`python -m vit_cls.convert`), from this checkout."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")]
                                                               if p]))
  proc = subprocess.run([sys.executable, "-m", "vit_cls.convert", "--help"], capture_output=True,
                        text=True, env=env, cwd=repo, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert re.search(r"--patch_size PATCH_SIZE\s+target patch size", proc.stdout), proc.stdout


def test_init_patch_size_must_divide_the_image():
  config = _config(init_patch_size=5, init_from="src.npz")
  with pytest.raises(errors.ConfigError, match=r"^config\.init_patch_size=5 is not allowed: .*"
                                               r"divisor of config\.image_size=16\.$") as e:
    train.validate_config(config)
  assert "\n" not in str(e.value)
  with pytest.raises(errors.ConfigError, match=r"^config\.init_patch_size=8 is not allowed: None "
                                               r"without config\.init_from"):
    train.validate_config(_config(init_patch_size=8))
  train.validate_config(_config(init_patch_size=8, init_from="src.npz"))
  assert train.model_kwargs(_config(init_patch_size=8), 3)["patch_size"] == (8, 8)
  assert train.model_kwargs(_config(), 3)["patch_size"] == (4, 4)


def test_check_init_from_with_init_patch_size(tmp_path, monkeypatch):
  """The train path: without config.init_patch_size another patch size is one line naming it; with it,
  the source opened by check_init_from is the one initialise_from converts (not read again)."""
  import logging  # pylint: disable=g-import-not-at-top
  src_model, src = _params()
  src = jax.tree.map(lambda x: x + 0.05, src)
  path = str(tmp_path / "src.npz")
  checkpoint.save_npz(jax.device_get(src), path, config=src_model, image_size=16)
  config = _config(image_size=32, init_from=path)
  config.model.patch_size = (8, 8)
  with pytest.raises(errors.ConfigError, match=r"^config\.init_from=.* cannot initialise this model: "
                                               r".*config\.init_patch_size resample it") as e:
    train.check_init_from(config, train.create_model(config, 5))
  assert "\n" not in str(e.value)
  config.model.patch_size = (4, 4)  # the source's; init_patch_size takes its place
  config.init_patch_size = 8
  model = train.create_model(config, 5)
  assert tuple(model.patch_size) == (8, 8)
  source = train.check_init_from(config, model)
  monkeypatch.setattr(checkpoint, "_read", None)  # a second read would fail
  params0 = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  state = train.TrainState(step=0, params=params0, opt_state=None)
  state = train.initialise_from(state, config, logging.getLogger("test"), model, source)
  images = tiny_model.images()
  np.testing.assert_allclose(
      model.apply({"params": state.params}, _resize_patches(images, (4, 4), (8, 8)), train=False),
      src_model.apply({"params": src}, images, train=False), rtol=1e-4, atol=1e-4)
