"""vit_cls.convert: position-embedding resize, checkpoint -> fine-tuning params, and the command.

Params are random numpy trees shaped by `jax.eval_shape(model.init)` (no compiled init); the "fresh"
target trees zero their head as the model's initialiser does. Models are tiny (width 32, 2 layers).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vit_cls import checkpoint as ck
from vit_cls import convert
from vit_cls.model import VisionTransformer, apply_with_aux

TINY = dict(num_classes=10, patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
            pool="cls", representation_size=None, num_registers=0, dtype=jnp.float32)
POSEMB = convert.POSEMB


def random_params(model, image_size=16, seed=0, zero_head=False):
  shapes = ck.abstract_params(model, image_size)
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda s: (0.3 * rng.randn(*s.shape)).astype(s.dtype), shapes)
  if zero_head and "head" in params:
    params["head"] = jax.tree.map(np.zeros_like, params["head"])
  return params


# One compiled function per (model, shapes, return_aux): equal linen modules hash equal.
_apply = jax.jit(lambda model, p, x, return_aux: (
    apply_with_aux(model, {"params": p}, x, train=False) if return_aux
    else model.apply({"params": p}, x, train=False)), static_argnums=(0, 3))


def apply(model, params, x, return_aux=False):
  return _apply(model, params, x, return_aux)


def images(n=2, size=16, seed=1):
  return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def model(**overrides):
  return VisionTransformer(**dict(TINY, **overrides))


# ----------------------------------------------------------------------------------------------------
# resize_posemb


def test_resize_identity_when_grid_unchanged():
  pe = np.random.RandomState(0).randn(1, 1 + 12, 8).astype(np.float32)
  out = convert.resize_posemb(pe, (3, 4), old_grid=(3, 4))
  assert out.dtype == pe.dtype
  np.testing.assert_array_equal(out, pe)
  square = np.random.RandomState(1).randn(1, 1 + 49, 8).astype(np.float32)
  np.testing.assert_array_equal(convert.resize_posemb(square, (7, 7)), square)


@pytest.mark.parametrize("old, new", [((4, 4), (7, 7)), ((7, 7), (3, 3)), ((3, 5), (6, 4)),
                                      ((2, 6), (5, 11)), ((4, 4), (4, 9))])
def test_linear_ramp_stays_a_ramp_and_class_row_is_untouched(old, new):
  (oh, ow), (nh, nw) = old, new
  i, j = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
  d = np.arange(1, 4)  # 3 channels, each its own ramp
  ramp = (2.0 * i[..., None] - 0.5 * j[..., None]) * d + 1.0
  cls_row = np.array([[[7.0, -3.0, 0.25]]])
  pe = np.concatenate([cls_row, ramp.reshape(1, oh * ow, 3)], axis=1)
  out = convert.resize_posemb(pe, new, old_grid=None if oh == ow else old)
  assert out.shape == (1, 1 + nh * nw, 3)
  np.testing.assert_array_equal(out[:, :1], cls_row)
  # Corner-aligned: new index a samples old position a * (oh - 1) / (nh - 1).
  a, b = np.meshgrid(np.linspace(0, oh - 1, nh), np.linspace(0, ow - 1, nw), indexing="ij")
  want = (2.0 * a[..., None] - 0.5 * b[..., None]) * d + 1.0
  np.testing.assert_allclose(out[0, 1:].reshape(nh, nw, 3), want, atol=1e-12)


@pytest.mark.parametrize("old, new", [((4, 4), (6, 6)), ((3, 5), (7, 9)), ((5, 3), (2, 2))])
def test_resize_matches_scipy_zoom_order1(old, new):
  rng = np.random.RandomState(0)
  grid = rng.randn(old[0], old[1], 5).astype(np.float32)
  pe = np.concatenate([rng.randn(1, 1, 5), grid.reshape(1, -1, 5)], axis=1).astype(np.float32)
  out = convert.resize_posemb(pe, new, old_grid=old)
  zoom = (new[0] / old[0], new[1] / old[1], 1)
  want = scipy.ndimage.zoom(grid.astype(np.float64), zoom, order=1)
  assert want.shape == (*new, 5)
  np.testing.assert_allclose(out[0, 1:].reshape(*new, 5), want, atol=1e-5)


def test_resize_2d_input_prefix_and_suffix_tokens():
  rng = np.random.RandomState(0)
  pe = rng.randn(2 + 9 + 1, 4)
  out = convert.resize_posemb(pe, (5, 5), num_prefix_tokens=2, num_suffix_tokens=1)
  assert out.shape == (2 + 25 + 1, 4)
  np.testing.assert_array_equal(out[:2], pe[:2])
  np.testing.assert_array_equal(out[-1], pe[-1])
  with pytest.raises(ValueError, match="square"):
    convert.resize_posemb(pe[:11], (5, 5))  # 10 patch rows
  with pytest.raises(ValueError, match="3x4"):
    convert.resize_posemb(pe, (5, 5), old_grid=(3, 4))


# ----------------------------------------------------------------------------------------------------
# convert_for_finetuning


def test_same_resolution_same_head_keeps_everything_and_features():
  m = model()
  src = random_params(m, seed=1)
  target = random_params(m, seed=2, zero_head=True)
  params, report = convert.convert_for_finetuning(src, target, patch_size=(4, 4))
  flat_src, flat_out = ck.flatten(src), ck.flatten(params)
  assert sorted(flat_out) == sorted(flat_src)
  for k in flat_src:
    np.testing.assert_array_equal(flat_out[k], flat_src[k], err_msg=k)
  assert sorted(report.kept) == sorted(flat_src)
  assert not (report.dropped or report.reinitialised or report.resized)
  x = images()
  (y0, aux0), (y1, aux1) = apply(m, src, x, return_aux=True), apply(m, params, x, return_aux=True)
  np.testing.assert_array_equal(np.asarray(aux1["pre_logits"]), np.asarray(aux0["pre_logits"]))
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))


def test_new_head_drops_pre_logits_and_keeps_features_of_the_encoder():
  src_model = model(representation_size=24)  # a pre-training checkpoint: MLP head
  src = random_params(src_model, seed=1)
  tgt_model = model(num_classes=3)  # fine-tuning: linear zero-init head, 3 classes
  target = random_params(tgt_model, seed=2, zero_head=True)
  params, report = convert.convert_for_finetuning(src, target, patch_size=4)
  assert "pre_logits" not in params
  np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((32, 3)))
  assert params["head"]["kernel"] is target["head"]["kernel"]
  dropped = dict(report.dropped)
  assert "pre_logits" in dropped["pre_logits/kernel"] and "head/kernel" in dropped
  reinit = dict(report.reinitialised)
  assert "10 classes in the source, 3 in the target" in reinit["head/kernel"]
  text = str(report)
  assert "dropped 4" in text and "re-initialised 2" in text and "pre_logits/bias" in text
  # The encoder is the source's: the pooled representation (the fine-tuning head's input) is the same.
  x = images()
  _, aux_src = apply(src_model, src, x, return_aux=True)
  y, aux = apply(tgt_model, params, x, return_aux=True)
  np.testing.assert_array_equal(np.asarray(aux["pre_logits"]), np.asarray(aux_src["pooled"]))
  np.testing.assert_array_equal(np.asarray(y), np.zeros((2, 3)))  # zero head


def test_same_classes_keeps_head_unless_reset():
  m = model()
  src, target = random_params(m, seed=1), random_params(m, seed=2, zero_head=True)
  params, _ = convert.convert_for_finetuning(src, target, patch_size=4, reset_head=True)
  np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["cls"], src["cls"])


def test_new_resolution_resizes_posemb_and_runs():
  m = model()
  src = random_params(m, seed=1)
  target = random_params(m, image_size=24, seed=2, zero_head=True)
  params, report = convert.convert_for_finetuning(src, target, patch_size=(4, 4))
  pe_src, pe = src["Transformer"]["posembed_input"]["pos_embedding"], \
      params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 1 + 36, 32)
  np.testing.assert_array_equal(pe[:, 0], pe_src[:, 0])
  np.testing.assert_allclose(
      pe[0, 1:], convert.resize_posemb(pe_src, (6, 6))[0, 1:], rtol=0, atol=0)
  # Corners of the grid are the old corners.
  g_src, g = pe_src[0, 1:].reshape(4, 4, 32), pe[0, 1:].reshape(6, 6, 32)
  for a, b in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
    np.testing.assert_allclose(g[a, b], g_src[a, b], atol=1e-6)
  assert [r[0] for r in report.resized] == [POSEMB]
  assert "4x4 -> 6x6" in str(report)
  assert apply(m, params, images(size=24)).shape == (2, 10)


def test_non_square_target_and_source_grids():
  m = model(class_token_position="last")
  src = random_params(m, image_size=(8, 16), seed=1)  # 2x4 grid
  target = random_params(m, image_size=(12, 20), seed=2)  # 3x5 grid
  params, _ = convert.convert_for_finetuning(
      src, target, patch_size=4, image_size=(12, 20), src_image_size=(8, 16),
      src_class_token_position="last", class_token_position="last")
  pe_src = src["Transformer"]["posembed_input"]["pos_embedding"]
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 16, 32)
  np.testing.assert_array_equal(pe[:, -1], pe_src[:, -1])  # class row is last here
  want = convert.resize_posemb(pe_src[:, :-1], (3, 5), old_grid=(2, 4), num_prefix_tokens=0)
  np.testing.assert_array_equal(pe[:, :-1], want)
  with pytest.raises(ValueError, match="square"):  # 8 source rows: the grid must be given
    convert.convert_for_finetuning(src, target, patch_size=4, image_size=(12, 20))


def test_class_token_only_on_one_side():
  cls_model, gap_model = model(), model(pool="gap")
  src = random_params(cls_model, seed=1)
  gap_target = random_params(gap_model, image_size=24, seed=2, zero_head=True)
  params, report = convert.convert_for_finetuning(src, gap_target, patch_size=4)
  assert "cls" not in params
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  src_pe = src["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(pe, convert.resize_posemb(src_pe[:, 1:], (6, 6), num_prefix_tokens=0))
  assert any(p.startswith(POSEMB) and "no class token" in why for p, why in report.dropped)
  # gap source -> cls target: the target's fresh class token and class row, the source's patch rows.
  src_gap = random_params(gap_model, seed=3)
  cls_target = random_params(cls_model, seed=4, zero_head=True)
  params, report = convert.convert_for_finetuning(src_gap, cls_target, patch_size=4)
  np.testing.assert_array_equal(params["cls"], cls_target["cls"])
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(pe[:, 0], cls_target["Transformer"]["posembed_input"]["pos_embedding"][:, 0])
  np.testing.assert_array_equal(pe[:, 1:], src_gap["Transformer"]["posembed_input"]["pos_embedding"])
  assert ("cls", "not in the source checkpoint") in report.reinitialised


def test_wrong_hidden_size_names_parameter_and_both_shapes():
  src = random_params(model(), seed=1)
  target = random_params(model(hidden_size=48), seed=2)
  with pytest.raises(ValueError) as e:
    convert.convert_for_finetuning(src, target, patch_size=4)
  msg = str(e.value)
  m = re.search(r"parameter '([^']+)' has shape (\([^)]*\)) in the source checkpoint but "
                r"(\([^)]*\)) in the target model", msg)
  assert m, msg
  name, got, want = m.groups()
  assert got == str(tuple(ck.flatten(src)[name].shape))
  assert want == str(tuple(ck.flatten(target)[name].shape)) and got != want


def test_other_architecture_mismatches():
  src = random_params(model(), seed=1)
  with pytest.raises(ValueError, match="encoderblock_2"):
    convert.convert_for_finetuning(src, random_params(model(num_layers=3)), patch_size=4)
  with pytest.raises(ValueError, match="encoderblock_1.*does not have"):
    convert.convert_for_finetuning(src, random_params(model(num_layers=1)), patch_size=4)
  with pytest.raises(ValueError, match=r"embedding/kernel.*\(4, 4\).*\(2, 2\)"):
    convert.convert_for_finetuning(src, random_params(model(patch_size=(2, 2)), image_size=8),
                                   patch_size=(2, 2))


def test_prelinen_source_and_dtype_cast():
  m = model()
  src = ck.to_prelinen_naming(random_params(m, seed=1))
  src = jax.tree.map(lambda a: a.astype(np.float16), src)
  target = random_params(m, seed=2, zero_head=True)
  params, _ = convert.convert_for_finetuning(src, target, patch_size=4)
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))
  assert "MlpBlock_0" in params["Transformer"]["encoderblock_0"]


# ----------------------------------------------------------------------------------------------------
# init_from_checkpoint and the command


def test_init_from_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  m = model(class_token_position="last")
  src = random_params(m, seed=1)
  mngr = ocp.CheckpointManager(os.fspath(tmp_path / "checkpoints"), item_names=("state", "meta"))
  cfg = dict(num_classes=10, patch_size=[4, 4], hidden_size=32, mlp_dim=64, num_heads=2,
             num_layers=2, pool="cls", class_token_position="last", dtype="float32")
  mngr.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": np.asarray(1), "params": src, "opt_state": {}}),
      meta=ocp.args.JsonSave({"model": cfg, "image_size": 16, "label_names": [], "num_classes": 10,
                              "dataset": "t"})))
  mngr.wait_until_finished()
  mngr.close()
  target = random_params(m, image_size=24, seed=2, zero_head=True)
  params, report = convert.init_from_checkpoint(tmp_path, target, patch_size=4,
                                                class_token_position="last")
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_array_equal(pe[:, -1], src["Transformer"]["posembed_input"]["pos_embedding"][:, -1])
  assert report.resized and not report.reinitialised


def test_command_converts_npz(tmp_path, capsys):
  src_model = model(representation_size=24)
  src = random_params(src_model, seed=1)
  ck.save_npz(src, tmp_path / "pretrained.npz")
  out = tmp_path / "finetune.npz"
  rc = convert.main(["--checkpoint", str(tmp_path / "pretrained.npz"), "--out", str(out),
                     "--num_classes", "5", "--image_size", "24"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "re-initialised 2" in text and "4x4 -> 6x6" in text and "pre_logits/kernel" in text
  new_model, params = ck.load(out)
  assert (new_model.num_classes, new_model.representation_size) == (5, None)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 37, 32)
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), 0.0)
  np.testing.assert_array_equal(np.asarray(params["embedding"]["kernel"]), src["embedding"]["kernel"])
  # A bad source is one line on stderr and exit status 2, no traceback.
  (tmp_path / "junk.npz").write_bytes(b"\x00" * 64)
  rc = convert.main(["--checkpoint", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "o.npz"),
                     "--num_classes", "5", "--image_size", "24"])
  err = capsys.readouterr().err
  assert rc == 2 and "junk.npz" in err and err.count("\n") == 1
  assert not (tmp_path / "o.npz").exists()
