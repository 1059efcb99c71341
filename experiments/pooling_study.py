"""Pooling study: does the ViT need a prepended class token, or would the last token (or a mean) do?

    python experiments/pooling_study.py            # the default study (measured time: results/pooling_study.md)
    python experiments/pooling_study.py --quick    # smoke test: a 1-layer width-32 model, seconds
    python experiments/pooling_study.py --heads cls,cls_appended,last,gap,map,cls+4reg   # more heads

The built-in digits job (`configs/default.py`, read fresh, so its current recipe is what gets compared) is
trained once per *cell*: an attention mask, a depth and a head.

  bidirectional, the config's depth (4): cls, cls_appended, last, gap (and map, cls+4reg on request)
  causal, the config's depth:            cls, cls_appended, last, gap
  bidirectional, 1, 2 and 4 layers:      cls, last, gap (the depth axis)

Heads: `cls` reads a class token prepended to the patches (the ViT paper), `cls_appended` the same token
appended (`class_token_position="last"`; bidirectional, this is the same function with the position rows
permuted, so it must tie with `cls`), `last` the last patch token with no extra token (the causal-LM
habit), `gap` the mean of the patch tokens, `map` a learned attention-pooling query, `cls+4reg` the class
token plus 4 registers (Darcet et al., 2024). Under the causal mask (token i attends to tokens <= i) a
prepended class token sees only itself, so it must fall to chance, while the appended one and the last
patch token see everything. Registers are not in the causal arm: they are appended after the patches, so
under the mask they would see everything and be seen by nobody (a causal run with them is refused).

Protocol, per cell:
  1. sweep: every rate of `--lrs` x `--sweep_seeds` seeds, trained on train minus a held-out validation
     split (`--val_percent` of train, chosen by a fixed hash of the row index) and scored on validation;
     the rate with the best mean validation accuracy wins (ties: lower validation loss; a rate with a
     diverged run never wins). The test split plays no part in the choice.
  2. final: `--seeds` fresh seeds at that rate, trained on the whole train split, scored on test.
Reported: mean test accuracy with a 95% t-interval over the seeds, and for each pair that matters the
difference with its 95% interval. Seed s means the same data order, the same crops and, for every
parameter of the same shape, the same initial values in every cell, so differences are paired by seed
(Welch's interval when the seed sets differ, e.g. after a diverged run).

How it fits the time: all the models of one phase of a cell (rates x seeds) are trained in one jitted
step, `vmap`ped over the models (each with its own parameters, optimizer state, rate and random keys),
`--chunk` steps at a time under `lax.scan`, with the digits (1,797 8x8 images) kept on the device and
augmented there. On a 2-core CPU the models per CPU-second are the same as one model at a time (the
step is compute-bound, not overhead-bound), so the gain is no per-run set-up: one compilation per cell
instead of one process, data pipeline and checkpoint per run. On an accelerator the same script runs
every model of a phase in parallel. `--devices N` splits the models of a phase over N devices
(simulated CPU devices when JAX has not started yet).

The recipe is the built-in job's, with the schedule scaled to `--steps`: AdamW (decoupled weight decay on
kernels only), global-norm clipping, label smoothing, linear warmup (scaled) then cosine decay, batch 128.
Each model's rate multiplies the update of an optimizer built by `vit_cls.optim` with rate 1, which is
the same update (tested). Data, unlike the built-in job's tf.data pipeline: the random-resized crop (50 to
100% of the 8x8 area, aspect 3/4 to 4/3, integer window, bilinear resize to 16x16 with half-pixel
centres, as tf.image does) is drawn by JAX from the model's own key, so the draws are not TF's; the
evaluation images are the pipeline's to float rounding (tested); each epoch is a fresh permutation, and
the last partial batch of an epoch is dropped.

Outputs in `--out` (default experiments/results/): pooling_study.csv (every run: mask, depth, head, phase,
rate, seed, accuracy, ...; appended per cell and phase, so `--resume` continues a killed study),
pooling_study.md (tables with intervals, the machine and the measured time), pooling_study.png (the
accuracies, the depth axis and the paired differences) and, when the study has the bidirectional `cls`
cell at full depth, attention_cls.png: the class token's attention (vit_cls.visualize) in the first
seed's final model on digit_example.png, the first test digit.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import importlib.util
import math
import os
import platform
import sys
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # configs/ is a directory of the repository, not an installed package
  sys.path.insert(0, REPO)
if __name__ == "__main__":  # before JAX allocates: the memory allocator, the first line of the run
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup()

# head name -> (model overrides, one-line description). The rest of the model is the base config's.
HEADS: dict[str, tuple[dict, str]] = {
    "cls": (dict(pool="cls", class_token_position="first", num_registers=0),
            "class token, prepended"),
    "cls_appended": (dict(pool="cls", class_token_position="last", num_registers=0),
                     "the same class token, appended"),
    "last": (dict(pool="last", num_registers=0), "last patch token, no extra token"),
    "gap": (dict(pool="gap", num_registers=0), "mean of the patch tokens"),
    "map": (dict(pool="map", num_registers=0), "attention pooling (learned query)"),
    "cls+4reg": (dict(pool="cls", class_token_position="first", num_registers=4),
                 "class token + 4 registers"),
}
MASKS = ("bidirectional", "causal")

DEFAULT_STEPS = 400
DEFAULT_LRS = (2e-3, 4e-3, 8e-3)
DEFAULT_HEADS = ("cls", "cls_appended", "last", "gap")
DEFAULT_DEPTH_HEADS = ("cls", "last", "gap")
DEFAULT_DEPTHS = (1, 2, 4)
CSV_NAME, MD_NAME, PNG_NAME = "pooling_study.csv", "pooling_study.md", "pooling_study.png"
ATTENTION_NAME, DIGIT_NAME = "attention_cls.png", "digit_example.png"
FIELDS = ("mask", "depth", "head", "phase", "learning_rate", "seed", "steps", "train_split",
          "train_examples", "eval_split", "accuracy", "loss", "num_examples", "params", "status",
          "group_models", "compile_s", "train_s")
CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Cell:
  mask: str  # bidirectional | causal
  depth: int
  head: str

  @property
  def label(self) -> str:
    return f"{self.mask} {self.depth}L {self.head}"


# ------------------------------------------------------------------------------------------------
# Command line and config.


def _csv_list(text: str, kind=str) -> list:
  return [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--heads", default=",".join(DEFAULT_HEADS),
                 help=f"bidirectional heads at the config's depth; from: {', '.join(HEADS)}")
  p.add_argument("--causal_heads", default=",".join(DEFAULT_HEADS),
                 help="heads of the causal arm, at the config's depth (empty: no causal arm)")
  p.add_argument("--depth_heads", default=",".join(DEFAULT_DEPTH_HEADS),
                 help="bidirectional heads trained at every depth of --depths")
  p.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)), help="the depth axis")
  p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS), help="rates of the sweep")
  p.add_argument("--sweep_seeds", type=int, default=2, help="seeds per rate in the sweep")
  p.add_argument("--seeds", type=int, default=6, help="seeds per cell at its chosen rate (reported)")
  p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                 help="training steps per run (the config's warmup is scaled to match)")
  p.add_argument("--chunk", type=int, default=50, help="steps per jitted call (a divisor of --steps)")
  p.add_argument("--val_percent", type=int, default=20, help="share of train held out for the sweep")
  p.add_argument("--devices", type=int, default=2,
                 help="devices to split each phase's models over (2 simulated CPU devices use both cores "
                      "better than one device's thread pool)")
  p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"),
                 help="base config file (a get_config() module training on the digits)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field, e.g. --set model.matmul_dtype=bfloat16")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results"), help="output directory")
  p.add_argument("--resume", action="store_true", help="keep the CSV of --out and skip what it has")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: a 1-layer width-32 model, 6 steps, 4 cells, 2 rates, 2 seeds")
  p.add_argument("--note", default="", help="a line for the table header (what was unusual, and why)")
  args = p.parse_args(argv)
  if args.quick:
    args.heads, args.causal_heads, args.depth_heads, args.depths = "cls,gap", "cls", "cls", "1,2"
    args.steps, args.chunk, args.sweep_seeds, args.seeds = min(args.steps, 6), 3, 1, 2
  args.heads, args.causal_heads, args.depth_heads = (
      _csv_list(args.heads), _csv_list(args.causal_heads), _csv_list(args.depth_heads))
  args.depths, args.lrs = _csv_list(args.depths, int), _csv_list(args.lrs, float)
  if args.quick:
    args.lrs = args.lrs[:2]
  for flag in ("heads", "causal_heads", "depth_heads"):
    unknown = [h for h in getattr(args, flag) if h not in HEADS]
    if unknown:
      p.error(f"--{flag} {','.join(unknown)}: unknown head(s); choose from {', '.join(HEADS)}")
  if any(HEADS[h][0]["num_registers"] for h in args.causal_heads):
    p.error("--causal_heads: registers are appended after the patches, so under the causal mask they "
            "are seen by no other token; leave cls+4reg out of the causal arm")
  if min(args.steps, args.seeds, args.sweep_seeds, args.devices, args.chunk) < 1 or not args.lrs:
    p.error("--steps, --seeds, --sweep_seeds, --devices, --chunk and --lrs must be positive")
  if min(args.depths, default=1) < 1 or not 0 < args.val_percent < 100:
    p.error("--depths must be positive and --val_percent in 1..99")
  if args.steps % args.chunk:
    args.chunk = max(d for d in range(1, args.chunk + 1) if args.steps % d == 0)
  return args


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as bfloat16


def base_config(args):
  """The base config file's get_config(), with the study's command-line changes applied."""
  spec = importlib.util.spec_from_file_location("_pooling_study_base_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.quick:  # compilation dominates a smoke test: the smallest model that still has every part
    config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, representation_size=32))
    config.batch_size = 32
  for item in args.set:
    field, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected FIELD=VALUE, e.g. --set model.hidden_size=32")
    config.update_from_flattened_dict({field: _literal(value)})
  if config.dataset != "digits":
    raise SystemExit(f"config.dataset={config.dataset!r}: the study keeps its data on the device and "
                     f"reads the built-in digits only; use a config that trains on 'digits'.")
  return config


def plan_cells(args, base) -> list[Cell]:
  """Bidirectional heads at the config's depth, the causal arm, then the depth axis (no duplicates)."""
  full = int(base.model.num_layers)
  cells = [Cell("bidirectional", full, h) for h in args.heads]
  cells += [Cell("causal", full, h) for h in args.causal_heads]
  cells += [Cell("bidirectional", d, h) for d in sorted(args.depths) for h in args.depth_heads]
  return list(dict.fromkeys(cells))


# ------------------------------------------------------------------------------------------------
# Data: the digits on the device, preprocessed there.


def validation_rows(train_rows, percent: int):
  """The rows of train held out for the sweep: the lowest `percent`% by a fixed hash of the row index
  (like the digits' own train/test split: no RNG, the same on every machine)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rank = lambda i: hashlib.sha256(f"vit_cls-pooling-study-val-{int(i)}".encode()).digest()
  ordered = sorted(train_rows, key=rank)
  return np.sort(np.asarray(ordered[:round(len(ordered) * percent / 100)], dtype=np.int64))


def load_splits(val_percent: int) -> dict:
  """{'fit', 'val', 'train', 'test'} -> (uint8 images [n, 8, 8], int32 labels [n]) of the digits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_cls.datasets import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_images()
  rows = digits.split_indices()
  val = validation_rows(rows["train"], val_percent)
  rows = dict(fit=np.setdiff1d(rows["train"], val), val=val, train=rows["train"], test=rows["test"])
  return {k: (images[r, :, :, 0], labels[r].astype(np.int32)) for k, r in rows.items()}


def resize_weights(start, length, out_size: int, in_size: int):
  """[..., out_size, in_size] bilinear weights that resize the window [start, start + length) of an
  in_size axis to out_size samples: half-pixel centres, clamped to the window's edge pixels (what
  tf.image.resize does to the sliced window). `start` and `length` are integer arrays of any shape."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  start = jnp.asarray(start, jnp.float32)[..., None]
  length = jnp.asarray(length, jnp.float32)[..., None]
  pos = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * (length / out_size) - 0.5
  pos = start + jnp.clip(pos, 0.0, length - 1.0)
  lo = jnp.floor(pos)
  frac = pos - lo
  grid = jnp.arange(in_size, dtype=jnp.float32)
  upper = jnp.minimum(lo + 1.0, start + length - 1.0)
  return ((grid == lo[..., None]) * (1.0 - frac[..., None]) + (grid == upper[..., None]) * frac[..., None])


def to_model_input(gray, rows_w, cols_w):
  """uint8-valued [..., 8, 8] -> float32 [..., S, S, 3] in [-1, 1]: resize, gray to RGB, scale."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  image = jnp.einsum("...ij,...jk,...lk->...il", rows_w, gray.astype(jnp.float32), cols_w)
  image = jnp.clip(image * (2.0 / 255.0) - 1.0, -1.0, 1.0)
  return jnp.repeat(image[..., None], 3, axis=-1)


def eval_images(gray, size: int):
  """The whole image resized to `size` (the built-in job's eval_crop='resize')."""
  n = gray.shape[-1]
  w = resize_weights(0, n, size, n)
  return to_model_input(gray, w, w)


def crop_windows(key, batch: int, in_size: int, min_area: float, attempts: int = 10):
  """Random-resized-crop windows (top, left, height, width), integer, as tf.image's sampler draws them:
  area min_area..1 of the image, aspect (width/height) 3/4..4/3, up to `attempts` tries, else the whole
  image."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k_area, k_aspect, k_top, k_left = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, (batch, attempts), minval=min_area, maxval=1.0) * in_size ** 2
  aspect = jax.random.uniform(k_aspect, (batch, attempts), minval=3 / 4, maxval=4 / 3)
  h = jnp.round(jnp.sqrt(area / aspect))
  w = jnp.round(jnp.sqrt(area * aspect))
  ok = (h >= 1) & (w >= 1) & (h <= in_size) & (w <= in_size)
  first = jnp.argmax(ok, axis=1)
  pick = lambda a: jnp.where(ok.any(1), jnp.take_along_axis(a, first[:, None], 1)[:, 0], in_size)
  h, w = pick(h), pick(w)
  top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (in_size - h + 1))
  left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (in_size - w + 1))
  return top, left, h, w


def train_images(key, gray, size: int, min_area: float):
  """[B, 8, 8] -> [B, size, size, 3]: the built-in job's train preprocessing (crop='inception')."""
  top, left, h, w = crop_windows(key, gray.shape[0], gray.shape[-1], min_area)
  n = gray.shape[-1]
  return to_model_input(gray, resize_weights(top, h, size, n), resize_weights(left, w, size, n))


# ------------------------------------------------------------------------------------------------
# Training many models in one step.


def cell_model(base, cell: Cell, num_classes: int = 10):
  from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top
  fields = {k: v for k, v in base.model.to_dict().items() if k != "name"}
  fields.update(HEADS[cell.head][0], num_layers=cell.depth, causal=cell.mask == "causal",
                patch_size=tuple(fields["patch_size"]), num_classes=num_classes)
  return VisionTransformer(**fields)


def unit_rate_config(base, steps: int):
  """The base recipe at rate 1 with its schedule scaled to `steps` (warmup keeps its share)."""
  config = base.copy_and_resolve_references()
  config.learning_rate = 1.0
  config.warmup_steps = max(1, min(steps - 1, round(int(base.warmup_steps) * steps / int(base.total_steps))))
  config.total_steps = steps
  return config


def scaled_update(tx, grads, opt_state, params, rate):
  """The update of `tx` (built at rate 1) times `rate`: the same update as the optimizer built at
  `rate`, since clipping and Adam come before the rate and AdamW's decoupled decay is scaled by it."""
  import jax  # pylint: disable=g-import-not-at-top
  updates, opt_state = tx.update(grads, opt_state, params)
  return jax.tree.map(lambda u: rate * u, updates), opt_state


class Group:
  """The compiled programs of one cell: init, `chunk` training steps and evaluation, each over a
  leading model axis of (rate, seed) pairs, padded to a multiple of the device count. Both phases of a
  cell share them when they train as many models."""

  def __init__(self, base, cell: Cell, *, steps: int, chunk: int, devices, max_train: int,
               num_eval: int, compiler_options=None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from vit_cls import optim  # pylint: disable=g-import-not-at-top
    self.model = model = cell_model(base, cell)
    self.tx = tx = optim.create_optimizer(unit_rate_config(base, steps))[0]
    size, batch, smoothing = int(base.image_size), int(base.batch_size), float(base.label_smoothing)
    min_area = float(base.pp.get("crop_min_area", 0.05))
    self.steps, self.chunk, self.num_devices = steps, chunk, len(devices)
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)

    def init(key):
      params = model.init(jax.random.fold_in(key, 0), dummy, train=False)["params"]
      return params, tx.init(params), jnp.zeros((), bool)

    def step(state, rate, key, t, images, labels, n):
      params, opt_state, bad = state
      per_epoch = n // batch
      order = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, 1), t // per_epoch), (max_train,))
      order = jnp.argsort(jnp.where(jnp.arange(max_train) < n, order, 2.0))  # a permutation of 0..n-1 first
      idx = jax.lax.dynamic_slice(order, ((t % per_epoch) * batch,), (batch,))
      x = train_images(jax.random.fold_in(jax.random.fold_in(key, 2), t), images[idx], size, min_area)
      y = labels[idx]

      def loss_fn(p):
        logits = model.apply({"params": p}, x, train=True)
        targets = optax.smooth_labels(jax.nn.one_hot(y, 10), smoothing) if smoothing else jax.nn.one_hot(y, 10)
        return optax.softmax_cross_entropy(logits, targets).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
      updates, new_opt = scaled_update(tx, grads, opt_state, params, rate)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      # A non-finite step changes nothing (as in vit_cls.train); the run is reported as diverged.
      new_state = (keep(optax.apply_updates(params, updates), params), keep(new_opt, opt_state), bad | ~finite)
      return new_state, loss

    def train_chunk(state, rates, keys, t0, images, labels, n):
      def body(s, t):
        s, loss = jax.vmap(step, in_axes=(0, 0, 0, None, None, None, None))(s, rates, keys, t, images, labels, n)
        return s, loss
      state, losses = jax.lax.scan(body, state, t0 + jnp.arange(chunk))
      return state, losses.mean(0)

    def evaluate(params, images, labels, mask):
      def one(p):
        logits = model.apply({"params": p}, images, train=False)
        loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10))
        hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.sum(hit * mask), jnp.sum(loss * mask)
      return jax.vmap(one)(params)

    if len(devices) > 1:
      mesh = jax.sharding.Mesh(devices, ("models",))
      self.models_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("models"))
      self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
      self.models_sharding = self.replicated = jax.sharding.SingleDeviceSharding(devices[0])
    self._init = jax.jit(jax.vmap(init), out_shardings=self.models_sharding)
    self._train = jax.jit(train_chunk, donate_argnums=(0,))
    self._eval = jax.jit(evaluate)
    self.num_eval, self.max_train, self.size = num_eval, max_train, size
    self.compiler_options = compiler_options
    self.compile_s = 0.0  # seconds spent compiling (all programs of the cell, both phases)
    self._compiled = {}

  def _compile(self, name, fn, *args):
    """`fn` compiled once per model count (ahead of time, so that compilation is timed apart)."""
    import jax  # pylint: disable=g-import-not-at-top
    key = (name, len(jax.tree.leaves(args)[0]))
    if key not in self._compiled:
      self._compiled[key] = fn.lower(*args).compile(self.compiler_options)
    return self._compiled[key]

  def params_count(self) -> int:
    import jax  # pylint: disable=g-import-not-at-top
    shapes = jax.eval_shape(lambda: self.model.init(jax.random.key(0), jax.numpy.zeros(
        (1, self.size, self.size, 3)), train=False)["params"])
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)))

  def run(self, rates, seeds, train_data, eval_data, progress=None) -> list[dict]:
    """Trains one model per (rate, seed) and scores each on `eval_data`: [{accuracy, loss, status}]."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    count = len(seeds)
    extra = -count % self.num_devices  # copies of the last model that even out the devices, then dropped
    rates, seeds = list(rates) + [rates[-1]] * extra, list(seeds) + [seeds[-1]] * extra
    put = lambda a: jax.device_put(a, self.models_sharding)
    keys = put(jax.vmap(lambda s: jax.random.key(s))(jnp.asarray(seeds, jnp.uint32)))
    rates = put(jnp.asarray(rates, jnp.float32))
    images, labels = train_data
    n = len(labels)
    pad = self.max_train - n
    images, labels = jax.device_put((_pad(images, pad), _pad(labels, pad)), self.replicated)
    start = time.perf_counter()
    init = self._compile("init", self._init, keys)
    state = init(keys)
    train = self._compile("train", self._train, state, rates, keys, jnp.int32(0), images, labels, jnp.int32(n))
    self.compile_s += time.perf_counter() - start
    losses = None
    for t0 in range(0, self.steps, self.chunk):
      state, losses = train(state, rates, keys, jnp.int32(t0), images, labels, jnp.int32(n))
      if progress:
        progress(t0 + self.chunk, np.asarray(losses))
    ev_images, ev_labels = eval_data
    m = len(ev_labels)
    x, y, mask = jax.device_put((eval_images(_pad(ev_images, self.num_eval - m), self.size),
                                 _pad(ev_labels, self.num_eval - m),
                                 (np.arange(self.num_eval) < m).astype(np.float32)), self.replicated)
    start = time.perf_counter()
    evaluate = self._compile("eval", self._eval, state[0], x, y, mask)
    self.compile_s += time.perf_counter() - start
    hits, loss = (np.asarray(a) for a in evaluate(state[0], x, y, mask))
    bad = np.asarray(state[2])
    self.last_params = state[0]
    return [dict(accuracy=float("nan") if bad[i] else float(hits[i]) / m,
                 loss=float("nan") if bad[i] else float(loss[i]) / m, num_examples=m,
                 status="diverged" if bad[i] else "ok") for i in range(count)]


def _pad(array, count: int):
  """`array` with `count` zero rows appended (fixed shapes: one program serves every split)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.concatenate([array, np.zeros((count,) + array.shape[1:], array.dtype)])


# ------------------------------------------------------------------------------------------------
# Rows, the rate choice and the statistics.


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ("learning_rate", "accuracy", "loss", "compile_s", "train_s"):
      r[k] = float(r[k])
    for k in ("depth", "seed", "steps", "train_examples", "num_examples", "params", "group_models"):
      r[k] = int(r[k])
  return rows


def append_rows(path: str, rows: list[dict]) -> None:
  new = not os.path.exists(path)
  with open(path, "a", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    if new:
      w.writeheader()
    for row in rows:
      w.writerow({k: row[k] for k in FIELDS})


def cell_rows(rows: list[dict], cell: Cell, phase: str) -> list[dict]:
  return [r for r in rows if (r["mask"], int(r["depth"]), r["head"], r["phase"]) ==
          (cell.mask, cell.depth, cell.head, phase)]


def choose_rate(rows: list[dict], cell: Cell, lrs: Sequence[float]) -> float:
  """The sweep's best rate: highest mean validation accuracy over the sweep seeds, then lowest mean
  loss; a rate with a diverged seed never wins. Without sweep rows, the first rate."""
  best = None
  for lr in lrs:
    runs = [r for r in cell_rows(rows, cell, "sweep") if math.isclose(r["learning_rate"], lr)]
    if not runs or any(r["status"] != "ok" for r in runs):
      continue
    # Rounded, so that equal hit counts tie exactly and the loss decides.
    score = (round(sum(r["accuracy"] for r in runs) / len(runs), 9), -sum(r["loss"] for r in runs) / len(runs))
    if best is None or score > best[0]:
      best = (score, lr)
  return lrs[0] if best is None else best[1]


def t_quantile(df: float) -> float:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def t_interval(values: Sequence[float]) -> tuple[float, float]:
  """Mean and the half-width of its 95% t-interval (nan with fewer than 2 values)."""
  n = len(values)
  if n == 0:
    return float("nan"), float("nan")
  mean = sum(values) / n
  if n < 2:
    return mean, float("nan")
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, t_quantile(n - 1) * sd / math.sqrt(n)


def difference(a: dict, b: dict) -> tuple[float, float, str]:
  """a - b of two {seed: value} maps: (mean difference, 95% half-width, 'paired' | 'Welch').

  Paired by seed when both have the same seeds (same data order and crops, shared initial values);
  otherwise Welch's unequal-variance interval."""
  if set(a) == set(b) and len(a) >= 2:
    mean, half = t_interval([a[s] - b[s] for s in sorted(a)])
    return mean, half, "paired"
  va, vb = list(a.values()), list(b.values())
  if len(va) < 2 or len(vb) < 2:
    return float("nan"), float("nan"), "Welch"
  ma, mb = sum(va) / len(va), sum(vb) / len(vb)
  sa = sum((v - ma) ** 2 for v in va) / (len(va) - 1) / len(va)
  sb = sum((v - mb) ** 2 for v in vb) / (len(vb) - 1) / len(vb)
  if sa + sb == 0:
    return ma - mb, 0.0, "Welch"
  df = (sa + sb) ** 2 / (sa ** 2 / (len(va) - 1) + sb ** 2 / (len(vb) - 1))
  return ma - mb, t_quantile(df) * math.sqrt(sa + sb), "Welch"


def final_accuracies(rows: list[dict], cell: Cell) -> dict:
  """{seed: test accuracy in %} of a cell's final runs that did not diverge."""
  return {r["seed"]: 100 * r["accuracy"] for r in cell_rows(rows, cell, "final") if r["status"] == "ok"}


def summarise(rows: list[dict], cells: Sequence[Cell], lrs: Sequence[float]) -> list[dict]:
  out = []
  for cell in cells:
    final = cell_rows(rows, cell, "final")
    accs = final_accuracies(rows, cell)
    mean, half = t_interval(list(accs.values()))
    lr = final[0]["learning_rate"] if final else choose_rate(rows, cell, lrs)
    val = [100 * r["accuracy"] for r in cell_rows(rows, cell, "sweep")
           if math.isclose(r["learning_rate"], lr) and r["status"] == "ok"]
    out.append(dict(cell=cell, lr=lr, mean=mean, half=half, n=len(accs), accs=accs,
                    diverged=len(final) - len(accs), val=sum(val) / len(val) if val else float("nan"),
                    edge=len(lrs) > 1 and (math.isclose(lr, min(lrs)) or math.isclose(lr, max(lrs))),
                    params=final[0]["params"] if final else None))
  return out


def key_pairs(cells: Sequence[Cell]) -> list[tuple[Cell, Cell]]:
  """cls against every other head of its (mask, depth); the same head causal against bidirectional."""
  present = set(cells)
  pairs = []
  for c in cells:
    if c.head == "cls":
      pairs += [(c, o) for o in cells if o != c and (o.mask, o.depth) == (c.mask, c.depth)]
  pairs += [(c, Cell("bidirectional", c.depth, c.head)) for c in cells
            if c.mask == "causal" and Cell("bidirectional", c.depth, c.head) in present]
  return pairs


def compare(rows: list[dict], pairs) -> list[dict]:
  out = []
  for a, b in pairs:
    diff, half, kind = difference(final_accuracies(rows, a), final_accuracies(rows, b))
    if math.isnan(half):
      verdict = "too few seeds"
    elif abs(diff) > half:
      verdict = f"real: {a.head if diff > 0 else b.head} higher" if a.mask == b.mask else (
          f"real: {a.mask if diff > 0 else b.mask} higher")
    else:
      verdict = "noise (interval spans 0)"
    out.append(dict(a=a, b=b, diff=diff, half=half, kind=kind, verdict=verdict))
  return out


# ------------------------------------------------------------------------------------------------
# Outputs.


def _fmt(mean: float, half: float) -> str:
  if math.isnan(mean):
    return "—"
  return f"{mean:.2f}" if math.isnan(half) else f"{mean:.2f} ± {half:.2f} [{mean - half:.2f}, {mean + half:.2f}]"


def processor_name() -> str:
  """The CPU's model name, and whether it has AMX (bf16 matrix units): what a reader needs to compare."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
              platform.machine())
  return name + (" (AMX)" if "amx_bf16" in info else "")


def write_table(path: str, summary, comparisons, rows, args, base, header: dict) -> None:
  m = base.model
  lines = [
      "# Pooling study: which token should the classifier read, and does the mask decide it?", "",
      f"Data: the digits (train 1,437 / test 360; the sweep holds out {args.val_percent}% of train as "
      f"validation). Model: `configs/default.py` (width {m.hidden_size}, {m.num_heads} heads, MLP "
      f"{m.mlp_dim}, patch {tuple(m.patch_size)} of a {base.image_size}x{base.image_size} image, so 16 patch "
      f"tokens; depth as in the table), **{args.steps} steps** per run at batch {base.batch_size} "
      f"({args.steps * base.batch_size / 1437:.2g} epochs of train; the built-in job trains "
      f"{base.total_steps} steps), {base.optimizer}, warmup + cosine, label smoothing "
      f"{base.label_smoothing}, weight decay {base.weight_decay}, clipping {base.grad_clip_norm}.",
      f"Rate per cell: the best mean validation accuracy over {args.sweep_seeds} seed(s) at each of "
      f"{', '.join(f'{x:g}' for x in args.lrs)} (trained on train minus validation); then {args.seeds} "
      f"fresh seeds at that rate on the whole train split, scored on test. Accuracy: mean ± half-width "
      f"[95% t-interval over the seeds]; one test image is {100 / 360:.2f} points.",
      f"Machine: {header['processor']}, {header['cores']} cores, allocator {header['allocator']}, "
      f"{header['devices']}. Wall clock of this invocation: **{header['wall_min']:.1f} min** "
      f"(compilation {header['compile_min']:.1f} min of it; {header['models']} models trained), "
      f"load average {header['load_start']} at the start and {header['load_end']} at the end "
      f"(the study alone keeps {header['cores']} cores busy: a load above that is other jobs).",
  ]
  if args.note:
    lines += ["", f"**{args.note}**"]
  lines += ["", "| mask | layers | head | what the classifier reads | lr | test accuracy (%) | seeds | "
                "parameters |", "|---|---|---|---|---|---|---|---|"]
  for s in summary:
    c = s["cell"]
    acc = _fmt(s["mean"], s["half"]) + (f" ({s['diverged']} diverged)" if s["diverged"] else "")
    lr = f"{s['lr']:g}" + (" (grid edge)" if s["edge"] else "")
    params = "—" if s["params"] is None else f"{s['params']:,}"
    lines.append(f"| {c.mask} | {c.depth} | `{c.head}` | {HEADS[c.head][1]} | {lr} | {acc} | {s['n']} | "
                 f"{params} |")
  if comparisons:
    lines += ["", "Differences (first minus second, test accuracy points, 95% interval; paired by seed):", "",
              "| first | second | difference | interval | verdict |", "|---|---|---|---|---|"]
    for d in comparisons:
      interval = "—" if math.isnan(d["half"]) else f"[{d['diff'] - d['half']:+.2f}, {d['diff'] + d['half']:+.2f}]"
      kind = "" if d["kind"] == "paired" else f" ({d['kind']})"
      lines.append(f"| {d['a'].label} | {d['b'].label} | {d['diff']:+.2f}{kind} | {interval} | {d['verdict']} |")
    lines += ["", f"{len(comparisons)} intervals at 95%: even if no cell differed, about "
                  f"{len(comparisons) / 20:.1f} of them would exclude 0 by chance, so a difference just past "
                  f"the edge is weak evidence on its own."]
  if len(args.lrs) > 1:
    lines += ["", f"Sweep: validation accuracy (%), mean over {args.sweep_seeds} seed(s); the chosen rate in "
                  "bold:", "", "| cell | " + " | ".join(f"lr {x:g}" for x in args.lrs) + " |",
              "|---|" + "---|" * len(args.lrs)]
    for s in summary:
      cells = []
      for lr in args.lrs:
        runs = [r for r in cell_rows(rows, s["cell"], "sweep") if math.isclose(r["learning_rate"], lr)]
        ok = [100 * r["accuracy"] for r in runs if r["status"] == "ok"]
        text = "—" if not runs else ("diverged" if len(ok) < len(runs) else f"{sum(ok) / len(ok):.2f}")
        cells.append(f"**{text}**" if math.isclose(lr, s["lr"]) else text)
      lines.append(f"| {s['cell'].label} | " + " | ".join(cells) + " |")
  lines += ["", f"Every run: `{CSV_NAME}`. Plot: `{PNG_NAME}`. Rerun: `python experiments/pooling_study.py"
                f"{(' ' + header['argv']) if header['argv'] else ''}`.", ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def write_plot(path: str, summary, comparisons, args, base) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_heads, ax_depth, ax_diff) = plt.subplots(1, 3, figsize=(17, 5.2),
                                                    gridspec_kw=dict(width_ratios=(1.2, 0.8, 1.3)))
  colors = {h: plt.get_cmap("tab10")(i + 2) for i, h in enumerate(HEADS)}  # blue/orange: the masks
  full = int(base.model.num_layers)
  by_cell = {s["cell"]: s for s in summary}

  def point(ax, x, s, color):
    if math.isnan(s["mean"]):
      return
    ax.errorbar(x, s["mean"], yerr=0 if math.isnan(s["half"]) else s["half"], fmt="o", color=color,
                capsize=4, ms=7)
    ax.plot([x + 0.12] * len(s["accs"]), list(s["accs"].values()), ".", color=color, alpha=0.5, ms=4)

  heads = list(dict.fromkeys(c.head for c in by_cell if c.depth == full))
  mask_colors = {"bidirectional": "tab:blue", "causal": "tab:orange"}
  for i, head in enumerate(heads):
    for j, mask in enumerate(MASKS):
      s = by_cell.get(Cell(mask, full, head))
      if s:
        point(ax_heads, i + (0.3 * j - 0.15), s, mask_colors[mask])
  for mask, color in mask_colors.items():
    ax_heads.plot([], [], "o", color=color, label=mask)
  ax_heads.legend(fontsize=8, loc="lower right")
  ax_heads.set_xlim(-0.6, len(heads) - 0.4)
  ax_heads.set_xticks(range(len(heads)))
  ax_heads.set_xticklabels(heads, fontsize=9)
  ax_heads.set_ylabel("test accuracy (%)")
  ax_heads.set_title(f"{full} layer(s), each head at its best rate\nmean, 95% CI, seeds (dots)", fontsize=10)
  ax_heads.axhline(10, color="gray", lw=0.8, ls=":")
  ax_heads.text(-0.4, 11, "chance", fontsize=8, color="gray")
  ax_heads.grid(axis="y", alpha=0.3)

  depths = sorted({c.depth for c in by_cell if c.mask == "bidirectional"})
  for k, head in enumerate(args.depth_heads):
    pts = [(d, by_cell[Cell("bidirectional", d, head)]) for d in depths if Cell("bidirectional", d, head) in by_cell]
    pts = [(d, s) for d, s in pts if not math.isnan(s["mean"])]
    if pts:
      xs = [depths.index(d) + 0.08 * (k - 1) for d, _ in pts]
      ax_depth.errorbar(xs, [s["mean"] for _, s in pts],
                        yerr=[0 if math.isnan(s["half"]) else s["half"] for _, s in pts], fmt="o-",
                        color=colors[head], capsize=4, label=head)
  ax_depth.set_xticks(range(len(depths)))
  ax_depth.set_xticklabels([str(d) for d in depths])
  ax_depth.set_xlabel("encoder layers (bidirectional)")
  ax_depth.set_ylabel("test accuracy (%)")
  ax_depth.set_title("Depth axis: mean and 95% CI", fontsize=10)
  ax_depth.grid(alpha=0.3)
  if ax_depth.get_legend_handles_labels()[0]:
    ax_depth.legend(fontsize=8)

  shown = [d for d in comparisons if not math.isnan(d["diff"])]
  # A linear axis sized to the small differences; the large ones (the causal class token at chance)
  # are drawn at the edge, with their value written next to them.
  small = [abs(d["diff"]) + (0 if math.isnan(d["half"]) else d["half"]) for d in shown if abs(d["diff"]) < 20]
  limit = 1.15 * max(small + [2.0])
  for i, d in enumerate(shown):
    real = not math.isnan(d["half"]) and abs(d["diff"]) > d["half"]
    color = "tab:red" if real else "tab:gray"
    if abs(d["diff"]) <= limit:
      ax_diff.errorbar(d["diff"], i, xerr=0 if math.isnan(d["half"]) else d["half"], fmt="o", color=color,
                       capsize=3)
    else:
      edge = math.copysign(limit, d["diff"])
      ax_diff.plot(edge, i, "<" if d["diff"] < 0 else ">", color=color, ms=8)
      ax_diff.text(edge * 0.97, i - 0.25, f"{d['diff']:+.1f} ± {d['half']:.1f}", fontsize=7, color=color,
                   ha="left" if d["diff"] < 0 else "right")
  ax_diff.set_xlim(-limit, limit)
  ax_diff.axvline(0, color="black", lw=0.8)
  ax_diff.set_yticks(range(len(shown)))
  ax_diff.set_yticklabels([f"{d['a'].label} − {d['b'].label}" for d in shown], fontsize=7)
  ax_diff.invert_yaxis()
  ax_diff.set_xlabel("difference, test accuracy points")
  ax_diff.set_title("Paired differences, 95% CI (red: excludes 0)", fontsize=10)
  ax_diff.grid(axis="x", alpha=0.3)
  fig.suptitle(f"Pooling study on the digits: {args.steps} steps, {args.seeds} seeds per cell at its own "
               f"best rate (chosen on validation)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_attention_figure(out: str, group, lr: float) -> str | None:
  """The class token's attention on the first test digit, in the first seed's final `cls` model."""
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_cls import predict, visualize  # pylint: disable=g-import-not-at-top
  from vit_cls.datasets import digits  # pylint: disable=g-import-not-at-top
  images, _ = digits.load_images()
  digit = os.path.join(out, DIGIT_NAME)
  Image.fromarray(images[int(digits.split_indices()["test"][0]), :, :, 0]).save(digit)
  image = predict.load_image(digit, group.size)
  params = jax.tree.map(lambda a: a[0], group.last_params)
  maps = visualize.class_token_attention(group.model, params, image)
  return visualize.render(image, maps, os.path.join(out, ATTENTION_NAME),
                          title=f"class token of the pooling study's cls model ({group.model.num_layers} "
                                f"layers, bidirectional, lr {lr:g}, seed 0)")


def rerun_args(argv: Sequence[str]) -> str:
  """The command-line arguments that define the study (not where it wrote, or how it was resumed)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    name = a.split("=", 1)[0]
    if name == "--resume":
      continue
    if name in ("--out", "--note"):
      skip = "=" not in a
      continue
    out.append(a)
  return " ".join(out)


def _devices(count: int):
  """The first `count` devices; asks for simulated CPU devices when JAX has not started yet."""
  if count > 1 and "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={count}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  found = jax.devices()
  if len(found) < count:
    raise SystemExit(f"--devices {count}: only {len(found)} device(s) here; use --devices {len(found)}")
  return found[:count]


def _load() -> str:
  return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  started, load_start = time.perf_counter(), _load()
  devices = _devices(args.devices)
  import numpy as np  # pylint: disable=g-import-not-at-top
  base = base_config(args)
  cells = plan_cells(args, base)
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, CSV_NAME)
  if not args.resume and os.path.exists(csv_path):
    os.remove(csv_path)
  data = load_splits(args.val_percent)
  num_eval = max(len(data["val"][1]), len(data["test"][1]))
  max_train = len(data["train"][1])
  sweep = [(lr, s) for lr in args.lrs for s in range(args.sweep_seeds)] if len(args.lrs) > 1 else []
  groups, compile_s, models = {}, 0.0, 0
  # --quick: XLA's backend optimisations off (a third of the compile time; the 6 steps barely notice).
  compiler_options = {"xla_backend_optimization_level": 0} if args.quick else None

  def group_for(cell):
    if cell not in groups:
      groups.clear()  # one cell's programs at a time: memory stays flat over the study
      groups[cell] = Group(base, cell, steps=args.steps, chunk=args.chunk, devices=devices,
                           max_train=max_train, num_eval=num_eval, compiler_options=compiler_options)
    return groups[cell]

  def train_phase(cell, phase, pairs, train_split, eval_split):
    nonlocal compile_s, models
    group = group_for(cell)
    before = group.compile_s
    t = time.perf_counter()

    def progress(step, losses):
      if step % max(args.chunk, args.steps // 4) == 0 or step == args.steps:
        print(f"[pooling_study] {cell.label} {phase} step {step}/{args.steps} loss "
              f"{np.nanmean(losses):.3f} ({time.perf_counter() - started:.0f}s elapsed, load {_load()})",
              flush=True)

    results = group.run([lr for lr, _ in pairs], [s for _, s in pairs], data[train_split],
                        data[eval_split], progress)
    spent = group.compile_s - before
    compile_s += spent
    models += len(pairs)
    train_s = time.perf_counter() - t - spent
    params = group.params_count()
    append_rows(csv_path, [dict(mask=cell.mask, depth=cell.depth, head=cell.head, phase=phase,
                                learning_rate=lr, seed=s, steps=args.steps, train_split=train_split,
                                train_examples=len(data[train_split][1]), eval_split=eval_split,
                                params=params, group_models=len(pairs), compile_s=round(spent, 2),
                                train_s=round(train_s, 2), **r)
                           for (lr, s), r in zip(pairs, results)])
    return group

  attention = None
  for cell in cells:
    rows = read_rows(csv_path)
    if sweep and not cell_rows(rows, cell, "sweep"):
      train_phase(cell, "sweep", sweep, "fit", "val")
      rows = read_rows(csv_path)
    if not cell_rows(rows, cell, "final"):
      lr = choose_rate(rows, cell, args.lrs)
      group = train_phase(cell, "final", [(lr, s) for s in range(args.seeds)], "train", "test")
      if cell == Cell("bidirectional", int(base.model.num_layers), "cls") and not args.quick:
        attention = write_attention_figure(args.out, group, lr)

  rows = read_rows(csv_path)
  summary = summarise(rows, cells, args.lrs)
  comparisons = compare(rows, key_pairs(cells))
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  header = dict(processor=processor_name(), cores=os.cpu_count(), allocator=allocator.kind(),
                devices=f"{len(devices)} {devices[0].platform.upper()} device(s)",
                wall_min=(time.perf_counter() - started) / 60, compile_min=compile_s / 60, models=models,
                load_start=load_start, load_end=_load(),
                argv=rerun_args(sys.argv[1:] if argv is None else argv))
  write_table(os.path.join(args.out, MD_NAME), summary, comparisons, rows, args, base, header)
  write_plot(os.path.join(args.out, PNG_NAME), summary, comparisons, args, base)
  print(open(os.path.join(args.out, MD_NAME), encoding="utf-8").read())
  if attention:
    print(f"[pooling_study] class-token attention: {attention}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
