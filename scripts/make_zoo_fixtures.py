"""Makes tests/fixtures/zoo: tiny random-init timm and Hugging Face ViTs, written by the real libraries.

The import of timm and Hugging Face checkpoints (vit_cls/formats) is tested in CI without torch against
these files: for every family vit_cls imports, a tiny model (2 blocks, width 24) built by
`timm.create_model(name, pretrained=False, ...)` or by `transformers`, with every parameter set to random
values (LayerNorm scales, biases, layer scales, class token, registers, position embeddings, head: none
left at the library's zero/one defaults, which would hide a transposed or swapped tensor), saved the way
the libraries save for the hub, plus a fixed float32 input (NCHW) and the outputs the library computed.

Run it beside torch + timm + transformers, never in the project's environment (which must not need them):

    python3 -m venv /tmp/zoovenv
    /tmp/zoovenv/bin/pip install torch==2.13.0      # the CPU wheel
    /tmp/zoovenv/bin/pip install numpy safetensors pyyaml huggingface_hub pillow regex tokenizers typer
    /tmp/zoovenv/bin/pip install --no-deps timm torchvision transformers
    /tmp/zoovenv/bin/python scripts/make_zoo_fixtures.py make          # writes tests/fixtures/zoo

Export direction (vit_cls -> timm / Hugging Face), checked with the real loaders:

    for n in timm_augreg timm_clip hf_vit_classifier ...; do          # project env: import each
      python -m vit_cls.formats.export --checkpoint tests/fixtures/zoo/$n --format timm \
          --out /tmp/zoo_exports/$n@timm; done                         # fixture, export it (also hf)
    /tmp/zoovenv/bin/python scripts/make_zoo_fixtures.py check-exports /tmp/zoo_exports

`check-exports` loads every exported folder with `timm.create_model("local-dir:...")` or
`transformers.*.from_pretrained` and compares its outputs on the fixture's input with the fixture's.

Per family the fixture folder holds (names as the libraries write them):
  timm: model.safetensors + config.json (`timm.models.save_for_hf`, what the hub serves for `timm/...`;
        for TIMM_TABLE_FAMILIES without `model_args`, as the hub's configs of pretrained models are)
  hf:   model.safetensors + config.json (`save_pretrained`) + preprocessor_config.json (ViTImageProcessor)
  io.npz: `input` (2, 3, H, W) float32, `output` (what the model returns: logits, or features for a
          model without a head), `pre_logits` (timm: forward_head(pre_logits=True); HF: the final
          LayerNorm's class-token output).
and foreign.json: names and shapes of the state dicts of architectures the import must refuse (ConvNeXt,
Swin, DeiT with a distillation token), from tiny real models; tests write zero-filled files from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "zoo")

# Shared tiny sizes: 16x16 input, 4x4 patches (a 4x4 grid), width 24, 3 heads, 2 blocks, MLP 48. Width 24
# rather than 32 keeps all nine families under half a megabyte; 3 heads of 8 and a non-square MLP make a
# wrongly ordered head axis or a transposed matrix fail by value or by shape.
TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=3, mlp_ratio=2.0)

# name: (timm architecture, overrides). Family flags (qkv_bias, no_embed_class, init_values, fc_norm,
# pre_norm, norm eps, act_layer, global_pool, class_token, reg_tokens) come from the architecture's own
# definition in timm; only sizes are overridden. What timm 1.0.31 sets (vision_transformer.py / deit.py):
#   vit_base_patch16_224             defaults: class token, 'token' pool, qkv_bias, erf GELU, eps 1e-6
#   deit_small_patch16_224           the same ViT class (distilled DeiTs are another class: refused)
#   vit_small_patch14_reg4_dinov2    init_values=1e-5 (LayerScale), reg_tokens=4, no_embed_class=True
#   vit_base_patch16_clip_224        pre_norm=True (norm_pre; the patch embedding has no bias), eps 1e-5
#   vit_base_patch16_siglip_224      class_token=False, global_pool='map' (attn_pool), erf GELU
#   vit_medium_patch16_gap_256       class_token=False, 'avg', qkv_bias=False, init_values=1e-6,
#                                    fc_norm=False (the final norm stays before the pooling)
#   vit_betwixt_patch16_reg4_gap_256 class_token=False, 'avg' (fc_norm by default: norm after pooling),
#                                    init_values=1e-5, reg_tokens=4, no_embed_class=True
TIMM_FAMILIES = {
    "timm_augreg": ("vit_base_patch16_224", dict(num_classes=5)),
    # A non-square input (16x24, a 4x6 patch grid) checks the row-major order of position rows.
    "timm_deit": ("deit_small_patch16_224", dict(num_classes=5, img_size=(16, 24))),
    "timm_dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(num_classes=5, img_size=28,
                                                               patch_size=7)),
    "timm_clip": ("vit_base_patch16_clip_224", dict(num_classes=5)),
    # SigLIP towers on the hub have no head (num_classes=0): the output is the pooled feature.
    "timm_siglip": ("vit_base_patch16_siglip_224", dict(num_classes=0)),
    "timm_gap_medium": ("vit_medium_patch16_gap_256", dict(num_classes=5)),
    "timm_gap_betwixt_reg": ("vit_betwixt_patch16_reg4_gap_256", dict(num_classes=5)),
}
# Architectures whose heads are not width / 64, saved as the hub serves them: config.json names the
# architecture and has no model_args, so only vit_cls's table of timm architectures (by name) gives the
# heads. Width 64 rather than 24: timm keeps the architecture's 16 heads when only the width is changed, and
# 64 / 16 heads of 4 is the smallest such model; width / 64 would say 1 head, which loads but computes
# something else (the tests check both).
#   vit_base_patch16_gap_224          768 wide, 16 heads; class_token=False, 'avg', fc_norm=False
#   vit_giantopt_patch16_siglip_256   1536 wide, 16 heads; 'map' (16-head attention pooling), tanh GELU
TABLE_TINY = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, mlp_ratio=1.0)
TIMM_TABLE_FAMILIES = {
    "timm_gap_base_16heads": ("vit_base_patch16_gap_224", dict(num_classes=5)),
    "timm_siglip_giantopt": ("vit_giantopt_patch16_siglip_256", dict(num_classes=0)),
}
HF_FAMILIES = ("hf_vit_classifier", "hf_vit_model")
# The order seeds follow (new families go last, so the others' values stay as committed).
ALL_FAMILIES = list(TIMM_FAMILIES) + list(HF_FAMILIES) + list(TIMM_TABLE_FAMILIES)
HF_TINY = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48,
               image_size=16, patch_size=4)


def import_timm():
  """torch + timm, with the torchvision operator workaround of benchmarks/timm_benchmark.py."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from timm_benchmark import _import_timm  # pylint: disable=g-import-not-at-top
  return _import_timm()


def randomise(model, torch, seed: int) -> None:
  """Every parameter to random values of a sensible scale; asserts none is left constant.

  Matrices ~ N(0, 1/fan_in) so activations stay O(1) through the blocks; LayerNorm scales 1 + N(0, 0.2)
  and layer scales 0.5 + N(0, 0.2) (both far from their 1 / 1e-5 inits); biases, tokens and position
  embeddings N(0, 0.3).
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      r = torch.randn(p.shape, generator=g, dtype=p.dtype)
      leaf = name.split(".")[-1]
      if leaf == "gamma":
        p.copy_(0.5 + 0.2 * r)
      elif p.ndim == 1 and leaf == "weight":  # a norm's scale
        p.copy_(1.0 + 0.2 * r)
      elif p.ndim >= 2 and leaf == "weight":
        fan_in = math.prod(p.shape[1:])
        p.copy_(r / math.sqrt(fan_in))
      else:
        p.copy_(0.3 * r)
      flat = p.reshape(-1)
      assert flat.numel() < 2 or float(flat.std()) > 0.01, f"{name} is still constant"


def save_io(folder: str, x, output, pre_logits) -> None:
  np.savez(os.path.join(folder, "io.npz"), input=x.numpy().astype(np.float32),
           output=output.numpy().astype(np.float32), pre_logits=pre_logits.numpy().astype(np.float32))


def make_input(torch, shape, seed: int):
  g = torch.Generator().manual_seed(seed)
  return torch.randn(shape, generator=g, dtype=torch.float32)


def make_timm(name: str, seed: int) -> None:
  torch, timm = import_timm()
  hub_style = name in TIMM_TABLE_FAMILIES
  arch, overrides = (TIMM_TABLE_FAMILIES if hub_style else TIMM_FAMILIES)[name]
  kwargs = dict(TABLE_TINY if hub_style else TINY, **overrides)
  model = timm.create_model(arch, pretrained=False, **kwargs).eval()
  if hub_style:  # the point of these fixtures: heads that width / 64 gets wrong
    assert model.blocks[0].attn.num_heads * 64 != kwargs["embed_dim"], arch
  randomise(model, torch, seed)
  folder = os.path.join(OUT, name)
  shutil.rmtree(folder, ignore_errors=True)
  timm.models.save_for_hf(model, folder, safe_serialization=True)
  if hub_style:  # what the hub serves for timm/<name>: the name, no model_args
    with open(os.path.join(folder, "config.json")) as f:
      config = json.load(f)
    config.pop("model_args", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
  h, w = (kwargs["img_size"],) * 2 if isinstance(kwargs["img_size"], int) else kwargs["img_size"]
  x = make_input(torch, (2, 3, h, w), seed + 1)
  with torch.no_grad():
    out = model(x)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
  save_io(folder, x, out, pre)


def make_hf(name: str, seed: int) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.ViTConfig(**HF_TINY, num_labels=5)
  if name == "hf_vit_classifier":
    model = transformers.ViTForImageClassification(config)
  else:  # the in21k checkpoints: ViTModel with its pooler (Dense + tanh), no classifier
    model = transformers.ViTModel(config, add_pooling_layer=True)
  model.eval()
  randomise(model, torch, seed)
  folder = os.path.join(OUT, name)
  shutil.rmtree(folder, ignore_errors=True)
  model.save_pretrained(folder)
  transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
  x = make_input(torch, (2, 3, 16, 16), seed + 1)
  with torch.no_grad():
    if name == "hf_vit_classifier":
      res = model(pixel_values=x, output_hidden_states=True)
      out = res.logits
      # The classifier reads the final LayerNorm's class-token state (the pre-logits).
      pre = model.vit.layernorm(res.hidden_states[-1])[:, 0]
    else:
      res = model(pixel_values=x)
      out, pre = res.pooler_output, res.last_hidden_state[:, 0]
  save_io(folder, x, out, pre)


def foreign_state_dicts() -> None:
  """Names and shapes of tiny real state dicts the import must refuse (no weights: tests fill zeros)."""
  _, timm = import_timm()
  models = {
      "convnext": timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1),
                                    dims=(8, 16, 24, 32), num_classes=5),
      "swin": timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=28,
                                embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=7,
                                num_classes=5),
      "deit_distilled": timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                                          **TINY, num_classes=5),
  }
  out = {k: {n: list(t.shape) for n, t in m.state_dict().items()} for k, m in models.items()}
  with open(os.path.join(OUT, "foreign.json"), "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)


def make(args) -> None:
  os.makedirs(OUT, exist_ok=True)
  names = args.only or ALL_FAMILIES
  for name in names:
    seed = 1000 + 10 * ALL_FAMILIES.index(name)
    (make_hf if name in HF_FAMILIES else make_timm)(name, seed)
    print(f"wrote {name}")
  if not args.only:
    foreign_state_dicts()
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"tests/fixtures/zoo: {total / 1024:.0f} KiB")


def check_exports(args) -> int:
  """Loads each exported folder with the real library and compares outputs with the fixture's."""
  torch, timm = import_timm()
  import transformers  # pylint: disable=g-import-not-at-top
  failures = 0
  for name in sorted(os.listdir(args.dir)):
    folder = os.path.join(args.dir, name)
    fixture = name.split("@")[0]  # "<fixture>@<format>" folders
    io = np.load(os.path.join(OUT, fixture, "io.npz"))
    x = torch.from_numpy(io["input"])
    with open(os.path.join(folder, "config.json")) as f:
      config = json.load(f)
    with torch.no_grad():
      if "architecture" in config:  # timm
        model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
        out = model(x)
      else:
        arch = config["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(folder).eval()
        res = model(pixel_values=x)
        out = res.logits if hasattr(res, "logits") else res.pooler_output
    err = float(np.max(np.abs(out.numpy() - io["output"])))
    ok = err < 1e-4
    failures += not ok
    print(f"{name}: max |output - fixture| = {err:.2e} {'ok' if ok else 'FAILED'}")
  print(f"{failures} failed" if failures else "all exports reproduce the fixtures' outputs")
  return 1 if failures else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("make", help="write tests/fixtures/zoo")
  p.add_argument("--only", nargs="*", help="fixture names (default: all)")
  p = sub.add_parser("check-exports", help="load vit_cls exports with timm / transformers")
  p.add_argument("dir", help="folder of exported '<fixture>@<format>' folders")
  args = parser.parse_args()
  if args.cmd == "make":
    make(args)
    return 0
  return check_exports(args)


if __name__ == "__main__":
  sys.exit(main())
