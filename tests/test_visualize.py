"""vit_cls.visualize: the class token's attention as a PNG, from a checkpoint and an image file."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_cls import checkpoint as ckpt_lib
from vit_cls import visualize
from vit_cls.model import VisionTransformer

TINY = dict(num_classes=10, patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
            representation_size=16, attention_impl="einsum")


def _npz(tmp_path, **kw):
  """A tiny 16x16 checkpoint in the published .npz format, with random (non-zero) parameters."""
  model = VisionTransformer(**{**TINY, **kw})
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)
  path = str(tmp_path / f"model_{kw.get('pool', 'cls')}.npz")
  ckpt_lib.save_npz(params, path)
  return path


def _image(tmp_path, size=(20, 12)):
  rng = np.random.default_rng(0)
  path = str(tmp_path / "digit.png")
  Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), mode="L").save(path)
  return path


def test_cli_writes_png_of_the_expected_size(tmp_path):
  out = str(tmp_path / "att.png")
  assert visualize.main(["--checkpoint", _npz(tmp_path), "--out", out, _image(tmp_path)]) == 0
  with Image.open(out) as img:
    # One panel for the image, one per last-layer head (2), one for the rollout; 2.0 x 2.3 in at 100 dpi.
    assert img.size == (4 * 200, 230)


def test_maps_are_probabilities_over_the_patch_grid():
  model = VisionTransformer(**TINY, num_registers=2, class_token_position="last")
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)
  image = np.asarray(jax.random.uniform(jax.random.key(2), (16, 16, 3), minval=-1, maxval=1))
  maps = visualize.class_token_attention(model, params, image)
  assert maps["last_layer"].shape == (2, 4, 4) and maps["rollout"].shape == (4, 4)
  assert np.all(maps["last_layer"] >= 0) and np.all(maps["patch_share"] < 1)  # cls + registers get some
  np.testing.assert_allclose(maps["last_layer"].sum(axis=(1, 2)), maps["patch_share"])
  assert 0 < maps["rollout"].sum() < 1


def test_rollout_rows_sum_to_one_and_identity_attention_rolls_out_to_identity():
  att = [np.tile(np.eye(5), (3, 1, 1))] * 4
  np.testing.assert_allclose(visualize.attention_rollout(att), np.eye(5))
  rng = np.random.default_rng(0)
  att = [rng.dirichlet(np.ones(5), size=(3, 5)) for _ in range(3)]
  np.testing.assert_allclose(visualize.attention_rollout(att).sum(axis=-1), np.ones(5))


@pytest.mark.parametrize("pool", ["gap", "last", "map"])
def test_model_without_class_token_is_a_clear_error(tmp_path, pool, capsys):
  assert visualize.main(["--checkpoint", _npz(tmp_path, pool=pool), _image(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "no class token" in err and "pool='cls'" in err


def test_no_tensorflow_import():
  code = "import sys, vit_cls.visualize; sys.exit('tensorflow' in sys.modules)"
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_imported_checkpoint_is_shown_with_its_own_preprocessing(tmp_path, monkeypatch):
  """The timm CLIP fixture (mean/std of CLIP, 0.95 crop): the model sees what predict feeds it, and the
  input panel is told the mean/std to turn it back into pixels (not read as [-1, 1])."""
  from vit_cls import predict  # pylint: disable=g-import-not-at-top
  zoo = os.path.join(os.path.dirname(__file__), "fixtures", "zoo", "timm_clip")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "img.png")
  seen = {}
  attention, render = visualize.class_token_attention, visualize.render
  monkeypatch.setattr(visualize, "class_token_attention",
                      lambda m, p, image: attention(m, p, seen.setdefault("x", image)))
  monkeypatch.setattr(visualize, "render",
                      lambda image, maps, out, **kw: seen.update(kw) or render(image, maps, out, **kw))
  out = visualize.visualize(zoo, str(tmp_path / "img.png"), str(tmp_path / "att.png"))
  loaded = ckpt_lib.load_with_info(zoo)
  want = predict.load_image(str(tmp_path / "img.png"), loaded.image_size, loaded.preprocessing)
  np.testing.assert_array_equal(seen["x"], want)
  assert seen["preprocessing"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
  assert os.path.exists(out)
