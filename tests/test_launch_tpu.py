"""scripts/launch_tpu.py without a cloud: a fake `gcloud` on PATH plays scripted states, records calls.

The fake answers each kind of call from its own list in a scenario (queued-resource states, node states,
the workers' status lines), one entry per call, the last one repeating; every call is appended to
calls.jsonl. The launcher's whole state machine runs against it with poll intervals of milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "launch_tpu.py")

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    d = os.environ["FAKE_GCLOUD_DIR"]
    argv = sys.argv[1:]
    with open(os.path.join(d, "calls.jsonl"), "a") as f:
      f.write(json.dumps(argv) + "\\n")
    scenario = json.load(open(os.path.join(d, "scenario.json")))
    words = [a for a in argv if not a.startswith("-")]
    command = next((a for a in argv if a.startswith("--command=")), "")
    if "queued-resources" in words:
      kind = {"describe": "queue", "create": "create"}.get(words[words.index("queued-resources") + 1])
    elif "describe" in words:
      kind = "node"
    elif "vit_cls-status" in command:
      kind = "status"
    elif "pip install" in command:
      kind = "install"
    else:
      kind = None
    if "vit_cls-start" in command:
      kind = "start"
    counters_path = os.path.join(d, "counters.json")
    counters = json.load(open(counters_path)) if os.path.exists(counters_path) else {}
    if kind == "start":
      counters["start"] = counters.get("start", 0) + 1
      json.dump(counters, open(counters_path, "w"))
    # Before the first start a worker has no run directory: the status command prints nothing.
    if kind == "status" and not counters.get("start") and not scenario.get("already_running"):
      sys.exit(0)
    if kind is None or kind not in scenario:
      sys.exit(0)
    i = counters.get(kind, 0)
    counters[kind] = i + 1
    json.dump(counters, open(counters_path, "w"))
    answer = scenario[kind][min(i, len(scenario[kind]) - 1)]
    if kind == "install":
      sys.exit(answer)
    if kind == "create":
      if answer:
        sys.stderr.write("ERROR: " + answer + "\\n")
        sys.exit(1)
    elif answer.startswith("ERROR:"):
      sys.stderr.write(answer + "\\n")
      sys.exit(1)
    elif answer == "NOT_FOUND":
      sys.stderr.write("ERROR: (gcloud) NOT_FOUND: Resource not found\\n")
      sys.exit(1)
    elif kind == "status":
      for worker in answer.split(";"):
        print("vit_cls-status " + worker)
    else:
      print(answer)
    """)

FAKE_AOT = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    with open(os.environ["FAKE_GCLOUD_DIR"] + "/aot_calls.jsonl", "a") as f:
      f.write(json.dumps(sys.argv[1:]) + "\\n")
    path = sys.argv[sys.argv.index("--json") + 1]
    fits = os.environ.get("FAKE_AOT_FITS", "1") == "1"
    target = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--target="))
    json.dump({"fits": fits, "per_chip_bytes": (20 if not fits else 10) * 2**30,
               "chip_memory_bytes": 16 * 2**30, "target": target}, open(path, "w"))
    """)

FAST = ["--poll=0.01", "--max_poll=0.02", "--stop_timeout=2"]


@pytest.fixture
def cloud(tmp_path):
  """A directory with the fake gcloud (and a fake aot command) and a runner of the launcher."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("fake_aot", FAKE_AOT)):
    (bin_dir / name).write_text(text.replace("{python}", sys.executable))
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path),
         "VIT_CLS_AOT": str(bin_dir / "fake_aot")}
  name = f"vit-test-{os.getpid()}-{tmp_path.name}"

  class Cloud:
    dir = tmp_path

    def args(self, *extra, accelerator="v4-8"):
      return [sys.executable, SCRIPT, f"--name={name}", "--zone=us-central2-b",
              f"--accelerator={accelerator}", "--bucket=b", *FAST, *extra, "--",
              "--config=configs/default.py"]

    def run(self, scenario, *extra, **kw):
      (tmp_path / "scenario.json").write_text(json.dumps(scenario))
      out = subprocess.run(self.args(*extra, **kw), capture_output=True, text=True, env=env, timeout=120)
      return out

    def popen(self, scenario, *extra):
      (tmp_path / "scenario.json").write_text(json.dumps(scenario))
      return subprocess.Popen(self.args(*extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)

    def calls(self):
      path = tmp_path / "calls.jsonl"
      if not path.exists():
        return []
      return [json.loads(line) for line in path.read_text().splitlines()]

    def steps(self):
      """Each call as one word: create, queue, node, copy, install, start, status, stop, delete."""
      out = []
      for argv in self.calls():
        command = next((a for a in argv if a.startswith("--command=")), "")
        if "queued-resources" in argv:
          verb = argv[argv.index("queued-resources") + 1]
          out.append({"describe": "queue"}.get(verb, verb))
        elif "describe" in argv:
          out.append("node")
        elif "scp" in argv:
          out.append("copy")
        elif "pip install" in command:
          out.append("install")
        else:
          out.append(next(k for k in ("start", "status", "stop") if f"vit_cls-{k}" in command))
      return out

  cloud_ = Cloud()
  cloud_.name = name
  yield cloud_
  assert not os.path.exists(f"/tmp/vit_cls-{name}.tgz")  # the launcher removes its tarball


def _collapse(steps):
  """Repeated polls of one kind in a row count once: their number depends on timing."""
  out = []
  for s in steps:
    if not out or s != out[-1] or s not in ("queue", "node", "status"):
      out.append(s)
  return out


START = ["copy", "install", "start"]


def test_capacity_refused_then_granted_creating_then_ready_then_finished(cloud):
  out = cloud.run({"queue": ["NOT_FOUND", "WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "FAILED",
                             "NOT_FOUND", "PROVISIONING", "ACTIVE"],
                   "node": ["CREATING", "CREATING", "READY"],
                   "status": ["0 running;1 running", "0 running;1 running", "0 exit 0;1 exit 0"]},
                  "--spot", "--skip_fit_check")
  assert out.returncode == 0, out.stderr
  assert _collapse(cloud.steps()) == [
      "queue", "create", "queue", "delete", "queue", "create", "queue", "node", "status", *START,
      "node", "status", "node", "status", "node", "status", "delete"]
  create = next(c for c in cloud.calls() if c[2:4] == ["queued-resources", "create"])
  assert "--spot" in create and "--valid-until-duration=6h" in create
  assert "the request is FAILED" in out.stderr and "training finished" in out.stderr
  # Back-off: the queue was polled more than once while WAITING_FOR_RESOURCES.
  assert cloud.steps().count("queue") >= 6


def test_preemption_requeues_the_slice_and_trains_again(cloud):
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE", "SUSPENDED", "NOT_FOUND", "ACTIVE"],
                   "node": ["READY", "READY", "PREEMPTED", "READY"],
                   "status": ["0 running", "0 exit 0"]}, "--skip_fit_check")
  assert out.returncode == 0, out.stderr
  steps = _collapse(cloud.steps())
  assert steps == ["queue", "create", "queue", "node", "status", *START, "node", "status", "node", "delete",
                   "queue", "delete", "queue", "create", "queue", "node", "status", *START, "node", "status",
                   "delete"], steps
  assert "preempted" in out.stderr and "restart 1/20" in out.stderr


def test_preemption_during_the_install_requeues(cloud):
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE", "NOT_FOUND", "ACTIVE"],
                   "node": ["READY", "PREEMPTED", "READY"], "install": [255, 0],
                   "status": ["0 exit 0"]}, "--skip_fit_check")
  assert out.returncode == 0, out.stderr
  steps = _collapse(cloud.steps())
  assert steps == ["queue", "create", "queue", "node", "status", "copy", "install", "node", "delete",
                   "queue",
                   "create", "queue", "node", "status", *START, "node", "status", "delete"], steps
  assert "the TPU is PREEMPTED" in out.stderr


def test_maintenance_event_waits_and_resumes_training(cloud):
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE"],
                   "node": ["READY", "READY", "REPAIRING", "REPAIRING", "READY"],
                   "status": ["0 running;1 running", "0 stopped;1 stopped", "0 running;1 running",
                              "0 exit 0;1 exit 0"]}, "--skip_fit_check")
  assert out.returncode == 0, out.stderr
  steps = _collapse(cloud.steps())
  assert steps == ["queue", "create", "queue", "node", "status", *START, "node", "status", "node", "status",
                   *START, "node", "status", "node", "status", "delete"], steps
  assert "READY again after REPAIRING" in out.stderr
  assert "resumes from the last checkpoint" in out.stderr


def test_maintenance_with_autocheckpoint_sigterm_exit_0_is_not_the_end(cloud):
  # train.py saves and exits 0 on the SIGTERM that autocheckpoint sends: the launcher starts it again.
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE"], "node": ["READY"],
                   "status": ["0 term 0", "0 exit 0"]}, "--skip_fit_check", "--autocheckpoint")
  assert out.returncode == 0, out.stderr
  assert cloud.steps().count("start") == 2
  create = next(c for c in cloud.calls() if "create" in c)
  assert create[:5] == ["alpha", "compute", "tpus", "queued-resources", "create"]
  assert "--autocheckpoint-enabled" in create


@pytest.mark.parametrize("keep", [False, True])
def test_an_unknown_state_stops_and_deletes_unless_keep(cloud, keep):
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE"], "node": ["READY", "BOGUS_STATE"],
                   "status": ["0 running"]}, "--skip_fit_check", *(["--keep"] if keep else []))
  assert out.returncode == 1
  assert "does not know: BOGUS_STATE" in out.stderr
  steps = cloud.steps()
  if keep:
    assert "delete" not in steps
    assert f"kept: {cloud.name} (v4-8, zone us-central2-b)" in out.stderr
    assert (f"gcloud compute tpus queued-resources delete {cloud.name} --force --quiet "
            f"--zone=us-central2-b") in out.stderr
  else:
    assert steps[-1] == "delete"


def test_a_rerun_watches_the_train_py_already_running(cloud):
  # The launcher died (a closed laptop) with --keep or before its cleanup: the same command again finds
  # the slice ACTIVE and train.py running, and watches it instead of starting a second one.
  out = cloud.run({"queue": ["ACTIVE"], "node": ["READY"], "already_running": True,
                   "status": ["0 running", "0 running", "0 exit 0"]}, "--skip_fit_check")
  assert out.returncode == 0, out.stderr
  assert _collapse(cloud.steps()) == ["queue", "node", "status", "node", "status", "node", "status",
                                      "delete"]
  assert "already running on the workers: watching it" in out.stderr


def test_a_state_query_that_keeps_failing_gives_up_with_its_error(cloud):
  out = cloud.run({"queue": ["ERROR: (gcloud) You do not currently have an active account selected."]},
                  "--skip_fit_check", "--max_wait=0.2")
  assert out.returncode == 1
  assert "cannot read the queued resource's state for 0.2s: ERROR: (gcloud) You do not" in out.stderr


def test_training_failure_deletes_the_slice(cloud):
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE"], "node": ["READY"],
                   "status": ["0 running;1 running", "0 exit 1;1 running"]}, "--skip_fit_check")
  assert out.returncode == 1
  assert "failed on worker(s) 0 (exit 1)" in out.stderr
  assert cloud.steps()[-1] == "delete"


def test_a_failing_gcloud_command_still_deletes_the_slice(cloud):
  # An exception on the way (here: the create itself fails) reaches the delete too.
  out = cloud.run({"queue": ["NOT_FOUND"], "create": ["PERMISSION_DENIED: no quota"]},
                  "--skip_fit_check")
  assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
  assert cloud.steps() == ["queue", "create", "delete"]


def test_ctrl_c_stops_training_then_deletes(cloud):
  proc = cloud.popen({"queue": ["NOT_FOUND", "ACTIVE"], "node": ["READY"],
                      "status": ["0 running"]}, "--skip_fit_check")
  deadline = time.monotonic() + 60

  def polled_after_start():
    steps = cloud.steps()
    return "start" in steps and "status" in steps[steps.index("start"):]

  while not polled_after_start() and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  steps = cloud.steps()
  assert "stop" in steps and steps[-1] == "delete"
  assert steps.index("stop") < len(steps) - 1
  assert "SIGINT: stopping" in err


def test_fit_check_refuses_with_the_numbers_before_creating_anything(cloud, monkeypatch):
  monkeypatch.setenv("FAKE_AOT_FITS", "0")
  out = subprocess.run(cloud.args(accelerator="v5litepod-8") + ["--config.batch_size=4096"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": f"{cloud.dir}/bin:{os.environ['PATH']}",
                            "FAKE_GCLOUD_DIR": str(cloud.dir),
                            "VIT_CLS_AOT": f"{cloud.dir}/bin/fake_aot"})
  assert out.returncode == 2
  assert "does not fit: 20.0 GiB per chip of 16.0 GiB on v5e:2x4" in out.stderr
  assert "--skip_fit_check" in out.stderr
  assert cloud.calls() == []  # nothing created
  aot = json.loads((cloud.dir / "aot_calls.jsonl").read_text().splitlines()[0])
  assert aot[:2] == ["--config=configs/default.py", "--target=v5e:2x4"]
  assert "--config.batch_size=4096" in aot and "--json" in aot


def test_fit_check_passes_then_launches(cloud):
  out = cloud.run({"queue": ["NOT_FOUND", "ACTIVE"], "node": ["READY"], "status": ["0 exit 0"]})
  assert out.returncode == 0, out.stderr
  assert "fits: 10.0 GiB per chip of 16.0 GiB on v4:2x2x1" in out.stderr


def _module():
  spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["launch_tpu"] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def test_fit_check_without_aot_or_libtpu_says_so_in_one_line(tmp_path, monkeypatch):
  mod = _module()
  monkeypatch.delenv("VIT_CLS_AOT", raising=False)
  args, train_args = mod.parse(["--name=n", "--zone=z", "--accelerator=v6e-8", "--bucket=b", "--",
                                "--config=configs/default.py"])
  monkeypatch.setattr(mod, "REPO", str(tmp_path))
  why = mod.fit_check(args, mod.Commands(args, train_args))
  assert why.startswith("the fit check needs vit_cls.aot") and "--skip_fit_check" in why
  (tmp_path / "vit_cls").mkdir()
  (tmp_path / "vit_cls" / "aot.py").write_text("")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
  why = mod.fit_check(args, mod.Commands(args, train_args))
  assert "needs libtpu" in why and "--skip_fit_check" in why and "\n" not in why


def test_accelerator_to_topology_and_generation_table():
  mod = _module()
  assert [mod.aot_target(a) for a in ("v4-8", "v4-16", "v4-32", "v4-64", "v4-128", "v5p-8",
                                      "v5litepod-1", "v5litepod-4", "v5litepod-8", "v5litepod-16",
                                      "v5litepod-32", "v6e-8", "v6e-256", "v3-8")] == [
      "v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4", "v5p:2x2x1", "v5e:1x1", "v5e:2x2",
      "v5e:2x4", "v5e:4x4", "v5e:4x8", "v6e:2x4", "v6e:16x16", None]


# The create command per generation, pinned: runtime version from the table, --version overrides.
DRY_RUN_CREATE = {
    "v4-32": "gcloud compute tpus queued-resources create N --node-id=N --accelerator-type=v4-32 "
             "--runtime-version=tpu-ubuntu2204-base --valid-until-duration=6h --spot --zone=Z",
    "v5litepod-16": "gcloud compute tpus queued-resources create N --node-id=N "
                    "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite "
                    "--valid-until-duration=6h --spot --zone=Z",
    "v5p-8": "gcloud compute tpus queued-resources create N --node-id=N --accelerator-type=v5p-8 "
             "--runtime-version=v2-alpha-tpuv5 --valid-until-duration=6h --spot --zone=Z",
    "v6e-8": "gcloud compute tpus queued-resources create N --node-id=N --accelerator-type=v6e-8 "
             "--runtime-version=v2-alpha-tpuv6e --valid-until-duration=6h --spot --zone=Z",
}
DRY_RUN_TARGET = {"v4-32": "v4:2x2x4", "v5litepod-16": "v5e:4x4", "v5p-8": "v5p:2x2x1",
                  "v6e-8": "v6e:2x4"}


def _dry_run(*args, expect_rc=0):
  out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
  assert out.returncode == expect_rc, out.stderr
  return out


@pytest.mark.parametrize("accelerator", sorted(DRY_RUN_CREATE))
def test_dry_run_per_generation(accelerator):
  out = _dry_run("--name=N", "--zone=Z", f"--accelerator={accelerator}", "--bucket=b", "--spot",
                 "--dry-run", "--", "--config=configs/default.py").stdout
  lines = [line for line in out.splitlines() if not line.startswith("#")]
  commands = [shlex.split(line) for line in lines]
  assert commands[0][1:3] == ["-m", "vit_cls.aot"]
  assert commands[0][3:] == ["--config=configs/default.py", f"--target={DRY_RUN_TARGET[accelerator]}",
                             "--json", "/tmp/vit_cls-fit.json"]
  assert commands[1][:3] == ["tar", "-czf", "/tmp/vit_cls-N.tgz"]
  assert lines[2] == DRY_RUN_CREATE[accelerator]
  verbs = [c[4] if c[3] != "queued-resources" else "qr-" + c[4] for c in commands[2:]]
  assert verbs == ["qr-create", "qr-describe", "describe", "scp", "ssh", "ssh", "describe", "ssh",
                   "ssh", "qr-delete"]
  assert lines[-1] == "gcloud compute tpus queued-resources delete N --force --quiet --zone=Z"
  assert not os.path.exists("/tmp/vit_cls-N.tgz")  # printed, not run


def test_dry_run_details_version_override_credentials_and_the_train_command():
  name = f"vit-test-{os.getpid()}"
  out = _dry_run(f"--name={name}", "--zone=us-central2-b", "--accelerator=v4-32", "--bucket=my-bucket",
                 "--project=my-project", "--version=tpu-vm-custom", "--service_account=sa@p.iam",
                 "--scopes=cloud-platform", "--dry-run", "--",
                 "--config=configs/pretrain_imagenet.py:L/16,imagenet2012",
                 "--config.data_dir=gs://my-bucket/tfds", "--config.fsdp=True").stdout
  gcloud = [shlex.split(line) for line in out.splitlines() if line.startswith("gcloud")]
  assert all("--zone=us-central2-b" in c and "--project=my-project" in c for c in gcloud)
  create = gcloud[0]
  assert "--runtime-version=tpu-vm-custom" in create and "--spot" not in create
  assert "--service-account=sa@p.iam" in create and "--scopes=cloud-platform" in create
  ssh = [c for c in gcloud if c[4] == "ssh"]
  assert all("--worker=all" in c and "--ssh-flag=-o ServerAliveInterval=30" in c for c in ssh)
  install = next(a for a in ssh[0] if a.startswith("--command="))
  pin = _jax_pin()
  assert f"'jax[tpu]=={pin}'" in install and "gcsfuse" not in install
  assert "Python on the VM: $PY" in install and "python3.11" in install
  start = next(a for a in ssh[1] if a.startswith("--command="))
  assert "nohup setsid bash -c" in start
  train = start[start.index("~/vit_cls_venv/bin/python train.py"):].split(" >> ", 1)[0]
  assert shlex.split(train)[1:] == [
      "train.py", f"--workdir=gs://my-bucket/vit_cls/{name}",
      "--config=configs/pretrain_imagenet.py:L/16,imagenet2012",
      "--config.data_dir=gs://my-bucket/tfds", "--config.fsdp=True"]
  poll = next(a for a in ssh[2] if a.startswith("--command="))
  assert f"gs://my-bucket/vit_cls/{name}/logs/" in poll


def _jax_pin():
  import re  # pylint: disable=g-import-not-at-top
  return re.search(r"^jax==(\S+)", open(os.path.join(REPO, "requirements.txt")).read(), re.M).group(1)


def test_refusals_are_one_line():
  err = _dry_run("--name=x", "--zone=z", "--accelerator=tpu7x-8", "--bucket=b", "--dry-run", "--",
                 "--config=configs/default.py", expect_rc=2).stderr
  assert "TPU7x is not created through the Cloud TPU API" in err and "GKE or Compute Engine" in err
  err = _dry_run("--name=x", "--zone=z", "--accelerator=v5p-8", "--bucket=b", "--autocheckpoint",
                 "--dry-run", "--", "--config=configs/default.py", expect_rc=2).stderr
  assert "v2-v4 and v5e only" in err
  err = _dry_run("--name=x", "--zone=z", "--accelerator=v4-8", "--dry-run", "--",
                 "--config=configs/default.py", expect_rc=2).stderr
  assert "give --bucket" in err


def test_logs_and_ssh_commands():
  out = _dry_run("--name=n", "--zone=z", "--logs", "--dry-run").stdout
  assert shlex.split(out)[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "n", "--worker=0"]
  assert "tail -n 200 -F ~/vit_cls_run/worker-*.log" in out
  out = _dry_run("--name=n", "--zone=z", "--logs=3", "--dry-run").stdout
  assert "--worker=3" in out
  out = _dry_run("--name=n", "--zone=z", "--ssh=2", "--dry-run").stdout
  assert "--worker=2" in out and "--command" not in out


def test_the_worker_commands_run_train_detached_and_report_its_end(tmp_path):
  """The start, poll and stop commands, run by bash on this machine with a fake HOME and train.py."""
  mod = _module()
  home = tmp_path / "home"
  (home / "vit_cls_venv" / "bin").mkdir(parents=True)
  (home / "vit_cls").mkdir()
  fake_python = home / "vit_cls_venv" / "bin" / "python"
  # A train.py that runs until SIGTERM, then "saves" and exits 0, as train.py does on a preemption.
  fake_python.write_text("#!/bin/bash\necho \"args: $*\"\ntrap 'echo saved; exit 0' TERM\n"
                         "while true; do sleep 0.05; done\n")
  fake_python.chmod(0o755)
  workdir = tmp_path / "shared"
  args, train_args = mod.parse(["--name=n", "--zone=z", "--accelerator=v4-8",
                                f"--workdir={workdir}", "--", "--config=c.py"])
  c = mod.Commands(args, train_args)
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}

  def remote(cmd):
    script = next(a for a in cmd if a.startswith("--command="))[len("--command="):]
    # The metadata server is absent here: the worker id falls back to the hostname.
    script = script.replace("curl -sf", "false")
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)

  assert remote(c.start()).returncode == 0
  status = remote(c.poll()).stdout.split()
  assert status[0] == "vit_cls-status" and status[2] == "running"
  remote(c.stop())
  deadline = time.monotonic() + 10
  while "running" in remote(c.poll()).stdout and time.monotonic() < deadline:
    time.sleep(0.1)
  assert remote(c.poll()).stdout.split()[2:] == ["term", "0"]  # exit 0 after SIGTERM: not the end
  logs = list((workdir / "logs").iterdir())
  assert len(logs) == 1 and logs[0].name.startswith("worker-")
  text = logs[0].read_text()
  assert f"args: train.py --workdir={workdir} --config=c.py" in text and "saved" in text
