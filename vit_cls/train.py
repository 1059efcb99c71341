"""Training and evaluation: one jit-compiled step over a mesh of every device, orbax checkpoints, resume.

`train_and_evaluate(config, workdir)` is the whole job. The step is data-parallel: the global batch is
split along the mesh's `data` axis, parameters and optimizer state are replicated (or, with `config.fsdp`,
sharded along the same axis), buffers are donated. Every process of a multi-host job runs this same code.
Everything a step needs from randomness derives from (config.seed, step), and the input pipeline can start
at any step, so a run that is killed and resumed ends with the parameters of a run that never stopped.
"""

from __future__ import annotations

import contextlib
import errno
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

from vit_cls import checkpoint
from vit_cls import errors
from vit_cls import evaluators
from vit_cls import input_pipeline
from vit_cls import manifest
from vit_cls import metrics_log
from vit_cls import optim
from vit_cls import orbax_fix
from vit_cls import sharding
from vit_cls import speed
from vit_cls import storage
from vit_cls import workdir as workdir_lib
from vit_cls.model import VisionTransformer

orbax_fix.apply()  # a failed restore lets its other reads finish before its event loop closes

CHECKPOINT_DIR = "checkpoints"
# Inside CHECKPOINT_DIR: orbax renames a step it garbage-collects into this folder and `Checkpoints`
# empties it. On a local disk that is one atomic rename, so a kill never leaves a half-deleted step that
# looks like a checkpoint; on gs:// a "rename" copies then deletes object by object, so a kill there can
# leave a partial step under either name (the step's own commit marker goes with the copy).
TRASH_DIR = "trash"
# A step that does not read back whole is renamed to "<step>" + this suffix: orbax lists only all-digit
# names, so it is never taken for a checkpoint again, and the files stay for a post-mortem. Not atomic on
# gs:// (copy, then delete, per object): a kill mid-way leaves the step under both names, and the next
# start finds the damaged original again and moves the rest.
DAMAGED_SUFFIX = ".damaged"
# Fields of config.model that describe the checkpoint, not the architecture.
_NON_ARCHITECTURE_FIELDS = ("name",)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteError(errors.VitClsError, FloatingPointError):
  """The loss or the gradients became NaN or Inf: the run stops without saving."""


# A checkpoint that cannot be written, read or used; the message names the step directory and the way
# out (raised instead of training from a state that was only partly read, or silently starting over).
CheckpointError = errors.CheckpointError


# ----------------------------------------------------------------------------------------------------
# The model and the steps.


def model_kwargs(config, num_classes: int) -> dict:
  """`VisionTransformer` keyword arguments from `config.model`, with the dataset's number of classes
  (and `config.init_patch_size`, when set, as the patch size)."""
  fields = {k: v for k, v in config.model.to_dict().items() if k not in _NON_ARCHITECTURE_FIELDS}
  fields["patch_size"] = tuple(fields["patch_size"])
  # FlexiViT: a fine-tuning run at another patch size than its config.init_from checkpoint (the patch
  # embedding is resampled to it, vit_cls/convert.py); the checkpoint meta records this model's size.
  if config.get("init_patch_size"):
    fields["patch_size"] = (int(config.init_patch_size),) * 2
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

  chunks = config.get("batch_chunks", 1)

  frozen = config.get("frozen", "") or ""

  def loss_fn(params, images, labels, dropout_rng):
    if frozen:
      # Gradients of frozen parameters are never used (set_to_zero): stop_gradient lets XLA drop
      # their weight-gradient products, and with only the head trained, the whole backbone backward.
      mask = optim.frozen_mask(params, frozen, int(config.model.num_layers))
      params = jax.tree.map(lambda m, p: jax.lax.stop_gradient(p) if np.ndim(m) == 0 and m else p,
                            mask, params)
    logits = speed.apply_in_chunks(model, {"params": params}, images, chunks, train=True,
                                       rngs={"dropout": dropout_rng})
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

  grad_norm = optax.tree.norm(grads)
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


def evaluate(params, eval_fn, eval_data, mesh) -> dict:
  """Scores every example of the eval split once (the pipeline pads the last batch and masks it).

  `eval_data`: `input_pipeline.create_eval_dataset(config)`, built once per run; each call is a new
  pass over it.
  """
  totals = None
  for local in eval_data:
    sums = eval_fn(params, sharding.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop("count"))
  return {"num_examples": count, **{k: float(v) / max(count, 1.0) for k, v in totals.items()}}


# ----------------------------------------------------------------------------------------------------
# Checkpoints: orbax, one `state` item (step, params, optimizer state) and one `meta` item (JSON).


class Checkpoints:
  """The run's checkpoints, `<workdir>/checkpoints`: orbax's CheckpointManager and the save in flight.

  One object because an asynchronous save (the default, unless `config.async_checkpoints=False`) ends
  in orbax's background thread, and reporting it needs its step, the newest committed step when it
  started, and whether its manifest (vit_cls/manifest.py) was written: state that belongs beside the
  manager, not on it. Such a save keeps what a blocking one guarantees (a kill loses only the save in
  flight); `finish` waits for it before the next save, a read, a preemption exit, the end, and
  (`finished_on_error`) an error leaving the loop, and reports its failure naming the step.
  """

  def __init__(self, workdir: str, config):
    self.directory = storage.join(storage.absolute(workdir), CHECKPOINT_DIR)
    self._async = bool(config.get("async_checkpoints", True))
    self._step = self._previous = self._manifest_error = None  # the save in flight
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.get("keep_checkpoints", 3), create=True,
        enable_async_checkpointing=self._async,
        async_options=(ocp.AsyncOptions(post_finalization_callback=self._write_manifest)
                       if self._async else None),
        # What a killed save left behind (`<step>.orbax-checkpoint-tmp`) goes at the next start.
        cleanup_tmp_directories=True,
        # Old steps leave by one rename into the trash instead of a file-by-file delete, so a kill
        # during garbage collection cannot leave a half-deleted step that still looks like a checkpoint.
        todelete_subdir=TRASH_DIR)
    self._empty_trash()  # a kill between a step's removal and the emptying left it there
    try:  # the manager lists the steps and reads whether each was finalised
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
    except Exception as e:  # pylint: disable=broad-except
      if not storage.is_io_failure(e):
        raise
      raise errors.StorageError(
          f"the checkpoints in {self.directory} could not be listed ({_reason(e)}): stopping without "
          f"renaming anything; fix the storage (permissions, disk, mount, bucket access) and "
          f"rerun.") from None

  def save(self, state: TrainState, meta: dict) -> None:
    """Starts writing `state` as step `state.step`, with `meta` (JSON) beside it; returns once the
    state is in host memory (asynchronous) or committed (blocking). Old steps go only after the commit,
    so a kill or a full disk leaves them as they were. A failed write stops the run with a
    CheckpointError saying which step is still good (here, or from `finish`): carrying on would only
    pile up steps that cannot be saved either."""
    self.finish()  # the previous save, committed (or reported) before this one starts
    self._step, self._previous = int(jax.device_get(state.step)), self._manager.latest_step()
    self._manifest_error = None
    try:
      self._manager.save(self._step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({"step": state.step, "params": state.params,
                                       "opt_state": state.opt_state}),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e
    if not self._async:
      self.finish()

  def finish(self) -> None:
    """Waits until the save in flight (if any) is committed, with its manifest; a CheckpointError
    naming its step and the previous intact one if it failed."""
    if self._step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from e
    if not self._async:
      self._write_manifest()  # orbax calls it only for asynchronous saves
    step, error, self._step = self._step, self._manifest_error, None
    if error is not None:
      raise CheckpointError(
          f"the checkpoint of step {step} in {self.directory} is written, but its manifest is not "
          f"({_reason(error)}). Free disk space (or fix the workdir) and rerun: it resumes from step "
          f"{step}.") from error
    self._empty_trash()

  @contextlib.contextmanager
  def finished_on_error(self):
    """On an error in the block, waits for the save in flight (its own failure is not reported: the
    block's error is) before the error propagates."""
    try:
      yield
    except BaseException:
      with contextlib.suppress(CheckpointError):
        self.finish()
      raise

  def close(self) -> None:
    """`finish`, then orbax's manager closes (its threads end)."""
    self.finish()
    self._manager.close()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, args):
    return self._manager.restore(step, args=args)

  def reload(self) -> None:  # after `restore_latest` moved damaged steps aside
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:  # the step JAX picked for every process to stop
    return self._manager.reached_preemption(step)

  def _write_manifest(self) -> None:
    """Process 0 records the files of the step being saved; a failure is kept for `finish` to report.

    Asynchronous: orbax's post-finalization callback, run once every item is written and before the
    commit, so the manifest is committed with the step; where orbax writes is what its own temporary
    path class for the step says (the manager's, given no `temporary_path_class` or `atomicity_options`):
    `<step>.orbax-checkpoint-tmp` on a local disk, the step itself on gs://. Blocking: after the commit.
    """
    if jax.process_index() != 0 or self._step is None:
      return
    from etils import epath  # pylint: disable=g-import-not-at-top
    step_dir = epath.Path(storage.join(self.directory, str(self._step)))
    if self._async:
      temporary = ocp.path.atomicity_defaults.get_default_temporary_path_class(step_dir)
      step_dir = temporary.from_final(step_dir).get()
    try:
      manifest.write(step_dir)
    except OSError as e:
      self._manifest_error = e

  def _failed(self, e: BaseException) -> CheckpointError:
    # OSError from Python writes, ValueError from tensorstore's: all mean this save did not happen.
    step, self._step = self._step, None
    kept = (f"step {self._previous} in {self.directory} is intact" if self._previous is not None
            else "none was written yet")
    return CheckpointError(
        f"saving the checkpoint of step {step} failed ({_reason(e)}); the previous checkpoint: {kept}. "
        f"Free disk space (or fix the workdir) and rerun: it resumes from the last intact step.")

  def _empty_trash(self) -> None:
    if jax.process_index() == 0:
      storage.rmtree(storage.join(self.directory, TRASH_DIR))


def checkpoint_meta(config, info: input_pipeline.DatasetInfo) -> dict:
  """What `vit_cls.load` and `predict` need to rebuild the model without the training config."""
  return {"model": model_kwargs(config, info.num_classes), "image_size": config.image_size,
          "num_classes": info.num_classes, "label_names": list(info.label_names),
          "dataset": config.dataset}


def _reason(e: BaseException, limit: int = 240) -> str:
  """An exception as one short line: orbax and tensorstore errors run to many lines of context."""
  text = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, OSError) and e.strerror:
    code = f"{errno.errorcode[e.errno]}, " if e.errno in errno.errorcode else ""
    text = f"{code}{e.strerror}" + (f": {e.filename}" if e.filename else "")
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + "..."


def _stored_state_tree(step_dir: str):
  """The saved `state` tree of a step as ShapeDtypeStructs, from its metadata file (no array is read)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  handler = ocp.PyTreeCheckpointHandler()
  tree = handler.metadata(epath.Path(step_dir) / "state")
  # Closed on success only (see checkpoint._restore_orbax): after a failed read, close() makes
  # tensorstore's pending callbacks print tracebacks that would bury the one-line message.
  handler.close()
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, dict) or "params" not in tree:
    raise _DamagedCheckpoint("its state has no 'params' entry")
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def check_checkpoint_matches(step_dir: str, stored, abstract_state: TrainState) -> None:
  """CheckpointError unless the step (its `stored` state tree) was written for this config's model and
  optimizer.

  Compared on the metadata, before any array is read: a checkpoint of another model shape is refused
  with the first differing parameter's name and both shapes (not damage: no fallback to an older step,
  which the same run wrote). Optimizer states have no stable names across optax versions, so they are
  compared by their arrays' shapes.
  """
  try:
    checkpoint.check_param_shapes(
        stored["params"], abstract_state.params, got_from=f"checkpoint {step_dir}",
        want_from="model of this config",
        hint="resume with the config it was written with, or use a new workdir (config.init_from "
             "fine-tunes from this checkpoint)")
  except ValueError as e:  # check_param_shapes compares only; its ValueError is the mismatch
    raise CheckpointError(str(e)) from None
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
  got, want = shapes(stored.get("opt_state", {})), shapes(abstract_state.opt_state)
  if got != want:
    raise CheckpointError(
        f"checkpoint {step_dir} holds another optimizer's state ({len(got)} arrays; config.optimizer "
        f"has {len(want)}): resume with the optimizer it was written with, or use a new workdir "
        f"(config.init_from fine-tunes from this checkpoint).")


def restore_checkpoint(mngr, step: int, abstract_state: TrainState) -> TrainState:
  """Step `step`, read whole into `abstract_state`'s shapes and shardings.

  A CheckpointError means another model or optimizer. Anything else means the step did not read back;
  whether it is damaged is `restore_latest`'s question, answered from evidence (vit_cls/manifest.py).
  """
  mngr.finish()  # a save still in flight is read once committed
  step_dir = os.path.join(str(mngr.directory), str(step))
  check_checkpoint_matches(step_dir, _stored_state_tree(step_dir), abstract_state)
  target = {"step": abstract_state.step, "params": abstract_state.params,
            "opt_state": abstract_state.opt_state}
  # `meta` too: a step whose meta cannot be read is incomplete (predict and load need it).
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  s = restored["state"]
  return TrainState(step=s["step"], params=s["params"], opt_state=s["opt_state"])


class _DamagedCheckpoint(Exception):
  """Proof, found while reading, that a step is not what a save of this program writes."""


def restore_latest(mngr, abstract_state: TrainState, config, log) -> TrainState | None:
  """The newest checkpoint that reads back whole, or None when the workdir has none.

  A step that fails to read is damaged only on evidence (`manifest.damage_evidence`: files that differ
  from the sizes and checksums its save recorded, metadata that does not parse, an unfinished save,
  tensorstore's own checksums). Then the run says which and why, and falls back to the previous step;
  once one reads, the damaged ones are renamed to `<step>.damaged` so that they are never taken for
  checkpoints again and their step numbers can be written anew. With `config.strict_checkpoints` it
  stops at the first damaged step instead and renames nothing, as it does when no step is readable: a
  CheckpointError, never a silent start from scratch.

  A failure that proves nothing (a permission, an I/O error, a stale handle, an unavailable bucket: the
  files match what the save wrote, or cannot even be checked) stops the run with a one-line
  StorageError and renames nothing: the newest step is probably fine, and the storage is what to fix.
  A step written for another model is a CheckpointError naming the parameter and both shapes.
  Multi-process runs are always strict: falling back needs every process to agree on the step.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  multi_process = jax.process_count() > 1
  strict = bool(config.get("strict_checkpoints", False)) or multi_process
  damaged = []
  for i, step in enumerate(steps):
    where = os.path.join(str(mngr.directory), str(step))
    try:
      state = restore_checkpoint(mngr, step, abstract_state)
    except errors.VitClsError:
      raise  # another model or optimizer: not damage
    except (MemoryError, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, _DamagedCheckpoint):
        reason = str(e)
      else:
        try:
          reason = manifest.damage_evidence(where, e)
        except Exception as check_error:  # pylint: disable=broad-except
          if not storage.is_io_failure(check_error):
            raise
          raise errors.StorageError(
              f"checkpoint {where} could not be read ({_reason(e)}), nor checked for damage "
              f"({_reason(check_error)}): stopping without renaming anything; fix the storage "
              f"(permissions, disk, mount) and rerun.") from None
        if reason is None:
          if not storage.is_io_failure(e):
            raise  # a bug, not the storage: its traceback
          raise errors.StorageError(
              f"checkpoint {where} could not be read ({_reason(e)}) and nothing shows it is damaged "
              f"(its files are the ones its save wrote, or it recorded none to compare): stopping "
              f"without renaming anything; fix the storage (permissions, disk, mount) and "
              f"rerun.") from None
      earlier = steps[i + 1] if i + 1 < len(steps) else None
      if strict:
        way_out = ("move it aside to start from scratch" if earlier is None else
                   f"move it aside to resume from step {earlier}" + (
                       "" if multi_process else ", or set config.strict_checkpoints=False to do "
                                                "that automatically"))
        raise CheckpointError(
            f"checkpoint {where} is damaged ({reason}); "
            f"{'a multi-process run' if multi_process else 'strict checkpoints'}: stopping without "
            f"training: {way_out}.") from None
      if earlier is None:
        raise CheckpointError(
            f"checkpoint {where} is damaged ({reason}) and no earlier checkpoint reads back "
            f"({', '.join(str(s) for s in steps[:i]) or 'none'} damaged too): stopping without training; "
            f"move {mngr.directory} aside to start from scratch.") from None
      log(f"checkpoint {where} is damaged ({reason}); falling back to {mngr.directory}/{earlier}.")
      damaged.append(step)
      continue
    if damaged:
      for bad in damaged:
        src = os.path.join(str(mngr.directory), str(bad))
        dst, n = src + DAMAGED_SUFFIX, 1
        while storage.exists(dst):
          n += 1
          dst = f"{src}{DAMAGED_SUFFIX}.{n}"
        storage.rename(src, dst)
        log(f"moved the damaged checkpoint {src} to {dst}.")
      mngr.reload()
    return state
  return None


# ----------------------------------------------------------------------------------------------------
# Checks that fail before anything is compiled.


def validate_config(config, num_devices: int | None = None, num_processes: int | None = None) -> None:
  """One-line errors naming the field, the value and what is allowed, before any compile or data read.

  The batch is checked against this job's devices and processes, or the given counts (`vit_cls.aot`
  checks a config for a slice it is not running on).
  """
  def bad(field, allowed):
    value = config.get(field) if "." not in field else None
    raise errors.ConfigError(f"config.{field}={value!r} is not allowed: {allowed}.")

  # A config file that lacks a field would otherwise fail with an AttributeError wherever it is first read.
  missing = [f for f in ("dataset", "image_size", "model", "optimizer", "learning_rate", "decay_type",
                         "warmup_steps", "total_steps", "batch_size", "seed") if f not in config]
  if missing:
    raise errors.ConfigError(f"the config has no field {', '.join(missing)}: add it (configs/default.py sets "
                     f"every field, with comments).")
  optim.check_config(config)
  if config.decay_type not in optim.DECAY_TYPES:
    bad("decay_type", f"choose one of {', '.join(optim.DECAY_TYPES)}")
  for field in ("total_steps", "batch_size", "eval_batch_size", "accum_steps", "batch_chunks",
                "log_every", "checkpoint_every", "eval_every"):
    if int(config.get(field, 1)) < 1:
      bad(field, "a positive integer")
  if config.warmup_steps < 0 or config.warmup_steps > config.total_steps:
    bad("warmup_steps", f"between 0 and total_steps={config.total_steps}")
  if config.learning_rate <= 0:
    bad("learning_rate", "a positive number")
  if not 0.0 <= config.get("label_smoothing", 0.0) < 1.0:
    bad("label_smoothing", "a value in [0, 1)")
  keep = config.get("keep_checkpoints", 3)
  if keep is not None and int(keep) < 1:
    bad("keep_checkpoints", "None (keep all) or a positive integer (2 or more leaves a fallback "
                            "when the newest is damaged)")
  for field in ("strict_checkpoints", "async_checkpoints"):
    if not isinstance(config.get(field, False), bool):
      bad(field, "True or False")
  if not isinstance(config.image_size, int) or config.image_size < 1:
    bad("image_size", "a positive integer")
  input_pipeline.check_preprocessing(config)
  # FlexiViT: init_patch_size replaces config.model.patch_size, so it is checked in its place.
  init_patch = config.get("init_patch_size")
  if init_patch is not None:
    if (isinstance(init_patch, bool) or not isinstance(init_patch, int) or init_patch < 1
        or config.image_size % init_patch):
      bad("init_patch_size", f"None (config.model.patch_size) or a positive divisor of "
                             f"config.image_size={config.image_size}")
    if not config.get("init_from"):
      bad("init_patch_size", "None without config.init_from (it is the patch size that "
                             "config.init_from's patch embedding is resampled to)")
  evaluators.check_config(config)  # config.feature_eval: few-shot and kNN
  patch = tuple(config.model.patch_size)
  if not init_patch and (config.image_size % patch[0] or config.image_size % patch[1]):
    raise errors.ConfigError(f"config.image_size={config.image_size} is not divisible by "
                     f"config.model.patch_size={patch}: use a multiple of the patch size.")
  try:
    model = create_model(config, num_classes=1)  # the architecture fields check themselves
  except (ValueError, TypeError) as e:
    # VisionTransformer names its own field; the user writes config.model.<field>.
    raise errors.ConfigError(str(e).replace("VisionTransformer.", "config.model.")) from None
  if config.get("frozen"):  # names and shapes only (eval_shape): nothing is initialised
    size = config.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               train=False))["params"]
    optim.check_frozen(config, shapes)
  n_dev = jax.device_count() if num_devices is None else num_devices
  n_proc = jax.process_count() if num_processes is None else num_processes
  input_pipeline.check_batch_divisibility(config.batch_size, n_dev, n_proc, "batch_size")
  input_pipeline.check_batch_divisibility(config.get("eval_batch_size") or config.batch_size, n_dev,
                                          n_proc, "eval_batch_size")
  per_device = config.batch_size // n_dev
  if per_device % config.get("accum_steps", 1):
    raise errors.ConfigError(f"config.accum_steps={config.accum_steps} does not divide the per-device batch "
                     f"{per_device} (batch_size={config.batch_size} over {n_dev} devices): choose a "
                     f"divisor of {per_device}.")
  per_micro = per_device // config.get("accum_steps", 1)
  if per_micro % config.get("batch_chunks", 1):
    raise errors.ConfigError(f"config.batch_chunks={config.batch_chunks} does not divide the per-device "
                     f"micro-batch {per_micro} (batch_size={config.batch_size} over {n_dev} devices, "
                     f"accum_steps={config.get('accum_steps', 1)}): choose a divisor of {per_micro}.")


def prepare_workdir(workdir: str) -> None:
  if storage.is_gcs(workdir):  # a bucket has no directories to create: a written and removed probe
    storage.check_access(workdir, write=True, what="workdir")
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.ConfigError(f"workdir {workdir!r} is a file, not a directory: pass a directory path.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.StorageError(f"workdir {workdir!r} cannot be created ({e.strerror}): pass a writable path.") from None
  # A real write, not os.access: root passes os.access everywhere, and a full or read-only disk should
  # fail here, in a second, not at the first checkpoint.
  import tempfile  # pylint: disable=g-import-not-at-top
  try:
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write_test")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.StorageError(f"workdir {workdir!r} is not writable ({e.strerror}): pass a writable "
                     f"directory.") from None


# ----------------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """Turns SIGTERM (what preemptible TPUs and `kill` send) into a flag the loop checks every step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    # Multi-process: SIGTERM stays with JAX's preemption sync manager (started by
    # jax.distributed.initialize). It tells every process and picks one step for all, which
    # `mngr.reached_preemption(step)` reports; a per-process flag would make the host that got the
    # signal save and leave alone while the others wait in the next collective.
    if threading_is_main() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      # train.py installs a latch (a handler with a `received` flag) before its imports: a SIGTERM that
      # came during startup (restore, compile) is honoured at the first step instead of being lost.
      self.requested = bool(getattr(self._previous, "received", False))
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def threading_is_main() -> bool:
  import threading  # pylint: disable=g-import-not-at-top
  return threading.current_thread() is threading.main_thread()


def abstract_train_state(model, tx, config, mesh) -> tuple[Any, TrainState]:
  """The state's init function, and its abstract twin: ShapeDtypeStructs carrying the shardings.

  Replicated, or with `config.fsdp` sharded along the data axis (`sharding.state_shardings`). Nothing is
  allocated: `init_state` runs the function into that layout, and `vit_cls.aot` compiles the step
  against the abstract state for chips this machine does not have.
  """
  size = config.image_size

  def init():
    params = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)), train=False)
    params = params["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, mesh, fsdp=config.get("fsdp", False))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  return init, abstract


def init_state(model, tx, config, mesh) -> tuple[TrainState, TrainState]:
  """Initial state, and its abstract twin (shapes and shardings) for checkpoint restores.

  The state is created in its layout by the jitted init, never whole on one device: a model that fits
  only sharded can start.
  """
  init, abstract = abstract_train_state(model, tx, config, mesh)
  state = jax.jit(init, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))()
  return state, abstract


def build_steps(config, model, tx, schedule, num_classes: int, mesh, abstract_state: TrainState):
  """The jitted train and eval steps exactly as the training loop runs them: (step_fn, eval_fn).

  One place for everything that decides a step's cost (the model, the optimizer, the state and batch
  layouts, fsdp's activation constraints, donation), so that `vit_cls.aot` compiles this very function
  for a TPU slice or a GPU node rather than a copy that could drift from it.
  """
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)  # replicated, or fsdp-sharded
  # fsdp: activations pinned to the batch layout, so XLA gathers weights (ZeRO-3), not activations.
  step_model = sharding.BatchShardedModel(model, mesh) if config.get("fsdp", False) else model
  # Traced with the mesh as JAX's ambient mesh: on TPU, `attention_impl="fused"` reads it to run splash
  # attention in a shard_map over the batch (speed.sharded_splash_attention).
  step_fn = jax.jit(
      sharding.on_mesh(functools.partial(train_step, model=step_model, tx=tx, schedule=schedule,
                                         config=config, num_classes=num_classes), mesh),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=(0,),
      # fsdp on GPUs: one collective per gradient, so remat's savings survive (sharding.py).
      compiler_options=sharding.step_compiler_options(mesh, config.get("fsdp", False)))
  eval_fn = jax.jit(sharding.on_mesh(functools.partial(eval_step, model=step_model,
                                                       num_classes=num_classes), mesh),
                    in_shardings=(state_sh.params, batch_sh), out_shardings=repl)
  return step_fn, eval_fn


def abstract_batch(config, mesh, batch_size: int | None = None, *, eval_batch: bool = False) -> dict:
  """ShapeDtypeStructs of a global batch as `sharding.global_batch` assembles it from the input
  pipeline: float32 images, int32 labels, and for evaluation the float32 mask of padded examples."""
  n, size = batch_size or config.batch_size, config.image_size
  sh = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=sh),
           "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh)}
  if eval_batch:
    batch["mask"] = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sh)
  return batch


def compiled_bytes(compiled) -> dict:
  """What one device needs for a compiled program, from XLA's buffer assignment: its arguments +
  outputs + temporaries, less the outputs that reuse donated arguments."""
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
         "generated_code_bytes": int(getattr(m, "generated_code_size_in_bytes", 0) or 0)}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  return out


def compile_and_report(step_fn, abstract_state: TrainState, config, mesh, log):
  """On a TPU or GPU: compiles the train step before the first batch, logs what one device needs, and
  returns the compiled step (so that it is not compiled a second time). Elsewhere: `step_fn` unchanged.

  The line is what `python -m vit_cls.aot` predicts for the same config without the chips; both side
  by side on a real run show whether the prediction holds. CPU runs skip it: the CPU compiler's buffers
  say little about an accelerator, and the tests should not pay for the step's compile twice.
  """
  if jax.default_backend() not in ("tpu", "gpu"):
    return step_fn
  compiled = step_fn.lower(abstract_state, abstract_batch(config, mesh)).compile()
  try:
    b = compiled_bytes(compiled)
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    log(f"Compiled train step: {b['total_bytes'] / 2**30:.2f} GiB per device (state and batch "
        f"{b['argument_bytes'] / 2**30:.2f}, temporaries {b['temp_bytes'] / 2**30:.2f})"
        + (f" of {limit / 2**30:.1f} GiB usable." if limit else "."))
  except Exception as e:  # pylint: disable=broad-except  (a report, never a reason to stop the run)
    log(f"Compiled train step: no memory analysis from this backend ({type(e).__name__}).")
  return compiled


def _convert_init_from(source, params, config, model):
  """`source` converted onto `params` (this model's, either layout) the way `config` fine-tunes it:
  `check_init_from` runs it on stand-ins, `initialise_from` on the real start. Published layout out."""
  from vit_cls import convert  # pylint: disable=g-import-not-at-top
  return convert.init_from_checkpoint(
      source, checkpoint.scan_to_unrolled(params), patch_size=model_kwargs(config, 1)["patch_size"],
      image_size=config.image_size, class_token_position=config.model.class_token_position,
      model=model, resample_patch=bool(config.get("init_patch_size")))


def initialise_from(state: TrainState, config, logger, model, source) -> TrainState:
  """Fine-tuning start: the `config.init_from` checkpoint, converted to this model's head and resolution.

  `source`: the `CheckpointSource` that `check_init_from` opened and checked before anything compiled,
  converted again here into the real start without reading it again.
  """
  # Conversion works in the published layout; a layer-scan model gets its blocks stacked back.
  params, report = _convert_init_from(source, sharding.to_host(state.params), config, model)
  if config.model.get("scan_layers", False):
    params = checkpoint.unrolled_to_scan(params)
  logger.info(f"Initialised from {config.init_from}:\n{report}")
  params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
  return state.replace(params=params)


def check_init_from(config, model):
  """`config.init_from` exists and converts to this model: checked on shapes, before anything compiles.

  The conversion runs against zero-strided stand-ins for the model's parameters (no memory, no init),
  so a checkpoint of another architecture fails here with the parameter's name and both shapes. Returns
  the opened source (its params in host memory) for `initialise_from`: one read serves both.
  """
  path = config.init_from
  stand_ins = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape),
                           checkpoint.abstract_params(model, config.image_size))
  try:
    # gs://: the access check names config.init_from and answers in seconds.
    source = checkpoint.open_source(path, what="config.init_from",
                                     num_heads_fallback=int(model.num_heads))
    _convert_init_from(source, stand_ins, config, model)
  except checkpoint.CheckpointNotFound:
    raise errors.ConfigError(
        f"config.init_from={path!r} does not exist: pass an orbax checkpoint directory (a workdir, its "
        f"checkpoints/ or one step), a .npz or .safetensors file, a timm or Hugging Face model folder, "
        f"or the id of a model in the local Hugging Face cache.") from None
  except (ValueError, FileNotFoundError) as e:
    raise errors.ConfigError(f"config.init_from={path!r} cannot initialise this model: {e}") from None
  return source


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.total_steps` steps (resuming from `workdir` if it holds a checkpoint).

  Returns the final evaluation metrics. Raises NonFiniteError if the loss or gradients stop being finite
  (no checkpoint of that state is written).
  """
  sharding.maybe_initialize_distributed()
  validate_config(config)
  prepare_workdir(workdir)
  # Before anything reads data, compiles, or touches a file of the workdir (the checkpoint manager
  # removes unfinished saves: another live run's save in flight).
  with workdir_lib.JobLock(workdir):
    return _train_and_evaluate(config, workdir)


def _format_eval(metrics: dict) -> str:
  return "  ".join(f"{k} {v:.4f}" if k != "num_examples" else f"{k} {int(v)}"
                   for k, v in metrics.items())


def _report_complete(workdir: str, step: int, total_steps: int, logger) -> dict:
  """A resumed run with nothing left to train says so (with its last evaluation) instead of
  printing an empty step range; returns that evaluation's metrics (empty where none was logged)."""
  evals = []
  if logger.enabled and storage.exists(storage.join(workdir, metrics_log.METRICS_FILE)):
    evals = [r for r in metrics_log.read_metrics(workdir)
             if r["split"] == "eval" and r["step"] <= step]
  last = max(evals, key=lambda r: r["step"]) if evals else None
  metrics = {k: v for k, v in last.items() if k not in ("step", "split", "time")} if last else {}
  logger.info(
      f"The run in {workdir} is already complete: its checkpoint is at step {step} and "
      f"config.total_steps={total_steps}. "
      + (f"Last evaluation, at step {last['step']}: {_format_eval(metrics)}. " if last else
         "No evaluation was logged. ")
      + "Nothing to train: raise config.total_steps to train further.")
  return metrics


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`train_and_evaluate` once the workdir is checked and this run holds it."""
  info = input_pipeline.get_dataset_info(config)
  input_pipeline.num_steps_per_epoch(config, info)  # a batch larger than the train split fails here
  is_chief = jax.process_index() == 0
  logger = metrics_log.MetricsLogger(workdir, config.total_steps, enabled=is_chief)
  mesh = sharding.create_mesh()
  model = create_model(config, info.num_classes)
  # Few-shot and kNN (config.feature_eval; None when off): their datasets are checked and opened here,
  # before anything compiles or a checkpoint is read.
  feature_eval = evaluators.create(config, model, mesh)
  tx, schedule = optim.create_optimizer(config)
  mngr = Checkpoints(workdir, config)
  source = None  # config.init_from, opened and checked once, before the first compile
  if config.get("init_from") and mngr.latest_step() is None:
    source = check_init_from(config, model)
  state, abstract_state = init_state(model, tx, config, mesh)
  meta = checkpoint_meta(config, info)

  restored = restore_latest(mngr, abstract_state, config, logger.info)
  if restored is not None:
    state = restored
    logger.info(f"Resumed from {mngr.directory}/{int(jax.device_get(state.step))}.")
  elif source is not None:
    state = initialise_from(state, config, logger, model, source)
  del source  # its host copy of the params is not kept through training
  start_step = int(jax.device_get(state.step))
  if start_step >= config.total_steps:
    mngr.close()
    last_eval = _report_complete(workdir, start_step, config.total_steps, logger)
    logger.close()
    return last_eval
  logger.write_config(config)  # the config this run trains with

  step_fn, eval_fn = build_steps(config, model, tx, schedule, info.num_classes, mesh, abstract_state)
  step_fn = compile_and_report(step_fn, abstract_state, config, mesh, logger.info)

  logger.info(f"Training {config.model.get('name', 'ViT')} on {config.dataset}: "
              f"{info.num_train_examples} train / {info.num_eval_examples} eval examples, "
              f"{info.num_classes} classes, global batch {config.batch_size} on "
              f"{jax.device_count()} device(s), steps {start_step}..{config.total_steps}.")
  train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
  eval_data = input_pipeline.create_eval_dataset(config)
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
      mngr.finish()  # a good state's save in flight is committed before the run stops
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

  # A save in flight is committed before an error leaves (train.py then exits at once).
  with _Preemption() as preemption, mngr.finished_on_error():
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
        eval_metrics = evaluate(state.params, eval_fn, eval_data, mesh)
        if feature_eval is not None:  # fewshot_* and knn_* fields in the same record
          eval_metrics.update(feature_eval.run(state.params))
        logger.write(step, "eval", eval_metrics)
        took = f"  (few-shot/kNN {feature_eval.seconds:.1f} s)" if feature_eval is not None else ""
        logger.info(f"eval at step {step}: {_format_eval(eval_metrics)}{took}")
      if step % config.checkpoint_every == 0 or last or stop:
        flush_train_metrics(step)  # never save a state whose steps have not been checked finite
        logger.sync()  # a gs:// metrics file: uploaded up to the step being saved
        mngr.save(state, meta)
      if stop:
        mngr.finish()
        logger.info(f"Preemption requested: checkpoint written at step {step}; exiting.")
        break

  mngr.close()
  if is_chief and step == config.total_steps:
    path = metrics_log.plot_curves(workdir)
    logger.info(f"Done. Curves: {path}")
  logger.close()
  return eval_metrics
