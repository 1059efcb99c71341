"""Writes vit_cls/formats/timm_architectures.json: what timm builds for each of its ViT architecture names.

Why: a timm checkpoint's tensors do not show everything its architecture is. The fused `qkv` hides the
number of heads (`vit_base_patch16_gap_224` is 768 wide with 16 heads, not 768 / 64 = 12), and nothing in
the tensors says the GELU form, the LayerNorm epsilon, the pooling (`avg` / `avgmax` / `max`), whether the
pooling reads the class token and registers (`pool_include_prefix`), or that a block is not timm's plain
pre-norm `Block`. The `config.json` the hub serves for `timm/<name>` names the architecture but carries no
`model_args`, so the import (vit_cls/formats/timm.py) looks these up by name in this table.

The table is derived from timm's own registry, never written by hand: every model name of
`timm.list_models('vit_*')` and of the `vision_transformer` and `deit` modules is built with
`pretrained=False` on the meta device (no memory, no weights) and the built modules are read: heads from
the attention module, the activation's class, the norm's class and epsilon, pooling and token flags from
the model's attributes. A model that is not timm's `VisionTransformer` (Eva, the relative-position ViTs,
distilled DeiTs) is listed with its class only, so the import can refuse it by name.

Run it beside torch + timm (see scripts/make_zoo_fixtures.py for the side venv), never in the project's
environment:

    /work/venvs/zoo/bin/python scripts/make_timm_arch_table.py            # rewrite the table (minutes)
    /work/venvs/zoo/bin/python scripts/make_timm_arch_table.py --check    # compare with the committed copy
    /work/venvs/zoo/bin/python scripts/make_timm_arch_table.py --check vit_base_patch16_gap_224 ...

`--check NAME ...` regenerates only those entries (seconds) and compares them; tests/test_timm_arch_table.py
runs that when timm is importable, or through $VIT_CLS_TIMM_PYTHON (a side venv's python).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "vit_cls", "formats", "timm_architectures.json")
# The module names whose models are all ViT-like; `vit_*` adds those defined elsewhere (relpos, hybrids).
MODULES = ("vision_transformer", "deit")


def import_timm():
  """torch + timm, with the torchvision operator workaround of benchmarks/timm_benchmark.py."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from timm_benchmark import _import_timm  # pylint: disable=g-import-not-at-top
  return _import_timm()


def architecture_names(timm) -> list[str]:
  names = set(timm.list_models("vit_*"))
  for module in MODULES:
    names |= set(timm.list_models(module=module))
  return sorted(names)


def activation_name(act) -> str:
  """timm's name for the MLP activation: 'gelu' (exact erf), 'gelu_tanh', 'quick_gelu', ..."""
  kind = type(act).__name__
  if kind == "GELU":  # torch.nn.GELU, or timm's GELU (a subclass-free re-statement): read the form
    return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
  return {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu"}.get(kind, kind)


def describe(model, torch) -> dict:
  """The table entry of one built timm model: what its tensors cannot show, plus sizes for reference."""
  if type(model).__name__ != "VisionTransformer":
    return {"class": type(model).__name__}
  identity = torch.nn.Identity
  block = model.blocks[0]
  attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
  norm = getattr(block, "norm1", None)
  patch = model.patch_embed.patch_size if hasattr(model.patch_embed, "patch_size") else None
  img = getattr(model.patch_embed, "img_size", None)
  return {
      "class": "VisionTransformer",
      # Module classes: vit_cls builds timm's Block / Attention / Mlp / LayerNorm / PatchEmbed only.
      "block": type(block).__name__,
      "attn": type(attn).__name__ if attn is not None else None,
      "mlp": type(mlp).__name__ if mlp is not None else None,
      "norm": type(norm).__name__ if norm is not None else None,
      "embed": type(model.patch_embed).__name__,
      # What the tensors cannot show.
      "num_heads": int(attn.num_heads) if hasattr(attn, "num_heads") else None,
      "act": activation_name(getattr(mlp, "act", None)) if mlp is not None else None,
      "norm_eps": float(norm.eps) if hasattr(norm, "eps") else None,
      "global_pool": model.global_pool,
      "pool_include_prefix": bool(model.pool_include_prefix),
      # What the tensors show too (checked against them where they are ambiguous, e.g. pos_embed rows).
      "class_token": bool(model.has_class_token),
      "no_embed_class": bool(model.no_embed_class),
      "reg_tokens": int(model.num_reg_tokens),
      "pre_norm": not isinstance(model.norm_pre, identity),
      "fc_norm": not isinstance(model.fc_norm, identity),
      "embed_dim": int(model.embed_dim),
      "depth": len(model.blocks),
      "img_size": [int(x) for x in img] if img is not None else None,
      "patch_size": [int(x) for x in patch] if patch is not None else None,
  }


def build_entries(names, torch, timm) -> dict:
  entries = {}
  for name in names:
    with torch.device("meta"):  # no memory for the weights, no initialisation work worth the name
      model = timm.create_model(name, pretrained=False)
    entries[name] = describe(model, torch)
  return entries


def render(entries: dict, timm_version: str) -> str:
  """The file's text: sorted names, one entry per line (reviewable diffs), a header naming the source."""
  lines = ["{",
           f'  "generated_by": "scripts/make_timm_arch_table.py",',
           f'  "timm_version": {json.dumps(timm_version)},',
           '  "architectures": {']
  names = sorted(entries)
  for i, name in enumerate(names):
    comma = "," if i < len(names) - 1 else ""
    lines.append(f"    {json.dumps(name)}: {json.dumps(entries[name], sort_keys=True)}{comma}")
  lines += ["  }", "}", ""]
  return "\n".join(lines)


def check(names: list[str], torch, timm) -> int:
  """Regenerates `names` (all when empty) and compares them with the committed table: 0 when equal."""
  with open(TABLE, encoding="utf-8") as f:
    committed = json.load(f)
  problems = []
  if committed["timm_version"] != timm.__version__:
    problems.append(f"the table is of timm {committed['timm_version']}, this is timm {timm.__version__}")
  every = architecture_names(timm)
  if not names:
    names = every
    extra = sorted(set(committed["architectures"]) - set(every))
    if extra:
      problems.append(f"in the table but not in timm: {extra[:5]}")
  fresh = build_entries(names, torch, timm)
  for name in names:
    have = committed["architectures"].get(name)
    if have != fresh[name]:
      problems.append(f"{name}: table {have} != timm {fresh[name]}")
  for p in problems:
    print(p)
  print(f"checked {len(names)} architectures: " + ("DIFFERENT: rerun scripts/make_timm_arch_table.py"
                                                   if problems else "the table is what timm builds"))
  return 1 if problems else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", nargs="*", metavar="NAME",
                      help="compare with the committed table instead of writing it (only NAMEs if given)")
  args = parser.parse_args()
  torch, timm = import_timm()
  if args.check is not None:
    return check(args.check, torch, timm)
  entries = build_entries(architecture_names(timm), torch, timm)
  with open(TABLE, "w", encoding="utf-8") as f:
    f.write(render(entries, timm.__version__))
  print(f"wrote {len(entries)} architectures of timm {timm.__version__} to {os.path.relpath(TABLE, ROOT)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
