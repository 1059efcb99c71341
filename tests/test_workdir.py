"""One owner per workdir (vit_cls/workdir.py), resuming past the end, a quiet first train.py run."""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from tests import fault_harness as fh
from vit_cls import train
from vit_cls import workdir as workdir_lib

_HOLDER = r"pid (\d+) on host (\S+) \(started [0-9-]+ [0-9:]+ UTC\)"


def test_a_held_workdir_is_refused_with_its_holder_and_free_again_after_release(tmp_path):
  first = workdir_lib.lock_for(str(tmp_path)).acquire()
  with pytest.raises(workdir_lib.WorkdirBusyError) as e:
    workdir_lib.lock_for(str(tmp_path)).acquire()
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"workdir {tmp_path} is in use by another run: ")
  pid, host = re.search(_HOLDER, message).groups()
  assert (int(pid), host) == (os.getpid(), socket.gethostname())
  first.release()
  workdir_lib.lock_for(str(tmp_path)).acquire().release()


def test_the_job_lock_is_released_when_the_run_raises(tiny_config, tmp_path):
  """The lock is held for the whole run and dropped however it ends: a failed run leaves it free."""
  with pytest.raises(RuntimeError, match="boom"):
    with workdir_lib.JobLock(str(tmp_path)):
      with pytest.raises(workdir_lib.WorkdirBusyError):
        train.train_and_evaluate(tiny_config, str(tmp_path))  # a second run inside the first
      raise RuntimeError("boom")
  with workdir_lib.JobLock(str(tmp_path)):
    pass


def test_a_killed_holder_never_blocks(tmp_path):
  """SIGKILL leaves no chance to clean up: the kernel drops the flock with the process."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from vit_cls import workdir; "
       f"workdir.lock_for({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True, cwd=fh.REPO)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {holder.pid} on host"):
      workdir_lib.lock_for(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()
  workdir_lib.lock_for(str(tmp_path)).acquire().release()


def _snapshot(workdir, under=("",)) -> dict:
  """Every file of the workdir (or of its folders `under`) with its content hash."""
  found = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel.startswith(under):
        with open(path, "rb") as f:
          found[rel] = hashlib.sha256(f.read()).hexdigest()
  return found


@pytest.mark.slow
def test_a_second_train_py_on_a_held_workdir_stops_at_once_and_a_killed_owner_is_resumed(tmp_path):
  """The first run is frozen (SIGSTOP: it still holds the workdir) while a second one starts on the
  same workdir: it exits 1 with one line naming the holder and changes no file. After a SIGKILL of
  the first, the next run resumes from its checkpoint and finishes."""
  wd = tmp_path / "wd"
  env = fh.child_env(str(tmp_path / "xla_cache"))
  args = fh.tiny_train_args(wd, "--config.total_steps=60", "--config.checkpoint_every=3",
                            "--config.log_every=1", "--config.eval_every=60")
  first = fh.TrainRun(args, env=env)
  try:
    # Saves may finish in the background: frozen once step 3 is committed, wherever it is then.
    assert fh.wait_for_path(str(wd / "checkpoints" / "3" / "commit_success.txt"), first.proc,
                            timeout=300), first.text()
    first.signal(signal.SIGSTOP)
    before = _snapshot(wd)
    committed = max(int(p.split("/")[1]) for p in before
                    if re.fullmatch(r"checkpoints/\d+/commit_success\.txt", p))
    assert "metrics.jsonl" in before
    second = subprocess.run([sys.executable, fh.TRAIN_PY, *args], capture_output=True, text=True,
                            env=env, timeout=120)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "Training" not in second.stdout  # stopped before reading data or compiling
    error = second.stderr.strip()
    assert "\n" not in error, error
    assert re.fullmatch(rf"error: workdir {re.escape(str(wd))} is in use by another run: "
                        rf"{_HOLDER}; wait for it to end or stop it, or pass another --workdir\.",
                        error), error
    assert re.search(_HOLDER, error).groups() == (str(first.proc.pid), socket.gethostname())
    assert _snapshot(wd) == before  # the first run's checkpoints and metrics untouched
  finally:
    first.proc.kill()  # SIGKILL works on a stopped process too
    first.wait()
  resumed = fh.TrainRun(args, env=env)
  assert resumed.wait(timeout=300) == 0, resumed.text()[-3000:]
  assert re.search(rf"Resumed from .*checkpoints/{committed}\.", resumed.text("out")), resumed.text()
  assert resumed.steps_printed()[0] == committed + 1 and resumed.steps_printed()[-1] == 60


# What a first run printed before (tensorflow-cpu 2.21, tensorflow-datasets 4.9.10): absl's and
# TensorFlow's import notices, TFDS's warning, its download announcement and progress bars.
NOISE = ("absl::InitializeLog", "oneDNN", "dataset_info.json", "Downloading and preparing",
         "Unknown size", "Generating", "Shuffling", "examples/s", "Subsequent calls", "[A")


@pytest.mark.slow
def test_a_first_run_is_quiet_and_a_rerun_past_the_end_says_it_is_complete(tmp_path):
  data_dir, wd = tmp_path / "tfds", tmp_path / "wd"
  env = fh.child_env(str(tmp_path / "xla_cache"), TFDS_DATA_DIR=str(data_dir))
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
  args = fh.tiny_train_args(wd, "--config.total_steps=4", "--config.log_every=2",
                            "--config.eval_every=4")
  first = subprocess.run([sys.executable, fh.TRAIN_PY, *args], capture_output=True, text=True,
                         env=env, timeout=300)
  assert first.returncode == 0, first.stderr[-3000:]
  output = first.stdout + first.stderr
  assert not [line for line in output.splitlines() if any(n in line for n in NOISE)], output
  assert first.stderr == "", first.stderr
  lines = first.stdout.splitlines()
  preparing = [i for i, line in enumerate(lines) if line.startswith("preparing ")]
  assert [lines[i] for i in preparing] == [
      f"preparing the built-in digits dataset once in {data_dir}/digits/1.0.0"], lines
  assert preparing[0] < next(i for i, line in enumerate(lines) if line.startswith("Training "))
  assert os.path.exists(data_dir / "digits" / "1.0.0" / "dataset_info.json")

  with open(wd / "metrics.jsonl") as f:
    last_eval = [r for r in map(json.loads, f) if r["split"] == "eval"][-1]
  kept = ("checkpoints", "metrics.jsonl", "curves.png")
  before = _snapshot(wd, kept)
  past = subprocess.run([sys.executable, fh.TRAIN_PY, *args[:-3], "--config.total_steps=2",
                         "--config.warmup_steps=1"], capture_output=True, text=True, env=env,
                        timeout=300)
  assert past.returncode == 0, past.stderr[-3000:]
  assert "preparing" not in past.stdout  # prepared once
  assert not re.search(r"^step ", past.stdout, re.M), past.stdout
  done = [line for line in past.stdout.splitlines() if "already complete" in line]
  assert done == [
      f"The run in {wd} is already complete: its checkpoint is at step 4 and "
      f"config.total_steps=2. Last evaluation, at step 4: num_examples 360  "
      f"accuracy {last_eval['accuracy']:.4f}  loss {last_eval['loss']:.4f}  "
      f"top5_accuracy {last_eval['top5_accuracy']:.4f}. Nothing to train: raise "
      f"config.total_steps to train further."], past.stdout
  after = _snapshot(wd, kept)
  assert after == before, set(after.items()) ^ set(before.items())


def test_a_run_resumed_past_the_end_returns_the_last_evaluation(tiny_config, tmp_path, capsys):
  first = train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.total_steps = 6
  again = train.train_and_evaluate(tiny_config, str(tmp_path))
  assert again == pytest.approx(first)
  assert "already complete: its checkpoint is at step 12 and config.total_steps=6" in (
      capsys.readouterr().out)


def test_in_a_multi_process_job_every_process_stops_when_the_chief_finds_the_workdir_held(
    tmp_path, monkeypatch):
  """Process 0 takes the lock; the others learn the outcome from its broadcast and name the holder
  from the lock file (here process 1 of 2, with the chief's broadcast saying "held elsewhere")."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  holder = workdir_lib.lock_for(str(tmp_path)).acquire()
  broadcasts = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                      lambda x: broadcasts.append(int(x)) or 0)
  for index in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"pid {os.getpid()} on host"):
      with workdir_lib.JobLock(str(tmp_path)):
        pass
  assert broadcasts == [0, 1]  # the chief sent "not held"; process 1 sent its ignored value
  holder.release()
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: 1)
  with workdir_lib.JobLock(str(tmp_path)):  # process 1: no lock of its own, nothing to release
    pass
