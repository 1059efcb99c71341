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
"""

from __future__ import annotations

from typing import Callable

import flax
import jax.numpy as jnp
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


def check_config(config) -> None:
  """One-line ConfigError for an optimizer the config cannot build (see the module docstring)."""
  name, wd = config.optimizer, config.get("weight_decay", 0.0)
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


def create_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  """The update rule, with global-norm clipping first and the schedule inside. Returns (tx, schedule)."""
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
  return tx, schedule
