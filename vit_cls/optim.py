"""The optax optimizer and learning-rate schedule a config asks for.

Config fields (see configs/base.py): optimizer (sgd | adam | adamw), learning_rate, momentum, b1, b2,
weight_decay, grad_clip_norm (0 disables), warmup_steps, decay_type (cosine | linear | constant),
total_steps.

Weight decay, per optimizer (kernels only, see `decay_mask`):

* `adamw`: decoupled from the gradient and scaled by the learning rate, after the Adam step:
  `param -= lr_t * (adam_update + weight_decay * param)` (optax.adamw; Loshchilov & Hutter). This is what
  the ViT paper's "Adam with weight decay" means and what its pre-training recipe uses.
* `adam`: no weight decay. `adam` with `weight_decay > 0` is refused, because two different updates go by
  that name: the L2 term added to the gradient before Adam (torch.optim.Adam's `weight_decay`), which
  Adam's normaliser rescales per parameter so that it barely decays weights with large gradients, and
  the decoupled one above. Picking either silently would change a recipe's regularisation by orders of
  magnitude for half of the readers; `adamw` names the decoupled one unambiguously.
* `sgd`: L2, added to the gradient before momentum (for SGD the two forms differ only by the momentum
  filter, and this is the usual one). The paper's fine-tuning recipe uses none.

Fine-tuning tools (both off by default, and then the optimizer and its state are exactly as before):

* `layer_decay` (a float in (0, 1]; None = off): layer-wise learning-rate decay as in BEiT, MAE, DINOv2
  fine-tuning and timm's `param_groups_layer_decay`. Layer ids follow timm: 0 for the embeddings (patch
  embedding, `cls`, registers, position embeddings, CLIP's `pre_norm`), i + 1 for block i, L + 1 for the
  final norm, pooling head (MAP, `fc_norm`), `pre_logits` and `head`. Parameter p of layer id l learns
  at `learning_rate * layer_decay ** (L + 1 - l)`: the head at the full rate, block i at `d ** (L - i)`,
  the embeddings at `d ** (L + 1)`. The factor multiplies the optimizer's final update, so it scales
  whatever that update holds (decoupled weight decay included, as timm's per-group `lr` does) and works
  with every optimizer. With `scan_layers` the stacked block parameters get one factor per slice.
* `frozen` (a regular expression; "" = nothing frozen): see `frozen_mask`. Frozen leaves go through
  `optax.set_to_zero` in an `optax.multi_transform`, so they have no optimizer state at all.
"""

from __future__ import annotations

from typing import Callable

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_cls import errors

OPTIMIZERS = ("sgd", "adam", "adamw")
DECAY_TYPES = ("cosine", "linear", "constant")


def create_learning_rate_schedule(config) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Linear warmup, then cosine or linear decay to zero at `total_steps`.

  The warmup counts from step 1, not 0, so that the very first update already moves the parameters
  (optax's linear_schedule from 0 would waste step 0 on a zero learning rate).
  """
  base, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
  decay_type = config.decay_type

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    if decay_type == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay_type == "linear":
      decay = 1.0 - progress
    else:
      decay = 1.0
    return base * warm * decay

  return schedule


def decay_mask(params):
  """Weight decay applies to kernels only: never to biases, LayerNorm, `cls`, registers or position
  embeddings, which are offsets and scales rather than weights that grow with overfitting."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


# ----------------------------------------------------------------------------------------------------
# Parameter names, layer ids, frozen masks.

# Top-level scopes at layer id 0 (before the first block) and under `Transformer` (the rest of
# `Transformer` is blocks or the final norm).
_EMBEDDING_SCOPES = ("embedding", "cls", "registers")
_EMBEDDING_ENCODER_SCOPES = ("posembed_input", "pre_norm")


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_id(names: tuple[str, ...], num_layers: int):
  """BEiT/timm layer id of a parameter: 0 embeddings, i + 1 block i, L + 1 final norm and heads.

  For a scanned block parameter (`Transformer/encoderblock/...`, stacked on axis 0) returns the array
  `[1, ..., L]`, one id per slice.
  """
  top = names[0]
  if top in _EMBEDDING_SCOPES:
    return 0
  if top == "Transformer" and len(names) > 1:
    sub = names[1]
    if sub in _EMBEDDING_ENCODER_SCOPES:
      return 0
    if sub == "encoderblock":
      return np.arange(1, num_layers + 1)
    if sub.startswith("encoderblock_"):
      return int(sub.split("_")[1]) + 1
  return num_layers + 1  # encoder_norm, fc_norm, MAPHead, pre_logits, head


def layer_decay_scale(names: tuple[str, ...], num_layers: int, decay: float):
  """The factor `decay ** (L + 1 - layer_id)` of one parameter (an array of L factors if scanned)."""
  return np.asarray(decay, np.float64) ** (num_layers + 1 - np.asarray(layer_id(names, num_layers)))


def unrolled_names(names: tuple[str, ...], num_layers: int) -> list[str]:
  """The published-layout name(s) of a parameter, "/"-joined: one per slice for a scanned block
  parameter (`Transformer/encoderblock/x` -> `Transformer/encoderblock_{i}/x`), so the same
  `config.frozen` regex works with and without `scan_layers`."""
  if len(names) > 1 and names[:2] == ("Transformer", "encoderblock"):
    return ["/".join(("Transformer", f"encoderblock_{i}") + names[2:]) for i in range(num_layers)]
  return ["/".join(names)]


def frozen_mask(params, pattern: str | None, num_layers: int):
  """Per leaf: False (trained), True (frozen), or for a scanned block leaf whose layers are only partly
  frozen a bool array with one entry per layer.

  `pattern` is searched (`re.search`) in the published-layout names ("Transformer/encoderblock_3/
  MlpBlock_0/Dense_0/kernel", "embedding/kernel", "cls", "head/bias"; see `unrolled_names`).
  """
  if not pattern:
    return jax.tree.map(lambda _: False, params)
  regex = re.compile(pattern)

  def leaf(path, _):
    hits = [bool(regex.search(n)) for n in unrolled_names(_names(path), num_layers)]
    return hits[0] if len(hits) == 1 else (all(hits) if all(hits) or not any(hits) else np.array(hits))
  return jax.tree_util.tree_map_with_path(leaf, params)


def _leading_axis_scale(x, factors):
  """`factors` (one per slice of axis 0) shaped to broadcast against `x`."""
  return jnp.asarray(factors, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def scale_by_parameter(factor_fn: Callable) -> optax.GradientTransformation:
  """Multiplies each update by `factor_fn(names)` (a scalar, or one factor per slice of axis 0 for
  scanned block parameters). Stateless: adding it changes no optimizer state."""
  def update(updates, state, params=None):
    del params

    def one(path, u):
      f = factor_fn(_names(path))
      if np.ndim(f) == 0:
        return u if float(f) == 1.0 else u * jnp.asarray(f, u.dtype)
      return u * _leading_axis_scale(u, f)
    return jax.tree_util.tree_map_with_path(one, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def check_config(config) -> None:
  """One-line ConfigError for an optimizer the config cannot build (see the module docstring)."""
  name, wd = config.optimizer, config.get("weight_decay", 0.0)
  decay = config.get("layer_decay", None)
  if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float))
                            or not 0.0 < decay <= 1.0):
    raise errors.ConfigError(
        f"config.layer_decay={decay!r} is not allowed: None (off) or a number in (0, 1] (BEiT/MAE use "
        f"0.65..0.75; 1 is no decay).")
  frozen = config.get("frozen", "") or ""
  if not isinstance(frozen, str):
    raise errors.ConfigError(f"config.frozen={frozen!r} is not allowed: a regular expression string "
                             f"(\"\" freezes nothing).")
  try:
    re.compile(frozen)
  except re.error as e:
    raise errors.ConfigError(f"config.frozen={frozen!r} is not a valid regular expression ({e}).") from None
  if name not in OPTIMIZERS:
    raise errors.ConfigError(
        f"config.optimizer={name!r} is not allowed: choose one of {', '.join(OPTIMIZERS)}.")
  if wd < 0:
    raise errors.ConfigError(f"config.weight_decay={wd!r} is not allowed: 0 (off) or a positive number.")
  if name == "adam" and wd:
    raise errors.ConfigError(
        f"config.optimizer='adam' with config.weight_decay={wd!r} is ambiguous (L2 in the gradient, or "
        f"decoupled?): use config.optimizer='adamw' for the decoupled, learning-rate-scaled decay of the "
        f"ViT paper, or weight_decay=0.")


def check_frozen(config, params) -> None:
  """One-line ConfigError for a `config.frozen` that matches no parameter, every parameter, or the head
  (a frozen head leaves nothing a classifier can learn: use `configs/linear_probe.py`'s pattern)."""
  frozen = config.get("frozen", "") or ""
  if not frozen:
    return
  num_layers = int(config.model.num_layers)
  mask = flax.traverse_util.flatten_dict(frozen_mask(params, frozen, num_layers), sep="/")
  hit = {k: np.any(v) for k, v in mask.items()}
  if not any(hit.values()):
    raise errors.ConfigError(
        f"config.frozen={frozen!r} matches no parameter: names look like 'embedding/kernel', 'cls', "
        f"'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', 'head/kernel'.")
  head = [k for k in hit if k.split("/")[0] == "head" and hit[k]]
  if head:
    raise errors.ConfigError(
        f"config.frozen={frozen!r} freezes the head ({', '.join(head)}): the head is what fine-tuning "
        f"trains; leave it out of the pattern (e.g. '^(?!head/)').")
  if all(np.all(v) for v in mask.values()):
    raise errors.ConfigError(f"config.frozen={frozen!r} freezes every parameter: nothing would train.")


def create_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  """The update rule, with global-norm clipping first and the schedule inside. Returns (tx, schedule).

  Layer decay scales the final update (after clipping, moments and weight decay); frozen parameters
  are routed to `optax.set_to_zero` by `optax.multi_transform`, so the inner optimizer, its state and
  the clipping norm see only the trained ones.
  """
  check_config(config)
  schedule = create_learning_rate_schedule(config)
  name, wd = config.optimizer, config.get("weight_decay", 0.0)
  b1, b2 = config.get("b1", 0.9), config.get("b2", 0.999)
  if name == "sgd":
    base = optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=config.get("momentum", 0.9) or None))
  elif name == "adam":
    base = optax.adam(schedule, b1=b1, b2=b2)
  else:
    base = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=wd, mask=decay_mask)
  clip = config.get("grad_clip_norm", 0.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), base) if clip else base
  num_layers = int(config.model.num_layers) if "model" in config else 0
  decay = config.get("layer_decay", None)
  frozen = config.get("frozen", "") or ""
  partial = []
  if frozen:
    # Scanned leaves frozen for some layers only keep their state; their frozen slices get factor 0.
    def frozen_factor(names):
      hits = [bool(re.search(frozen, n)) for n in unrolled_names(names, num_layers)]
      return np.where(hits, 0.0, 1.0) if len(hits) > 1 and any(hits) and not all(hits) else 1.0
    partial.append(frozen_factor)
  if decay is not None and decay != 1.0:
    partial.append(lambda names: layer_decay_scale(names, num_layers, decay))
  if partial:
    tx = optax.chain(tx, scale_by_parameter(
        lambda names: functools.reduce(np.multiply, [f(names) for f in partial], 1.0)))
  if frozen:
    def labels(params):
      mask = frozen_mask(params, frozen, num_layers)
      return jax.tree.map(lambda m: "frozen" if np.ndim(m) == 0 and m else "trained", mask)
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
