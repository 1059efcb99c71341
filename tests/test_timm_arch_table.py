"""The committed table of timm's ViT architectures (vit_cls/formats/timm_architectures.json) is what
scripts/make_timm_arch_table.py derives from timm's registry.

Without timm (CI, the project's environment) the file is checked for what the script's logic guarantees
(sorted names, its exact rendering, complete entries) and for the facts the import and the fixtures rely
on. With timm importable here, or a side venv's python in $VIT_CLS_TIMM_PYTHON, the script regenerates the
entries of the fixtures' architectures and those the issue names, and they must equal the committed ones.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from vit_cls.formats import timm as timm_format

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "make_timm_arch_table.py")
ZOO = os.path.join(ROOT, "tests", "fixtures", "zoo")
VIT_FIELDS = {"class", "block", "attn", "mlp", "norm", "embed", "num_heads", "act", "norm_eps",
              "global_pool", "pool_include_prefix", "class_token", "no_embed_class", "reg_tokens",
              "pre_norm", "fc_norm", "embed_dim", "depth", "img_size", "patch_size"}
# Published architectures whose heads are not width / 64 (issue 27), with timm's heads.
NOT_WIDTH_OVER_64 = {"vit_base_patch16_gap_224": 16, "vit_giantopt_patch16_siglip_256": 16,
                     "vit_giantopt_patch16_siglip_384": 16, "vit_so400m_patch14_siglip_384": 16,
                     "vit_huge_patch14_224": 16, "vit_giant_patch14_224": 16}


def script():
  spec = importlib.util.spec_from_file_location("make_timm_arch_table", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # imports no torch or timm until a function asks for them
  return module


def fixture_architectures():
  names = set()
  for folder in sorted(os.listdir(ZOO)):
    path = os.path.join(ZOO, folder, "config.json")
    if folder.startswith("timm_") and os.path.isfile(path):
      with open(path) as f:
        names.add(json.load(f)["architecture"])
  return sorted(names)


def test_committed_file_is_the_scripts_rendering_of_its_entries():
  """Sorted names, one entry per line, the script's header: byte for byte what `render` writes."""
  with open(timm_format.ARCHITECTURES_JSON, encoding="utf-8") as f:
    text = f.read()
  table = json.loads(text)
  assert table["generated_by"] == "scripts/make_timm_arch_table.py"
  assert text == script().render(table["architectures"], table["timm_version"])
  names = list(table["architectures"])
  assert names == sorted(names) and len(names) > 200


def test_every_vision_transformer_entry_is_complete():
  for name, entry in timm_format.architectures()["architectures"].items():
    if entry["class"] != "VisionTransformer":
      assert set(entry) == {"class"}, name
      continue
    assert set(entry) == VIT_FIELDS, name
    if entry["block"] == "Block" and entry["attn"] == "Attention":
      assert entry["num_heads"] > 0 and entry["embed_dim"] % entry["num_heads"] == 0, name
      assert entry["norm_eps"] in (1e-6, 1e-5), name
      assert entry["global_pool"] in ("token", "avg", "avgmax", "max", "map", "prr", ""), name


def test_the_fixtures_and_the_published_odd_head_counts_are_in_the_table():
  archs = fixture_architectures()
  assert "vit_base_patch16_gap_224" in archs and "vit_giantopt_patch16_siglip_256" in archs
  for name in archs:
    assert timm_format.architecture(name)["class"] == "VisionTransformer", name
  for name, heads in NOT_WIDTH_OVER_64.items():
    entry = timm_format.architecture(name)
    assert entry["num_heads"] == heads and entry["embed_dim"] // 64 != heads, name
  giantopt = timm_format.architecture("vit_giantopt_patch16_siglip_256")
  assert giantopt["act"] == "gelu_tanh" and giantopt["global_pool"] == "map"
  assert timm_format.architecture("vit_base_patch16_clip_224")["norm_eps"] == 1e-5


def _timm_python():
  if importlib.util.find_spec("timm") is not None:
    return sys.executable
  return os.environ.get("VIT_CLS_TIMM_PYTHON")


@pytest.mark.skipif(not _timm_python(), reason="needs timm (or $VIT_CLS_TIMM_PYTHON: a side venv's python)")
def test_timm_builds_what_the_table_says():
  names = sorted(set(fixture_architectures()) | set(NOT_WIDTH_OVER_64) | {"vit_base_patch16_rpn_224",
                                                                           "vit_medium_patch16_rope_reg1_gap_256"})
  run = subprocess.run([_timm_python(), SCRIPT, "--check", *names], capture_output=True, text=True,
                       timeout=600, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
