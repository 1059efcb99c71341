#!/usr/bin/env python3
"""Runs vit_cls's train.py on a Cloud TPU VM or pod slice: queue, install, train detached, watch, delete.

    python scripts/launch_tpu.py --name=vit-l16 --zone=us-central2-b --accelerator=v4-32 \\
        --bucket=my-bucket --spot --dry-run -- \\
        --config=configs/pretrain_imagenet.py:L/16,imagenet2012 \\
        --config.data_dir=gs://my-bucket/tensorflow_datasets --config.fsdp=True

Everything after `--` goes to train.py unchanged. --dry-run prints every command, in order, exactly as
it would run, and runs none. docs/cloud_tpu.md is the guide; what the launcher does, and why:

1. Fit check: `python -m vit_cls.aot` compiles train.py's step for the slice's topology (no TPU needed,
   libtpu is) and the launcher refuses, with the numbers, a setting that does not fit in a chip's memory:
   before anything is paid for. --skip_fit_check skips it.
2. Packs this checkout (no .git, no workdirs): the workers run the code you have.
3. Asks for the slice as a *queued resource* (`gcloud compute tpus queued-resources create`, --spot for
   Spot capacity, a wait window --valid_until): a direct create fails at once when the zone has no
   capacity, which is exactly what happens on the re-create after a preemption; a queued request waits.
   Polls until ACTIVE with back-off; a FAILED or SUSPENDED request is deleted and queued again.
4. Installs the checkout on every worker in a venv (Python 3.12+ when the runtime image has it, with the
   newest jax[tpu]; else Python 3.11 with requirements.txt's pins; the install prints which).
5. Starts train.py on every worker *detached* (nohup + setsid): a dropped ssh connection does not stop
   training. Each worker logs to ~/vit_cls_run/worker-W.log on its VM; every poll copies the logs into
   WORKDIR/logs/ (gs:// included). `--logs [WORKER]` tails one, `--ssh WORKER` opens a shell.
6. Watches the node: transitional states (CREATING, RESTARTING, REPAIRING, ...) are waited out; after a
   maintenance event (READY -> REPAIRING -> READY) training is started again and resumes from the last
   checkpoint; PREEMPTED, TERMINATED, STOPPED or a vanished node re-queues the slice (up to
   --max_restarts); any state it does not know stops the run.
7. Deletes the slice (the queued resource and its node) on *every* way out: success, failure, Ctrl-C,
   SIGTERM, an exception, an unknown state. --keep keeps it and prints its name and the delete command.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/vit_cls"
VENV = "~/vit_cls_venv"
RUN_DIR = "~/vit_cls_run"  # on every worker: pid, exit code, worker-W.log of the detached train.py
MOUNT = "/mnt/gcs"  # where --bucket is mounted on every worker with --gcsfuse
STATUS = "vit_cls-status"  # the prefix of the lines the poll command prints, one per worker

# ---------------------------------------------------------------------------------------------------
# What each TPU generation needs. Sources (read 2026-12):
#   runtime versions:  https://cloud.google.com/tpu/docs/runtimes ("TPU software versions", PyTorch and
#                      JAX table: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
#                      v4 and older tpu-ubuntu2204-base)
#   autocheckpoint:    https://cloud.google.com/tpu/docs/autocheckpoint ("Only TPUs (v2-v4, and v5e)
#                      created through the Cloud TPU API"; the flag --autocheckpoint-enabled is in
#                      `gcloud alpha compute tpus queued-resources create` only)
#   TPU7x:             https://docs.cloud.google.com/tpu/docs/queued-resources ("The Cloud TPU API is not
#                      supported on TPU7x and later TPU versions": GKE or Compute Engine instead)
#   accelerator types: v2/v3/v4/v5p count TensorCores (2 per chip), v5e (v5litepod) and v6e count chips.


@dataclasses.dataclass(frozen=True)
class Generation:
  runtime: str  # --runtime-version for JAX
  autocheckpoint: bool  # the docs list it for this generation
  cores_per_chip: int  # how the accelerator type's number counts
  aot_name: str | None  # the chip's name in `python -m vit_cls.aot --target=NAME:TOPOLOGY`
  dims: int  # topology rank: 2 (v5e, v6e) or 3 (v4, v5p)


GENERATIONS = {
    "v2": Generation("tpu-ubuntu2204-base", True, 2, None, 2),
    "v3": Generation("tpu-ubuntu2204-base", True, 2, None, 2),
    "v4": Generation("tpu-ubuntu2204-base", True, 2, "v4", 3),
    "v5litepod": Generation("v2-alpha-tpuv5-lite", True, 1, "v5e", 2),
    "v5p": Generation("v2-alpha-tpuv5", False, 2, "v5p", 3),
    "v6e": Generation("v2-alpha-tpuv6e", False, 1, "v6e", 2),
}
TPU7X = ("tpu7x", "v7x", "v7")

# Node states (google.cloud.tpu.v2 Node.State), each with what the launcher does in it.
NODE_WAIT = ("CREATING", "STARTING", "RESTARTING", "REIMAGING", "REPAIRING", "STOPPING", "HIDING",
             "UNHIDING", "HIDDEN", "UNKNOWN", "STATE_UNSPECIFIED")  # transitional: wait it out
NODE_GONE = ("PREEMPTED", "TERMINATED", "STOPPED", "DELETING", "NOT_FOUND")  # re-queue the slice
# Queued-resource states (QueuedResourceState.State).
QR_WAIT = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "DELETING")
QR_REQUEUE = ("FAILED", "SUSPENDING", "SUSPENDED")


class LaunchError(Exception):
  """A reason to stop, said in one line; the slice is deleted on the way out (unless --keep)."""


class NodeGone(Exception):
  """The node went away (preempted, terminated) while the launcher was using it: queue it again."""


class Interrupted(Exception):
  """Ctrl-C, SIGTERM or SIGHUP to the launcher: stop training (it checkpoints) and delete the slice."""


def generation(accelerator: str) -> tuple[str, Generation]:
  gen = accelerator.rsplit("-", 1)[0]
  if gen.startswith(TPU7X):
    raise LaunchError(
        f"{accelerator}: TPU7x is not created through the Cloud TPU API this launcher uses; create it "
        f"with GKE or Compute Engine (https://cloud.google.com/tpu/docs/tpus-in-compute-engine) and run "
        f"train.py there")
  if gen == "v5e":
    gen = "v5litepod"
  if gen not in GENERATIONS or not re.fullmatch(r"[a-z0-9]+-\d+", accelerator):
    raise LaunchError(f"--accelerator={accelerator}: expected GEN-N with GEN one of "
                      f"{', '.join(GENERATIONS)} (e.g. v4-32, v5litepod-16, v6e-8)")
  return gen, GENERATIONS[gen]


def aot_target(accelerator: str) -> str | None:
  """The slice's topology as `python -m vit_cls.aot --target` names it (v4-32 -> v4:2x2x4).

  Cloud TPU's default topology for a chip count doubles the smallest side, the last one among equals
  (v5e: 2x2, 2x4, 4x4, 4x8 ...; v4/v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4 ...). None: no aot target.
  """
  _, gen = generation(accelerator)
  if gen.aot_name is None:
    return None
  chips = max(1, int(accelerator.rsplit("-", 1)[1]) // gen.cores_per_chip)
  shape = [1] * gen.dims if gen.dims == 2 or chips < 4 else [2, 2, 1]
  while shape[0] * shape[1] * (shape[2] if gen.dims == 3 else 1) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)
    shape[i] *= 2
  return f"{gen.aot_name}:{'x'.join(map(str, shape))}"


def parse(argv):
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1:]
  else:
    train_args = []
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="queued resource and TPU node name")
  p.add_argument("--zone", required=True)
  p.add_argument("--accelerator", help="accelerator type, e.g. v4-32, v5litepod-16, v5p-8, v6e-8")
  p.add_argument("--project", default=None, help="default: gcloud's configured project")
  p.add_argument("--version", default=None,
                 help="TPU runtime version (default: the generation's, see GENERATIONS)")
  p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted")
  p.add_argument("--valid_until", default="6h",
                 help="how long a queued request may wait for capacity (gcloud duration: 30m, 6h, 2d)")
  p.add_argument("--autocheckpoint", action="store_true",
                 help="Cloud TPU sends SIGTERM before a maintenance event (train.py then saves); "
                      "v2-v4 and v5e only; uses `gcloud alpha`")
  p.add_argument("--service_account", default=None,
                 help="service account of the VMs (it needs roles/storage.objectUser on the bucket)")
  p.add_argument("--scopes", default=None, help="access scopes of the VMs, comma-separated")
  p.add_argument("--bucket", default=None,
                 help="GCS bucket of the default workdir, gs://BUCKET/vit_cls/NAME")
  p.add_argument("--gcsfuse", action="store_true",
                 help=f"mount --bucket with gcsfuse at {MOUNT} on every worker and use "
                      f"{MOUNT}/vit_cls/NAME as the workdir instead of the gs:// path")
  p.add_argument("--workdir", default=None,
                 help="train.py --workdir on the workers (default: from --bucket)")
  p.add_argument("--python", default=None,
                 help="interpreter for the workers' venv (default: the image's python3 when it is "
                      "3.12+, else python3.11)")
  p.add_argument("--max_restarts", type=int, default=20,
                 help="re-queues after a preemption or failed request, plus restarts after maintenance")
  p.add_argument("--keep", action="store_true", help="do not delete the slice on the way out")
  p.add_argument("--skip_fit_check", action="store_true",
                 help="do not compile the step for the slice before creating it")
  p.add_argument("--poll", type=float, default=30.0, help="seconds between state polls (first)")
  p.add_argument("--max_poll", type=float, default=300.0, help="back-off cap of the poll interval")
  p.add_argument("--max_wait", type=float, default=3600.0,
                 help="seconds a node may stay in one transitional state before the launcher gives up")
  p.add_argument("--stop_timeout", type=float, default=300.0,
                 help="seconds train.py gets to checkpoint after Ctrl-C before the slice is deleted")
  p.add_argument("--logs", nargs="?", const="0", default=None, metavar="WORKER",
                 help="tail a running job's log on WORKER (default 0) and do nothing else")
  p.add_argument("--ssh", default=None, metavar="WORKER", help="open a shell on WORKER, nothing else")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="print the commands that would run, run none")
  args = p.parse_args(argv)
  if args.logs is not None or args.ssh is not None:
    return args, train_args
  if not args.accelerator:
    p.error("give --accelerator (e.g. v4-32, v5litepod-16)")
  try:
    _, gen = generation(args.accelerator)
  except LaunchError as e:
    p.error(str(e))
  if args.autocheckpoint and not gen.autocheckpoint:
    p.error(f"--autocheckpoint: Cloud TPU offers it on v2-v4 and v5e only, not {args.accelerator} "
            f"(https://cloud.google.com/tpu/docs/autocheckpoint)")
  args.version = args.version or gen.runtime
  if any(a.startswith("--workdir") for a in train_args):
    p.error("give the workdir as the launcher's --workdir, not after `--`")
  if not any(a.startswith("--config") and not a.startswith("--config.") for a in train_args):
    p.error("pass train.py's --config after `--`, e.g. -- --config=configs/pretrain_imagenet.py:B/16,"
            "imagenet2012")
  if args.workdir is None:
    if not args.bucket:
      p.error("give --bucket (the workdir is then on it) or a --workdir that every worker shares: "
              "checkpoints of a multi-host job are written by all workers into one directory, and a "
              "Spot VM's own disk is deleted with it")
    args.workdir = (f"{MOUNT}/vit_cls/{args.name}" if args.gcsfuse
                    else f"gs://{args.bucket}/vit_cls/{args.name}")
  if args.gcsfuse and not args.bucket:
    p.error("--gcsfuse mounts --bucket: give --bucket too")
  return args, train_args


def _jax_version() -> str:
  with open(os.path.join(REPO, "requirements.txt")) as f:
    m = re.search(r"^jax==(\S+)", f.read(), re.M)
  return m.group(1) if m else ""


# ---------------------------------------------------------------------------------------------------
# The commands. Built in one place so that --dry-run prints exactly what a run executes.

SSH_KEEPALIVE = ["--ssh-flag=-o ServerAliveInterval=30", "--ssh-flag=-o ServerAliveCountMax=6"]


class Commands:
  """Every gcloud command of a launch, as argv lists."""

  def __init__(self, args, train_args):
    self.args, self.train_args = args, train_args

  def _where(self):
    a = self.args
    return [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])

  def _vm(self, *words):
    return ["gcloud", "compute", "tpus", "tpu-vm", *words, *self._where()]

  def _qr(self, *words, alpha=False):
    return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", "queued-resources", *words,
            *self._where()]

  def ssh(self, worker, command, keepalive=True):
    return self._vm("ssh", self.args.name, f"--worker={worker}",
                    *(SSH_KEEPALIVE if keepalive else []),
                    *(["--command=" + command] if command else []))

  @property
  def tarball(self):
    return f"/tmp/vit_cls-{self.args.name}.tgz"

  def pack(self):
    return ["tar", "-czf", self.tarball, "--exclude=./.git", "--exclude=./workdirs",
            "--exclude=__pycache__", "--exclude=*.egg-info", "-C", REPO, "."]

  def fit_check(self, json_path):
    aot = shlex.split(os.environ.get("VIT_CLS_AOT", "")) or [sys.executable, "-m", "vit_cls.aot"]
    config = [a for a in self.train_args if a.startswith("--config")]
    return [*aot, *config[:1], f"--target={aot_target(self.args.accelerator)}", *config[1:],
            "--json", json_path]

  def create(self):
    a = self.args
    return self._qr(
        "create", a.name, f"--node-id={a.name}", f"--accelerator-type={a.accelerator}",
        f"--runtime-version={a.version}", f"--valid-until-duration={a.valid_until}",
        *(["--spot"] if a.spot else []),
        *([f"--service-account={a.service_account}"] if a.service_account else []),
        *([f"--scopes={a.scopes}"] if a.scopes else []),
        *(["--autocheckpoint-enabled"] if a.autocheckpoint else []), alpha=a.autocheckpoint)

  def queue_state(self):
    return self._qr("describe", self.args.name, "--format=value(state.state)")

  def node_state(self):
    return self._vm("describe", self.args.name, "--format=value(state)")

  def delete(self):
    # --force deletes the node with the request; gcloud waits until both are gone.
    return self._qr("delete", self.args.name, "--force", "--quiet")

  def copy(self):
    return self._vm("scp", self.tarball, f"{self.args.name}:~/vit_cls.tgz", "--worker=all",
                    "--scp-flag=-o ServerAliveInterval=30")

  def install(self):
    a = self.args
    pin = _jax_version()
    # Python: libtpu's releases after jax 0.10.2 / libtpu 0.0.42 dropped 3.11; those pins are what
    # requirements.txt holds (tested). An image with 3.12+ gets the newest jax[tpu] (the other pins
    # kept); an older image gets python3.11 from apt and the tested pins.
    choose = (f"PY={a.python}" if a.python else
              "PY=$(python3 -c 'import sys; print(\"python%d.%d\" % sys.version_info[:2] "
              "if sys.version_info >= (3, 12) else \"python3.11\")')")
    steps = [
        "set -e",
        choose,
        "echo \"vit_cls: Python on the VM: $PY\"",
        f"mkdir -p {REMOTE_DIR}",
        f"tar -xzf ~/vit_cls.tgz -C {REMOTE_DIR}",
        f"cd {REMOTE_DIR}",
        "command -v $PY >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q $PY)",
        f"test -x {VENV}/bin/python || $PY -m venv {VENV} || "
        f"(sudo apt-get install -y -q $PY-venv && $PY -m venv {VENV})",
        f"if [ $PY = python3.11 ]; then {VENV}/bin/pip install -q -r requirements.txt "
        f"'jax[tpu]{'==' + pin if pin else ''}'; else grep -v '^jax\\(lib\\)\\?==' requirements.txt "
        f"> /tmp/vit_cls-req.txt && {VENV}/bin/pip install -q -U -r /tmp/vit_cls-req.txt 'jax[tpu]'; fi",
        f"{VENV}/bin/pip install -q --no-deps -e .",
    ]
    if a.gcsfuse:
      steps += [
          "if ! command -v gcsfuse >/dev/null; then "
          "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
          "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
          "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
          "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" | "
          "sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; "
          "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi",
          f"sudo mkdir -p {MOUNT} && sudo chown $USER {MOUNT}",
          f"mountpoint -q {MOUNT} || gcsfuse --implicit-dirs {shlex.quote(a.bucket)} {MOUNT}",
      ]
    return self.ssh("all", "; ".join(steps))

  def start(self):
    """train.py detached on every worker, so that it outlives the ssh session that started it.

    setsid+nohup: no hang-up reaches it when the connection drops. The wrapper shell records its pid
    (= the process group), train.py's exit code, and whether a SIGTERM came (a preemption, a maintenance
    event with autocheckpoint, the launcher's stop): train.py exits 0 after saving on SIGTERM, so only
    an exit 0 without one means the run is finished. The log is appended to: a resumed run continues it.
    """
    train = f"cd {REMOTE_DIR} && {VENV}/bin/python " + shlex.join(
        ["train.py", f"--workdir={self.args.workdir}", *self.train_args])
    # The wrapper leads the process group (setsid) and waits for train.py in the foreground: a SIGTERM
    # to the group reaches train.py, and the wrapper's trap runs only once train.py has exited, keeping
    # train.py's exit status in $? (bash restores it after a trap).
    wrapper = (f"echo $$ > {RUN_DIR}/pid; trap \"touch $HOME/vit_cls_run/sigterm\" TERM; "
               f"{train} >> {RUN_DIR}/worker-$W.log 2>&1; echo $? > {RUN_DIR}/exit_code")
    worker = ("$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/"
              "v1/instance/attributes/agent-worker-number || hostname)")
    return self.ssh("all", f": vit_cls-start; mkdir -p {RUN_DIR} && cd {RUN_DIR} && "
                           f"rm -f pid exit_code sigterm && W={worker} && echo $W > worker || exit 1; "
                           f"W=$W nohup setsid bash -c {shlex.quote(wrapper)} >/dev/null 2>&1 "
                           f"</dev/null & for i in $(seq 100); do [ -f {RUN_DIR}/pid ] && break; "
                           f"sleep 0.1; done")

  def poll(self):
    """On every worker: copy its log into WORKDIR/logs/, then print `vit_cls-status W STATE [RC]`."""
    wd = self.args.workdir
    if wd.startswith("gs://"):
      copy = f"gcloud storage cp {RUN_DIR}/worker-*.log {shlex.quote(wd + '/logs/')}"
    else:
      logs = shlex.quote(wd + "/logs")
      copy = f"mkdir -p {logs} && cp {RUN_DIR}/worker-*.log {logs}/"
    return self.ssh("all", f": {STATUS}; cd {RUN_DIR} 2>/dev/null || exit 0; ({copy}) >/dev/null 2>&1; "
                           f"W=$(cat worker); if [ -f exit_code ]; then if [ -f sigterm ]; then "
                           f"echo {STATUS} $W term $(cat exit_code); else echo {STATUS} $W exit "
                           f"$(cat exit_code); fi; elif [ -f pid ] && kill -0 $(cat pid) 2>/dev/null; "
                           f"then echo {STATUS} $W running; else echo {STATUS} $W stopped; fi")

  def stop(self):
    # To the whole process group (the wrapper and train.py), as a VM shutdown does: the wrapper then
    # records the SIGTERM, and train.py checkpoints.
    return self.ssh("all", f": vit_cls-stop; kill -TERM -- -$(cat {RUN_DIR}/pid) 2>/dev/null; true")

  def logs(self, worker):
    return self.ssh(worker, f"tail -n 200 -F {RUN_DIR}/worker-*.log")


# ---------------------------------------------------------------------------------------------------


def dry_run(args, c: Commands) -> None:
  """The commands in the order a run issues them; `#` lines say when each runs."""
  def show(cmd, comment=None):
    if comment:
      print(f"# {comment}")
    print(shlex.join(cmd))

  if args.skip_fit_check or aot_target(args.accelerator) is None:
    print("# fit check skipped" + ("" if args.skip_fit_check else f" (no aot target for "
                                                                    f"{args.accelerator})"))
  else:
    show(c.fit_check("/tmp/vit_cls-fit.json"), "fit check: refuse when per_chip_bytes > "
                                                "chip_memory_bytes")
  show(c.pack(), "pack this checkout")
  show(c.create(), f"queue the slice ({args.accelerator}, runtime {args.version})")
  show(c.queue_state(), f"poll every {args.poll:g}s, backing off to {args.max_poll:g}s, until ACTIVE "
                        f"(FAILED/SUSPENDED: delete, queue again)")
  show(c.node_state(), "until READY (CREATING, REPAIRING, ... are waited out)")
  show(c.copy(), "copy and install on every worker")
  show(c.install())
  show(c.start(), "start the training detached on every worker")
  show(c.node_state(), "watch: node state, then the workers' status (logs copied to "
                       f"{args.workdir}/logs/); PREEMPTED/TERMINATED: delete, queue again; READY "
                       "after REPAIRING/RESTARTING: start again (train.py resumes)")
  show(c.poll())
  show(c.stop(), "on Ctrl-C/SIGTERM: train.py checkpoints and stops")
  if args.keep:
    print(f"# --keep: the slice is kept; delete it with: {shlex.join(c.delete())}")
  else:
    show(c.delete(), "on every way out (done, failed, Ctrl-C, error)")


class Launcher:
  """The state machine of one launch. run() returns the exit code; cleanup() always runs after it."""

  def __init__(self, args, commands: Commands, out=sys.stderr):
    self.args, self.c, self.out = args, commands, out
    self.restarts = 0
    self.last_error = ""  # the stderr of the last state query
    self.queued = False  # a request may exist: delete it on the way out
    self.training = False  # train.py may be running: stop it before deleting

  def say(self, msg):
    print(f"launch_tpu: {msg}", file=self.out, flush=True)

  def _run(self, cmd, check=True, capture=False):
    out = subprocess.run(cmd, text=True, capture_output=capture)
    if check and out.returncode != 0:
      raise LaunchError(f"`{shlex.join(cmd[:5])} ...` exited {out.returncode}"
                        + (f": {out.stderr.strip().splitlines()[-1]}" if capture and out.stderr.strip()
                           else ""))
    return out

  def _state(self, cmd):
    out = self._run(cmd, check=False, capture=True)
    self.last_error = out.stderr.strip()
    if out.returncode != 0:
      return "NOT_FOUND" if "not_found" in out.stderr.lower() or "not found" in out.stderr.lower() \
          else "UNKNOWN"
    return out.stdout.strip() or "UNKNOWN"

  def _sleep(self, seconds):
    time.sleep(seconds)

  def _restart(self, why):
    if self.restarts >= self.args.max_restarts:
      raise LaunchError(f"{why}; out of restarts ({self.restarts}/{self.args.max_restarts})")
    self.restarts += 1
    self.say(f"{why}: restart {self.restarts}/{self.args.max_restarts}")

  def requeue(self, why):
    self._restart(why)
    self.say(f"deleting {self.args.name} and queueing it again")
    self._run(self.c.delete(), check=False)
    self.training = False  # (queued stays set: should that delete have failed, cleanup tries again)

  def provision(self):
    """Until the queued resource is ACTIVE: create it if absent, re-queue it when it failed."""
    interval, last, since = self.args.poll, None, time.monotonic()
    while True:
      state = self._state(self.c.queue_state())
      if state == "ACTIVE":
        self.queued = True
        return
      if state != last:
        self.say(f"queued resource {self.args.name}: {state}")
        interval, last, since = self.args.poll, state, time.monotonic()
      elif state == "UNKNOWN" and time.monotonic() - since > self.args.max_wait:
        # WAITING_FOR_RESOURCES may last the whole --valid_until window; a describe that keeps
        # failing (credentials, network) may not.
        raise LaunchError(f"cannot read the queued resource's state for {self.args.max_wait:g}s: "
                          f"{self.last_error or 'no output'}")
      if state == "NOT_FOUND":
        self.queued = True  # before the call: a create that fails half-way may leave a request
        self._run(self.c.create(), capture=True)
      elif state in QR_REQUEUE:
        self.queued = True
        self.requeue(f"the request is {state} (no capacity in the wait window, or preempted)")
      elif state in QR_WAIT or state == "UNKNOWN":
        self.queued = True
        self._sleep(interval)
        interval = min(interval * 2, self.args.max_poll)
      else:
        self.queued = True
        raise LaunchError(f"queued resource {self.args.name} is in a state this launcher does not "
                          f"know: {state}")

  def wait_node(self):
    """Returns READY, or one of NODE_GONE; waits out transitional states (bounded by --max_wait)."""
    interval, last, since = self.args.poll, None, time.monotonic()
    while True:
      state = self._state(self.c.node_state())
      if state == "READY" or state in NODE_GONE:
        return state
      if state not in NODE_WAIT:
        raise LaunchError(f"TPU {self.args.name} is in a state this launcher does not know: {state}")
      if state != last:
        self.say(f"TPU {self.args.name} is {state}: waiting")
        interval, last, since = self.args.poll, state, time.monotonic()
      elif time.monotonic() - since > self.args.max_wait:
        raise LaunchError(f"TPU {self.args.name} has been {state} for more than {self.args.max_wait:g}s")
      self._sleep(interval)
      interval = min(interval * 2, self.args.max_poll)

  def workers(self):
    """running / finished / failed / stopped (no train.py, or it ended on a SIGTERM), or None."""
    out = self._run(self.c.poll(), check=False, capture=True)
    # From the marker on: gcloud may prefix a worker's lines with its name when --worker=all.
    lines = [l[l.index(STATUS):].split() for l in out.stdout.splitlines() if STATUS in l]
    if out.returncode != 0 or not lines:
      return None
    kinds = [l[2] if len(l) > 2 else "stopped" for l in lines]
    failed = [l for l in lines if l[2:3] == ["exit"] and l[3:4] != ["0"]]
    if failed:
      self.say("train.py failed on worker(s) " + ", ".join(f"{l[1]} (exit {l[3]})" for l in failed))
      return "failed"
    if "running" in kinds:
      return "running"
    if all(k == "exit" for k in kinds):
      return "finished"
    return "stopped"

  def start(self, retry=True):
    """Copy, install, start; a failure because the node went away raises NodeGone (re-queue)."""
    try:
      self._run(self.c.copy())
      self._run(self.c.install())
      self._run(self.c.start())
    except LaunchError:
      # A preemption or maintenance event in the middle of the install shows as an ssh failure.
      state = self.wait_node()
      if state != "READY":
        raise NodeGone(state) from None
      if not retry:
        raise
      self.say("the TPU is READY: trying the install and start once more")
      return self.start(retry=False)
    self.training = True
    self.say(f"training started on every worker; logs: {self.args.workdir}/logs/, or `--logs`")

  def watch(self):
    """Returns 'finished', 'failed' or 'gone' (the slice must be queued again)."""
    ssh_failures, after = 0, None  # after: the transitional state the node came back from
    while True:
      if after is None:
        self._sleep(self.args.poll)
      state = self._state(self.c.node_state())
      if state in NODE_GONE:
        return "gone"
      if state != "READY":
        after = state
        if self.wait_node() != "READY":
          return "gone"
        self.say(f"the TPU is READY again after {after} (a maintenance event)")
        continue
      status = self.workers()
      if status is None:
        ssh_failures += 1
        if ssh_failures >= 5:
          raise LaunchError("the TPU is READY but 5 status polls in a row failed over ssh")
        continue
      ssh_failures = 0
      if status in ("finished", "failed"):
        self.training = False
        return status
      if status == "stopped":
        # A maintenance event restarts the VMs (train.py is gone), or sends SIGTERM first with
        # --autocheckpoint (train.py saved and exited); either way: start it again, it resumes.
        self._restart(f"train.py stopped after {after}" if after else
                      "train.py stopped on a READY TPU (a maintenance event between two polls?)")
        self.say("starting train.py again: it resumes from the last checkpoint")
        self.start()
      after = None

  def run(self) -> int:
    while True:
      self.provision()
      if self.wait_node() != "READY":
        self.requeue("the TPU went away before training started")
        continue
      try:
        if self.workers() == "running":
          # A launcher that died (a closed laptop) left train.py running: watch it, do not start another.
          self.say("train.py is already running on the workers: watching it")
          self.training = True
        else:
          self.start()
        outcome = self.watch()
      except NodeGone as e:
        outcome = "gone"
        self.say(f"the TPU is {e}")
      if outcome == "finished":
        self.say("training finished")
        return 0
      if outcome == "failed":
        return 1
      self.requeue("the TPU was preempted or terminated")

  def stop_training(self):
    """Asks train.py to checkpoint and stop (SIGTERM), and waits for it up to --stop_timeout."""
    if not self.training:
      return
    self.say(f"asking train.py to checkpoint and stop (up to {self.args.stop_timeout:g}s)")
    self._run(self.c.stop(), check=False, capture=True)
    deadline = time.monotonic() + self.args.stop_timeout
    while time.monotonic() < deadline:
      if self.workers() != "running":
        return
      self._sleep(min(self.args.poll, 10))

  def cleanup(self):
    if not self.queued:
      return
    if self.args.keep:
      self.say(f"kept: {self.args.name} ({self.args.accelerator}, zone {self.args.zone}) is still "
               f"running and billed; delete it with: {shlex.join(self.c.delete())}")
      return
    self.say(f"deleting {self.args.name} ({self.args.accelerator})")
    out = self._run(self.c.delete(), check=False, capture=True)
    if out.returncode != 0 and "not found" not in out.stderr.lower():
      self.say(f"the delete failed ({out.stderr.strip()}); delete it yourself: "
               f"{shlex.join(self.c.delete())}")


def fit_check(args, c: Commands) -> str | None:
  """None when the setting fits (or the check is skipped), else why not, in one line."""
  target = aot_target(args.accelerator)
  if args.skip_fit_check:
    return None
  skip = "(--skip_fit_check launches without it)"
  if target is None:
    print(f"launch_tpu: no ahead-of-time target for {args.accelerator}: fit check skipped",
          file=sys.stderr)
    return None
  if not os.environ.get("VIT_CLS_AOT"):
    if not os.path.exists(os.path.join(REPO, "vit_cls", "aot.py")):
      return f"the fit check needs vit_cls.aot, which this checkout lacks {skip}"
    if importlib.util.find_spec("libtpu") is None:
      return (f"the fit check compiles for TPU and needs libtpu here: pip install -r "
              f"requirements-tpu.txt {skip}")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "fit.json")
    cmd = c.fit_check(path)
    print(f"launch_tpu: fit check: compiling train.py's step for {target}", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0 or not os.path.exists(path):
      last = (out.stderr.strip().splitlines() or ["no output"])[-1]
      return f"the fit check failed (`{shlex.join(cmd[:4])} ...` exited {out.returncode}: {last}) {skip}"
    with open(path) as f:
      fit = json.load(f)
  gib = 2 ** 30
  try:
    numbers = (f"{fit['per_chip_bytes'] / gib:.1f} GiB per chip of "
               f"{fit['chip_memory_bytes'] / gib:.1f} GiB on {fit.get('target', target)}")
    fits = bool(fit["fits"])
  except (KeyError, TypeError) as e:
    return f"the fit check's JSON lacks {e} (fits, per_chip_bytes, chip_memory_bytes) {skip}"
  if not fits:
    return (f"does not fit: {numbers}; try --config.fsdp=True, --config.model.remat_policy=block, "
            f"--config.accum_steps or a larger slice {skip}")
  print(f"launch_tpu: fits: {numbers}", file=sys.stderr)
  return None


def main(argv=None) -> int:
  args, train_args = parse(sys.argv[1:] if argv is None else argv)
  c = Commands(args, train_args)
  if args.logs is not None or args.ssh is not None:
    cmd = c.logs(args.logs) if args.logs is not None else c.ssh(args.ssh, None)
    if args.dry_run:
      print(shlex.join(cmd))
      return 0
    os.execvp(cmd[0], cmd)
  if args.dry_run:
    dry_run(args, c)
    return 0
  refused = fit_check(args, c)
  if refused:
    print(f"launch_tpu: {refused}", file=sys.stderr)
    return 2
  subprocess.run(c.pack(), check=True)

  def interrupt(signum, frame):  # pylint: disable=unused-argument
    raise Interrupted(signal.Signals(signum).name)

  for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, interrupt)
  launcher = Launcher(args, c)
  rc = 1
  try:
    rc = launcher.run()
  except Interrupted as e:
    launcher.say(f"{e}: stopping")
    rc = 130
    try:
      launcher.stop_training()
    except Exception as e2:  # pylint: disable=broad-except
      launcher.say(f"could not stop train.py: {e2}")
  except LaunchError as e:
    launcher.say(str(e))
  except Exception as e:  # pylint: disable=broad-except
    launcher.say(f"{type(e).__name__}: {e}")
  finally:
    # Nothing interrupts the delete: a second Ctrl-C would leave a paid slice behind.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
      signal.signal(s, signal.SIG_IGN)
    launcher.cleanup()
    if os.path.exists(c.tarball):
      os.remove(c.tarball)
  return rc


if __name__ == "__main__":
  sys.exit(main())
