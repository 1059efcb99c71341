"""Hugging Face Transformers ViT (`model_type: "vit"`) <-> vit_cls parameters: names and layouts.

Both namings of a ViT state dict are read: the one on the hub and in `save_pretrained` folders
(`encoder.layer.N.attention.attention.query`, `intermediate.dense`, `output.dense`, ...) and the one of
Transformers v5's modules (`layers.N.attention.q_proj`, `mlp.fc1`, ...). `ViTForImageClassification`
keys carry a `vit.` prefix and a `classifier`; a `ViTModel` (the `google/vit-*-in21k` checkpoints) has a
`pooler` (Dense + tanh on the class token): that is the original pre-training head, so it becomes
`pre_logits` with no `head` (`num_classes=0`): the model outputs the pooler's features. A classifier's
checkpoint that also carries pooler weights drops them (the classifier never reads them).

The architecture comes from `config.json` (`num_attention_heads`, `layer_norm_eps`, `hidden_act`,
`image_size`; without one, the tensors and HF's defaults: eps 1e-12, exact GELU), the preprocessing from
`preprocessor_config.json` (`image_mean`, `image_std`, `size`, `resample`), else ViTImageProcessor's
defaults (mean = std = 0.5, a plain resize).

Export (`from_vit_cls`) writes what `save_pretrained` writes, for the architectures HF's ViT has: class
token first with its position row, no registers / LayerScale / extra norms / attention pooling, and either
a classifier head or (num_classes=0) the pooler.
"""

from __future__ import annotations

import re

import numpy as np

from vit_cls.errors import CheckpointError
from vit_cls.formats import full_config
from vit_cls.formats import torch_layout as tl
from vit_cls.formats.common import flatten, hw, plain, square_grid, unflatten

# Per block: vit_cls scope -> (hub name, v5 name).
_BLOCK = {
    "LayerNorm_0": ("layernorm_before", "layernorm_before"),
    "LayerNorm_1": ("layernorm_after", "layernorm_after"),
    "query": ("attention.attention.query", "attention.q_proj"),
    "key": ("attention.attention.key", "attention.k_proj"),
    "value": ("attention.attention.value", "attention.v_proj"),
    "out": ("attention.output.dense", "attention.o_proj"),
    "Dense_0": ("intermediate.dense", "mlp.fc1"),
    "Dense_1": ("output.dense", "mlp.fc2"),
}
_TANH_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
EXPECTED = ("Hugging Face ViT tensors: embeddings.{cls_token, position_embeddings, patch_embeddings}, "
            "encoder.layer.N.* (or layers.N.*), layernorm, pooler.dense, classifier")


def is_state_dict(tensors) -> bool:
  return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in tensors)


def to_vit_cls(tensors, config: dict | None, preprocessor: dict | None, *, source: str,
               hints: dict) -> tuple[dict, dict]:
  """A Hugging Face ViT state dict (+ config.json, preprocessor_config.json, or None) -> (params, meta)."""
  config = config or {}
  model_type = config.get("model_type", "vit")
  if model_type != "vit":
    raise CheckpointError(f"{source}: config.json has model_type {model_type!r}; vit_cls imports "
                          f"Hugging Face ViT (model_type 'vit'): for DeiT, DINOv2, CLIP or SigLIP use the "
                          f"timm checkpoint of the same model.")
  arch = (config.get("architectures") or [""])[0]
  prefix = "vit." if "vit.embeddings.patch_embeddings.projection.weight" in tensors else ""
  t = tl.Tensors(tensors, source, "Hugging Face")
  notes: list[str] = []
  emb = prefix + "embeddings."
  d, c, ph, pw = t.take(emb + "patch_embeddings.projection.weight", (None, None, None, None)).shape
  flat = {"embedding/kernel": tl.patch_in(t.take(emb + "patch_embeddings.projection.weight")),
          "embedding/bias": t.take(emb + "patch_embeddings.projection.bias", (d,)),
          "cls": t.take(emb + "cls_token", (1, 1, d))}
  if t.take(emb + "mask_token", (1, 1, d), optional=True) is not None:
    notes.append("dropped embeddings.mask_token (used only for masked-image pre-training)")
  pos = t.take(emb + "position_embeddings", (1, None, d))
  flat["Transformer/posembed_input/pos_embedding"] = pos

  v5 = t.has(prefix + "layers.0.attention.q_proj.weight")
  layer = prefix + ("layers." if v5 else "encoder.layer.")
  depth = 0
  while t.has(f"{layer}{depth}.{_BLOCK['query'][v5]}.weight"):
    depth += 1
  if depth == 0:
    t.take(f"{layer}0.{_BLOCK['query'][v5]}.weight")  # raises: missing
  from vit_cls.formats.timm import num_heads  # pylint: disable=g-import-not-at-top
  heads = hints.get("num_heads") or config.get("num_attention_heads")
  if not heads and config:  # what transformers builds from a config.json without it: ViTConfig's default
    heads = 12
    notes.append("num_heads=12: config.json has no num_attention_heads (ViTConfig's default)")
  heads = num_heads(heads, source, "no config.json beside it", hints, notes)
  mlp = t.take(f"{layer}0.{_BLOCK['Dense_0'][v5]}.weight", (None, d)).shape[0]
  missing_bias = False
  for i in range(depth):
    src, dst = f"{layer}{i}.", f"Transformer/encoderblock_{i}/"
    att = dst + "MultiHeadDotProductAttention_0/"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      tl.norm_in(t, flat, src + _BLOCK[ln][v5], dst + ln, d)
    for name in ("query", "key", "value"):
      b = t.take(f"{src}{_BLOCK[name][v5]}.bias", (d,), optional=True)
      missing_bias |= b is None
      flat[f"{att}{name}/kernel"], flat[f"{att}{name}/bias"] = tl.heads_in(
          t.take(f"{src}{_BLOCK[name][v5]}.weight", (d, d)), b, heads)
    flat[att + "out/kernel"] = tl.heads_out(t.take(f"{src}{_BLOCK['out'][v5]}.weight", (d, d)), heads)
    flat[att + "out/bias"] = t.take(f"{src}{_BLOCK['out'][v5]}.bias", (d,))
    for name, n_in, n_out in (("Dense_0", d, mlp), ("Dense_1", mlp, d)):
      tl.dense_in(t, flat, src + _BLOCK[name][v5], f"{dst}MlpBlock_0/{name}", n_in, n_out)
  if missing_bias:
    notes.append("no q/k/v biases in the source (qkv_bias=False): zeros (exact)")
  tl.norm_in(t, flat, prefix + "layernorm", "Transformer/encoder_norm", d)

  classifier = t.has("classifier.weight") or arch == "ViTForImageClassification"
  representation = None
  if t.has(prefix + "pooler.dense.weight"):
    w = t.take(prefix + "pooler.dense.weight", (None, d))
    b = t.take(prefix + "pooler.dense.bias", (w.shape[0],))
    if classifier:
      notes.append("dropped the pooler (ViTForImageClassification's classifier does not read it)")
    else:
      if config.get("pooler_act", "tanh") != "tanh":
        raise t.error(prefix + "pooler.dense.weight", f"pooler_act {config['pooler_act']!r}; vit_cls's "
                                                      f"pre_logits layer is Dense + tanh")
      flat["pre_logits/kernel"], flat["pre_logits/bias"] = tl.linear_in(w), b
      representation = int(w.shape[0])
  if t.has("classifier.weight"):
    w = t.take("classifier.weight", (None, d))
    flat["head/kernel"], flat["head/bias"] = tl.linear_in(w), t.take("classifier.bias", (w.shape[0],))
  t.finish(EXPECTED)

  image_size = hints.get("image_size") or config.get("image_size")
  grid_rows = pos.shape[1] - 1
  if image_size:
    h, w = hw(image_size)
    if (h // ph) * (w // pw) != grid_rows:
      raise t.error(emb + "position_embeddings", f"expected 1 + {(h // ph) * (w // pw)} rows for image "
                                                 f"size {h}x{w} and patch {ph}x{pw}")
  else:
    g = square_grid(grid_rows)
    if g is None:
      raise t.error(emb + "position_embeddings", "its patch rows are not a square grid; give the image "
                                                 "size: vit_cls.load(path, image_size=(height, width))")
    h, w = g * ph, g * pw
  act = config.get("hidden_act", "gelu")
  if act not in ("gelu",) + _TANH_ACTS and "gelu_approximate" not in hints:
    raise CheckpointError(f"{source}: config.json hidden_act {act!r}; vit_cls has exact ('gelu') and "
                          f"tanh-approximate ({', '.join(_TANH_ACTS)}) GELU.")
  approximate = hints.get("gelu_approximate", act in _TANH_ACTS)
  eps = hints.get("layernorm_epsilon") or config.get("layer_norm_eps") or 1e-12
  given = "layernorm_epsilon" in hints and "gelu_approximate" in hints
  assumed = [] if config or given else ["no config.json: layer_norm_eps=1e-12 and exact GELU assumed "
                                        "(HF ViT's defaults)"]
  model = dict(
      num_classes=int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else 0,
      patch_size=[int(ph), int(pw)], hidden_size=int(d), mlp_dim=int(mlp), num_heads=int(heads),
      num_layers=depth, pool="cls", representation_size=representation, num_registers=0,
      class_token_position="first", gelu_approximate=bool(approximate), layernorm_epsilon=float(eps),
      class_token_posemb=True, layerscale=False, pre_norm=False, fc_norm=False, dtype="float32",
      image_size=h if h == w else [h, w])
  return unflatten(flat), {"model": model, "image_size": model["image_size"], "format": "hf",
                           "label_names": _labels(config, model["num_classes"]),
                           "preprocessing": preprocessing(preprocessor),
                           "import_notes": notes + assumed, "import_assumed": assumed}


def _labels(config: dict, num_classes: int) -> list | None:
  id2label = config.get("id2label") or {}
  try:
    labels = [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(num_classes)]
  except KeyError:
    return None
  if not labels or all(re.fullmatch(r"LABEL_\d+", str(x)) for x in labels):
    return None  # Transformers' placeholders, not names
  return labels


def preprocessing(pp: dict | None) -> dict:
  """ViTImageProcessor's settings: resize to `size` (no crop unless do_center_crop), then mean/std."""
  pp = pp or {}
  out = {"mean": list(pp.get("image_mean") or [0.5, 0.5, 0.5]),
         "std": list(pp.get("image_std") or [0.5, 0.5, 0.5]),
         "interpolation": _RESAMPLE.get(pp.get("resample", 2), "bilinear"), "crop_pct": None,
         "source": "preprocessor_config.json" if pp else "ViTImageProcessor defaults"}
  size, crop = pp.get("size") or {}, pp.get("crop_size") or {}
  if pp.get("do_center_crop") and "shortest_edge" in size and "height" in crop:
    out["crop_pct"] = crop["height"] / size["shortest_edge"]
  return out


# ----------------------------------------------------------------------------------------------------
# Export


def from_vit_cls(params, config, preprocessing_cfg: dict | None = None,
                 label_names: list | None = None):
  """vit_cls params + model config -> (state dict, config.json, preprocessor_config.json), hub naming."""
  cfg = full_config(config)
  _check_exportable(cfg)
  p = {k: np.asarray(v, np.float32) for k, v in flatten(plain(dict(params))).items()}
  classifier = cfg["num_classes"] > 0
  prefix = "vit." if classifier else ""
  emb = prefix + "embeddings."
  out = {emb + "cls_token": p["cls"], emb + "position_embeddings": p["Transformer/posembed_input/pos_embedding"],
         emb + "patch_embeddings.projection.weight": tl.patch_out(p["embedding/kernel"]),
         emb + "patch_embeddings.projection.bias": p["embedding/bias"]}
  for i in range(cfg["num_layers"]):
    src, dst = f"Transformer/encoderblock_{i}/", f"{prefix}encoder.layer.{i}."
    att = src + "MultiHeadDotProductAttention_0/"
    for ln in ("LayerNorm_0", "LayerNorm_1"):
      tl.norm_out(p, out, src + ln, dst + _BLOCK[ln][0])
    for name in ("query", "key", "value"):
      w, b = tl.heads_in_out(p[f"{att}{name}/kernel"], p[f"{att}{name}/bias"])
      out[f"{dst}{_BLOCK[name][0]}.weight"], out[f"{dst}{_BLOCK[name][0]}.bias"] = w, b
    out[f"{dst}{_BLOCK['out'][0]}.weight"] = tl.heads_out_out(p[att + "out/kernel"])
    out[f"{dst}{_BLOCK['out'][0]}.bias"] = p[att + "out/bias"]
    for name in ("Dense_0", "Dense_1"):
      tl.dense_out(p, out, f"{src}MlpBlock_0/{name}", dst + _BLOCK[name][0])
  tl.norm_out(p, out, "Transformer/encoder_norm", prefix + "layernorm")
  tl.dense_out(p, out, *(("head", "classifier") if classifier else ("pre_logits", "pooler.dense")))
  h, w = hw(cfg["image_size"])
  ph, pw = cfg["patch_size"]
  labels = list(label_names or [f"LABEL_{i}" for i in range(max(cfg["num_classes"], 2))])
  hf_config = {
      "architectures": ["ViTForImageClassification" if classifier else "ViTModel"], "model_type": "vit",
      "hidden_size": cfg["hidden_size"], "num_hidden_layers": cfg["num_layers"],
      "num_attention_heads": cfg["num_heads"], "intermediate_size": cfg["mlp_dim"],
      "hidden_act": "gelu_pytorch_tanh" if cfg["gelu_approximate"] else "gelu",
      "layer_norm_eps": cfg["layernorm_epsilon"], "image_size": h if h == w else [h, w],
      "patch_size": ph if ph == pw else [ph, pw], "num_channels": int(p["embedding/kernel"].shape[2]),
      "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02, "encoder_stride": ph, "pooler_act": "tanh",
      "pooler_output_size": cfg["representation_size"] or cfg["hidden_size"],
      "id2label": {str(i): str(n) for i, n in enumerate(labels)},
      "label2id": {str(n): i for i, n in enumerate(labels)}}
  pp = preprocessing_cfg or {}
  preprocessor = {
      "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
      "rescale_factor": 1 / 255, "do_normalize": True, "size": {"height": h, "width": w},
      "resample": {v: k for k, v in _RESAMPLE.items()}.get(pp.get("interpolation"), 2),
      "image_mean": list(pp.get("mean") or [0.5] * 3), "image_std": list(pp.get("std") or [0.5] * 3)}
  return out, hf_config, preprocessor


def _check_exportable(cfg: dict) -> None:
  problems = [what for what, bad in (
      (f"pool={cfg['pool']!r} (HF ViT reads the class token)", cfg["pool"] != "cls"),
      ("class_token_position='last'", cfg["class_token_position"] != "first"),
      ("a class token without a position row", not cfg["class_token_posemb"]),
      ("registers", cfg["num_registers"]), ("LayerScale", cfg["layerscale"]),
      ("pre_norm", cfg["pre_norm"]), ("fc_norm", cfg["fc_norm"]), ("causal=True", cfg.get("causal")),
      ("a pre_logits layer and a head (HF's ViTModel pooler has no classifier after it)",
       cfg["representation_size"] is not None and cfg["num_classes"]),
      ("neither a head nor a pre_logits layer (export a features model to timm)",
       cfg["representation_size"] is None and not cfg["num_classes"]),
      ("no image size", cfg["image_size"] is None)) if bad]
  if problems:
    raise CheckpointError(f"cannot export to Hugging Face ViT: {problems[0]}; HF's ViT has no such "
                          f"architecture (the timm or npz export may).")
