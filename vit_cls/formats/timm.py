"""timm `VisionTransformer` state dicts <-> vit_cls parameters: a pure mapping of names and layouts.

Import (`to_vit_cls`) reads the architecture from the tensors: width, patch size and channels from
`patch_embed.proj.weight`, depth from the `blocks.N`, MLP width from `fc1`, class token, registers
(`reg_token`), whether the class token and registers have position rows (timm's `no_embed_class`, from the
number of `pos_embed` rows), LayerScale (`ls1/ls2.gamma`), a LayerNorm before the blocks (`norm_pre`,
CLIP), the final norm before (`norm`) or after (`fc_norm`) pooling, attention pooling (`attn_pool`,
SigLIP), the head. What tensors cannot say comes, in this order, from the caller (`vit_cls.load(path,
num_heads=...)`), from timm's `config.json` (`model_args`, `global_pool`, `pretrained_cfg`: what a model
saved with changed arguments carries), and from the table of timm's ViT architectures
(timm_architectures.json, generated from timm's own registry by scripts/make_timm_arch_table.py) by the
`architecture` name the config gives: the number of heads (a fused `qkv` hides it, and timm's heads are
not always width / 64: `vit_base_patch16_gap_224` has 16 of width 48), the GELU form, the LayerNorm
epsilon, the pooling and whether it reads the class token and registers (`pool_include_prefix`). The hub's
`config.json` for `timm/<name>` has only the name, so the table is what makes those checkpoints load as
timm builds them. An architecture the table does not know (or no config.json at all) loads only with
`num_heads` given; its epsilon and GELU form are then assumed (1e-5 for CLIP towers, else 1e-6; exact
GELU), noted, and warned about by `vit_cls.load` (the meta's `import_assumed`). Architectures whose
modules vit_cls does not build (timm's Eva, relative-position ViTs, parallel or post-norm blocks, SwiGLU,
RMSNorm, QuickGELU, ...) are refused by name with the reason.

Exact rewrites where vit_cls stores the same function differently: the fused `qkv` splits into query/key/
value; q/k/v or output biases that a source lacks (`qkv_bias=False`) become zeros; register position rows
(a timm model with registers but without `no_embed_class`) are added into the registers, which carry no
position rows here. A patch embedding without bias (CLIP) gets a zero bias.

Export (`from_vit_cls`) writes the state dict and a `config.json` that `timm.create_model("local-dir:...")`
or a timm hub upload rebuilds the same model from; refused, with the reason, where timm's ViT has no such
architecture: `last`/`none` pooling, a class token appended last, a `pre_logits` layer, the causal mask,
LayerNorm epsilons other than 1e-6 and 1e-5.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from vit_cls.errors import CheckpointError
from vit_cls.formats import full_config
from vit_cls.formats import torch_layout as tl
from vit_cls.formats.common import flatten, hw, plain, square_grid, unflatten

# The table of timm's ViT architectures, by name: scripts/make_timm_arch_table.py writes it from timm.
ARCHITECTURES_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_architectures.json")
# The module classes (and activations) of a timm VisionTransformer that vit_cls builds.
_BUILT = {"block": "Block", "attn": "Attention", "mlp": "Mlp", "norm": "LayerNorm", "embed": "PatchEmbed"}
_GELUS = {"gelu": False, "gelu_tanh": True}  # timm act_layer -> vit_cls gelu_approximate
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
INCEPTION_MEAN, INCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
_POOLS = {"token": "cls", "avg": "gap", "map": "map"}
EXPECTED = ("timm ViT tensors: patch_embed, cls_token, reg_token, pos_embed, norm_pre, blocks.N.{norm1, "
            "attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}, norm, fc_norm, attn_pool, head")


def is_state_dict(tensors) -> bool:
  return "patch_embed.proj.weight" in tensors and "blocks.0.attn.qkv.weight" in tensors


@functools.lru_cache(maxsize=1)
def architectures() -> dict:
  """The committed table: {"timm_version": ..., "architectures": {name: entry}} (see the script)."""
  with open(ARCHITECTURES_JSON, encoding="utf-8") as f:
    return json.load(f)


def architecture(name: str) -> dict | None:
  """timm's entry for architecture `name` (e.g. "vit_base_patch16_gap_224"), None if the table lacks it."""
  return architectures()["architectures"].get(name) if name else None


def num_heads(given, source: str, unknown: str, hints: dict, notes: list) -> int:
  """The head count given (by the caller, a config or the table), else `num_heads_fallback` (noted),
  else a one-line error.

  Never guessed from the width: timm's heads are not always width / 64, and a wrong guess loads without
  any error and computes different outputs. `unknown` says why nothing gave it.
  """
  if given:
    return int(given)
  if hints.get("num_heads_fallback"):
    notes.append(f"num_heads={hints['num_heads_fallback']} from the model being fine-tuned ({unknown})")
    return int(hints["num_heads_fallback"])
  raise CheckpointError(f"{source}: cannot tell the number of attention heads ({unknown}; the tensors do "
                        f"not show it); give it: vit_cls.load(path, num_heads=N).")


def _refuse_unbuilt(arch: str, entry: dict, act: str | None, source: str) -> None:
  """One line when timm builds `arch` from modules vit_cls does not have (the tensors may still fit)."""
  entry = entry or {"class": "VisionTransformer", **_BUILT}  # not in the table: only the activation known
  if entry["class"] != "VisionTransformer":
    raise CheckpointError(f"{source}: timm architecture '{arch}' is timm's {entry['class']}, not its "
                          f"VisionTransformer; vit_cls imports timm VisionTransformer checkpoints only.")
  for part, built in _BUILT.items():
    if entry.get(part) != built:
      raise CheckpointError(f"{source}: timm architecture '{arch}' is built with {part} "
                            f"{entry.get(part)}; vit_cls builds timm's {built} only.")
  if act in ("quick_gelu", "quickgelu"):
    raise CheckpointError(f"{source}: architecture '{arch}' uses QuickGELU (x * sigmoid(1.702 x)), which "
                          f"vit_cls does not implement; expected exact or tanh GELU.")
  if act is not None and act not in _GELUS:
    raise CheckpointError(f"{source}: architecture '{arch}' uses the activation {act!r}; vit_cls has "
                          f"exact ('gelu') and tanh-approximate ('gelu_tanh') GELU.")


def to_vit_cls(tensors, config: dict | None, *, source: str, hints: dict) -> tuple[dict, dict]:
  """A timm ViT state dict (+ its hub config.json, or None) -> (params, meta) (see `vit_cls.formats`)."""
  config = config or {}
  arch = str(config.get("architecture") or "")
  margs = config.get("model_args") or {}
  pcfg = config.get("pretrained_cfg") or {}
  t = tl.Tensors(tensors, source, "timm")
  notes: list[str] = []
  for name in ("dist_token", "head_dist.weight"):
    if t.has(name):
      raise t.error(name, "a DeiT with a distillation token (two class tokens, two heads); vit_cls "
                          "models have one class token: use a DeiT checkpoint without distillation")
  entry = architecture(arch)
  act = margs.get("act_layer") if isinstance(margs.get("act_layer"), str) else None
  act = act or (entry or {}).get("act") or ("quick_gelu" if "quickgelu" in arch else None)
  _refuse_unbuilt(arch, entry, act, source)

  d, c, ph, pw = t.take("patch_embed.proj.weight", (None, None, None, None)).shape
  flat = {"embedding/kernel": tl.patch_in(t.take("patch_embed.proj.weight"))}
  bias = t.take("patch_embed.proj.bias", (d,), optional=True)
  flat["embedding/bias"] = np.zeros((d,), np.float32) if bias is None else bias
  depth = 0
  while t.has(f"blocks.{depth}.attn.qkv.weight"):
    depth += 1
  table_heads = (entry or {}).get("num_heads")
  if arch and entry is None:
    unknown = (f"timm architecture '{arch}' is not in vit_cls's table of the ViTs of timm "
               f"{architectures()['timm_version']}")
  else:
    unknown = "no config.json names its timm architecture"
  heads = num_heads(hints.get("num_heads") or margs.get("num_heads") or table_heads, source, unknown,
                    hints, notes)
  if table_heads and heads == table_heads and entry["embed_dim"] != d:
    notes.append(f"num_heads={heads} of timm's '{arch}' ({entry['embed_dim']} wide there, {d} here: timm "
                 f"keeps an architecture's heads when only its width is changed)")
  if d % heads:
    raise t.error("patch_embed.proj.weight", f"width {d} is not divisible by num_heads={heads}")
  mlp = t.take("blocks.0.mlp.fc1.weight", (None, d)).shape[0]
  layerscale = t.has("blocks.0.ls1.gamma")

  cls = t.take("cls_token", (1, 1, d), optional=True)
  reg = t.take("reg_token", (1, None, d), optional=True)
  regs = 0 if reg is None else reg.shape[1]
  image_size = hints.get("image_size") or margs.get("img_size") or (pcfg.get("input_size") or [0])[1:]
  pos, class_row, image_size = _split_posemb(t, d, (ph, pw), cls is not None, regs, image_size, notes)
  if cls is not None:
    flat["cls"] = cls
  if reg is not None:
    flat["registers"] = reg if class_row is None or regs == 0 else reg + class_row[:, -regs:]
  if class_row is not None and cls is not None:
    pos = np.concatenate([class_row[:, :1], pos], axis=1)
  flat["Transformer/posembed_input/pos_embedding"] = pos

  pre_norm = t.has("norm_pre.weight")
  if pre_norm:
    tl.norm_in(t, flat, "norm_pre", "Transformer/pre_norm", d)
  missing_bias = []
  for i in range(depth):
    _block(t, flat, i, d, mlp, heads, layerscale, missing_bias)
  if missing_bias:
    notes.append(f"no {' / '.join(sorted(set(missing_bias)))} biases in the source: zeros (exact)")
  fc_norm = t.has("fc_norm.weight")
  tl.norm_in(t, flat, *(("fc_norm", "fc_norm") if fc_norm else ("norm", "Transformer/encoder_norm")), d)

  global_pool = config.get("global_pool") or margs.get("global_pool") or (entry or {}).get("global_pool")
  if global_pool is None:
    global_pool = "map" if t.has("attn_pool.latent") else "token" if cls is not None else "avg"
  pool = _POOLS.get(global_pool)
  if pool is None or (pool == "cls") != (cls is not None):
    raise t.error("cls_token" if cls is not None else "pos_embed",
                  f"timm global_pool={global_pool!r} " + ("with" if cls is not None else "without") +
                  " a class token; vit_cls builds 'token' pooling with a class token, 'avg' and 'map' "
                  "without one")
  include_prefix = margs.get("pool_include_prefix", (entry or {}).get("pool_include_prefix", False))
  if include_prefix and pool != "cls" and (cls is not None or regs):
    raise CheckpointError(f"{source}: timm pool_include_prefix=True ('{arch}'): its {global_pool} pooling "
                          f"reads the class token and registers too; vit_cls pools the patch tokens only.")
  if pool == "map":
    _map_head(t, flat, d, mlp, heads)
  if t.has("head.weight"):
    w = t.take("head.weight", (None, d))
    flat["head/kernel"], flat["head/bias"] = tl.linear_in(w), t.take("head.bias", (w.shape[0],))
  t.finish(EXPECTED)

  assumed: list[str] = []
  eps = hints.get("layernorm_epsilon") or (entry or {}).get("norm_eps")
  if eps is None:
    eps = 1e-5 if ("clip" in arch if arch else pre_norm) else 1e-6
    assumed.append(f"layernorm_epsilon={eps:g} assumed (" + (f"'{arch}' is not in the table" if arch else
                   "no config.json") + ("; CLIP towers use 1e-5" if eps == 1e-5 else "; timm's default") + ")")
  approximate = hints.get("gelu_approximate")
  if approximate is None:
    approximate = _GELUS.get(act, False)
    if act is None:
      assumed.append("exact (erf) GELU assumed (" + (f"'{arch}' is not in the table" if arch else
                     "no config.json") + "; give gelu_approximate=True for a tanh-GELU model)")
  model = dict(
      num_classes=int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else 0,
      patch_size=[int(ph), int(pw)], hidden_size=int(d), mlp_dim=int(mlp), num_heads=int(heads),
      num_layers=depth, pool=pool, representation_size=None, num_registers=int(regs),
      class_token_position="first", gelu_approximate=bool(approximate), layernorm_epsilon=float(eps),
      class_token_posemb=cls is None or class_row is not None, layerscale=layerscale,
      pre_norm=pre_norm, fc_norm=fc_norm, dtype="float32", image_size=image_size)
  labels = config.get("label_names")
  labels = list(labels.values()) if isinstance(labels, dict) else labels
  if labels is not None and len(labels) != model["num_classes"]:
    labels = None
  return unflatten(flat), {"model": model, "image_size": image_size, "label_names": labels, "format": "timm",
                           "preprocessing": preprocessing(arch, pcfg, model),
                           "import_notes": notes + assumed, "import_assumed": assumed}


def _split_posemb(t, d, patch, has_cls, regs, image_size, notes):
  """(patch rows, class/register rows or None, image size) of `pos_embed`, whichever layout it has."""
  pe = t.take("pos_embed", (1, None, d))
  rows, prefix = pe.shape[1], int(has_cls) + regs
  if image_size:
    h, w = hw(image_size)
    grid = (h // patch[0]) * (w // patch[1])
    if rows not in (grid, grid + prefix) or grid == 0:
      raise t.error("pos_embed", f"expected {grid} patch rows (image {h}x{w}, patch "
                                 f"{patch[0]}x{patch[1]})" + (f" or {grid + prefix} with the class "
                                                              f"token and register rows" if prefix else ""))
    with_prefix = rows != grid
  else:
    g = square_grid(rows - prefix) if prefix else None
    with_prefix = g is not None and square_grid(rows) is None
    g = g if with_prefix else square_grid(rows)
    if g is None:
      raise t.error("pos_embed", "its rows are not a square patch grid; give the image size: "
                                 "vit_cls.load(path, image_size=(height, width))")
    h, w = g * patch[0], g * patch[1]
  if with_prefix and regs:
    notes.append(f"the position rows of the {regs} registers were added into the registers (exact)")
  image_size = h if h == w else [h, w]
  return (pe[:, prefix:], pe[:, :prefix], image_size) if with_prefix else (pe, None, image_size)


def _block(t, flat, i, d, mlp, heads, layerscale, missing_bias):
  src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
  att = dst + "MultiHeadDotProductAttention_0/"
  tl.norm_in(t, flat, src + "norm1", dst + "LayerNorm_0", d)
  tl.norm_in(t, flat, src + "norm2", dst + "LayerNorm_1", d)
  qkv_w = t.take(src + "attn.qkv.weight", (3 * d, d))
  qkv_b = t.take(src + "attn.qkv.bias", (3 * d,), optional=True)
  if qkv_b is None:
    missing_bias.append("q/k/v")
  for j, name in enumerate(("query", "key", "value")):
    b = None if qkv_b is None else qkv_b[j * d:(j + 1) * d]
    flat[att + name + "/kernel"], flat[att + name + "/bias"] = tl.heads_in(qkv_w[j * d:(j + 1) * d], b,
                                                                          heads)
  flat[att + "out/kernel"] = tl.heads_out(t.take(src + "attn.proj.weight", (d, d)), heads)
  proj_b = t.take(src + "attn.proj.bias", (d,), optional=True)
  if proj_b is None:
    missing_bias.append("attention output")
  flat[att + "out/bias"] = np.zeros((d,), np.float32) if proj_b is None else proj_b
  tl.dense_in(t, flat, src + "mlp.fc1", dst + "MlpBlock_0/Dense_0", d, mlp)
  tl.dense_in(t, flat, src + "mlp.fc2", dst + "MlpBlock_0/Dense_1", mlp, d)
  if layerscale:
    flat[dst + "LayerScale_0/scale"] = t.take(src + "ls1.gamma", (d,))
    flat[dst + "LayerScale_1/scale"] = t.take(src + "ls2.gamma", (d,))


def _map_head(t, flat, d, mlp, heads):
  dst = "MAPHead_0/"
  flat[dst + "probe"] = t.take("attn_pool.latent", (1, 1, d))
  q_b = t.take("attn_pool.q.bias", (d,))
  flat[dst + "query/kernel"], flat[dst + "query/bias"] = tl.heads_in(
      t.take("attn_pool.q.weight", (d, d)), q_b, heads)
  kv_w, kv_b = t.take("attn_pool.kv.weight", (2 * d, d)), t.take("attn_pool.kv.bias", (2 * d,))
  for j, name in enumerate(("key", "value")):
    flat[dst + name + "/kernel"], flat[dst + name + "/bias"] = tl.heads_in(
        kv_w[j * d:(j + 1) * d], kv_b[j * d:(j + 1) * d], heads)
  flat[dst + "out/kernel"] = tl.heads_out(t.take("attn_pool.proj.weight", (d, d)), heads)
  flat[dst + "out/bias"] = t.take("attn_pool.proj.bias", (d,))
  tl.norm_in(t, flat, "attn_pool.norm", dst + "LayerNorm_0", d)
  tl.dense_in(t, flat, "attn_pool.mlp.fc1", dst + "MlpBlock_0/Dense_0", d, mlp)
  tl.dense_in(t, flat, "attn_pool.mlp.fc2", dst + "MlpBlock_0/Dense_1", mlp, d)


def preprocessing(arch: str, pcfg: dict, model: dict) -> dict:
  """Mean/std/crop from timm's pretrained_cfg; else the defaults of the family (timm's `_cfg`s)."""
  if "clip" in arch or (not arch and model["pre_norm"]):
    mean, std, crop, family = CLIP_MEAN, CLIP_STD, 0.9, "CLIP"
  elif "dinov2" in arch or "deit" in arch:
    mean, std, crop, family = IMAGENET_MEAN, IMAGENET_STD, 1.0 if "dinov2" in arch else 0.875, arch
  else:
    mean, std, crop, family = INCEPTION_MEAN, INCEPTION_STD, 0.9, "timm ViT"
  out = {"mean": list(pcfg.get("mean") or mean), "std": list(pcfg.get("std") or std),
         "interpolation": pcfg.get("interpolation") or "bicubic",
         "crop_pct": pcfg.get("crop_pct") or crop,
         "source": "config.json pretrained_cfg" if pcfg else f"defaults of {family} in timm"}
  if pcfg.get("crop_mode") == "squash":
    out["crop_pct"] = None
  return out


# ----------------------------------------------------------------------------------------------------
# Export


def from_vit_cls(params, config, preprocessing_cfg: dict | None = None):
  """vit_cls params + model config (dict with image_size, or the module) -> (state dict, config.json).

  Raises a one-line CheckpointError for an architecture timm's VisionTransformer cannot express.
  """
  cfg = full_config(config)
  p = {k: np.asarray(v, np.float32) for k, v in flatten(plain(dict(params))).items()}
  _check_exportable(cfg)
  d, m, heads = cfg["hidden_size"], cfg["mlp_dim"], cfg["num_heads"]
  has_cls, regs = cfg["pool"] == "cls", cfg["num_registers"]
  out = {"patch_embed.proj.weight": tl.patch_out(p["embedding/kernel"])}
  pos = p["Transformer/posembed_input/pos_embedding"]
  class_rows = 1 if has_cls and cfg["class_token_posemb"] else 0
  patches = pos[:, class_rows:]
  if cfg["pre_norm"]:  # timm's pre-norm ViTs have no patch-embedding bias: it moves into the rows
    patches = patches + p["embedding/bias"]
  else:
    out["patch_embed.proj.bias"] = p["embedding/bias"]
  no_embed_class = (has_cls and not class_rows) or (not has_cls and regs > 0)
  if no_embed_class:
    out["pos_embed"] = patches
  else:  # a class row, and a zero row for each register (they carry no position here)
    out["pos_embed"] = np.concatenate([pos[:, :class_rows], np.zeros((1, regs, d), np.float32),
                                       patches], axis=1)
  if has_cls:
    out["cls_token"] = p["cls"]
  if regs:
    out["reg_token"] = p["registers"]
  if cfg["pre_norm"]:
    tl.norm_out(p, out, "Transformer/pre_norm", "norm_pre")
  for i in range(cfg["num_layers"]):
    src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    att = src + "MultiHeadDotProductAttention_0/"
    tl.norm_out(p, out, src + "LayerNorm_0", dst + "norm1")
    tl.norm_out(p, out, src + "LayerNorm_1", dst + "norm2")
    qkv = [tl.heads_in_out(p[att + n + "/kernel"], p[att + n + "/bias"]) for n in ("query", "key", "value")]
    out[dst + "attn.qkv.weight"] = np.concatenate([w for w, _ in qkv], axis=0)
    out[dst + "attn.qkv.bias"] = np.concatenate([b for _, b in qkv], axis=0)
    out[dst + "attn.proj.weight"] = tl.heads_out_out(p[att + "out/kernel"])
    out[dst + "attn.proj.bias"] = p[att + "out/bias"]
    tl.dense_out(p, out, src + "MlpBlock_0/Dense_0", dst + "mlp.fc1")
    tl.dense_out(p, out, src + "MlpBlock_0/Dense_1", dst + "mlp.fc2")
    if cfg["layerscale"]:
      out[dst + "ls1.gamma"] = p[src + "LayerScale_0/scale"]
      out[dst + "ls2.gamma"] = p[src + "LayerScale_1/scale"]
  tl.norm_out(p, out, "fc_norm" if cfg["fc_norm"] else "Transformer/encoder_norm",
            "fc_norm" if cfg["fc_norm"] else "norm")
  if cfg["pool"] == "map":
    src = "MAPHead_0/"
    out["attn_pool.latent"] = p[src + "probe"]
    out["attn_pool.q.weight"], out["attn_pool.q.bias"] = tl.heads_in_out(p[src + "query/kernel"],
                                                                          p[src + "query/bias"])
    kv = [tl.heads_in_out(p[src + n + "/kernel"], p[src + n + "/bias"]) for n in ("key", "value")]
    out["attn_pool.kv.weight"] = np.concatenate([w for w, _ in kv], axis=0)
    out["attn_pool.kv.bias"] = np.concatenate([b for _, b in kv], axis=0)
    out["attn_pool.proj.weight"] = tl.heads_out_out(p[src + "out/kernel"])
    out["attn_pool.proj.bias"] = p[src + "out/bias"]
    tl.norm_out(p, out, src + "LayerNorm_0", "attn_pool.norm")
    tl.dense_out(p, out, src + "MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
    tl.dense_out(p, out, src + "MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
  if cfg["num_classes"]:
    tl.dense_out(p, out, "head", "head")

  h, w = hw(cfg["image_size"])
  pool = {"cls": "token", "gap": "avg", "map": "map"}[cfg["pool"]]
  model_args = dict(
      img_size=[h, w], patch_size=list(cfg["patch_size"]), embed_dim=d, depth=cfg["num_layers"],
      num_heads=heads, mlp_ratio=m / d, num_classes=cfg["num_classes"], global_pool=pool,
      class_token=has_cls, no_embed_class=bool(no_embed_class), reg_tokens=regs,
      pre_norm=cfg["pre_norm"], fc_norm=cfg["fc_norm"], qkv_bias=True,
      act_layer="gelu_tanh" if cfg["gelu_approximate"] else "gelu")
  if cfg["layerscale"]:
    model_args["init_values"] = 1e-5  # any value: it only switches LayerScale on; gamma is loaded
  pp = preprocessing_cfg or {}
  pretrained_cfg = {
      "input_size": [3, h, w], "num_classes": cfg["num_classes"], "fixed_input_size": True,
      "mean": list(pp.get("mean") or INCEPTION_MEAN), "std": list(pp.get("std") or INCEPTION_STD),
      "interpolation": pp.get("interpolation") or "bilinear",
      "crop_pct": pp.get("crop_pct") or 1.0, "crop_mode": "center" if pp.get("crop_pct") else "squash",
      "first_conv": "patch_embed.proj", "classifier": "head"}
  timm_config = {
      # The architecture names only the LayerNorm (timm's CLIP towers are its eps-1e-5 ViTs); model_args
      # override everything else.
      "architecture": "vit_base_patch16_clip_224" if cfg["layernorm_epsilon"] == 1e-5
                      else "vit_base_patch16_224",
      "num_classes": cfg["num_classes"], "num_features": d, "global_pool": pool,
      "model_args": model_args, "pretrained_cfg": pretrained_cfg}
  return out, timm_config


def _check_exportable(cfg: dict) -> None:
  def refuse(what):
    raise CheckpointError(f"cannot export to timm: {what}; timm's VisionTransformer has no such "
                          f"architecture (the npz export keeps it).")
  if cfg["pool"] not in ("cls", "gap", "map"):
    refuse(f"pool={cfg['pool']!r} (timm pools with the class token, the average, or attention)")
  if cfg["pool"] == "cls" and cfg["class_token_position"] != "first":
    refuse("class_token_position='last'")
  if cfg["representation_size"] is not None:
    refuse(f"a pre_logits layer (representation_size={cfg['representation_size']})")
  if cfg.get("causal"):
    refuse("causal=True")
  if cfg["layernorm_epsilon"] not in (1e-6, 1e-5):
    refuse(f"layernorm_epsilon={cfg['layernorm_epsilon']:g} (timm builds 1e-6, and 1e-5 for CLIP)")
  d, m = cfg["hidden_size"], cfg["mlp_dim"]
  if int(d * (m / d)) != m:
    refuse(f"mlp_dim={m} is not int(hidden_size * mlp_ratio) for any float mlp_ratio")
  if cfg["image_size"] is None:
    raise CheckpointError("cannot export to timm without the image size: pass image_size.")
