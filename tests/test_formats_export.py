"""Exports: timm / Hugging Face folders equal the libraries' own state dicts; npz files keep their switches.

timm's and Transformers' loaders themselves run in scripts/make_zoo_fixtures.py check-exports (beside
torch); here, without torch, an export of an imported fixture must give back the very tensors the library
saved (so its loader sees its own checkpoint), and a config that rebuilds the same architecture.
"""

import json
import os

import jax
import numpy as np
import pytest

import vit_cls
from vit_cls import checkpoint as ck
from vit_cls.formats import export as export_lib, npz, safetensors as st

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")
TIMM = ["timm_augreg", "timm_deit", "timm_dinov2_reg", "timm_clip", "timm_siglip", "timm_gap_medium",
        "timm_gap_betwixt_reg"]


def exported(tmp_path, name, fmt):
  out = tmp_path / f"{name}@{fmt}"
  export_lib.export_checkpoint(os.path.join(ZOO, name), str(out), fmt)
  tensors, meta = st.read(out / "model.safetensors")
  return tensors, json.loads((out / "config.json").read_text()), meta


def original(name):
  return st.read(os.path.join(ZOO, name, "model.safetensors"))[0]


@pytest.mark.parametrize("name", TIMM)
def test_timm_export_gives_back_timms_state_dict(tmp_path, name):
  got, config, meta = exported(tmp_path, name, "timm")
  want = original(name)
  assert meta == {"format": "pt"}
  for key, value in want.items():
    assert key in got, key
    assert got[key].dtype == np.float32 and np.array_equal(got[key], value), key
  # Only zero biases may be added (a source without q/k/v biases; vit_cls always has them).
  for key in set(got) - set(want):
    assert key.endswith("attn.qkv.bias") and not np.any(got[key]), key
  fixture_config = json.loads(open(os.path.join(ZOO, name, "config.json")).read())
  args = config["model_args"]
  assert config["global_pool"] == fixture_config["global_pool"]
  assert args["class_token"] == ("cls_token" in want)
  assert args["reg_tokens"] == (want["reg_token"].shape[1] if "reg_token" in want else 0)
  assert args["pre_norm"] == ("norm_pre.weight" in want)
  assert args["fc_norm"] == ("fc_norm.weight" in want)
  assert ("init_values" in args) == ("blocks.0.ls1.gamma" in want)
  assert args["act_layer"] == "gelu"  # every fixture family uses exact GELU
  assert ("clip" in config["architecture"]) == (name == "timm_clip")  # LayerNorm eps 1e-5
  assert args["num_heads"] == 3 and args["depth"] == 2


@pytest.mark.parametrize("name", ["hf_vit_classifier", "hf_vit_model"])
def test_hf_export_gives_back_the_saved_state_dict(tmp_path, name):
  got, config, _ = exported(tmp_path, name, "hf")
  want = original(name)
  assert set(got) == set(want)
  for key, value in want.items():
    assert np.array_equal(got[key], value), key
  fixture_config = json.loads(open(os.path.join(ZOO, name, "config.json")).read())
  for key in ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "hidden_act", "layer_norm_eps", "image_size", "patch_size"):
    assert config[key] == fixture_config[key], key


def test_export_round_trip_reproduces_outputs(tmp_path):
  """timm fixture -> vit_cls -> HF folder -> vit_cls: same outputs as timm computed."""
  export_lib.export_checkpoint(os.path.join(ZOO, "timm_deit"), str(tmp_path / "hf"), "hf")
  model, params = vit_cls.load(tmp_path / "hf")
  io = np.load(os.path.join(ZOO, "timm_deit", "io.npz"))
  out = model.apply({"params": params}, np.transpose(io["input"], (0, 2, 3, 1)), train=False)
  assert float(np.max(np.abs(np.asarray(out) - io["output"]))) < 1e-4


@pytest.mark.parametrize("name, fmt, message", [
    ("hf_vit_classifier", "timm", r"layernorm_epsilon=1e-12"),
    ("hf_vit_model", "timm", r"a pre_logits layer \(representation_size=24\)"),
    ("timm_dinov2_reg", "hf", r"a class token without a position row"),
    ("timm_siglip", "hf", r"pool='map'"),
])
def test_architectures_the_target_lacks_are_refused_in_one_line(tmp_path, name, fmt, message):
  with pytest.raises(ValueError, match=message) as e:
    export_lib.export_checkpoint(os.path.join(ZOO, name), str(tmp_path / "out"), fmt)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()


def tiny(**overrides):
  fields = dict(num_classes=3, patch_size=(4, 4), hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1)
  fields.update(overrides)
  return vit_cls.VisionTransformer(**fields)


# Each of these has the parameter tree of another one (or of the default) and so cannot be told from
# the shapes alone: only the record in the file brings it back.
SWITCHES = [dict(pool="cls"), dict(pool="gap"), dict(pool="last"), dict(pool="map"), dict(pool="none"),
            dict(pool="cls", class_token_position="last"), dict(pool="gap", num_registers=2),
            dict(pool="cls", class_token_posemb=False, layerscale=True, gelu_approximate=False,
                 layernorm_epsilon=1e-5, pre_norm=True),
            dict(pool="gap", fc_norm=True), dict(pool="cls", causal=True)]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_npz_round_trip_keeps_every_pooling_and_switch(tmp_path, switches):
  model = tiny(**switches)
  x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  params = model.init(jax.random.key(1), x, train=False)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * np.random.default_rng(2).normal(size=p.shape), params)
  ck.save_npz(params, tmp_path / "m.npz", config=model, image_size=(8, 12))
  loaded = ck.load_with_info(tmp_path / "m.npz")
  for field, value in switches.items():
    assert getattr(loaded.model, field) == value, field
  assert tuple(loaded.image_size) == (8, 12)
  np.testing.assert_allclose(loaded.model.apply({"params": loaded.params}, x, train=False),
                             model.apply({"params": params}, x, train=False), atol=1e-5)


def test_npz_record_is_invisible_to_name_based_readers(tmp_path):
  """timm's npz loader reads parameters by name; the record is one extra uint8 array beside them."""
  model = tiny(pool="gap")
  params = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32), train=False)["params"]
  ck.save_npz(params, tmp_path / "m.npz", config=model, image_size=8)
  with np.load(tmp_path / "m.npz") as f:
    assert f[npz.CONFIG_KEY].dtype == np.uint8
    assert json.loads(f[npz.CONFIG_KEY].tobytes())["pool"] == "gap"
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in f.files
  ck.save_npz(params, tmp_path / "plain.npz")  # without a config: the published format, as before
  assert npz.CONFIG_KEY not in np.load(tmp_path / "plain.npz").files
