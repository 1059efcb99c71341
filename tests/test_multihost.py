"""Multi-host training with JAX's own runtime: two real processes on this machine against one.

Two processes (4 simulated CPU devices each, `jax.distributed` with a coordinator on 127.0.0.1, gloo
collectives) run `train.train_and_evaluate`, the code every host of a TPU slice or GPU cluster runs, and
are compared with one process of 8 devices.

The data order: each process reads its own half of the train split and shuffles it with its own seed, so
a 2-process global batch holds other examples than the 1-process batch of the same step (the data order
depends on the process count; every example is still seen once per epoch). To compare like with like, the
1-process reference is fed the 2-process global batches: the two processes' local batches (the input
pipeline run with process_index=0 and 1 of 2), concatenated in process order, which is how
`make_array_from_process_local_data` lays them out on a mesh of `jax.devices()`. Everything else (the
jitted step, dropout keys, the optimizer, checkpoints) is the code under test. SGD keeps the comparison
tight: its update is linear in the gradient, so summation-order noise stays noise (Adam divides by
sqrt(v) and turns it into +-lr for near-zero gradients).

One launch of two processes runs every multi-process job in sequence (each launch costs seconds of JAX,
TensorFlow and coordinator start-up): replicated and fsdp training, resuming a 1-process checkpoint, the
fsdp layout, and a SIGTERM delivered to one process only.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from vit_cls import checkpoint
from vit_cls import input_pipeline
from vit_cls import sharding
from vit_cls import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
STEPS = 6  # checkpoints at 3 and 6: resumes start at 3

# The tiny digits job (as conftest's tiny_config), with SGD and dropout on.
CONFIG = {
    "model.hidden_size": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.num_layers": 1,
    "model.representation_size": 32, "model.attention_impl": "einsum", "model.dropout_rate": 0.1,
    "optimizer": "sgd", "learning_rate": 0.1, "total_steps": STEPS, "warmup_steps": 2,
    "batch_size": 32, "eval_batch_size": 64, "log_every": 3, "eval_every": STEPS,
    "checkpoint_every": 3, "shuffle_buffer": 256,
}
FSDP_MIN_SIZE = 256  # shard even this model's small kernels
_create_train_iterator = input_pipeline.create_train_iterator  # the real one, kept from the monkeypatch


def _config(**extra):
  sys.path.insert(0, REPO)
  from tests.multihost_worker import make_config  # pylint: disable=g-import-not-at-top
  return make_config({**CONFIG, **extra})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_process_batches(config, *, start_step=0):
  """The global batches of a 2-process run, built in one process: local batches in process order."""
  parts = [_create_train_iterator(config, start_step=start_step, process_index=i,
                                                process_count=2) for i in range(2)]
  while True:
    local = [next(p) for p in parts]
    yield {k: np.concatenate([b[k] for b in local]) for k in local[0]}


@contextlib.contextmanager
def _fed_two_process_batches():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train.input_pipeline, "create_train_iterator", _two_process_batches)
    yield


def _keep_only_step(workdir, src, step):
  shutil.copytree(src, workdir)
  for s in os.listdir(os.path.join(workdir, "checkpoints")):
    if s != str(step):
      shutil.rmtree(os.path.join(workdir, "checkpoints", s))


def _launch(spec: dict, tmp, on_line=None, timeout=400) -> list[str]:
  """Runs 2 worker processes to completion; returns their outputs. `on_line(line, procs)` sees process
  0's stdout as it comes (to send signals at the right moment)."""
  spec_path = os.path.join(tmp, "spec.json")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONUNBUFFERED="1",
             WORKER_HANG_DUMP_S=str(max(timeout - 30, 10)),
             WORKER_COMPILE_CACHE=os.path.join(tmp, "compile-cache"))
  logs = [os.path.join(tmp, f"process-{i}.log") for i in range(2)]
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, spec_path], env=dict(env, JAX_PROCESS_ID=str(i)), cwd=tmp,
        stdout=open(logs[i], "w"), stderr=subprocess.STDOUT, text=True))
  deadline = time.time() + timeout
  seen = 0
  try:
    while any(p.poll() is None for p in procs):
      if time.time() > deadline:
        raise TimeoutError("the 2-process job did not finish in time")
      if any(p.poll() not in (None, 0) for p in procs):
        time.sleep(3)  # let the other one print its error too
        break
      if on_line is not None:
        with open(logs[0]) as f:
          lines = f.read().splitlines()
        for line in lines[seen:]:
          on_line(line, procs)
        seen = len(lines)
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [open(log).read() for log in logs]
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{outputs[i][-4000:]}"
  return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of the comparison, 1-process and 2-process; returns their workdirs and outputs."""
  tmp = tmp_path_factory.mktemp("multihost")
  d = {name: str(tmp / name) for name in ("one", "two", "two_fsdp", "resume_in_two", "resume_in_one",
                                          "layout", "sigterm")}
  config = _config()
  input_pipeline.get_dataset_info(config)  # prepare the digits here, not in two racing processes
  t0 = time.time()
  with _fed_two_process_batches():
    train.train_and_evaluate(config, d["one"])  # 1 process, 8 devices, the 2-process batches
  _keep_only_step(d["resume_in_two"], d["one"], 3)  # a 1-process checkpoint for the 2 processes

  sigterm = {}

  def on_line(line, procs):
    if line == "JOB sigterm start":
      sigterm["started"] = True
    elif sigterm.get("started") and line.startswith("step") and "sent" not in sigterm:
      procs[1].send_signal(signal.SIGTERM)  # one host's preemption notice, not the other's
      sigterm["sent"] = line

  spec = {"config": CONFIG, "jobs": [
      {"kind": "train", "name": "two", "workdir": d["two"]},
      {"kind": "train", "name": "two_fsdp", "workdir": d["two_fsdp"], "config": {"fsdp": True},
       "fsdp_min_size": FSDP_MIN_SIZE},
      {"kind": "train", "name": "resume_in_two", "workdir": d["resume_in_two"]},
      {"kind": "layout", "name": "layout", "workdir": d["layout"], "config": {"fsdp": True},
       "fsdp_min_size": FSDP_MIN_SIZE},
      {"kind": "train", "name": "sigterm", "workdir": d["sigterm"],
       "config": {"total_steps": 100_000, "log_every": 2, "checkpoint_every": 100_000}},
  ]}
  t1 = time.time()
  outputs = _launch(spec, str(tmp), on_line=on_line)
  t2 = time.time()

  _keep_only_step(d["resume_in_one"], d["two"], 3)  # a 2-process checkpoint for 1 process
  with _fed_two_process_batches():
    train.train_and_evaluate(config, d["resume_in_one"])
  print(f"1-process runs {t1 - t0 + time.time() - t2:.0f} s, 2-process launch {t2 - t1:.0f} s:",
        *re.findall(r"^JOB .* done in .*$", outputs[0], re.M), sep="\n  ")
  return d, outputs, sigterm


def _params(workdir):
  return checkpoint.restore_params(workdir)[0]


def _assert_close(a, b, what):
  flat_a, flat_b = checkpoint.flatten(a), checkpoint.flatten(b)
  assert flat_a.keys() == flat_b.keys()
  worst = max(float(np.max(np.abs(flat_a[k] - flat_b[k]))) for k in flat_a)
  for k in flat_a:
    np.testing.assert_allclose(flat_a[k], flat_b[k], rtol=1e-5, atol=1e-6, err_msg=f"{what}: {k}")
  return worst


@pytest.mark.slow
def test_two_processes_train_like_one_process_on_the_same_global_batch(runs):
  d, outputs, _ = runs
  assert "process 0/2: 4 local, 8 global devices" in outputs[0]
  one = _params(d["one"])
  assert sorted(os.listdir(os.path.join(d["two"], "checkpoints"))) == ["3", str(STEPS)]
  worst = _assert_close(one, _params(d["two"]), "2 processes vs 1")
  print(f"largest |difference| 2 processes vs 1: {worst:.2e}")
  # The progress line and the metrics come from process 0 only.
  progress = re.compile(r"^step +\d+/\d+ ", re.M)
  assert f"step {STEPS:>6}/{STEPS}" in outputs[0] and not progress.search(outputs[1])
  assert os.path.exists(os.path.join(d["two"], "metrics.jsonl"))


@pytest.mark.slow
def test_two_processes_with_fsdp_train_like_one_replicated_process(runs):
  d, _, _ = runs
  worst = _assert_close(_params(d["one"]), _params(d["two_fsdp"]), "2 processes fsdp vs 1")
  print(f"largest |difference| 2 processes fsdp vs 1 replicated: {worst:.2e}")
  # The layout: each process holds 1/8 of a sharded kernel on each of its 4 devices.
  for i in range(2):
    with open(os.path.join(d["layout"], f"layout-{i}.json")) as f:
      layout = json.load(f)
    kernel = layout[".params['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']"]
    assert kernel["shape"] == [32, 64] and kernel["spec"] == [None, "data"]
    assert kernel["local_shards"] == [[32, 8]] * 4
    mu = [v for k, v in layout.items() if k.startswith(".opt_state") and "Dense_0" in k and
          "kernel" in k]
    assert mu and all(m["local_shards"] == [[32, 8]] * 4 for m in mu)  # momentum follows its param


@pytest.mark.slow
def test_checkpoints_move_between_one_and_two_processes(runs):
  d, outputs, _ = runs
  one = _params(d["one"])
  # Written by 1 process at step 3, resumed by 2: the uninterrupted 1-process parameters at the end.
  assert "Resumed from" in outputs[0].split("JOB resume_in_two start")[1]
  _assert_close(one, _params(d["resume_in_two"]), "1-process checkpoint resumed in 2 processes")
  # Written by 2 processes at step 3, resumed by 1.
  _assert_close(one, _params(d["resume_in_one"]), "2-process checkpoint resumed in 1 process")
  # An fsdp checkpoint written by 2 processes restores whole in 1 (checkpoint.restore_params).
  assert _params(d["two_fsdp"]).keys() == one.keys()


@pytest.mark.slow
def test_sigterm_on_one_host_checkpoints_one_step_on_all_and_exits(runs):
  d, outputs, sigterm = runs
  assert "sent" in sigterm, "the SIGTERM job never printed a progress line"
  assert "Preemption requested: checkpoint written at step" in outputs[0]
  steps = os.listdir(os.path.join(d["sigterm"], "checkpoints"))
  assert len(steps) == 1 and 2 <= int(steps[0]) < 100_000
  assert "JOB sigterm done" in outputs[0] and "JOB sigterm done" in outputs[1]  # both exited cleanly


def test_the_data_order_depends_on_the_process_count(tiny_config):
  """Documented behaviour (docs/training.md, Batch semantics): 2 processes see other global batches than 1 process."""
  tiny_config.batch_size = 32
  one = next(input_pipeline.create_train_iterator(tiny_config, process_index=0, process_count=1))
  two = next(_two_process_batches(tiny_config))
  assert one["image"].shape == two["image"].shape
  assert not np.array_equal(one["image"], two["image"])


def test_distributed_args_start_the_runtime_only_for_several_processes():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert sharding.distributed_args(environ={}) is None
  assert sharding.distributed_args(environ=env) == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
  assert sharding.distributed_args("h:1", 2, 0, environ={}) == dict(
      coordinator_address="h:1", num_processes=2, process_id=0)  # train.py's flags win
  assert sharding.distributed_args(environ={**env, "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) \
      is None
  assert sharding.distributed_args(environ={"TPU_WORKER_HOSTNAMES": "a,b"}) == {}  # JAX asks the TPU
  assert sharding.distributed_args(environ={"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0"}) == {}
  assert sharding.distributed_args(environ={"SLURM_NTASKS": "8"}) is None  # an sbatch script itself
  with pytest.raises(ValueError, match="missing the process id"):
    sharding.distributed_args(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="outside"):
    sharding.distributed_args("h:1", 2, 2, environ={})
  assert not sharding.maybe_initialize_distributed()  # this test process: no job, nothing started
  assert jax.process_count() == 1


# ----------------------------------------------------------------------------------------------------
# The launchers: what they would run, checked through --dry-run (nothing is created or started).


def _dry_run(script, *args, expect_rc=0):
  out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args],
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == expect_rc, out.stderr
  return out


# The TPU launcher's tests, with a fake gcloud: tests/test_launch_tpu.py.


def test_gpu_launcher_dry_run_prints_one_process_per_host():
  out = _dry_run("launch_gpu.py", "--hosts=gpu-0,gpu-1,gpu-2", "--port=4321", "--repo_dir=/shared/vit",
                 "--env", "NCCL_DEBUG=WARN", "--skip_fit_check", "--dry-run", "--",
                 "--config=configs/default.py", "--workdir=/shared/run").stdout
  lines = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
  assert len(lines) == 3
  for i, cmd in enumerate(lines):
    assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", f"gpu-{i}"]
    remote = cmd[4]
    assert remote.startswith("cd /shared/vit && echo vit_cls pid $$ && exec ")
    assert shlex.split(remote.split(" && exec ", 1)[1]) == [
        "env", "NCCL_DEBUG=WARN", "python3", "train.py", "--coordinator_address=gpu-0:4321",
        "--num_processes=3", f"--process_id={i}", "--config=configs/default.py", "--workdir=/shared/run"]
  assert "kill -TERM" in out
  err = _dry_run("launch_gpu.py", "--hosts=a,b", "--dry-run", "--", "--config=c.py",
                 expect_rc=2).stderr
  assert "--workdir" in err
