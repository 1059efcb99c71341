"""What does the class token look at? A PNG of its attention over one image.

  python -m vit_cls.visualize --checkpoint WORKDIR_OR_NPZ image.png [--out attention.png]

One row of panels: the image as the model sees it; then, per head of the last layer, the class token's
attention over the patches (the probabilities of the class token's query row, restricted to the patch
keys, drawn on the patch grid over the image); then the attention rollout over all layers (Abnar & Zuidema,
2020, "Quantifying Attention Flow in Transformers"): each layer's attention averaged over heads, plus the
identity for the residual connection, rows renormalised, multiplied from the first layer to the last. The
last layer alone shows what the final read-out mixes; rollout follows that mixing back through the tokens
that earlier layers had already mixed, which is closer to "which pixels fed the class token".

Each head's title gives the share of its attention that went to patches at all: the rest went to the class
token itself or to registers (Darcet et al., 2024, found that large ViTs without registers park this
attention on a few low-information patches; with registers it moves there).

Only a model with a class token (`pool="cls"`, prepended or appended, with or without registers) has a
class-token row to show; any other pooling is refused with a message saying so. The image is preprocessed
by `vit_cls.predict.load_image` with the checkpoint's own preprocessing (an imported timm or Hugging Face
model's mean/std, resize and crop), as prediction does. No TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

if __name__ == "__main__":  # before numpy and JAX: the memory allocator (stderr: stdout is the PNG's path)
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup(file=sys.stderr)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_cls import checkpoint as ckpt_lib
from vit_cls import predict

PANEL_INCHES = (2.0, 2.3)  # width, height of one panel; the PNG is (panels * 2.0 * dpi) x (2.3 * dpi)


def class_token_index(model, num_patches: int) -> int:
  """Where the class token sits in the encoder's sequence (registers are appended after it)."""
  if model.pool != "cls":
    raise ValueError(
        f"the model has no class token (pool={model.pool!r}); the class token's attention exists only "
        f"for pool='cls' checkpoints. Train with --config.model.pool=cls, or inspect "
        f"aux['attention'] from vit_cls.model.apply_with_aux(model, variables, images) yourself.")
  return 0 if model.class_token_position == "first" else num_patches


def attention_rollout(attention: Sequence[np.ndarray]) -> np.ndarray:
  """[tokens, tokens] rollout of per-layer [heads, tokens, tokens] attention (one image).

  Heads are averaged, 0.5 * (A + I) accounts for the residual path (half of each token's next state is
  itself), and the product runs first layer to last, so row i says how much of token i's final state
  came from each input token. Every row sums to 1.
  """
  tokens = attention[0].shape[-1]
  rollout = np.eye(tokens)
  for layer in attention:
    a = 0.5 * (np.asarray(layer, np.float64).mean(axis=0) + np.eye(tokens))
    a /= a.sum(axis=-1, keepdims=True)
    rollout = a @ rollout
  return rollout


def class_token_attention(model, params, image: np.ndarray) -> dict:
  """The class token's attention for one preprocessed (H, W, 3) image.

  Returns `last_layer` [heads, gh, gw] (last layer, per head, patch keys only), `patch_share` [heads]
  (the total of those probabilities: how much of each head went to patches), `rollout` [gh, gw] and
  `logits` [classes] (empty without a head).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  ph, pw = model.patch_size
  gh, gw = h // ph, w // pw
  cls = class_token_index(model, gh * gw)
  patches = np.arange(gh * gw) + (1 if cls == 0 else 0)  # the patch tokens' sequence positions
  from vit_cls.model import apply_with_aux  # pylint: disable=g-import-not-at-top
  logits, aux = jax.jit(lambda p, x: apply_with_aux(model, {"params": p}, x, train=False))(
      params, jnp.asarray(image[None], jnp.float32))
  attention = [np.asarray(a[0], np.float64) for a in aux["attention"]]  # [heads, tokens, tokens] each
  last = attention[-1][:, cls, patches]
  return dict(last_layer=last.reshape(-1, gh, gw), patch_share=last.sum(axis=-1),
              rollout=attention_rollout(attention)[cls, patches].reshape(gh, gw),
              logits=np.asarray(logits[0]))


def _label(logits: np.ndarray, names) -> str:
  if not logits.size:
    return ""
  i = int(np.argmax(logits))
  p = float(np.exp(logits[i] - logits.max()) / np.exp(logits - logits.max()).sum())
  return f"predicted {names[i] if names and i < len(names) else i} ({p:.0%})"


def render(image: np.ndarray, maps: dict, out_path: str, *, title: str = "", dpi: int = 100,
           preprocessing: dict | None = None) -> str:
  """Writes the panel row as a PNG of exactly (2 + heads) * 2.0 * dpi by 2.3 * dpi pixels.

  `preprocessing`: the mean/std the image was normalised with (None: this project's [-1, 1])."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  heads = maps["last_layer"].shape[0]
  panels = heads + 2
  fig, axes = plt.subplots(1, panels, figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=dpi)
  pp = preprocessing or {"mean": 0.5, "std": 0.5}  # the model input back to [0, 1] pixels
  shown = np.clip(image * np.asarray(pp["std"]) + np.asarray(pp["mean"]), 0.0, 1.0)
  h, w = image.shape[:2]
  extent = (0, w, h, 0)  # the patch grid stretched over the image, pixel-aligned
  axes[0].imshow(shown, extent=extent, interpolation="nearest")
  axes[0].set_title("input", fontsize=9)
  for i in range(heads):
    axes[i + 1].imshow(shown.mean(axis=-1), cmap="gray", extent=extent, interpolation="nearest")
    axes[i + 1].imshow(maps["last_layer"][i], cmap="inferno", alpha=0.7, extent=extent,
                       interpolation="nearest")
    axes[i + 1].set_title(f"last layer, head {i}\n{maps['patch_share'][i]:.0%} on patches", fontsize=8)
  axes[-1].imshow(shown.mean(axis=-1), cmap="gray", extent=extent, interpolation="nearest")
  axes[-1].imshow(maps["rollout"], cmap="inferno", alpha=0.7, extent=extent, interpolation="nearest")
  axes[-1].set_title("rollout, all layers", fontsize=8)
  for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.72 if title else 0.8, wspace=0.05)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=dpi)  # no bbox_inches="tight": the size stays what the figure says
  plt.close(fig)
  return out_path


def visualize(checkpoint, image_path: str, out_path: str | None = None, *, image_size=None,
              dpi: int = 100) -> str:
  """Loads the checkpoint and the image, writes the PNG, returns its path."""
  overrides = {} if image_size is None else {"image_size": image_size}
  loaded = ckpt_lib.load_with_info(checkpoint, **overrides)
  class_token_index(loaded.model, 0)  # refuse a model without a class token before any work
  image = predict.load_image(image_path, loaded.image_size, loaded.preprocessing)
  maps = class_token_attention(loaded.model, loaded.params, image)
  if out_path is None:
    out_path = os.path.splitext(image_path)[0] + "_attention.png"
  title = f"class-token attention: {os.path.basename(image_path)}  {_label(maps['logits'], loaded.label_names)}"
  return render(image, maps, out_path, title=title.strip(), dpi=dpi, preprocessing=loaded.preprocessing)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_cls.visualize",
                                   description="PNG of the class token's attention over an image.")
  parser.add_argument("--checkpoint", required=True, help=".npz file, workdir, or orbax step dir")
  parser.add_argument("--out", default=None, help="PNG path (default: IMAGE_attention.png)")
  parser.add_argument("--image_size", type=predict.image_size_arg, default=None,
                      help="N or HxW (default: the checkpoint's)")
  parser.add_argument("--dpi", type=int, default=100, help="pixels per inch (a panel is 2.0 x 2.3 in)")
  parser.add_argument("image", help="an image file (anything PIL reads)")
  args = parser.parse_args(argv)
  try:
    path = visualize(args.checkpoint, args.image, args.out, image_size=args.image_size, dpi=args.dpi)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
