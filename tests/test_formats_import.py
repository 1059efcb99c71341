"""timm and Hugging Face checkpoints load and reproduce the outputs their own library computed (no torch).

The fixtures (tests/fixtures/zoo, made by scripts/make_zoo_fixtures.py beside torch, timm and
transformers) are tiny random-init models of every family vit_cls imports, with every parameter random,
plus a float32 NCHW input and the library's outputs on it.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import vit_cls
from vit_cls import checkpoint as ck
from vit_cls.formats import safetensors as st

ZOO = os.path.join(os.path.dirname(__file__), "fixtures", "zoo")
TIMM = ["timm_augreg", "timm_deit", "timm_dinov2_reg", "timm_clip", "timm_siglip", "timm_gap_medium",
        "timm_gap_betwixt_reg", "timm_gap_base_16heads", "timm_siglip_giantopt"]
# Hub-style configs (the architecture's name, no model_args) of architectures whose heads are not
# width / 64: 16 heads of width 64 (timm keeps an architecture's heads when only the width changes).
TABLE_ONLY = {"timm_gap_base_16heads": "vit_base_patch16_gap_224",
              "timm_siglip_giantopt": "vit_giantopt_patch16_siglip_256"}
HF = ["hf_vit_classifier", "hf_vit_model"]
# What each family must come back as (the switches the import has to get right).
EXPECTED = {
    "timm_augreg": dict(pool="cls", gelu_approximate=False, layernorm_epsilon=1e-6),
    "timm_deit": dict(pool="cls", image_size=[16, 24]),
    "timm_dinov2_reg": dict(pool="cls", layerscale=True, num_registers=4, class_token_posemb=False,
                            patch_size=[7, 7]),
    "timm_clip": dict(pool="cls", pre_norm=True, layernorm_epsilon=1e-5),
    "timm_siglip": dict(pool="map", num_classes=0),
    "timm_gap_medium": dict(pool="gap", layerscale=True, fc_norm=False),
    "timm_gap_betwixt_reg": dict(pool="gap", layerscale=True, fc_norm=True, num_registers=4),
    "timm_gap_base_16heads": dict(pool="gap", num_heads=16, hidden_size=64, fc_norm=False,
                                  gelu_approximate=False, layernorm_epsilon=1e-6),
    "timm_siglip_giantopt": dict(pool="map", num_heads=16, hidden_size=64, num_classes=0,
                                 gelu_approximate=True, layernorm_epsilon=1e-6),
    "hf_vit_classifier": dict(pool="cls", layernorm_epsilon=1e-12, representation_size=None),
    "hf_vit_model": dict(pool="cls", num_classes=0, representation_size=24),
}


def fixture_io(name):
  io = np.load(os.path.join(ZOO, name, "io.npz"))
  return np.transpose(io["input"], (0, 2, 3, 1)), io["output"]  # NCHW there, NHWC here


def max_error(model, params, name):
  x, want = fixture_io(name)
  return float(np.max(np.abs(np.asarray(model.apply({"params": params}, x, train=False)) - want)))


@pytest.mark.parametrize("name", TIMM + HF)
def test_every_family_reproduces_its_library_outputs(name):
  loaded = ck.load_with_info(os.path.join(ZOO, name))
  assert max_error(loaded.model, loaded.params, name) < 1e-4
  for field, value in EXPECTED[name].items():
    assert loaded.config[field] == value, field
  assert loaded.meta["format"] == ("hf" if name in HF else "timm")


@pytest.mark.parametrize("name", sorted(TABLE_ONLY))
def test_heads_come_from_the_table_of_timm_architectures(name):
  """The hub's config.json names the architecture only; the table's 16 heads are what timm computed with.

  Width / 64 (what the import assumed before the table: 1 head here) loads without complaint but computes
  something else: the table is what makes the outputs match.
  """
  config = json.loads(open(os.path.join(ZOO, name, "config.json")).read())
  assert config["architecture"] == TABLE_ONLY[name] and "model_args" not in config
  loaded = ck.load_with_info(os.path.join(ZOO, name))
  assert loaded.config["num_heads"] == 16 and max_error(loaded.model, loaded.params, name) < 1e-4
  assert any("num_heads=16 of timm's" in n for n in loaded.meta["import_notes"])
  width_rule = ck.load_with_info(os.path.join(ZOO, name), num_heads=1)  # 64 wide / 64
  assert max_error(width_rule.model, width_rule.params, name) > 1e-2


def test_an_architecture_the_table_lacks_needs_num_heads(tmp_path):
  shutil.copytree(os.path.join(ZOO, "timm_gap_base_16heads"), tmp_path / "m")
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  config["architecture"] = "vit_base_patch16_gap_224_not_in_timm"
  (tmp_path / "m" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"model.safetensors: cannot tell the number of attention heads "
                                       r"\(timm architecture 'vit_base_patch16_gap_224_not_in_timm' is "
                                       r"not in vit_cls's table .*num_heads=N"):
    vit_cls.load(tmp_path / "m")
  with pytest.warns(UserWarning, match="is not in the table"):
    loaded = ck.load_with_info(tmp_path / "m", num_heads=16)
  assert max_error(loaded.model, loaded.params, "timm_gap_base_16heads") < 1e-4
  notes = " ".join(loaded.meta["import_notes"])
  assert "layernorm_epsilon=1e-06 assumed" in notes and "GELU assumed" in notes


def test_num_heads_reaches_predict_convert_and_init_from(tmp_path, capsys):
  """A bare file of a 16-head model: each entry point takes num_heads; init_from uses the target's."""
  from vit_cls import convert, predict  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path / "gap16.safetensors"
  shutil.copy(os.path.join(ZOO, "timm_gap_base_16heads", "model.safetensors"), path)
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img.png")
  assert predict.main(["--checkpoint", str(path), str(tmp_path / "img.png")]) == 2
  assert "no config.json names its timm architecture" in capsys.readouterr().err
  with pytest.warns(UserWarning, match="GELU assumed"):
    assert predict.main(["--checkpoint", str(path), "--num_heads", "16", str(tmp_path / "img.png")]) == 0
  with pytest.warns(UserWarning):
    loaded = ck.load_with_info(path, num_heads=16)
  assert convert.main(["--checkpoint", str(path), "--out", str(tmp_path / "c.npz"), "--num_classes", "5",
                       "--image_size", "16", "--num_heads", "16"]) == 0
  assert ck.load_with_info(tmp_path / "c.npz").config["num_heads"] == 16
  init = jax.tree.map(np.zeros_like, loaded.params)
  params, report = convert.init_from_checkpoint(path, init, patch_size=(4, 4), image_size=16,
                                                model=loaded.model)
  assert any("num_heads=16 from the model being fine-tuned" in n for n in report.notes)
  np.testing.assert_array_equal(params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"],
                                loaded.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"])


@pytest.mark.parametrize("arch,model_args,match", [
    ("vit_medium_patch16_rope_reg1_gap_256", {}, r"is timm's Eva, not its VisionTransformer"),
    ("vit_relpos_small_patch16_224", {}, r"is timm's VisionTransformerRelPos"),
    ("vit_base_patch16_rpn_224", {}, r"built with block ResPostBlock; vit_cls builds timm's Block only"),
    ("vit_huge_patch14_clip_quickgelu_224", {}, r"uses QuickGELU"),
    ("vit_betwixt_patch16_reg4_gap_256", {"pool_include_prefix": True},
     r"pool_include_prefix=True .*reads the class token and registers too"),
])
def test_architectures_vit_cls_does_not_build_are_refused_by_name(tmp_path, arch, model_args, match):
  """Tensors that fit are not enough: the table says what timm builds with them."""
  shutil.copytree(os.path.join(ZOO, "timm_gap_betwixt_reg"), tmp_path / "m")
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  config["architecture"] = arch
  config["model_args"].update(model_args)
  (tmp_path / "m" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=match):
    vit_cls.load(tmp_path / "m")


def test_preprocessing_is_reported_from_the_config():
  clip = ck.load_with_info(os.path.join(ZOO, "timm_clip"))
  assert clip.preprocessing["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
  assert clip.preprocessing["crop_pct"] == pytest.approx(0.95)
  assert clip.preprocessing["interpolation"] == "bicubic"
  hf = ck.load_with_info(os.path.join(ZOO, "hf_vit_classifier"))
  assert hf.preprocessing["mean"] == [0.5, 0.5, 0.5] and hf.preprocessing["crop_pct"] is None
  assert hf.preprocessing["interpolation"] == "bilinear"
  own = ck.load_with_info(os.path.join(ZOO, "timm_deit"))  # a DeiT: ImageNet mean/std, from config
  assert own.preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_bare_safetensors_file_needs_and_takes_hints(tmp_path):
  """Without config.json the head count of a non-standard width cannot be known: one line asks for it."""
  path = tmp_path / "vit.safetensors"
  shutil.copy(os.path.join(ZOO, "timm_augreg", "model.safetensors"), path)
  with pytest.raises(ValueError, match=r"vit\.safetensors: cannot tell the number of attention heads.*"
                                       r"num_heads=N"):
    vit_cls.load(path)
  with pytest.warns(UserWarning, match=r"vit\.safetensors: exact \(erf\) GELU assumed"):  # load says so
    loaded = ck.load_with_info(path, num_heads=3)
  assert max_error(loaded.model, loaded.params, "timm_augreg") < 1e-4
  assert any("erf" in n for n in loaded.meta["import_notes"])  # assumptions are reported


def test_bare_clip_file_assumes_clip_epsilon_and_mean(tmp_path):
  path = tmp_path / "clip.safetensors"
  shutil.copy(os.path.join(ZOO, "timm_clip", "model.safetensors"), path)
  with pytest.warns(UserWarning, match=r"clip\.safetensors: layernorm_epsilon=1e-05 assumed"):
    loaded = ck.load_with_info(path, num_heads=3)
  assert loaded.config["layernorm_epsilon"] == 1e-5
  assert loaded.preprocessing["mean"][0] == pytest.approx(0.48145466)
  assert max_error(loaded.model, loaded.params, "timm_clip") < 1e-4


def test_transformers_v5_module_names_load_too(tmp_path):
  """Transformers v5 names its modules q_proj/o_proj/mlp.fc1; a state dict saved with those loads."""
  tensors, meta = st.read(os.path.join(ZOO, "hf_vit_classifier", "model.safetensors"))
  renames = [("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
             ("attention.attention.key", "attention.k_proj"),
             ("attention.attention.value", "attention.v_proj"),
             ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
             ("output.dense", "mlp.fc2")]
  renamed = {}
  for name, value in tensors.items():
    for old, new in renames:
      name = name.replace(old, new)
    renamed[name] = value
  assert "vit.layers.0.mlp.fc2.weight" in renamed
  st.write(tmp_path / "model.safetensors", renamed, meta)
  shutil.copy(os.path.join(ZOO, "hf_vit_classifier", "config.json"), tmp_path)
  model, params = vit_cls.load(tmp_path)
  assert max_error(model, params, "hf_vit_classifier") < 1e-4


def fake_hub_cache(root, model_id, fixture, commit="0123abcd"):
  """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
  repo = root / ("models--" + model_id.replace("/", "--"))
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  shutil.copytree(os.path.join(ZOO, fixture), repo / "snapshots" / commit)


def test_hub_id_found_offline_in_the_local_cache(tmp_path, monkeypatch):
  fake_hub_cache(tmp_path, "google/vit-tiny-in21k", "hf_vit_model")
  fake_hub_cache(tmp_path, "timm/vit_tiny.clip", "timm_clip")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  model, params = vit_cls.load("google/vit-tiny-in21k")
  assert max_error(model, params, "hf_vit_model") < 1e-4
  model, params = vit_cls.load("timm/vit_tiny.clip")
  assert max_error(model, params, "timm_clip") < 1e-4
  with pytest.raises(FileNotFoundError, match=r"google/not-there: no such file or directory \(nor a "
                                              r"model id in the local Hugging Face cache"):
    vit_cls.load("google/not-there")


def test_hf_labels_become_label_names(tmp_path):
  shutil.copytree(os.path.join(ZOO, "hf_vit_classifier"), tmp_path / "m")
  config = json.loads((tmp_path / "m" / "config.json").read_text())
  config["id2label"] = {str(i): f"class{i}" for i in range(5)}
  (tmp_path / "m" / "config.json").write_text(json.dumps(config))
  assert ck.load_with_info(tmp_path / "m").label_names == [f"class{i}" for i in range(5)]
  assert ck.load_with_info(os.path.join(ZOO, "hf_vit_classifier")).label_names is None  # LABEL_i


def test_safetensors_round_trip_is_exact(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
             "c": rng.normal(size=(2,)).astype(np.float16), "empty": np.zeros((0, 3), np.float32)}
  st.write(tmp_path / "t.safetensors", tensors, {"format": "pt"})
  back, meta = st.read(tmp_path / "t.safetensors")
  assert meta == {"format": "pt"} and set(back) == set(tensors)
  for k in tensors:
    assert back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k])
  with open(tmp_path / "t.safetensors", "rb") as f:
    assert (8 + int.from_bytes(f.read(8), "little")) % 8 == 0


def test_bfloat16_tensors_widen_exactly(tmp_path):
  values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)  # exactly representable in bfloat16
  raw = (values.view(np.uint32) >> 16).astype(np.uint16)
  header = json.dumps({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}).encode()
  (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw.tobytes())
  back, _ = st.read(tmp_path / "bf16.safetensors")
  assert back["w"].dtype == np.float32 and np.array_equal(back["w"], values)


def test_predict_applies_the_imported_preprocessing(tmp_path):
  """CLIP's mean/std and 0.95 crop, HF's plain resize with 0.5/0.5: what each library's eval does."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_cls import predict  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "img.png")
  clip = ck.load_with_info(os.path.join(ZOO, "timm_clip"))
  x = predict.load_image(str(tmp_path / "img.png"), clip.image_size, clip.preprocessing)
  # timm: shorter side to int(16 / 0.95) = 16, bicubic, centre crop 16x16, then CLIP mean/std.
  img = Image.fromarray(pixels).resize((16, 21), Image.BICUBIC).crop((0, 2, 16, 18))
  want = (np.asarray(img, np.float32) / 255 - clip.preprocessing["mean"]) / clip.preprocessing["std"]
  np.testing.assert_allclose(x, want, atol=1e-6)
  hf = ck.load_with_info(os.path.join(ZOO, "hf_vit_classifier"))
  x = predict.load_image(str(tmp_path / "img.png"), hf.image_size, hf.preprocessing)
  want = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.BILINEAR), np.float32) / 127.5 - 1
  np.testing.assert_allclose(x, want, atol=1e-6)
  results = predict.predict(os.path.join(ZOO, "hf_vit_classifier"), [str(tmp_path / "img.png")], k=2)
  assert len(results[0][1]) == 2
