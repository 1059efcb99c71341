"""Fault injection (issue 7): kills at random moments, damaged checkpoints, a full disk, bad inputs and data.

A run killed at any moment must lose at most the steps since its last checkpoint and resume to the
parameters of a run that never stopped; a wrong input must fail in seconds with one line that names the
field, the value and what is allowed, before anything is compiled. RELIABILITY.md lists every case here
and what the program does. Helpers (child processes, pauses inside saves, corruption, ENOSPC) live in
tests/fault_harness.py.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest

import fault_harness as fh
from vit_cls import checkpoint as ckpt_lib
from vit_cls import errors
from vit_cls import input_pipeline
from vit_cls import manifest
from vit_cls import optim
from vit_cls import sharding
from vit_cls import train


def _tiny_config(**updates):
  """tests/conftest.py's tiny_config, for module-scoped fixtures (that one is per test)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                           representation_size=32, attention_impl="einsum"))
  config.update(dict(total_steps=4, warmup_steps=2, batch_size=32, eval_batch_size=64, log_every=2,
                     eval_every=4, checkpoint_every=2, shuffle_buffer=256))
  config.update(updates)
  return config


def _one_line(text: str) -> None:
  assert "\n" not in text.strip(), f"not one line: {text!r}"


# ====================================================================================================
# 1. Kills at random moments: SIGKILL (nothing runs after it) and SIGTERM (graceful).

KILL_RUN = ("--config.total_steps=40", "--config.checkpoint_every=2", "--config.log_every=1",
            "--config.eval_every=1000", "--config.keep_checkpoints=2", "--config.model.dropout_rate=0.1")
TERMS = 6  # SIGTERM cycles (the SIGKILL test lists its own modes)
_TRAINING_LINE = re.compile(r"steps (\d+)\.\.(\d+)\.")


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's child processes (restarts skip compiling)."""
  return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, xla_cache):
  """The reference: the kill runs' job, run once without a signal (it also fills the compile cache)."""
  root = tmp_path_factory.mktemp("uninterrupted")
  cache = xla_cache
  run = fh.TrainRun(fh.tiny_train_args(root / "wd", *KILL_RUN), env=fh.child_env(cache))
  assert run.wait(timeout=900) == 0, run.text()[-3000:]
  assert run.steps_printed()[-1] == 40
  return {"params": fh.params_of(root / "wd"), "cache": cache}


def _first_step_after(run) -> float | None:
  return next((t for t, s, text in run.lines if s == "out" and text.startswith("step ")), None)


def _check_restart_loaded(run, latest_before) -> None:
  """A restart never fails to load: it started at the newest checkpoint on disk, with no damage found."""
  out = run.text()
  assert "damaged" not in out and "Traceback" not in out and "error:" not in out, out[-3000:]
  started = _TRAINING_LINE.search(run.text("out"))
  if started:  # it got past restoring before the signal
    assert int(started.group(1)) == (latest_before or 0), out[-3000:]
    if latest_before:
      assert re.search(rf"Resumed from .*checkpoints/{latest_before}\.", out), out[-3000:]


def _check_finalized_steps_complete(workdir) -> None:
  for step in fh.step_dirs(workdir):
    d = os.path.join(workdir, "checkpoints", str(step))
    assert all(os.path.exists(os.path.join(d, p)) for p in ("commit_success.txt", "state", "meta")), d


@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart_gives_the_uninterrupted_parameters(uninterrupted,
                                                                                   tmp_path):
  """8 SIGKILLs: during startup/restore/compile, between steps, and inside checkpoint writes.

  Modes, in a seed-fixed order with seed-fixed timings: `startup` (a random delay shorter than a warm
  start takes), `step` (just after the k-th step of that run), `save:<point>` (the run pauses inside a
  save, with `<step>.orbax-checkpoint-tmp` half written, and is killed there) and `poll` (killed the
  moment a save's temporary directory appears).
  """
  rng = np.random.default_rng(20261126)
  modes = ["step", "startup", "save:finalize", "step", "save:meta", "poll", "save:state", "step"]
  workdir = str(tmp_path / "killed")
  env = fh.child_env(uninterrupted["cache"])
  warm_start = None  # seconds from launch to the first step, measured on the restarts themselves
  in_save, resumed_from, history = 0, [], []  # history: (mode, resumed from, last step, steps on disk)
  for i, mode in enumerate(modes):
    latest = (fh.step_dirs(workdir) or [None])[-1]
    pause = None
    if mode.startswith("save:"):
      marker = str(tmp_path / f"pause{i}")
      pause = (mode.split(":")[1], int(rng.integers(1, 4)), marker)  # inside this run's k-th save
    run = fh.TrainRun(fh.tiny_train_args(workdir, *KILL_RUN), env=env, pause=pause)
    if mode in ("step", "poll"):
      k = int(rng.integers(2, 9))
      assert run.wait_for(lambda t, k=k: t.startswith("step ") and len(run.steps_printed()) >= k,
                          timeout=600), run.text()[-3000:]
    if mode == "step":
      time.sleep(rng.uniform(0, 0.2))
    elif mode == "startup":
      time.sleep(rng.uniform(0.1, 0.9) * (warm_start or 3.0))
    elif mode == "poll":  # the next save's temporary directory, the moment it appears
      assert fh.wait_for_path(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"),
                              run.proc, timeout=600), run.text()[-3000:]
    else:
      assert fh.wait_for_path(pause[2], run.proc, timeout=600), run.text()[-3000:]
      half = fh.tmp_dirs(workdir)
      assert half, "paused inside a save, yet no temporary checkpoint directory"
      in_save += 1
    assert run.signal(signal.SIGKILL), f"cycle {i} ({mode}) finished before its kill:\n{run.text()[-2000:]}"
    assert run.wait() == -signal.SIGKILL
    if mode.startswith("save:"):  # the half-written step never became a checkpoint
      assert int(os.path.basename(half[0]).split(".")[0]) not in fh.step_dirs(workdir)
    _check_restart_loaded(run, latest)
    _check_finalized_steps_complete(workdir)
    if latest and _TRAINING_LINE.search(run.text("out")):
      resumed_from.append(latest)
    history.append((mode, latest, run.steps_printed()[-1:], fh.step_dirs(workdir)))
    first = _first_step_after(run)
    if first is not None and latest is not None:
      warm_start = first if warm_start is None else min(warm_start, first)

  assert in_save == 3
  assert len(set(resumed_from)) >= 2, history  # restarts loaded different steps, not just one
  latest = fh.step_dirs(workdir)[-1]
  final = fh.TrainRun(fh.tiny_train_args(workdir, *KILL_RUN), env=env)
  assert final.wait(timeout=600) == 0, final.text()[-3000:]
  _check_restart_loaded(final, latest)
  assert fh.step_dirs(workdir)[-1] == 40 and not fh.tmp_dirs(workdir)
  trash = os.path.join(workdir, "checkpoints", train.TRASH_DIR)
  assert not os.path.isdir(trash) or not os.listdir(trash)
  for step in fh.step_dirs(workdir):  # every checkpoint left behind reads back
    fh.params_of(os.path.join(workdir, "checkpoints", str(step)))
  assert fh.same_params(fh.params_of(workdir), uninterrupted["params"])


@pytest.mark.slow
def test_sigterm_at_random_moments_checkpoints_the_step_reached_and_resumes_exactly(uninterrupted,
                                                                                    tmp_path):
  """6 SIGTERMs, during startup or between steps: each run exits 0 with a checkpoint at its last step.

  A SIGTERM during startup (imports, restore, compile) is latched by train.py and honoured after the
  first step, so every cycle makes progress; the last run completes to the uninterrupted parameters.
  """
  rng = np.random.default_rng(7)
  workdir = str(tmp_path / "terminated")
  env = fh.child_env(uninterrupted["cache"])
  warm_start = None
  for i in range(TERMS):
    latest = (fh.step_dirs(workdir) or [None])[-1]
    run = fh.TrainRun(fh.tiny_train_args(workdir, *KILL_RUN), env=env)
    if i == 0 or rng.random() < 0.5:
      k = int(rng.integers(1, 4))
      assert run.wait_for(lambda t, k=k: t.startswith("step ") and len(run.steps_printed()) >= k,
                          timeout=600), run.text()[-3000:]
      time.sleep(rng.uniform(0, 0.2))
    else:
      time.sleep(rng.uniform(0.1, 0.9) * (warm_start or 3.0))
    assert run.signal(signal.SIGTERM), f"cycle {i} finished before its SIGTERM"
    assert run.wait() == 0, run.text()[-3000:]
    out = run.text("out")
    saved = re.search(r"Preemption requested: checkpoint written at step (\d+)", out)
    assert saved, out[-3000:]
    reached = max(run.steps_printed())
    assert int(saved.group(1)) == reached == fh.step_dirs(workdir)[-1]
    meta = os.path.join(workdir, "checkpoints", str(reached), "meta", "metadata")
    with open(meta) as f:
      assert json.load(f)["num_classes"] == 10  # the checkpoint says what it holds
    assert reached > (latest or 0)  # every SIGTERM cycle kept at least one step
    _check_restart_loaded(run, latest)
    first = _first_step_after(run)
    if first is not None and latest is not None:
      warm_start = first if warm_start is None else min(warm_start, first)

  final = fh.TrainRun(fh.tiny_train_args(workdir, *KILL_RUN), env=env)
  assert final.wait(timeout=600) == 0, final.text()[-3000:]
  assert fh.same_params(fh.params_of(workdir), uninterrupted["params"])


# ====================================================================================================
# 2. Damaged checkpoints, and checkpoints of another model.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with checkpoints at steps 2 and 4 of the tiny job, and what restores need."""
  workdir = tmp_path_factory.mktemp("trained") / "wd"
  config = _tiny_config()
  train.train_and_evaluate(config, str(workdir))
  assert fh.step_dirs(workdir) == [2, 4]
  model = train.create_model(config, 10)
  tx, _ = optim.create_optimizer(config)
  _, abstract = train.init_state(model, tx, config, sharding.create_mesh())
  params = {s: fh.params_of(workdir / "checkpoints" / str(s)) for s in (2, 4)}
  return {"workdir": workdir, "config": config, "abstract": abstract, "params": params}


def _copy(trained, tmp_path):
  dst = tmp_path / "wd"
  shutil.copytree(trained["workdir"], dst)
  return dst


def _restore(workdir, config, abstract):
  log = []
  mngr = train.Checkpoints(str(workdir), config)
  return train.restore_latest(mngr, abstract, config, log.append), log, mngr


@pytest.mark.parametrize("kind", fh.CORRUPTIONS)
def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_restored(trained, tmp_path, kind):
  workdir = _copy(trained, tmp_path)
  fh.corrupt(str(workdir / "checkpoints" / "4"), kind, np.random.default_rng(0))
  state, log, mngr = _restore(workdir, trained["config"], trained["abstract"])
  ckpt = workdir / "checkpoints"
  assert int(state.step) == 2
  assert fh.same_params(jax.device_get(state.params), trained["params"][2])
  assert log[0].startswith(f"checkpoint {ckpt}/4 is damaged (") and log[0].endswith(
      f"falling back to {ckpt}/2."), log
  _one_line(log[0])
  # Moved aside, never to be taken for a checkpoint again: orbax and the loaders list only step 2.
  assert (ckpt / "4.damaged").is_dir() and not (ckpt / "4").exists()
  assert mngr.all_steps() == [2] and fh.step_dirs(workdir) == [2]
  assert ckpt_lib.restore_params(str(workdir))[1]["step"] == 2


def test_strict_checkpoints_refuse_a_damaged_latest_and_touch_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  fh.corrupt(str(workdir / "checkpoints" / "4"), "truncate", np.random.default_rng(1))
  config = _tiny_config(strict_checkpoints=True)
  with pytest.raises(train.CheckpointError) as e:
    _restore(workdir, config, trained["abstract"])
  message = str(e.value)
  _one_line(message)
  assert f"checkpoint {workdir}/checkpoints/4 is damaged (" in message
  assert "strict" in message and "resume from step 2" in message
  assert fh.step_dirs(workdir) == [2, 4] and not (workdir / "checkpoints" / "4.damaged").exists()


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (2, 4):
    fh.corrupt(str(workdir / "checkpoints" / str(step)), "flip_bytes", np.random.default_rng(step))
  with pytest.raises(train.CheckpointError, match=r"checkpoints/2 is damaged .* no earlier checkpoint"
                                                  r" reads back \(4 damaged too\): stopping"):
    _restore(workdir, trained["config"], trained["abstract"])
  assert fh.step_dirs(workdir) == [2, 4]


def test_a_run_that_falls_back_ends_with_the_uninterrupted_parameters(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  fh.corrupt(str(workdir / "checkpoints" / "4"), "truncate", np.random.default_rng(2))
  train.train_and_evaluate(_tiny_config(), str(workdir))
  out = capsys.readouterr().out
  assert "checkpoints/4 is damaged" in out and "Resumed from" in out and "checkpoints/2." in out
  # Steps 3 and 4 retrained: the same parameters as the run that was never damaged.
  assert fh.same_params(fh.params_of(workdir), trained["params"][4])
  assert fh.step_dirs(workdir) == [2, 4] and (workdir / "checkpoints" / "4.damaged").is_dir()


def _abstract_for(config):
  model = train.create_model(config, 10)
  tx, _ = optim.create_optimizer(config)
  state = jax.eval_shape(lambda: train.TrainState(
      step=jax.numpy.zeros((), jax.numpy.int32),
      params=model.init(jax.random.key(0), jax.numpy.zeros((1, 16, 16, 3)), train=False)["params"],
      opt_state=None))
  return state.replace(opt_state=jax.eval_shape(tx.init, state.params))


def test_checkpoint_of_another_model_shape_is_refused_with_the_parameter_and_both_shapes(trained,
                                                                                       tmp_path):
  workdir = _copy(trained, tmp_path)
  config = _tiny_config()
  config.model.mlp_dim = 48
  with pytest.raises(ValueError) as e:
    _restore(workdir, config, _abstract_for(config))
  message = str(e.value)
  _one_line(message)
  assert re.search(r"parameter 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/(kernel|bias)' has "
                   r"shape \((32, )?64,?\) in the checkpoint .*checkpoints/4 but \((32, )?48,?\) in the "
                   r"model of this config", message), message
  assert fh.step_dirs(workdir) == [2, 4]  # not damage: nothing moved aside


def test_checkpoint_of_another_optimizer_is_refused(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config = _tiny_config(optimizer="sgd")
  with pytest.raises(ValueError, match=r"checkpoints/4 holds another optimizer's state \(\d+ arrays; "
                                       r"config.optimizer has \d+\)"):
    _restore(workdir, config, _abstract_for(config))
  assert fh.step_dirs(workdir) == [2, 4]


def _fail_reading_step(monkeypatch, workdir, step, error):
  """Every read of `step` raises `error`: its tree metadata (Python) and its arrays (orbax)."""
  step_dir = str(workdir / "checkpoints" / str(step))
  metadata = train.ocp.PyTreeCheckpointHandler.metadata
  restore = train.ocp.CheckpointManager.restore

  def failing_metadata(self, directory, *args, **kwargs):
    if str(directory).startswith(step_dir):
      raise error
    return metadata(self, directory, *args, **kwargs)

  def failing_restore(self, s, *args, **kwargs):
    if s == step:
      raise error
    return restore(self, s, *args, **kwargs)

  monkeypatch.setattr(train.ocp.PyTreeCheckpointHandler, "metadata", failing_metadata)
  monkeypatch.setattr(train.ocp.CheckpointManager, "restore", failing_restore)


READ_ERRORS = {
    "permission": lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), path),
    "eio": lambda path: OSError(errno.EIO, os.strerror(errno.EIO), path),
    "stale_handle": lambda path: OSError(errno.ESTALE, os.strerror(errno.ESTALE), path),
    # What orbax raises when tensorstore cannot reach the files (a bucket briefly unavailable).
    "tensorstore_unavailable": lambda path: ValueError(f"UNAVAILABLE: Error reading {path!r}"),
}


@pytest.mark.parametrize("kind", sorted(READ_ERRORS))
def test_a_read_error_that_proves_nothing_stops_in_one_line_and_renames_nothing(trained, tmp_path,
                                                                                monkeypatch, kind):
  """The newest step's files are as the save wrote them; reading them fails: no fallback, no rename."""
  workdir = _copy(trained, tmp_path)
  _fail_reading_step(monkeypatch, workdir, 4, READ_ERRORS[kind](str(workdir / "checkpoints" / "4")))
  with pytest.raises(errors.StorageError) as e:
    _restore(workdir, trained["config"], trained["abstract"])
  message = str(e.value)
  _one_line(message)
  assert re.match(rf"checkpoint {workdir}/checkpoints/4 could not be read \(\w+Error: .+\) and "
                  r"nothing shows it is damaged .*: stopping without renaming anything; fix the storage",
                  message), message
  assert fh.step_dirs(workdir) == [2, 4] and not list((workdir / "checkpoints").glob("*.damaged*"))


def _without_root_powers() -> list[str]:
  """A command prefix under which permission bits hold: root's file capabilities dropped at exec
  (what a run as an ordinary user, or in a container without them, has)."""
  if os.geteuid() != 0:
    return []
  if not shutil.which("setpriv"):
    pytest.skip("running as root without setpriv (util-linux) to drop the permission override")
  return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_an_unreadable_newest_step_stops_train_py_and_is_not_moved_aside(trained, tmp_path, xla_cache):
  """A real permission error, not an injected one: `chmod 000` on the newest step. Asking whether its
  files exist fails with EACCES (os.path.exists answered False: "state/_METADATA is missing", and the
  step was renamed `4.damaged`); now the run stops in one line naming the path and the errno."""
  workdir = _copy(trained, tmp_path)
  step = workdir / "checkpoints" / "4"
  step.chmod(0)
  try:
    run = subprocess.run([*_without_root_powers(), sys.executable, os.path.join(fh.REPO, "train.py"),
                          *fh.tiny_train_args(workdir, "--config.total_steps=6",
                                              "--config.checkpoint_every=2", "--config.eval_every=4")],
                         env=fh.child_env(xla_cache), capture_output=True, text=True, timeout=300)
  finally:
    step.chmod(0o755)
  errors_said = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert run.returncode == 1 and len(errors_said) == 1, run.stdout[-2000:] + run.stderr[-3000:]
  assert re.fullmatch(
      rf"error: checkpoint {step} could not be read \(.+\), nor checked for damage \(PermissionError: "
      rf"EACCES, Permission denied: {step}/\S+\): stopping without renaming anything; fix the storage .*",
      errors_said[0]), errors_said[0]
  assert "damaged" not in run.stdout and fh.step_dirs(workdir) == [2, 4]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_a_read_error_that_also_stops_the_damage_check_renames_nothing(trained, tmp_path, monkeypatch):
  """EIO on every read of the step, the checksum pass included: nothing can be proven either way."""
  workdir = _copy(trained, tmp_path)
  eio = OSError(errno.EIO, os.strerror(errno.EIO), str(workdir / "checkpoints" / "4" / "state"))
  _fail_reading_step(monkeypatch, workdir, 4, eio)
  monkeypatch.setattr(manifest, "_crc32", lambda path: (_ for _ in ()).throw(eio))
  with pytest.raises(errors.StorageError) as e:
    _restore(workdir, trained["config"], trained["abstract"])
  _one_line(str(e.value))
  assert "could not be read (OSError: EIO, Input/output error" in str(e.value)
  assert "nor checked for damage (OSError: EIO, Input/output error" in str(e.value)
  assert fh.step_dirs(workdir) == [2, 4] and not list((workdir / "checkpoints").glob("*.damaged*"))


def test_a_bug_while_reading_keeps_its_traceback_and_renames_nothing(trained, tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  _fail_reading_step(monkeypatch, workdir, 4, TypeError("unsupported operand type(s) for +"))
  with pytest.raises(TypeError, match="unsupported operand"):
    _restore(workdir, trained["config"], trained["abstract"])
  assert fh.step_dirs(workdir) == [2, 4]


def test_every_save_records_its_files_and_damage_is_checked_against_them(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  step_dir = workdir / "checkpoints" / "4"
  recorded = manifest.read(step_dir)
  data = [k for k in recorded if "/d/" in k]
  assert data and "state/_METADATA" in recorded and "meta/metadata" in recorded
  assert manifest.damage_evidence(step_dir) is None
  fh.corrupt(str(step_dir), "flip_bytes", np.random.default_rng(0))
  assert re.fullmatch(r"state/.*d/\w+ does not match the checksum the save recorded",
                      manifest.damage_evidence(step_dir))


# ====================================================================================================
# 6. A disk that fills up while saving.


@pytest.mark.parametrize("point", fh.PAUSE_POINTS)
def test_disk_full_while_saving_leaves_the_previous_checkpoint_valid(trained, tmp_path, point):
  """ENOSPC at each stage of a save: after the arrays, at the JSON meta, at the commit."""
  workdir = _copy(trained, tmp_path)
  config = _tiny_config()
  state, _, mngr = _restore(workdir, config, trained["abstract"])
  state = state.replace(step=state.step + 2)  # would be step 6
  with fh.disk_full(point) as calls, pytest.raises(train.CheckpointError) as e:
    mngr.save(state, {"model": {}})  # asynchronous: the write fails in the background
    mngr.finish()  # ... and is reported here, naming the step
  assert calls[0] >= 1
  message = str(e.value)
  _one_line(message)
  assert "saving the checkpoint of step 6 failed" in message and "No space left on device" in message
  assert f"step 4 in {workdir}/checkpoints is intact" in message
  assert fh.step_dirs(workdir) == [2, 4]
  state, log, _ = _restore(workdir, config, trained["abstract"])
  assert int(state.step) == 4 and not log  # the newest good step, nothing reported damaged
  assert fh.same_params(jax.device_get(state.params), trained["params"][4])


@pytest.mark.slow
def test_disk_full_stops_train_py_in_one_line_and_the_rerun_resumes(tmp_path, xla_cache):
  """The CLI: saves at steps 2 and 4 succeed, the disk is full at 6; the rerun resumes from 4."""
  args = fh.tiny_train_args(tmp_path / "wd", "--config.total_steps=6", "--config.checkpoint_every=2",
                            "--config.eval_every=6", "--config.log_every=2")
  env = fh.child_env(xla_cache)
  full = fh.TrainRun(args, env=env, enospc=("meta", 2))
  assert full.wait(timeout=600) == 1, full.text()[-3000:]
  errors = [t for _, s, t in full.lines if s == "err" and t.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in full.text("err"), full.text("err")[-3000:]
  assert re.fullmatch(r"error: saving the checkpoint of step 6 failed \(OSError: ENOSPC, No space left on "
                      r"device\); the previous checkpoint: step 4 in .* is intact\. .*", errors[0])
  assert fh.step_dirs(tmp_path / "wd") == [2, 4]
  rerun = fh.TrainRun(args, env=env)
  assert rerun.wait(timeout=600) == 0, rerun.text()[-3000:]
  assert re.search(r"Resumed from .*checkpoints/4\.", rerun.text("out"))
  assert fh.step_dirs(tmp_path / "wd") == [2, 4, 6] and not fh.tmp_dirs(tmp_path / "wd")


# ====================================================================================================
# 3. Bad inputs: one line naming the field, the value and what is allowed, before anything compiles.


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if train_and_evaluate gets as far as its first compile (the jitted init)."""
  def compiled(*args, **kwargs):
    raise AssertionError("reached the first compile: the bad input was not caught before it")
  monkeypatch.setattr(train, "init_state", compiled)


def _bad_npz(path):
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  return str(path)


def _other_model_npz(path):
  config = _tiny_config()
  config.model.hidden_size = 48
  shapes = jax.eval_shape(lambda: train.create_model(config, 10).init(
      jax.random.key(0), jax.numpy.zeros((1, 16, 16, 3)), train=False))["params"]
  ckpt_lib.save_npz(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), path)
  return str(path)


def _unwritable(tmp_path):
  if os.geteuid() == 0:  # root writes through permission bits; sysfs refuses even root
    return "/sys"
  d = tmp_path / "readonly"
  d.mkdir()
  d.chmod(0o500)
  return str(d)


# (id, how to break the config (config, tmp_path) -> workdir override or None, expected message regex)
BAD_INPUTS = [
    ("image_size_not_divisible_by_patch", lambda c, t: c.update(image_size=18),
     r"config.image_size=18 is not divisible by config.model.patch_size=\(4, 4\): use a multiple"),
    ("hidden_not_divisible_by_heads", lambda c, t: c.model.update(num_heads=3),
     r"config.model.hidden_size=32 is not allowed: a multiple of num_heads=3"),
    ("unknown_pooling", lambda c, t: c.model.update(pool="avg"),
     r"config.model.pool='avg' is not allowed: choose one of cls, gap, map"),
    ("unknown_optimizer", lambda c, t: c.update(optimizer="lamb"),
     r"config.optimizer='lamb' is not allowed: choose one of sgd, adam, adamw"),
    ("unknown_schedule", lambda c, t: c.update(decay_type="exponential"),
     r"config.decay_type='exponential' is not allowed: choose one of cosine, linear, constant"),
    ("unknown_dataset", lambda c, t: c.update(dataset="no_such_dataset_xyz"),
     r"Unknown dataset 'no_such_dataset_xyz': config.dataset must be a TFDS dataset name"),
    ("dataset_not_prepared", lambda c, t: c.update(dataset="mnist", data_dir=str(t / "empty")),
     r"Dataset 'mnist' is not prepared in data_dir .* config.allow_download is False: .*tfds build"),
    ("image_folder_missing", lambda c, t: c.update(dataset=f"imagefolder:{t}/nowhere"),
     r"Image folder '.*/nowhere' \(config.dataset='imagefolder:.*'\) does not exist; it must hold"),
    ("split_not_in_dataset", lambda c, t: c.update(eval_split="validation"),
     r"Split 'validation' is not in dataset 'digits' \(its splits: \['test', 'train'\]"),
    ("batch_not_divisible_by_devices", lambda c, t: c.update(batch_size=36),
     r"config.batch_size=36 must be a positive multiple of 8 .*8 device\(s\)\); use e.g. batch_size=40"),
    ("eval_batch_not_divisible_by_devices", lambda c, t: c.update(eval_batch_size=20),
     r"config.eval_batch_size=20 must be a positive multiple of 8"),
    ("batch_larger_than_the_train_split", lambda c, t: c.update(batch_size=2048, eval_batch_size=64),
     r"config.batch_size=2048 is larger than the train split 'train' of 'digits' \(1437 examples"),
    ("accum_steps_not_dividing_the_per_device_batch", lambda c, t: c.update(accum_steps=3),
     r"config.accum_steps=3 does not divide the per-device batch 4 .*choose a divisor of 4"),
    ("batch_chunks_not_dividing_the_per_device_micro_batch",
     lambda c, t: c.update(accum_steps=2, batch_chunks=4),
     r"config.batch_chunks=4 does not divide the per-device micro-batch 2 .*choose a divisor of 2"),
    ("warmup_longer_than_training", lambda c, t: c.update(warmup_steps=10),
     r"config.warmup_steps=10 is not allowed: between 0 and total_steps=4"),
    ("non_positive_learning_rate", lambda c, t: c.update(learning_rate=0.0),
     r"config.learning_rate=0.0 is not allowed: a positive number"),
    ("zero_total_steps", lambda c, t: c.update(total_steps=0, warmup_steps=0),
     r"config.total_steps=0 is not allowed: a positive integer"),
    ("label_smoothing_out_of_range", lambda c, t: c.update(label_smoothing=1.5),
     r"config.label_smoothing=1.5 is not allowed: a value in \[0, 1\)"),
    ("keep_no_checkpoints", lambda c, t: c.update(keep_checkpoints=0),
     r"config.keep_checkpoints=0 is not allowed: None \(keep all\) or a positive integer"),
    ("async_checkpoints_not_a_bool", lambda c, t: c.update(async_checkpoints=None),
     r"config.async_checkpoints=None is not allowed: True or False"),
    ("zero_layers", lambda c, t: c.model.update(num_layers=0),
     r"config.model.num_layers=0 is not allowed: a positive integer"),
    ("crop_area_out_of_range", lambda c, t: c.pp.update(crop_min_area=0.0),
     r"config.pp.crop_min_area=0.0 is not allowed: a fraction of the area in \(0, 1\]"),
    ("unknown_train_crop", lambda c, t: c.pp.update(crop="random"),
     r"config.pp.crop='random' is not allowed: choose one of inception, resize, none"),
    ("unknown_eval_crop", lambda c, t: c.pp.update(eval_crop="center"),
     r"config.pp.eval_crop='center' is not allowed: choose one of resize, central_crop, none"),
    ("unknown_dtype", lambda c, t: c.model.update(dtype="float13"),
     r"config.model.dtype='float13' is not allowed: a JAX dtype such as float32 or bfloat16"),
    ("dropout_out_of_range", lambda c, t: c.model.update(dropout_rate=1.5),
     r"config.model.dropout_rate=1.5 is not allowed: a rate in \[0, 1\)"),
    ("missing_field", lambda c, t: c.__delitem__("optimizer"),
     r"the config has no field optimizer: add it"),
    ("workdir_is_a_file", lambda c, t: (t / "afile").write_text("x") and str(t / "afile"),
     r"workdir '.*afile' is a file, not a directory: pass a directory path"),
    ("workdir_not_writable", lambda c, t: _unwritable(t),
     r"workdir '.*' is not writable \(Permission denied\): pass a writable directory"),
    ("init_from_missing", lambda c, t: c.update(init_from=str(t / "ViT-B_16.npz")),
     r"config.init_from='.*ViT-B_16.npz' does not exist: pass an orbax checkpoint directory"),
    ("init_from_random_bytes", lambda c, t: c.update(init_from=_bad_npz(t / "junk.npz")),
     r"config.init_from='.*junk.npz' cannot initialise this model: .*not a readable ViT .npz"),
    ("init_from_another_model", lambda c, t: c.update(init_from=_other_model_npz(t / "wide.npz")),
     r"config.init_from='.*wide.npz' cannot initialise this model: .*parameter '.*' has shape \(.*48.*\)"
     r" in the .* but \(.*32.*\) in the"),
]


@pytest.mark.parametrize("breakage, expected", [(b, e) for _, b, e in BAD_INPUTS],
                         ids=[name for name, _, _ in BAD_INPUTS])
def test_bad_input_fails_in_one_line_before_compiling(tmp_path, no_compile, breakage, expected):
  config = _tiny_config()
  workdir = breakage(config, tmp_path)
  workdir = workdir if isinstance(workdir, str) else str(tmp_path / "wd")
  with pytest.raises(errors.VitClsError) as e:  # the types train.py prints as one line
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  _one_line(message)
  assert re.search(expected, message), message


def test_batch_not_divisible_by_processes_fails_before_compiling(tmp_path, no_compile, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match=r"config.batch_size=32 must be a positive multiple of 24 \(it "
                                       r"is split over 3 process\(es\) and 8 device\(s\)\)"):
    train.train_and_evaluate(_tiny_config(), str(tmp_path))


def test_unknown_model_name_lists_the_known_ones():
  from configs import models  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"unknown model name 'B/17': choose one of Ti/16, S/16, .*H/14"):
    models.get_model_config("B/17")


def _cli(tmp_path, *args, timeout=300):
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, fh.TRAIN_PY, *args], capture_output=True, text=True,
                       timeout=timeout, cwd=tmp_path, env=fh.child_env())
  noise = re.compile(r"^(W0000|I0000|E0000|WARNING: All log messages)")
  err = [l for l in out.stderr.splitlines() if l.strip() and not noise.match(l)]
  return out.returncode, err


@pytest.mark.parametrize("args, expected", [
    (("--config.batchsize=64",),
     r"^error: --config.batchsize: the config has no field 'batchsize'; did you mean 'batch_size'\?$"),
    (("--config.model.hiden_size=64",),
     r"^error: --config.model.hiden_size: the config has no field 'hiden_size'; did you mean "
     r"'hidden_size'\?$"),
    (("--config.batch_size=lots",), r"^error: flag --config.batch_size=lots: invalid literal for int"),
], ids=["override_typo", "nested_override_typo", "override_of_the_wrong_type"])
def test_cli_override_errors_are_one_line(tmp_path, args, expected):
  rc, err = _cli(tmp_path, *fh.tiny_train_args(tmp_path / "wd", *args))
  assert rc == 1 and len(err) == 1 and re.search(expected, err[0]), err


def test_cli_config_file_with_a_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / "my_config.py"
  bad.write_text("def get_config(:\n  pass\n")
  rc, err = _cli(tmp_path, "--config", str(bad), "--workdir", str(tmp_path / "wd"))
  assert rc == 1 and len(err) == 1, err
  assert re.search(r"^error: --config: the config file .*my_config.py has a syntax error at line 1: "
                   r"invalid syntax", err[0]), err


def test_cli_config_file_errors_and_missing_file_are_one_line(tmp_path):
  finetune = os.path.join(fh.REPO, "configs", "finetune.py")
  rc, err = _cli(tmp_path, "--config", f"{finetune}:cifar10,B/17", "--workdir", str(tmp_path / "wd"))
  assert rc == 1 and len(err) == 1 and re.search(r"unknown model name 'B/17': choose one of", err[0])
  rc, err = _cli(tmp_path, "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "wd"))
  assert rc == 1 and len(err) == 1 and "No such file or directory" in err[0] and "nope.py" in err[0]


# train.py with a user's model whose forward pass has a shape bug (an einsum over mismatched sizes).
_BUGGY_MODEL_RUN = """
import runpy, sys
import jax.numpy as jnp
from vit_cls import model, train

class Buggy(model.VisionTransformer):
  def __call__(self, images, train=False, **kwargs):
    flat = images.reshape(images.shape[0], -1)
    return jnp.einsum("bi,ij->bj", flat, jnp.zeros((5, self.num_classes)))  # the bug: 5 is not the width

train.create_model = lambda config, num_classes: Buggy(**train.model_kwargs(config, num_classes))
sys.argv = [{train_py!r}, *sys.argv[1:]]
runpy.run_path({train_py!r}, run_name="__main__")
"""


def test_cli_a_bug_in_user_code_shows_its_traceback_while_a_bad_config_stays_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  script = tmp_path / "buggy_run.py"
  script.write_text(_BUGGY_MODEL_RUN.format(train_py=fh.TRAIN_PY))
  env = fh.child_env(VIT_CLS_ALLOCATOR="system", PYTHONPATH=fh.REPO)

  def run(*overrides):
    out = subprocess.run([sys.executable, str(script), *fh.tiny_train_args(tmp_path / "wd", *overrides)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    return out.returncode, out.stderr

  rc, err = run()
  assert rc != 0 and "Traceback (most recent call last)" in err, err[-3000:]
  assert "ValueError" in err and "einsum" in err and "the bug: 5 is not the width" in err, err[-3000:]
  assert not any(line.startswith("error: ") for line in err.splitlines()), err[-3000:]
  rc, err = run("--config.model.num_heads=3")  # the same program, a bad config: one line
  lines = [l for l in err.splitlines() if l.startswith("error: ") or "Traceback" in l]
  assert rc == 1 and lines == ["error: config.model.hidden_size=32 is not allowed: a multiple of "
                               "num_heads=3."], err[-3000:]


@pytest.mark.slow
def test_cli_bad_value_is_one_line_with_no_traceback(tmp_path):
  rc, err = _cli(tmp_path, *fh.tiny_train_args(tmp_path / "wd", "--config.model.num_heads=3"))
  assert rc == 1 and err == ["error: config.model.hidden_size=32 is not allowed: a multiple of "
                             "num_heads=3."], err


# ====================================================================================================
# 4. Bad data: image folders.


def _image_folder(root, classes=("cat", "dog"), per_class=4, splits=("train", "test")):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in splits:
    for cls in classes:
      d = root / split / cls
      d.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(d / f"{i}.png")
  return root


def _folder_config(root, **updates):
  return _tiny_config(dataset=f"imagefolder:{root}", batch_size=8, eval_batch_size=8, **updates)


def test_image_folder_file_that_is_not_an_image_is_named_before_training(tmp_path, no_compile):
  root = _image_folder(tmp_path / "photos")
  (root / "train" / "dog" / "notes.jpg").write_text("shopping list")
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(_folder_config(root), str(tmp_path / "wd"))
  _one_line(str(e.value))
  assert re.search(r"Image folder file '.*/train/dog/notes.jpg' is not a JPEG, PNG, GIF or BMP image "
                   r"\(it starts with b'shopping'\): remove or replace it", str(e.value))


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.symlink_to(p.parent / "gone.png"), r"cannot be read \(No such file or directory\)"),
    (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\)"),
], ids=["unreadable", "empty"])
def test_image_folder_unreadable_or_empty_file_is_named(tmp_path, make, reason):
  root = _image_folder(tmp_path / "photos")
  make(root / "test" / "cat" / "broken.png")
  with pytest.raises(ValueError, match=r"Image folder file '.*/test/cat/broken.png' " + reason):
    input_pipeline.get_dataset_info(_folder_config(root))


def test_image_folder_truncated_image_is_named_when_it_fails_to_decode(tmp_path):
  root = _image_folder(tmp_path / "photos")
  good = root / "train" / "cat" / "0.png"
  good.write_bytes(good.read_bytes()[:60])  # a valid PNG header, then nothing
  config = _folder_config(root)
  input_pipeline.get_dataset_info(config)  # the header passes
  with pytest.raises(ValueError, match=r"Image folder file '.*/train/cat/0.png' cannot be decoded "
                                       r"\(.*PNG.*\): remove or replace it"):
    it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
    for _ in range(3):
      next(it)


def test_image_folder_with_an_empty_class_folder_is_an_error(tmp_path, no_compile):
  root = _image_folder(tmp_path / "photos")
  (root / "train" / "bird").mkdir()
  with pytest.raises(ValueError, match=r"Image folder class '.*/train/bird' has no images"):
    train.train_and_evaluate(_folder_config(root), str(tmp_path / "wd"))


def test_image_folder_with_one_class_is_an_error(tmp_path, no_compile):
  root = _image_folder(tmp_path / "photos", classes=("cat",))
  with pytest.raises(ValueError, match=r"Image folder '.*photos' has 1 class \(cat\): classification "
                                       r"needs at least 2 class folders"):
    train.train_and_evaluate(_folder_config(root), str(tmp_path / "wd"))


def test_image_folder_skips_other_files_with_a_warning_naming_them(tmp_path, caplog):
  root = _image_folder(tmp_path / "photos")
  (root / "train" / "cat" / "README.txt").write_text("from the family album")
  (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (root / "train" / ".ipynb_checkpoints").mkdir()
  info = input_pipeline.get_dataset_info(_folder_config(root))
  assert info.label_names == ["cat", "dog"] and info.num_train_examples == 8
  warned = " ".join(r.getMessage() for r in caplog.records)
  assert "README.txt" in warned and ".DS_Store" not in warned


# ====================================================================================================
# 5. Untrusted files: nothing is ever unpickled.


class _Payload:
  """Unpickling this would create a file: proof that code ran."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_npz_with_a_pickled_object_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "code_ran"
  path = tmp_path / "evil.npz"
  objects = np.empty(1, dtype=object)
  objects[0] = _Payload(str(marker))
  np.savez(path, **{"embedding/kernel": objects})
  for load in (ckpt_lib.load_npz, ckpt_lib.restore_params, ckpt_lib.load):
    with pytest.raises(ValueError, match=r"evil.npz: not a readable ViT .npz parameter file \(it holds "
                                         r"pickled object arrays, which are never loaded\)"):
      load(str(path))
  assert not marker.exists()


@pytest.mark.parametrize("content", ["random_bytes", "zip_of_random_bytes", "npy_not_npz"])
def test_random_or_foreign_npz_fails_cleanly(tmp_path, content):
  path = tmp_path / "weights.npz"
  rng = np.random.default_rng(3)
  if content == "random_bytes":
    path.write_bytes(rng.bytes(10_000))
  elif content == "zip_of_random_bytes":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("embedding/kernel.npy", rng.bytes(1000))
  else:
    np.save(open(path, "wb"), np.zeros(3))
  with pytest.raises(ValueError) as e:
    ckpt_lib.load(str(path))
  _one_line(str(e.value))
  assert str(path) in str(e.value) and "not a readable ViT .npz parameter file" in str(e.value)


def test_no_loader_in_the_package_can_unpickle():
  """Every np.load passes allow_pickle=False; no pickle-based format is read anywhere."""
  sources = [os.path.join(fh.REPO, "train.py")] + [
      os.path.join(dirpath, f) for dirpath, _, files in os.walk(os.path.join(fh.REPO, "vit_cls"))
      for f in files if f.endswith(".py")]
  unsafe = re.compile(r"\bimport (c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b|torch\.load|"
                      r"allow_pickle\s*=\s*True|yaml\.load\(|\beval\(|\bexec\(|pd\.read_pickle")
  for path in sources:
    text = open(path, encoding="utf-8").read()
    assert not unsafe.search(text), f"{path}: {unsafe.search(text).group(0)}"
    for call in re.finditer(r"np\.load\(([^)]*)\)", text):
      assert "allow_pickle=False" in call.group(1), f"{path}: {call.group(0)}"


# ====================================================================================================
# Odds and ends a crash leaves behind.


def test_a_torn_metrics_line_does_not_break_reading_or_plotting(trained, tmp_path):
  from vit_cls import metrics_log  # pylint: disable=g-import-not-at-top
  workdir = _copy(trained, tmp_path)
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "split": "train", "lo')  # killed (or out of disk) mid-line
  logger = metrics_log.MetricsLogger(str(workdir), 6)
  logger.write(6, "train", {"loss": 1.0, "accuracy": 0.5})
  logger.close()
  records = metrics_log.read_metrics(str(workdir))
  assert [r["step"] for r in records if r["split"] == "train"][-1] == 6
  assert os.path.getsize(metrics_log.plot_curves(str(workdir))) > 1000


def test_old_checkpoints_leave_by_rename_and_the_trash_is_emptied(trained, tmp_path):
  """Garbage collection is one atomic rename per step: a kill never leaves a half-deleted step."""
  workdir = _copy(trained, tmp_path)
  config = _tiny_config(keep_checkpoints=1)
  state, _, mngr = _restore(workdir, config, trained["abstract"])
  mngr.save(state.replace(step=state.step + 2), {"model": {}})
  mngr.finish()
  assert fh.step_dirs(workdir) == [6]
  trash = workdir / "checkpoints" / train.TRASH_DIR
  assert not trash.exists() or not os.listdir(trash)
  assert mngr._manager._options.todelete_subdir == train.TRASH_DIR  # pylint: disable=protected-access
