"""The optax optimizer and learning-rate schedule a config asks for.

Config fields (see configs/default.py): optimizer (sgd | adam | adamw), learning_rate, momentum, b1, b2,
weight_decay, grad_clip_norm (0 disables), warmup_steps, decay_type (cosine | linear | constant),
total_steps.
"""

from __future__ import annotations

from typing import Callable

import flax
import jax.numpy as jnp
import optax

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


def create_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  """The update rule, with global-norm clipping first and the schedule inside. Returns (tx, schedule)."""
  schedule = create_learning_rate_schedule(config)
  name, wd = config.optimizer, config.get("weight_decay", 0.0)
  if name == "sgd":
    base = optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=config.get("momentum", 0.9) or None))
  elif name == "adam":
    base = optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask) if wd else optax.identity(),
        optax.adam(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999)))
  elif name == "adamw":
    base = optax.adamw(schedule, b1=config.get("b1", 0.9), b2=config.get("b2", 0.999),
                       weight_decay=wd, mask=decay_mask)
  else:
    raise ValueError(f"config.optimizer={name!r} is not allowed: choose one of {', '.join(OPTIMIZERS)}.")
  clip = config.get("grad_clip_norm", 0.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), base) if clip else base
  return tx, schedule
