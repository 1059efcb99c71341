"""Training and evaluation: one jit-compiled step over a mesh of every device, orbax checkpoints, resume.

`train_and_evaluate(config, workdir)` is the whole job. The step is data-parallel: the global batch is
split along the mesh's `data` axis, parameters and optimizer state are replicated, buffers are donated.
Everything a step needs from randomness derives from (config.seed, step), and the input pipeline can start
at any step, so a run that is killed and resumed ends with the parameters of a run that never stopped.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vit_cls import input_pipeline
from vit_cls import metrics_log
from vit_cls import optim
from vit_cls import sharding
from vit_cls.model import VisionTransformer

CHECKPOINT_DIR = "checkpoints"
# Fields of config.model that describe the checkpoint, not the architecture.
_NON_ARCHITECTURE_FIELDS = ("name",)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN or Inf: the run stops without saving."""


# ----------------------------------------------------------------------------------------------------
# The model and the steps.


def model_kwargs(config, num_classes: int) -> dict:
  """`VisionTransformer` keyword arguments from `config.model`, with the dataset's number of classes."""
  fields = {k: v for k, v in config.model.to_dict().items() if k not in _NON_ARCHITECTURE_FIELDS}
  fields["patch_size"] = tuple(fields["patch_size"])
  fields["num_classes"] = num_classes
  return fields


def create_model(config, num_classes: int) -> VisionTransformer:
  return VisionTransformer(**model_kwargs(config, num_classes))


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, config, num_classes: int):
  """One update from a global batch, averaging gradients over `accum_steps` micro-batches.

  Micro-batch j takes every accum-th example (j, j+accum, ...): each device's contiguous share of the
  batch then contributes equally to every micro-batch, so splitting needs no communication, and the mean
  of equal-sized micro-batch means is the mean over the whole batch: the same update as one big step.
  """
  accum = config.get("accum_steps", 1)
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

  def loss_fn(params, images, labels, dropout_rng):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": dropout_rng})
    loss = cross_entropy(logits, labels, num_classes, config.get("label_smoothing", 0.0)).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, accuracy

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, accuracy), grads = grad_fn(state.params, batch["image"], batch["label"], rng)
  else:
    def split(x):
      return jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
    micro = jax.tree.map(split, {"image": batch["image"], "label": batch["label"]})

    def body(carry, inputs):
      j, mb = inputs
      (l, a), g = grad_fn(state.params, mb["image"], mb["label"], jax.random.fold_in(rng, j))
      return jax.tree.map(jnp.add, carry, (l, a, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    (loss, accuracy, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    loss, accuracy, grads = jax.tree.map(lambda x: x / accum, (loss, accuracy, grads))

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  # A non-finite step changes nothing: the state stays the last good one, and the host stops the run.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt_state, state.opt_state))
  metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm,
             "learning_rate": schedule(state.step), "finite": finite}
  return new_state, metrics


def eval_step(params, batch: dict, *, model, num_classes: int):
  """Sums over the unmasked examples of a batch: loss, top-1 and top-5 hits, and the count."""
  logits = model.apply({"params": params}, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  labels = batch["label"]
  loss = cross_entropy(logits, labels, num_classes)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  out = {"loss": jnp.sum(loss * mask), "accuracy": jnp.sum(top1 * mask), "count": jnp.sum(mask)}
  if num_classes > 5:
    top5_idx = jax.lax.top_k(logits, 5)[1]
    top5 = jnp.any(top5_idx == labels[:, None], axis=-1).astype(jnp.float32)
    out["top5_accuracy"] = jnp.sum(top5 * mask)
  return out


def evaluate(params, eval_fn, config, mesh) -> dict:
  """Scores every example of the eval split once (the pipeline pads the last batch and masks it)."""
  totals = None
  for local in input_pipeline.create_eval_iterator(config):
    sums = eval_fn(params, sharding.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {"num_examples": count, **{k: float(v) / max(count, 1.0) for k, v in totals.items()}}


# ----------------------------------------------------------------------------------------------------
# Checkpoints: orbax, one `state` item (step, params, optimizer state) and one `meta` item (JSON).


def create_checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.get("keep_checkpoints", 3), create=True,
      # Saves block until committed: a kill can only ever lose the save in flight, which orbax writes to
      # a temporary directory and renames when complete.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                               options=options, item_names=("state", "meta"))


def checkpoint_meta(config, info: input_pipeline.DatasetInfo) -> dict:
  """What `vit_cls.load` and `predict` need to rebuild the model without the training config."""
  return {"model": model_kwargs(config, info.num_classes), "image_size": config.image_size,
          "num_classes": info.num_classes, "label_names": list(info.label_names),
          "dataset": config.dataset}


def save_checkpoint(mngr, state: TrainState, meta: dict) -> None:
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"step": state.step, "params": state.params,
                                   "opt_state": state.opt_state}),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()


def restore_checkpoint(mngr, step: int, abstract_state: TrainState) -> TrainState:
  target = {"step": abstract_state.step, "params": abstract_state.params,
            "opt_state": abstract_state.opt_state}
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except ValueError as e:
    if "do not match" not in str(e) and "shape" not in str(e).lower():
      raise
    raise ValueError(
        f"the checkpoint {mngr.directory}/{step} does not match this config's model or optimizer "
        f"(its parameter or optimizer-state tree differs): resume with the config it was written with, "
        f"or start a new workdir (use config.init_from to fine-tune from it).") from None
  s = restored["state"]
  return TrainState(step=s["step"], params=s["params"], opt_state=s["opt_state"])


# ----------------------------------------------------------------------------------------------------
# Checks that fail before anything is compiled.


def validate_config(config) -> None:
  """One-line errors naming the field, the value and what is allowed, before any compile or data read."""
  def bad(field, allowed):
    value = config.get(field) if "." not in field else None
    raise ValueError(f"config.{field}={value!r} is not allowed: {allowed}.")

  if config.optimizer not in optim.OPTIMIZERS:
    bad("optimizer", f"choose one of {', '.join(optim.OPTIMIZERS)}")
  if config.decay_type not in optim.DECAY_TYPES:
    bad("decay_type", f"choose one of {', '.join(optim.DECAY_TYPES)}")
  for field in ("total_steps", "batch_size", "eval_batch_size", "accum_steps", "log_every",
                "checkpoint_every", "eval_every"):
    if int(config.get(field, 1)) < 1:
      bad(field, "a positive integer")
  if config.warmup_steps < 0 or config.warmup_steps > config.total_steps:
    bad("warmup_steps", f"between 0 and total_steps={config.total_steps}")
  if config.learning_rate <= 0:
    bad("learning_rate", "a positive number")
  if not 0.0 <= config.get("label_smoothing", 0.0) < 1.0:
    bad("label_smoothing", "a value in [0, 1)")
  patch = tuple(config.model.patch_size)
  if config.image_size % patch[0] or config.image_size % patch[1]:
    raise ValueError(f"config.image_size={config.image_size} is not divisible by "
                     f"config.model.patch_size={patch}: use a multiple of the patch size.")
  create_model(config, num_classes=1)  # the architecture fields check themselves
  n_dev, n_proc = jax.device_count(), jax.process_count()
  input_pipeline.check_batch_divisibility(config.batch_size, n_dev, n_proc, "batch_size")
  input_pipeline.check_batch_divisibility(config.eval_batch_size, n_dev, n_proc, "eval_batch_size")
  per_device = config.batch_size // n_dev
  if per_device % config.accum_steps:
    raise ValueError(f"config.accum_steps={config.accum_steps} does not divide the per-device batch "
                     f"{per_device} (batch_size={config.batch_size} over {n_dev} devices): choose a "
                     f"divisor of {per_device}.")


def prepare_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} is a file, not a directory: pass a directory path.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} cannot be created ({e.strerror}): pass a writable path.") from None
  if not os.access(workdir, os.W_OK):
    raise ValueError(f"workdir {workdir!r} is not writable: pass a writable directory.")


# ----------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Turns SIGTERM (what preemptible TPUs and `kill` send) into a flag the loop checks every step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading_is_main():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def threading_is_main() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def init_state(model, tx, config, mesh) -> tuple[TrainState, TrainState]:
  """Initial (replicated) state, and its abstract twin for checkpoint restores."""
  size = config.image_size

  def init():
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)), train=False)
    params = params["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  repl = sharding.replicated(mesh)
  abstract = jax.eval_shape(init)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
  state = jax.jit(init, out_shardings=repl)()
  return state, abstract


def initialise_from(state: TrainState, config, logger) -> TrainState:
  """Fine-tuning start: the `config.init_from` checkpoint, converted to this model's head and resolution."""
  from vit_cls import convert  # pylint: disable=g-import-not-at-top
  if not os.path.exists(config.init_from):
    raise ValueError(f"config.init_from={config.init_from!r} does not exist: pass an orbax checkpoint "
                     f"directory (a workdir, its checkpoints/ or one step) or a .npz file.")
  params, report = convert.init_from_checkpoint(
      config.init_from, jax.device_get(state.params), patch_size=tuple(config.model.patch_size),
      image_size=config.image_size, class_token_position=config.model.class_token_position)
  logger.info(f"Initialised from {config.init_from}:\n{report}")
  params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
  return state.replace(params=params)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.total_steps` steps (resuming from `workdir` if it holds a checkpoint).

  Returns the final evaluation metrics. Raises NonFiniteError if the loss or gradients stop being finite
  (no checkpoint of that state is written).
  """
  sharding.maybe_initialize_distributed()
  validate_config(config)
  prepare_workdir(workdir)
  info = input_pipeline.get_dataset_info(config)
  is_chief = jax.process_index() == 0
  logger = metrics_log.MetricsLogger(workdir, config.total_steps, enabled=is_chief)
  mesh = sharding.create_mesh()
  model = create_model(config, info.num_classes)
  tx, schedule = optim.create_optimizer(config)
  state, abstract_state = init_state(model, tx, config, mesh)
  meta = checkpoint_meta(config, info)

  mngr = create_checkpoint_manager(workdir, config)
  latest = mngr.latest_step()
  if latest is not None:
    state = restore_checkpoint(mngr, latest, abstract_state)
    logger.info(f"Resumed from {mngr.directory}/{latest}.")
  elif config.get("init_from"):
    state = initialise_from(state, config, logger)
  start_step = int(jax.device_get(state.step))

  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        num_classes=info.num_classes),
      in_shardings=(repl, batch_sh), out_shardings=(repl, repl), donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model=model, num_classes=info.num_classes),
                    in_shardings=(repl, batch_sh), out_shardings=repl)

  logger.info(f"Training {config.model.get('name', 'ViT')} on {config.dataset}: "
              f"{info.num_train_examples} train / {info.num_eval_examples} eval examples, "
              f"{info.num_classes} classes, global batch {config.batch_size} on "
              f"{jax.device_count()} device(s), steps {start_step}..{config.total_steps}.")
  train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
  pending, eval_metrics = [], {}
  t_last, step_last = time.perf_counter(), start_step
  step = start_step

  def flush_train_metrics(step):
    nonlocal pending, t_last, step_last
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending = []
    bad = [s for s, m in fetched if not m["finite"]]
    if bad:
      last_good = mngr.latest_step()
      raise NonFiniteError(
          f"loss or gradients became NaN/Inf at step {bad[0]}: stopping. The last checkpoint "
          f"({'step ' + str(last_good) if last_good is not None else 'none'}) is intact; lower "
          f"config.learning_rate or set config.grad_clip_norm.")
    summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1] if k != "finite"}
    summary["learning_rate"] = float(fetched[-1][1]["learning_rate"])
    now = time.perf_counter()
    steps_per_sec = (step - step_last) / max(now - t_last, 1e-9)
    t_last, step_last = now, step
    logger.write(step, "train", summary)
    logger.progress(step, summary, steps_per_sec * config.batch_size, steps_per_sec)

  with _Preemption() as preemption:
    for step in range(start_step + 1, config.total_steps + 1):
      batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = step_fn(state, batch)
      pending.append((step, metrics))
      last = step == config.total_steps
      stop = preemption.requested or mngr.reached_preemption(step)
      if step % config.log_every == 0 or last or stop:
        flush_train_metrics(step)
      if step % config.eval_every == 0 or last:
        flush_train_metrics(step)
        eval_metrics = evaluate(state.params, eval_fn, config, mesh)
        logger.write(step, "eval", eval_metrics)
        logger.info(f"eval at step {step}: " + "  ".join(
            f"{k} {v:.4f}" if k != "num_examples" else f"{k} {int(v)}"
            for k, v in eval_metrics.items()))
      if step % config.checkpoint_every == 0 or last or stop:
        flush_train_metrics(step)  # never save a state whose steps have not been checked finite
        save_checkpoint(mngr, state, meta)
      if stop:
        logger.info(f"Preemption requested: checkpoint written at step {step}; exiting.")
        break

  mngr.close()
  if is_chief and step == config.total_steps:
    path = metrics_log.plot_curves(workdir)
    logger.info(f"Done. Curves: {path}")
  logger.close()
  return eval_metrics
