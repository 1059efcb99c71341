"""vit_cls.checkpoint (npz import/export, orbax restore, `load`) and vit_cls.predict.

Params are random numpy trees shaped by `jax.eval_shape(model.init)`: no random init is compiled, and
random (not zero) heads make logits comparisons meaningful. Models are tiny (width 32, 2 layers, 16x16).
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_cls
from vit_cls import checkpoint as ck
from vit_cls import predict as predict_lib
from vit_cls.model import VisionTransformer

TINY = dict(num_classes=10, patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
            pool="cls", representation_size=None, num_registers=0, dropout_rate=0.0,
            attention_dropout_rate=0.0, dtype=jnp.float32)


def random_params(model, image_size=16, seed=0):
  shapes = ck.abstract_params(model, image_size)
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: (0.3 * rng.randn(*s.shape)).astype(s.dtype), shapes)


def images(n=2, size=16, seed=1):
  return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


# One compiled function per (model, shapes): equal linen modules hash equal, so reloads reuse it.
_apply = jax.jit(lambda model, p, x: model.apply({"params": p}, x, train=False), static_argnums=0)


def logits(model, params, x):
  return np.asarray(_apply(model, params, x))


def json_config(model) -> dict:
  """The stored form of a model config: VisionTransformer fields, JSON types, dtype as a string."""
  cfg = {f: getattr(model, f) for f in ck.model_fields()}
  cfg["patch_size"] = list(cfg["patch_size"])
  cfg["dtype"] = jnp.dtype(cfg["dtype"]).name
  return json.loads(json.dumps(cfg))


def write_orbax(workdir, params, model, *, step, image_size=16, label_names=None):
  """A checkpoint in the layout training writes: checkpoints/<step>/{state, meta}."""
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(os.fspath(workdir), "checkpoints"),
                               item_names=("state", "meta"))
  opt_state = optax.adam(1e-3).init(params)
  meta = {"model": json_config(model), "image_size": image_size,
          "label_names": label_names or [f"class_{i}" for i in range(model.num_classes)],
          "num_classes": model.num_classes, "dataset": "unit-test"}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": np.asarray(step), "params": params,
                                   "opt_state": opt_state}),
      meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()


def assert_trees_equal(a, b):
  fa, fb = ck.flatten(ck.plain(a)), ck.flatten(ck.plain(b))
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k


@pytest.fixture(scope="module")
def tiny():
  model = VisionTransformer(**TINY)
  return model, random_params(model)


# ----------------------------------------------------------------------------------------------------
# npz


def test_npz_round_trip_is_exact_and_uses_prelinen_names(tiny, tmp_path):
  _, params = tiny
  path = tmp_path / "vit.npz"
  ck.save_npz(params, path)
  assert os.listdir(tmp_path) == ["vit.npz"]  # the temporary file was renamed, nothing left over
  keys = set(np.load(path, allow_pickle=False).files)
  block = "Transformer/encoderblock_1/"
  assert {block + "LayerNorm_0/scale", block + "MultiHeadDotProductAttention_1/query/kernel",
          block + "LayerNorm_2/bias", block + "MlpBlock_3/Dense_1/kernel"} <= keys
  assert not any(k.startswith("params/") or "MlpBlock_0" in k for k in keys)
  assert {"cls", "embedding/kernel", "head/kernel", "Transformer/posembed_input/pos_embedding",
          "Transformer/encoder_norm/scale"} <= keys
  assert_trees_equal(ck.load_npz(path), params)


def test_linen_named_and_prefixed_npz_load_to_the_same_tree(tiny, tmp_path):
  _, params = tiny
  flat = {k: np.asarray(v) for k, v in ck.flatten(params).items()}
  np.savez(tmp_path / "linen.npz", **flat)
  np.savez(tmp_path / "prefixed.npz", **{f"params/{k}": v for k, v in flat.items()})
  ck.save_npz(params, tmp_path / "prelinen.npz")
  for name in ("linen.npz", "prefixed.npz", "prelinen.npz"):
    assert_trees_equal(ck.load_npz(tmp_path / name), params)


def test_block_renumbering():
  prelinen = {"LayerNorm_0": 0, "MultiHeadDotProductAttention_1": 1, "LayerNorm_2": 2, "MlpBlock_3": 3}
  linen = {"LayerNorm_0": 0, "MultiHeadDotProductAttention_0": 1, "LayerNorm_1": 2, "MlpBlock_0": 3}
  assert ck.to_linen_naming({"Transformer": {"encoderblock_0": prelinen}}) == {
      "Transformer": {"encoderblock_0": linen}}
  assert ck.to_linen_naming({"Transformer": {"encoderblock_0": linen}}) == {
      "Transformer": {"encoderblock_0": linen}}
  assert ck.to_prelinen_naming({"Transformer": {"encoderblock_0": linen}}) == {
      "Transformer": {"encoderblock_0": prelinen}}
  # Only encoder blocks are renamed (the MAP head keeps its own linen names).
  other = {"MAPHead_0": {"LayerNorm_0": 1, "MlpBlock_0": 2}}
  assert ck.to_prelinen_naming(other) == other


class _Exploit:
  """A pickle that would create a file when unpickled."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["random", "text", "npy", "pickled_npz", "truncated", "empty_zip"])
def test_bad_npz_fails_with_one_clean_line(tmp_path, kind):
  path = tmp_path / "bad.npz"
  marker = tmp_path / "pwned"
  if kind == "random":
    path.write_bytes(np.random.RandomState(0).bytes(4096))
  elif kind == "text":
    path.write_text("not weights\n")
  elif kind == "npy":
    np.save(open(path, "wb"), np.zeros(3))
  elif kind == "pickled_npz":
    np.savez(path, obj=np.array([_Exploit(str(marker))], dtype=object))
  elif kind == "truncated":
    np.savez(path, a=np.zeros(1000))
    path.write_bytes(path.read_bytes()[:300])
  elif kind == "empty_zip":
    np.savez(path)
  with pytest.raises(ValueError) as e:
    ck.load_npz(path)
  msg = str(e.value)
  assert str(path) in msg and "\n" not in msg and "allow_pickle" not in msg
  # No chained traceback from inside numpy/zipfile.
  assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
  assert not marker.exists()
  # Loaders built on load_npz fail the same way.
  with pytest.raises(ValueError, match=re.escape(str(path))):
    vit_cls.load(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    ck.restore_params(tmp_path / "nope.npz")
  with pytest.raises(ValueError, match="no checkpoint found"):
    ck.restore_params(tmp_path)


def test_one_open_source_serves_every_entry_point(tiny, tmp_path, monkeypatch):
  """`open_source` reads once; load, predict, convert and export take the source without reading again."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_cls import convert  # pylint: disable=g-import-not-at-top
  from vit_cls.formats import export as export_lib  # pylint: disable=g-import-not-at-top
  model, params = tiny
  ck.save_npz(params, tmp_path / "m.npz")
  source = ck.open_source(tmp_path / "m.npz")
  assert (source.kind, source.image_size, source.label_names, source.meta) == ("npz", 16, None, None)
  assert source.preprocessing["source"] == "vit_cls" and ck.open_source(source) is source
  with pytest.raises(ck.CheckpointNotFound, match="nope.npz: no such file or directory"):
    ck.open_source(tmp_path / "nope.npz")
  monkeypatch.setattr(ck, "_read", None)  # a second read would fail
  m, p = vit_cls.load(source)
  np.testing.assert_array_equal(logits(m, p, images()), logits(model, params, images()))
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
  assert len(predict_lib.predict(source, [str(tmp_path / "a.png")], k=2)[0][1]) == 2
  convert.convert_checkpoint(source, str(tmp_path / "c.npz"), num_classes=3, image_size=16)
  export_lib.export_checkpoint(source, str(tmp_path / "timm"), "timm")
  assert ck.load_with_info(source, dtype="bfloat16").config["dtype"] == "bfloat16"
  assert source.overrides == {}  # overrides on an open source make a new one, the params shared


# ----------------------------------------------------------------------------------------------------
# Inferring the architecture


@pytest.mark.parametrize("overrides, image_size, expected", [
    ({}, 16, {}),
    (dict(pool="gap", num_classes=0), 16, dict(pool="gap", num_classes=0)),
    (dict(representation_size=24, num_classes=7), 16, dict(representation_size=24, num_classes=7)),
    (dict(num_registers=3, num_heads=4, mlp_dim=40, num_layers=3), 16,
     dict(num_registers=3, num_heads=4, mlp_dim=40, num_layers=3)),
    (dict(pool="map"), 24, dict(pool="map", image_size=24)),
    (dict(patch_size=(2, 4)), 16, dict(patch_size=[2, 4], image_size=None)),  # 8x4 grid: not square
    (dict(patch_size=(2, 4)), (8, 16), dict(patch_size=[2, 4], image_size=[8, 16])),  # 4x4 grid
])
def test_infer_model_config(overrides, image_size, expected):
  model = VisionTransformer(**dict(TINY, **overrides))
  config = ck.infer_model_config(ck.abstract_params(model, image_size))
  want = dict(num_classes=10, patch_size=[4, 4], hidden_size=32, mlp_dim=64, num_heads=2,
              num_layers=2, pool="cls", representation_size=None, num_registers=0, dtype="float32",
              image_size=16)
  want.update(expected)
  assert config == want


def test_infer_rejects_non_vit_trees():
  with pytest.raises(ValueError, match="embedding/kernel"):
    ck.infer_model_config({"foo": np.zeros(3)})


# ----------------------------------------------------------------------------------------------------
# load / load_nnx


def test_load_npz_infers_architecture_and_gives_same_logits(tiny, tmp_path):
  model, params = tiny
  path = tmp_path / "vit.npz"
  ck.save_npz(params, path)
  loaded_model, loaded_params = vit_cls.load(path)
  for field in ("num_classes", "hidden_size", "mlp_dim", "num_heads", "num_layers", "pool",
                "representation_size", "num_registers"):
    assert getattr(loaded_model, field) == getattr(model, field), field
  assert tuple(loaded_model.patch_size) == (4, 4)
  x = images()
  np.testing.assert_array_equal(logits(loaded_model, loaded_params, x), logits(model, params, x))
  # Overrides reach the model.
  m2, _ = vit_cls.load(path, attention_impl="einsum", dtype="bfloat16")
  assert m2.attention_impl == "einsum" and m2.dtype == "bfloat16"


def test_load_with_wrong_architecture_names_parameter_and_shapes(tiny, tmp_path):
  _, params = tiny
  path = tmp_path / "vit.npz"
  ck.save_npz(params, path)
  with pytest.raises(ValueError) as e:
    vit_cls.load(path, hidden_size=48)
  msg = str(e.value)
  m = re.search(r"parameter '([^']+)' has shape (\([^)]*\)) in the checkpoint .* but (\([^)]*\)) in "
                r"the model", msg)
  assert m, msg
  name, got, want = m.groups()
  flat = ck.flatten(params)
  assert got == str(tuple(flat[name].shape))
  assert want != got and "48" in want
  assert "\n" not in msg


def test_load_orbax_workdir_checkpoints_and_step_dirs(tmp_path):
  # class_token_position="last" cannot be inferred from shapes: the stored config must be used.
  model = VisionTransformer(**dict(TINY, class_token_position="last"))
  old, new = random_params(model, seed=1), random_params(model, seed=2)
  write_orbax(tmp_path, old, model, step=5)
  write_orbax(tmp_path, new, model, step=12)
  x = images()
  want_new, want_old = logits(model, new, x), logits(model, old, x)
  for path, want in ((tmp_path, want_new), (tmp_path / "checkpoints", want_new),
                     (tmp_path / "checkpoints" / "5", want_old)):
    m, p = vit_cls.load(path)
    assert m.class_token_position == "last"
    np.testing.assert_array_equal(logits(m, p, x), want)
  params, meta = ck.restore_params(tmp_path)
  assert_trees_equal(params, new)
  assert meta["step"] == 12 and meta["image_size"] == 16 and meta["label_names"][3] == "class_3"


def test_layer_scan_checkpoints_read_back_in_the_published_layout(tmp_path):
  """A run trained with `scan_layers` stores stacked blocks; every reader sees `encoderblock_{i}`."""
  from vit_cls import convert  # pylint: disable=g-import-not-at-top
  scanned_model = VisionTransformer(**dict(TINY, scan_layers=True))
  stacked = random_params(scanned_model, seed=3)
  assert "encoderblock" in stacked["Transformer"]
  write_orbax(tmp_path, stacked, scanned_model, step=4)
  unrolled = ck.scan_to_unrolled(stacked)
  params, meta = ck.restore_params(tmp_path)
  assert meta["model"]["scan_layers"] is True
  assert_trees_equal(params, unrolled)  # encoderblock_0, encoderblock_1: the published layout
  x = images()
  want = logits(scanned_model, stacked, x)
  # `load` rebuilds the scanned model from the stored config and stacks the blocks again ...
  m, p = vit_cls.load(tmp_path)
  assert m.scan_layers and "encoderblock" in p["Transformer"]
  np.testing.assert_array_equal(logits(m, p, x), want)
  # ... or gives the unrolled model when asked; the same function either way.
  m, p = vit_cls.load(tmp_path, scan_layers=False)
  assert "encoderblock_1" in p["Transformer"]
  np.testing.assert_allclose(logits(m, p, x), want, rtol=1e-5, atol=1e-6)
  # An export is an ordinary published-layout .npz.
  npz = tmp_path / "exported.npz"
  ck.save_npz(params, npz)
  assert_trees_equal(ck.load_npz(npz), unrolled)
  # Fine-tuning init into a scanned model with a new head: converted in the published layout, stacked.
  target = ck.scan_to_unrolled(random_params(
      VisionTransformer(**dict(TINY, scan_layers=True, num_classes=5)), seed=4))
  new, _ = convert.init_from_checkpoint(str(tmp_path), target, patch_size=(4, 4), image_size=16)
  assert_trees_equal(new["Transformer"]["encoderblock_1"], unrolled["Transformer"]["encoderblock_1"])
  assert np.asarray(new["head"]["kernel"]).shape == (32, 5)


def test_load_nnx_gives_same_logits(tiny, tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model, params = tiny
  path = tmp_path / "vit.npz"
  ck.save_npz(params, path)
  nnx_model = ck.load_nnx(path)
  assert isinstance(nnx_model, nnx.Module)
  x = images()
  np.testing.assert_allclose(np.asarray(nnx_model(x, train=False)), logits(model, params, x),
                             rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# predict


def _write_pngs(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  rgb, gray = tmp_path / "rgb.png", tmp_path / "gray.png"
  Image.fromarray(rng.randint(0, 256, (20, 28, 3), dtype=np.uint8)).save(rgb)
  Image.fromarray(rng.randint(0, 256, (9, 9), dtype=np.uint8), mode="L").save(gray)
  return str(rgb), str(gray)


def test_predict_prints_top5_with_label_names(tiny, tmp_path, capsys):
  model, params = tiny
  names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  write_orbax(tmp_path / "work", params, model, step=3, label_names=names)
  rgb, gray = _write_pngs(tmp_path)
  assert predict_lib.main(["--checkpoint", str(tmp_path / "work"), rgb, gray]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 12 and lines[0] == rgb and lines[6] == gray
  for block in (lines[1:6], lines[7:12]):
    probs = []
    for rank, line in enumerate(block, 1):
      m = re.fullmatch(rf"  {rank}\. (\w+): (\d\.\d{{4}})", line)
      assert m and m.group(1) in names, line
      probs.append(float(m.group(2)))
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
  # The same numbers as the model on the eval preprocessing.
  x = np.stack([predict_lib.load_image(rgb, 16)])
  assert x.shape == (1, 16, 16, 3) and x.min() >= -1 and x.max() <= 1
  g = predict_lib.load_image(gray, (12, 20))  # grayscale -> RGB, any (h, w)
  assert g.shape == (12, 20, 3) and np.array_equal(g[..., 0], g[..., 2])
  best = int(np.argmax(logits(model, params, x)[0]))
  assert lines[1].startswith(f"  1. {names[best]}:")


def test_predict_npz_falls_back_to_indices(tiny, tmp_path, capsys):
  _, params = tiny
  ck.save_npz(params, tmp_path / "vit.npz")
  rgb, _ = _write_pngs(tmp_path)
  assert predict_lib.main(["--checkpoint", str(tmp_path / "vit.npz"), "--top_k", "3", rgb]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4 and all(re.fullmatch(r"  \d\. \d: \d\.\d{4}", l) for l in lines[1:])
  assert predict_lib.main(["--checkpoint", str(tmp_path / "vit.npz"), str(tmp_path / "no.png")]) == 2
  err = capsys.readouterr().err
  assert "no.png" in err and err.count("\n") == 1


def test_predict_command_runs_without_tensorflow(tiny, tmp_path):
  """`python -m vit_cls.predict` end to end in a fresh process, which must not import TensorFlow."""
  _, params = tiny
  ck.save_npz(params, tmp_path / "vit.npz")
  rgb, _ = _write_pngs(tmp_path)
  code = ("import runpy, sys\n"
          "try:\n"
          "  runpy.run_module('vit_cls.predict', run_name='__main__')\n"
          "finally:\n"
          "  assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code, "--checkpoint", str(tmp_path / "vit.npz"), rgb],
                        capture_output=True, text=True, env=env, cwd=root, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines()[0] == rgb and len(proc.stdout.splitlines()) == 6


# ----------------------------------------------------------------------------------------------------
# Third-party loader (optional)


def test_exported_npz_loads_in_timm(tiny, tmp_path):
  timm_vit = pytest.importorskip("timm.models.vision_transformer")
  torch = pytest.importorskip("torch")
  model, params = tiny
  path = tmp_path / "vit.npz"
  ck.save_npz(params, path)
  tm = timm_vit.VisionTransformer(
      img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10,
      act_layer=lambda: torch.nn.GELU(approximate="tanh"))
  timm_vit._load_weights(tm, str(path))  # pylint: disable=protected-access
  tm.eval()
  x = images()
  with torch.no_grad():
    out = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(out, logits(model, params, x), atol=1e-4)
