"""Fine-tuning from an imported timm checkpoint: convert, config.init_from, train.py end to end."""

import os

import jax
import numpy as np
import pytest

from vit_cls import checkpoint as ck
from vit_cls import convert

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")
DINO = os.path.join(ZOO, "timm_dinov2_reg")  # class token without a position row, registers, LayerScale
DINO_SWITCHES = dict(gelu_approximate=False, class_token_posemb=False, layerscale=True)


def dino_model_config(config):
  config.model.update(dict(patch_size=(7, 7), hidden_size=24, mlp_dim=48, num_heads=3, num_layers=2,
                           num_registers=4, representation_size=None, **DINO_SWITCHES))


def test_convert_command_resizes_and_records_the_switches(tmp_path, capsys):
  out = tmp_path / "dino_ft.npz"
  assert convert.main(["--checkpoint", DINO, "--out", str(out), "--num_classes", "3",
                       "--image_size", "42"]) == 0
  text = capsys.readouterr().out
  assert "(1, 16, 24) -> (1, 36, 24) (patch grid 4x4 -> 6x6" in text  # no class row to set aside
  assert "head/kernel: 5 classes in the source, 3 in the target" in text
  assert "--config.model.class_token_posemb=False --config.model.layerscale=True" in text
  loaded = ck.load_with_info(out)
  for field, value in dict(DINO_SWITCHES, num_registers=4, num_classes=3).items():
    assert getattr(loaded.model, field) == value, field
  assert not np.any(np.asarray(loaded.params["head"]["kernel"]))  # fresh zero-initialised head
  src = ck.load_with_info(DINO).params
  np.testing.assert_array_equal(loaded.params["Transformer"]["encoderblock_1"]["LayerScale_0"]["scale"],
                                src["Transformer"]["encoderblock_1"]["LayerScale_0"]["scale"])


def test_posemb_gains_a_zero_class_row_for_a_class_row_target(tmp_path):
  """A source class token without a position row, a target with one: the exact row is zeros."""
  import vit_cls  # pylint: disable=g-import-not-at-top
  target = vit_cls.VisionTransformer(num_classes=3, patch_size=(7, 7), hidden_size=24, mlp_dim=48,
                                     num_heads=3, num_layers=2, num_registers=4, layerscale=True,
                                     gelu_approximate=False)
  init = target.init(jax.random.key(0), np.zeros((1, 28, 28, 3), np.float32), train=False)["params"]
  with pytest.raises(ValueError, match=r"the checkpoint's model has class_token_posemb=False, the "
                                       r"model being fine-tuned does not; add "
                                       r"--config.model.class_token_posemb=False\.$"):
    convert.init_from_checkpoint(DINO, init, patch_size=(7, 7), image_size=28, model=target)
  params, report = convert.init_from_checkpoint(DINO, init, patch_size=(7, 7), image_size=28)
  pos = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pos.shape == (1, 17, 24) and not np.any(pos[:, 0])
  assert any("zeros" in why for _, why in report.reinitialised)


@pytest.mark.slow
def test_train_fine_tunes_from_an_imported_checkpoint(tiny_config, tmp_path, capsys):
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  dino_model_config(tiny_config)
  tiny_config.update(dict(image_size=21, init_from=DINO, optimizer="sgd", learning_rate=1e-7,
                          weight_decay=0.0, total_steps=2, warmup_steps=0, eval_every=2,
                          checkpoint_every=2, log_every=1))
  train.train_and_evaluate(tiny_config, str(tmp_path / "ft"))
  out = capsys.readouterr().out
  assert "Initialised from" in out and "source: a timm checkpoint" in out
  assert "patch grid 4x4 -> 3x3" in out
  tuned, meta = ck.restore_params(str(tmp_path / "ft"))
  assert meta["model"]["layerscale"] and not meta["model"]["class_token_posemb"]
  src = ck.load_with_info(DINO).params
  for i in range(2):  # two steps at lr 1e-7: still the imported encoder
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 tuned["Transformer"][f"encoderblock_{i}"], src["Transformer"][f"encoderblock_{i}"])
  assert tuned["head"]["kernel"].shape == (24, 10)


def test_init_from_refuses_a_model_without_the_sources_function_switches(tiny_config):
  """GELU form and epsilon change no shape: only the switch check stops a silently different model."""
  from vit_cls import errors, train  # pylint: disable=g-import-not-at-top
  dino_model_config(tiny_config)
  tiny_config.model.gelu_approximate = True  # the source uses exact GELU
  tiny_config.update(dict(image_size=21, init_from=DINO))
  with pytest.raises(errors.ConfigError, match=r"add --config.model.gelu_approximate=False"):
    train.check_init_from(tiny_config, train.create_model(tiny_config, 10))
  tiny_config.model.gelu_approximate = False
  train.check_init_from(tiny_config, train.create_model(tiny_config, 10))  # the same model: accepted


def _resize_patches(images, patch: int, new_patch: int):
  """Every patch of NHWC `images` resized on its own (bilinear, no antialias), the grid kept."""
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = jax.vmap(jax.vmap(jax.vmap(lambda p: jax.image.resize(p, (new_patch, new_patch, c), "bilinear",
                                                            antialias=False))))(x)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // patch * new_patch, w // patch * new_patch, c)


def test_convert_dinov2_patch_up_keeps_timms_output(tmp_path, capsys):
  """The DINOv2 /14 -> /16 case at fixture size: /7 at 28 -> --patch_size 8 at 32 (the 4x4 grid kept,
  registers, LayerScale, a class token without a position row). On each patch upsampled to 8x8 the
  converted model gives timm's logits for the original input."""
  out = tmp_path / "dino_p8.npz"
  assert convert.main(["--checkpoint", DINO, "--out", str(out), "--num_classes", "5",
                       "--image_size", "32", "--patch_size", "8"]) == 0
  assert "embedding/kernel: (7, 7, 3, 24) -> (8, 8, 3, 24) (patch 7x7 -> 8x8" in capsys.readouterr().out
  loaded = ck.load_with_info(out)
  assert tuple(loaded.model.patch_size) == (8, 8) and loaded.model.num_registers == 4
  io = np.load(os.path.join(DINO, "io.npz"))
  x = np.transpose(io["input"], (0, 2, 3, 1))  # NCHW there, NHWC here
  got = loaded.model.apply({"params": loaded.params}, _resize_patches(x, 7, 8), train=False)
  np.testing.assert_allclose(got, io["output"], atol=1e-4)
  # The assertion can fail: a plainly resized kernel (what FlexiViT replaces) is far from timm's logits.
  src_kernel = np.asarray(ck.load_with_info(DINO).params["embedding"]["kernel"])
  naive = dict(loaded.params, embedding=dict(loaded.params["embedding"], kernel=np.asarray(
      jax.image.resize(src_kernel, (8, 8, 3, 24), "bilinear"))))
  off = loaded.model.apply({"params": naive}, _resize_patches(x, 7, 8), train=False)
  assert np.max(np.abs(np.asarray(off) - io["output"])) > 1e-2
