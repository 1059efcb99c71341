"""A trained checkpoint -> the initial params of a fine-tuning run (a new head, a new resolution).

Fine-tuning keeps the whole encoder and changes only what the new task changes (docs/ARCHITECTURE.md):

* `head`: the target's fresh zero-initialised head whenever the source head cannot serve (another number
  of classes, another input width), the source head otherwise (or always fresh with `reset_head`);
* `pre_logits`: dropped when the target has none (the fine-tuning head is `head` alone);
* the position embeddings: the patch rows are resized, bilinearly with corner alignment, to the new
  patch grid; the class token's row is kept aside and put back (or dropped / taken from the target when
  only one side has a class token);
* everything else must match in shape exactly; a mismatch is an error that names the parameter and both
  shapes, because it means the checkpoint is another architecture.

As a command it writes the converted params as a published-format `.npz`:

  python -m vit_cls.convert --checkpoint SRC --out DST.npz --num_classes 10 --image_size 384

`--patch_size 16` (training: `config.init_patch_size`) changes the patch size, FlexiViT's way: the patch
embedding is resampled by `resample_patch_embedding` and the position embeddings resized as above to the
new grid (e.g. a DINOv2 /14 checkpoint fine-tuned as /16).

Training's `config.init_from` goes through `init_from_checkpoint`; it and `convert_checkpoint` take a path
or a `CheckpointSource` (`vit_cls.checkpoint.open_source`). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Mapping, Sequence

import numpy as np

from vit_cls import checkpoint as ckpt_lib

POSEMB = "Transformer/posembed_input/pos_embedding"
# Top-level modules that belong to the task or the pooling rather than to the encoder: when the source
# cannot provide them (absent, or shaped for another task) the target's fresh values are used.
_REPLACEABLE = ("head", "pre_logits", "cls", "registers", "MAPHead_0")


# ----------------------------------------------------------------------------------------------------
# Position embeddings


def _resize_axis(x: np.ndarray, new: int, axis: int) -> np.ndarray:
  """Linear interpolation along one axis with corner alignment: output end points = input end points.

  The same sampling as `scipy.ndimage.zoom(order=1)` (output index i reads input position
  i * (old - 1) / (new - 1)), written out so the output size is exactly `new` (zoom rounds
  old * factor) and a size-1 axis needs no special case in the caller.
  """
  old = x.shape[axis]
  if new == old:
    return x
  pos = np.linspace(0.0, old - 1, new) if new > 1 else np.zeros((1,))
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, old - 1)
  frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis=axis) * (1.0 - frac) + np.take(x, hi, axis=axis) * frac


def _as_grid(grid, what: str) -> tuple[int, int]:
  if isinstance(grid, (int, np.integer)):
    return int(grid), int(grid)
  h, w = grid
  if int(h) < 1 or int(w) < 1:
    raise ValueError(f"{what} must be positive, got {tuple(grid)}.")
  return int(h), int(w)


def _square_grid(n: int, what: str) -> tuple[int, int]:
  g = ckpt_lib.square_grid(n)
  if g is None:
    raise ValueError(f"{what}: {n} position-embedding rows are not a square grid; give the grid "
                     f"(or the image size) explicitly.")
  return g, g


def resize_posemb(posemb, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                  num_prefix_tokens: int = 1, num_suffix_tokens: int = 0) -> np.ndarray:
  """Resizes position embeddings (1, tokens, D) or (tokens, D) to a new (h, w) patch grid.

  The first `num_prefix_tokens` rows (the class token's) and last `num_suffix_tokens` rows are returned
  untouched; the rows in between are the patch grid in row-major order, `old_grid` (square when not
  given). The grid is resized bilinearly, corners aligned, one axis after the other, in float64, and
  cast back. Unchanged grids come back unchanged.
  """
  posemb = np.asarray(posemb)
  squeeze = posemb.ndim == 2
  if squeeze:
    posemb = posemb[None]
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f"position embeddings must be (1, tokens, D) or (tokens, D), got {posemb.shape}.")
  n, d = posemb.shape[1], posemb.shape[2]
  p, s = int(num_prefix_tokens), int(num_suffix_tokens)
  if p < 0 or s < 0 or p + s > n:
    raise ValueError(f"{p} prefix + {s} suffix tokens do not fit {n} position-embedding rows.")
  prefix, grid, suffix = posemb[:, :p], posemb[:, p:n - s], posemb[:, n - s:]
  m = grid.shape[1]
  oh, ow = _as_grid(old_grid, "old_grid") if old_grid is not None else _square_grid(m, "old grid")
  if oh * ow != m:
    raise ValueError(f"old_grid {oh}x{ow} needs {oh * ow} patch rows, the position embedding has {m}.")
  nh, nw = _as_grid(new_grid, "new_grid")
  if (nh, nw) != (oh, ow):
    g = grid.reshape(oh, ow, d).astype(np.float64)
    g = _resize_axis(_resize_axis(g, nh, 0), nw, 1)
    grid = g.reshape(1, nh * nw, d).astype(posemb.dtype)
  out = np.concatenate([prefix, grid, suffix], axis=1)
  return out[0] if squeeze else out


# ----------------------------------------------------------------------------------------------------
# Patch size (FlexiViT)


def _resize_matrix(old_hw: tuple[int, int], new_hw: tuple[int, int]) -> np.ndarray:
  """The linear map of a bilinear image resize old_hw -> new_hw, as a (new_h*new_w, old_h*old_w) matrix
  (jax.image.resize without antialiasing, as big_vision's FlexiViT uses for its patches)."""
  import jax  # pylint: disable=g-import-not-at-top
  n = old_hw[0] * old_hw[1]
  basis = np.eye(n, dtype=np.float32).reshape((n,) + tuple(old_hw))
  resized = jax.vmap(lambda b: jax.image.resize(b, tuple(new_hw), "bilinear", antialias=False))(basis)
  return np.asarray(resized, np.float64).reshape(n, -1).T


def resample_patch_embedding(kernel, new_hw) -> np.ndarray:
  """A (ph, pw, C, D) patch-embedding kernel resampled to patches of `new_hw`, FlexiViT's way.

  FlexiViT (Beyer et al., CVPR 2023; big_vision's `resample_patchemb`): with B the bilinear resize of
  a patch, the new kernel is `pinv(B^T) w`, the solution that keeps the token of every resized patch
  equal to the old token of the patch: <B x, pinv(B^T) w> = <x, w> whenever B has full column rank,
  i.e. when the patch grows. Shrinking it is the least-squares best, not exact. A plain resize of the
  kernel would change the tokens' scale with the patch area and break the pretrained function.
  """
  k = np.asarray(kernel)
  old_hw, new_hw = tuple(k.shape[:2]), tuple(int(x) for x in new_hw)
  if old_hw == new_hw:
    return k
  pinv = np.linalg.pinv(_resize_matrix(old_hw, new_hw).T)  # (new_n, old_n)
  flat = k.reshape(old_hw[0] * old_hw[1], -1).astype(np.float64)
  return (pinv @ flat).reshape(new_hw + k.shape[2:]).astype(k.dtype)


# ----------------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass
class ConversionReport:
  """What happened to each parameter; `str(report)` is the text the command prints."""

  kept: list[str] = dataclasses.field(default_factory=list)
  dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why)
  reinitialised: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why)
  resized: list[tuple[str, tuple, tuple, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)  # about the source (an imported file)

  def to_text(self, verbose: bool = False) -> str:
    lines = [f"kept {len(self.kept)} parameters from the checkpoint"
             + (":" if verbose and self.kept else "")]
    if verbose:
      lines += [f"  {p}" for p in self.kept]
    for title, rows in (("dropped", self.dropped), ("re-initialised", self.reinitialised)):
      lines.append(f"{title} {len(rows)}" + (":" if rows else ""))
      lines += [f"  {p}: {why}" for p, why in rows]
    lines.append(f"resized {len(self.resized)}" + (":" if self.resized else ""))
    lines += [f"  {p}: {old} -> {new} ({why})" for p, old, new, why in self.resized]
    if self.notes:
      lines.append(f"notes {len(self.notes)}:")
      lines += [f"  {n}" for n in self.notes]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.to_text()


def _top(path: str) -> str:
  return path.split("/")[0]


def _class_row(n_rows: int, position: str) -> int:
  if position not in ("first", "last"):
    raise ValueError(f"class_token_position must be 'first' or 'last', got {position!r}.")
  return 0 if position == "first" else n_rows - 1


def _grid_from_image(image_size, patch_size, what: str) -> tuple[int, int]:
  h, w = _as_grid(image_size, what)
  ph, pw = _as_grid(patch_size, "patch_size")
  if h % ph or w % pw:
    raise ValueError(f"{what} {h}x{w} is not a multiple of the patch size {ph}x{pw}.")
  return h // ph, w // pw


def convert_for_finetuning(
    src_params: Mapping,
    target_init_params: Mapping,
    *,
    patch_size: Sequence[int] | int,
    image_size: Sequence[int] | int | None = None,
    src_image_size: Sequence[int] | int | None = None,
    reset_head: bool = False,
    src_class_token_position: str = "first",
    class_token_position: str = "first",
    src_class_token_posemb: bool = True,
    class_token_posemb: bool = True,
    resample_patch: bool = False,
) -> tuple[dict, ConversionReport]:
  """Source params (any accepted naming) + the target model's fresh init -> (target params, report).

  The result has exactly the target's tree. `patch_size` is the target's; the patch embedding of the
  source must have it too. The target patch grid is `image_size // patch_size` when `image_size` is given,
  else the square grid that fits the target's position embedding; likewise the source grid from
  `src_image_size` (non-square sources need it). A class token only in the source is dropped with its
  position-embedding row (e.g. for a `gap` target); one only in the target keeps the target's fresh
  values. Source values are cast to the target's dtypes; target values that are kept (fresh head, ...)
  are passed through untouched. Raises ValueError naming the parameter and both shapes on any other
  disagreement. `resample_patch=True` lets the source have another patch size: its patch embedding is
  resampled to `patch_size` (`resample_patch_embedding`) and the position embeddings resized to the new
  grid (for the source grid, `src_image_size` is divided by the source's patch size).
  """
  src = ckpt_lib.flatten(ckpt_lib.to_linen_naming(ckpt_lib.plain(dict(src_params))))
  tgt = ckpt_lib.flatten(ckpt_lib.plain(dict(target_init_params)))
  for pos in (src_class_token_position, class_token_position):
    _class_row(1, pos)  # validates
  report = ConversionReport()
  mismatch = dict(got_from="source checkpoint", want_from="target model")

  def shape(x):
    return tuple(np.shape(x))

  # Patch embedding: the same patch size on both sides, or the grids below are meaningless; with
  # `resample_patch` the source's kernel is resampled to the target's patch first (FlexiViT).
  ph, pw = _as_grid(patch_size, "patch_size")
  src_patch = (ph, pw)
  resampled = set()  # reported under "resized", not "kept"
  for side, flat in (("source checkpoint", src), ("target model", tgt)):
    k = flat.get("embedding/kernel")
    if k is None:
      raise ValueError(f"the {side} has no 'embedding/kernel': not a ViT parameter tree.")
    if side == "source checkpoint" and resample_patch and len(shape(k)) == 4:
      src_patch = shape(k)[:2]
      continue
    if shape(k)[:2] != (ph, pw):
      hint = (" (--patch_size / config.init_patch_size resample it, FlexiViT-style)"
              if side == "source checkpoint" else "")
      raise ValueError(f"parameter 'embedding/kernel' has patch size {shape(k)[:2]} in the {side} "
                       f"but patch_size={(ph, pw)} was asked for{hint}.")
  if src_patch != (ph, pw):
    old_kernel = src["embedding/kernel"]
    src = dict(src, **{"embedding/kernel": resample_patch_embedding(old_kernel, (ph, pw))})
    resampled.add("embedding/kernel")
    report.resized.append(("embedding/kernel", shape(old_kernel), shape(src["embedding/kernel"]),
                           f"patch {src_patch[0]}x{src_patch[1]} -> {ph}x{pw}, FlexiViT "
                           f"pseudo-inverse of the bilinear patch resize"))

  # Replaceable modules: all-or-nothing, so a head never mixes a kept bias with a fresh kernel.
  keep_module = {}
  for mod in _REPLACEABLE:
    t_keys = [k for k in tgt if _top(k) == mod]
    s_keys = [k for k in src if _top(k) == mod]
    if not t_keys:
      for k in s_keys:
        why = ("the target has no head (num_classes=0)" if mod == "head" else
               "the target has no pre_logits layer" if mod == "pre_logits" else
               "the target has no class token" if mod == "cls" else
               f"the target model has no '{mod}'")
        report.dropped.append((k, why))
      continue
    same = (sorted(t_keys) == sorted(s_keys)
            and all(shape(src[k]) == shape(tgt[k]) for k in t_keys))
    if mod == "head" and reset_head:
      keep_module[mod], why = False, "reset_head=True"
    elif same:
      keep_module[mod], why = True, ""
    elif not s_keys:
      keep_module[mod], why = False, "not in the source checkpoint"
    else:
      s_shape = shape(src.get(f"{mod}/kernel", src[s_keys[0]]))
      t_shape = shape(tgt.get(f"{mod}/kernel", tgt[t_keys[0]]))
      keep_module[mod], why = False, f"source shape {s_shape} differs from target {t_shape}"
      if mod == "head" and len(s_shape) == 2 and len(t_shape) == 2 and s_shape[1] != t_shape[1]:
        why = f"{s_shape[1]} classes in the source, {t_shape[1]} in the target"
    if not keep_module[mod]:
      report.reinitialised += [(k, why) for k in sorted(t_keys)]
      report.dropped += [(k, f"replaced by the target's fresh '{mod}'") for k in sorted(s_keys)]

  # The encoder: every parameter on one side must be on the other, with the same shape.
  for k in src:
    if k not in tgt and _top(k) not in _REPLACEABLE:
      raise ValueError(f"the source checkpoint has parameter '{k}' {shape(src[k])} that the target "
                       f"model does not have (another depth or architecture?).")

  out = {}
  for k, t in tgt.items():
    mod = _top(k)
    if mod in keep_module:
      out[k] = np.asarray(src[k]).astype(t.dtype) if keep_module[mod] else t
      if keep_module[mod]:
        report.kept.append(k)
      continue
    if k not in src:
      raise ValueError(f"parameter '{k}' {shape(t)} of the target model is missing from the source "
                       f"checkpoint (another depth or architecture?).")
    if k == POSEMB:
      out[k] = _convert_posemb(src, tgt, report, (ph, pw), image_size, src_image_size,
                               src_class_token_position, class_token_position,
                               src_class_token_posemb, class_token_posemb, src_patch=src_patch)
      continue
    if shape(src[k]) != shape(t):
      raise ckpt_lib.shape_mismatch_error(
          k, shape(src[k]), shape(t), **mismatch,
          hint="the checkpoint is another architecture; fine-tune a model built with its config")
    out[k] = np.asarray(src[k]).astype(t.dtype)
    if k not in resampled:
      report.kept.append(k)
  return ckpt_lib.unflatten(out), report


def _convert_posemb(src, tgt, report, patch, image_size, src_image_size, src_pos, tgt_pos,
                    src_class_row=True, tgt_class_row=True, src_patch=None):
  """The position-embedding part of `convert_for_finetuning` (class row aside, grid resized)."""
  s, t = np.asarray(src[POSEMB]), tgt[POSEMB]
  s_shape, t_shape = tuple(np.shape(s)), tuple(np.shape(t))
  if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[0] != 1 or s_shape[2] != t_shape[2]:
    raise ckpt_lib.shape_mismatch_error(
        POSEMB, s_shape, t_shape, got_from="source checkpoint", want_from="target model",
        hint="the hidden sizes differ: the checkpoint is another architecture")
  # A class token joined after the position embeddings (timm's `no_embed_class`) has no row.
  s_cls, t_cls = "cls" in src and src_class_row, "cls" in tgt and tgt_class_row
  # Class-token row aside; the rest is the patch grid.
  s_row = None
  if s_cls:
    i = _class_row(s_shape[1], src_pos)
    s_row = s[:, i:i + 1]
    s_grid_rows = np.delete(s, i, axis=1)
  else:
    s_grid_rows = s
  n_src, n_tgt = s_grid_rows.shape[1], t_shape[1] - (1 if t_cls else 0)
  old_grid = (_grid_from_image(src_image_size, src_patch or patch, "src_image_size")
              if src_image_size is not None
              else _square_grid(n_src, "source checkpoint"))
  new_grid = (_grid_from_image(image_size, patch, "image_size") if image_size is not None
              else _square_grid(n_tgt, "target model"))
  if old_grid[0] * old_grid[1] != n_src:
    raise ValueError(f"parameter '{POSEMB}' has {n_src} patch rows in the source checkpoint, not the "
                     f"{old_grid[0]}x{old_grid[1]} grid of src_image_size={src_image_size}.")
  if new_grid[0] * new_grid[1] != n_tgt:
    raise ValueError(f"parameter '{POSEMB}' has {n_tgt} patch rows in the target model, not the "
                     f"{new_grid[0]}x{new_grid[1]} grid of image_size={image_size}.")
  grid = resize_posemb(s_grid_rows, new_grid, old_grid, num_prefix_tokens=0)

  if t_cls:
    if s_row is None and "cls" in src:  # a class token without a position row: a zero row is exact
      s_row = np.zeros((1, 1, t_shape[2]), np.asarray(s).dtype)
      report.reinitialised.append((f"{POSEMB}[class row]", "zeros: the source's class token carries no "
                                                           "position row"))
    elif s_row is None:
      j = _class_row(t_shape[1], tgt_pos)
      s_row = np.asarray(t)[:, j:j + 1]
      report.reinitialised.append((f"{POSEMB}[class row]", "the source has no class token"))
    parts = [s_row, grid] if tgt_pos == "first" else [grid, s_row]
    new = np.concatenate(parts, axis=1)
  else:
    if s_row is not None:
      report.dropped.append((f"{POSEMB}[class row]", "the target has no class token"))
    new = grid
  new = new.astype(t.dtype)
  if old_grid != new_grid:
    report.resized.append((POSEMB, s_shape, tuple(new.shape),
                           f"patch grid {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]}, "
                           f"bilinear, corners aligned"))
  else:
    report.kept.append(POSEMB)
  return new


# Architecture switches a fine-tuning target takes from its source, with the original ViT's values. The
# first two change no parameter shape, so a target built without them would silently compute another
# function.
_SWITCH_DEFAULTS = dict(gelu_approximate=True, layernorm_epsilon=1e-6, class_token_posemb=True,
                        layerscale=False, pre_norm=False, fc_norm=False, causal=False)
SOURCE_SWITCHES = tuple(_SWITCH_DEFAULTS)


def init_from_checkpoint(path, target_init_params: Mapping, *, patch_size, image_size=None,
                         reset_head: bool = False, class_token_position: str = "first",
                         model=None, resample_patch: bool = False):
  """Training's `config.init_from`: convert a `CheckpointSource` (or any path `open_source` opens).

  The source's image size, class-token position and switches come from its stored config when it has
  one (a published `.npz` has none: square grid, class token first, the original ViT). `model` (the
  VisionTransformer being fine-tuned), when given, must have the source's SOURCE_SWITCHES: a mismatch
  is one error line listing the `--config.model.*` flags to add. The report notes the switches either way.
  `resample_patch` (training's `config.init_patch_size`): a source of another patch size is resampled
  to `patch_size` (FlexiViT; see `convert_for_finetuning`).
  """
  # A timm / HF file that does not say its heads (no config, a name timm's table lacks) is split into
  # the heads of the model being fine-tuned: the attention kernels' shapes must match those anyway.
  hints = {} if model is None else {"num_heads_fallback": int(model.num_heads)}
  source = ckpt_lib.open_source(path, **hints)
  src_model = (source.meta or {}).get("model") or {}
  src_image_size = (source.meta or {}).get("image_size") or src_model.get("image_size")
  switches = {k: src_model[k] for k in SOURCE_SWITCHES if k in src_model}
  if model is not None:
    wrong = {k: v for k, v in switches.items() if getattr(model, k) != v}
    if wrong:
      raise ValueError(f"{source.path}: the checkpoint's model has {_flags(wrong, '')}, the model being "
                       f"fine-tuned does not; add {_flags(wrong, '--config.model.')}.")
    tgt_class_row = model.class_token_posemb
  else:  # from the target's rows: one more than the patch grid is the class token's
    rows = np.shape(ckpt_lib.flatten(ckpt_lib.plain(dict(target_init_params))).get(POSEMB, ()))
    grid = _grid_from_image(image_size, patch_size, "image_size") if image_size is not None else None
    tgt_class_row = (switches.get("class_token_posemb", True) if grid is None or len(rows) != 3
                     else rows[1] != grid[0] * grid[1])
  params, report = convert_for_finetuning(
      source.params, target_init_params, patch_size=patch_size, image_size=image_size,
      src_image_size=src_image_size, reset_head=reset_head,
      src_class_token_position=src_model.get("class_token_position", "first"),
      class_token_position=class_token_position,
      src_class_token_posemb=switches.get("class_token_posemb", True), class_token_posemb=tgt_class_row,
      resample_patch=resample_patch)
  if source.kind in ("timm", "hf"):
    report.notes.append(f"source: a {'timm' if source.kind == 'timm' else 'Hugging Face'} checkpoint "
                        f"({source.meta.get('source')})")
    report.notes += source.meta["import_notes"]
  changed = {k: v for k, v in switches.items() if v != _SWITCH_DEFAULTS[k]}
  if changed:
    report.notes.append("the source's architecture switches (the fine-tuned model must have them): "
                        + _flags(changed, "--config.model."))
  return params, report


def _flags(switches: Mapping, prefix: str) -> str:
  return " ".join(f"{prefix}{k}={v}" for k, v in switches.items())


# ----------------------------------------------------------------------------------------------------
# Command line


def image_size_arg(text: str):
  """Command-line image size: "224" -> 224, "224x320" or "224,320" -> (224, 320)."""
  parts = text.lower().replace("x", ",").split(",")
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}") from None
  if len(sizes) == 1:
    return sizes[0]
  if len(sizes) == 2:
    return tuple(sizes)
  raise argparse.ArgumentTypeError(f"image size must be N or HxW, got {text!r}")


def _representation_arg(text: str):
  if text.lower() in ("none", "0", ""):
    return None
  return int(text)


def convert_checkpoint(checkpoint, out, *, num_classes: int, image_size, representation_size=None,
                       pool: str | None = None, reset_head: bool = False, seed: int = 0,
                       num_heads: int | None = None, patch_size: int | None = None):
  """What the command does: open `checkpoint` (a path or a `CheckpointSource`), build the target model,
  init it, convert, write `out` (.npz).

  `num_heads`: for a timm / HF checkpoint that does not say its heads (see `vit_cls.formats.read`).
  `patch_size`: the target's patch size, when it differs from the source's (FlexiViT resample of the
  patch embedding, see `resample_patch_embedding`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  source = ckpt_lib.open_source(checkpoint, **({"num_heads": num_heads} if num_heads else {}))
  # The output is the published layout, which a source also holds for a layer-scan run: the target is
  # built unrolled whatever the source trained with (`vit_cls.load` restacks for scan).
  target_config = dict(source.own_config, num_classes=int(num_classes),
                       representation_size=representation_size, scan_layers=False)
  target_config.pop("image_size", None)
  if pool is not None:
    target_config["pool"] = pool
  h, w = ckpt_lib.hw(image_size)
  if patch_size is not None:
    # Checked here: the model would otherwise drop the image's last partial row and column of patches.
    if int(patch_size) < 1 or h % int(patch_size) or w % int(patch_size):
      raise ValueError(f"patch_size={patch_size} is not allowed: a positive divisor of "
                       f"image_size={h}x{w}.")
    target_config["patch_size"] = [int(patch_size), int(patch_size)]
  model = ckpt_lib.build_model(target_config)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, h, w, 3), jnp.float32), train=False))
  target = init(jax.random.key(seed))["params"]
  params, report = init_from_checkpoint(source, target, patch_size=tuple(model.patch_size),
                                        image_size=(h, w), reset_head=reset_head,
                                        class_token_position=model.class_token_position, model=model,
                                        resample_patch=patch_size is not None)
  # The architecture goes into the file, so that loading it rebuilds this model (pooling, switches).
  ckpt_lib.save_npz(params, out, config=target_config, image_size=image_size)
  return params, report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m vit_cls.convert",
      description="Convert a ViT checkpoint (.npz, orbax, timm or Hugging Face safetensors) into "
                  "fine-tuning init params (.npz).")
  parser.add_argument("--checkpoint", required=True,
                      help=".npz file, workdir, orbax step dir, .safetensors file, timm or Hugging Face "
                           "model folder, or a hub id in the local Hugging Face cache")
  parser.add_argument("--out", required=True, help="output .npz (published ViT format)")
  parser.add_argument("--num_classes", required=True, type=int, help="classes of the new head")
  parser.add_argument("--image_size", required=True, type=image_size_arg, help="N or HxW")
  parser.add_argument("--representation_size", type=_representation_arg, default=None,
                      help="pre_logits width of the target (default: none, a linear head)")
  parser.add_argument("--pool", default=None, help="target pooling (default: the source's)")
  parser.add_argument("--reset_head", action="store_true",
                      help="fresh head even when the number of classes is unchanged")
  parser.add_argument("--seed", type=int, default=0, help="init seed of fresh parameters")
  parser.add_argument("--verbose", action="store_true", help="list every kept parameter")
  parser.add_argument("--num_heads", type=int, default=None,
                      help="attention heads of a timm / HF source that does not say them")
  parser.add_argument("--patch_size", type=int, default=None,
                      help="target patch size (default: the source's); another one resamples the "
                           "patch embedding FlexiViT-style (pseudo-inverse resize)")
  args = parser.parse_args(argv)
  try:
    _, report = convert_checkpoint(
        args.checkpoint, args.out, num_classes=args.num_classes, image_size=args.image_size,
        representation_size=args.representation_size, pool=args.pool, reset_head=args.reset_head,
        seed=args.seed, num_heads=args.num_heads, patch_size=args.patch_size)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.to_text(verbose=args.verbose))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
