#!/usr/bin/env python3
"""Runs vit_cls's train.py on several GPU hosts: one process per host, JAX's multi-controller runtime.

    python scripts/launch_gpu.py --hosts=gpu-0,gpu-1 --gpu=h100 --repo_dir=/shared/vit_cls --dry-run -- \
        --config=configs/pretrain_imagenet.py:L/16,imagenet2012 --workdir=/shared/runs/l16 \
        --config.fsdp=True

Everything after `--` goes to train.py unchanged; the launcher adds --coordinator_address (the first
host, --port), --num_processes and --process_id, which make train.py call `jax.distributed.initialize`.
Each process drives every GPU of its host, builds the same mesh over all GPUs of all hosts, reads its own
part of the data; only process 0 prints progress and writes TensorBoard. --dry-run prints the exact
commands and runs none.

Fit check, before any train.py starts: `python -m vit_cls.aot` compiles train.py's train and eval steps
on this machine for --gpu's chip, --hosts' count of hosts and its GPUs per host (`--gpu=h100` is
h100:2x8 on two hosts; `--gpu=a100:4` for four GPUs a host), and the launcher refuses, with the per-GPU
bytes against what JAX may use of the GPU's memory, a setting that does not fit. It needs JAX's CUDA
plugin here (requirements-gpu.txt; no GPU or driver) and says so in one line when it is missing;
--skip_fit_check launches without the check. Without it, a setting too large for the GPUs fails only
after every host has started, loaded its data and compiled: GPU hours for an out-of-memory error.

Needs: passwordless ssh to every host (`localhost`/`127.0.0.1` runs locally, no ssh), this checkout at
--repo_dir on every host with its requirements installed, and a --workdir every host sees at the same
path (NFS, Lustre, a gcsfuse mount): orbax writes one checkpoint from all processes into it.

The coordinator must be an address every host reaches: `--hosts=localhost,gpu-1` would send gpu-1 to
its own loopback. When the first host is a loopback name (localhost, 127.x, or this machine's name where
it resolves to 127.0.1.1 as on Debian), the launcher uses this machine's address on the route to the
second host, and refuses when it finds none (give --coordinator then); a loopback --coordinator in a
multi-host job is refused.

Stopping and preemption: every child (the local train.py, the ssh clients) runs in its own process
group, so a Ctrl-C in the terminal reaches the launcher only, not train.py as SIGINT, and the ssh
clients stay up; the launcher then sends SIGTERM to every train.py (by the process id each one reports
first), local or remote, and does the same on its own SIGTERM. JAX's preemption sync then has all
processes save the same step and exit, and running the same command again resumes from it. A cluster
scheduler that signals the processes itself (Slurm) needs no launcher: see docs/training.md (Several GPUs).

On GKE (or any scheduler that starts the pods itself) there is no launcher either: give each pod the
three variables train.py reads in place of the flags. With an Indexed Job (or a JobSet) of N pods behind
a headless Service:
  JAX_COORDINATOR_ADDRESS = <pod 0's DNS name>:12355, e.g. myjob-0.myjob-svc:12355 (JobSet:
                            $(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.<subdomain>:12355)
  JAX_NUM_PROCESSES       = N (the Job's completions/parallelism)
  JAX_PROCESS_ID          = the pod's completion index: env valueFrom fieldRef
                            metadata.annotations['batch.kubernetes.io/job-completion-index']
GKE sends SIGTERM to every container before stopping a pod (terminationGracePeriodSeconds): set it long
enough for a checkpoint.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = ("localhost", "127.0.0.1")
PID_PREFIX = "vit_cls pid "
DEFAULT_GPUS_PER_HOST = 8  # an HGX/DGX node; --gpu=CHIP:N for other hosts
# The share of each GPU's memory JAX preallocates, which a step must fit in (vit_cls.aot reads it).
MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
SKIP_HINT = "(--skip_fit_check launches without it)"


def _aot():
  """vit_cls.aot from this checkout: its target names and plugin check are the compile's own. It imports
  no JAX at module level, so the launcher stays quick to start."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from vit_cls import aot  # pylint: disable=g-import-not-at-top
  return aot


def gpu_names() -> tuple[str, ...]:
  return _aot().chips_lib.GPU_NAMES


def aot_target(gpu: str, num_hosts: int) -> str:
  """--gpu (CHIP, CHIP:GPUS_PER_HOST or CHIP:HOSTSxGPUS) and the host count -> vit_cls.aot's target name
  (`h100`, 1 host -> h100:8; `a100:4`, 2 hosts -> a100:2x4). A ValueError in one line otherwise."""
  names = gpu_names()
  chip, sep, count = gpu.strip().lower().partition(":")
  if chip not in names:
    raise ValueError(f"--gpu={gpu}: expected one of {', '.join(names)}, optionally :GPUS_PER_HOST "
                     f"(e.g. --gpu=h100 for {DEFAULT_GPUS_PER_HOST} a host, --gpu=a100:4)")
  m = re.fullmatch(r"(?:(\d+)x)?(\d+)", count) if sep else None
  if sep and (not m or not 1 <= int(m.group(2)) <= 8):
    raise ValueError(f"--gpu={gpu}: write the GPUs per host as {chip}:N, N from 1 to 8 (e.g. {chip}:8)")
  if m and m.group(1) and int(m.group(1)) != num_hosts:
    raise ValueError(f"--gpu={gpu} says {m.group(1)} hosts but --hosts lists {num_hosts}: write "
                     f"--gpu={chip}:{m.group(2)} (the hosts come from --hosts)")
  per_host = int(m.group(2)) if m else DEFAULT_GPUS_PER_HOST
  target = f"{chip}:{per_host}" if num_hosts == 1 else f"{chip}:{num_hosts}x{per_host}"
  _aot().parse_target(target)  # cannot fail after the checks above, unless vit_cls.aot's names change
  return target


def config_flags(train_args: list[str]) -> list[str]:
  """train.py's --config and --config.FIELD flags, each as one `--name=value` word (train.py also takes
  `--config FILE`): what the fit check passes on. --workdir and the rest are train.py's alone."""
  out, i = [], 0
  while i < len(train_args):
    a = train_args[i]
    value = train_args[i + 1] if i + 1 < len(train_args) else None
    # `--config.fsdp` alone is absl's boolean form: the next word is then another flag, not its value.
    if (a == "--config" or (a.startswith("--config.") and "=" not in a)) and value is not None \
        and not value.startswith("--"):
      out.append(f"{a}={value}")
      i += 2
      continue
    if a.startswith("--config=") or a.startswith("--config."):
      out.append(a)
    i += 1
  # The file first: vit_cls.aot applies the overrides to it.
  return sorted(out, key=lambda f: not f.startswith("--config="))


def parse(argv):
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1:]
  else:
    train_args = []
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--hosts", required=True, help="comma-separated hosts; the first runs the coordinator")
  p.add_argument("--coordinator", default=None,
                 help="address the others reach process 0 at (default: the first host's name)")
  p.add_argument("--port", type=int, default=12355, help="coordinator port (free on the first host)")
  p.add_argument("--repo_dir", default="~/vit_cls", help="this checkout's path on every host")
  p.add_argument("--python", default="python3", help="interpreter on the hosts (e.g. a venv's)")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment for train.py on every host (repeatable)")
  p.add_argument("--ssh", default="ssh", help="ssh command (e.g. 'ssh -i key -l user')")
  p.add_argument("--gpu", default=None, metavar="CHIP[:GPUS_PER_HOST]",
                 help=f"the hosts' GPUs, for the fit check: {', '.join(gpu_names())}, with :N when a "
                      f"host has N GPUs (default {DEFAULT_GPUS_PER_HOST})")
  p.add_argument("--skip_fit_check", action="store_true",
                 help="do not compile the step for the GPUs before starting train.py")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="print the commands that would run, run none")
  args = p.parse_args(argv)
  args.hosts = [h for h in args.hosts.split(",") if h]
  if not any(a.startswith("--workdir") for a in train_args) or not any(
      a.startswith("--config") and not a.startswith("--config.") for a in train_args):
    p.error("pass train.py's --config and --workdir after `--` (a workdir every host shares)")
  if any(a.split("=")[0] in ("--coordinator_address", "--num_processes", "--process_id")
         for a in train_args):
    p.error("the launcher sets --coordinator_address/--num_processes/--process_id itself")
  for e in args.env:
    if "=" not in e:
      p.error(f"--env {e!r}: expected NAME=VALUE")
  args.target = None
  if args.gpu:
    try:
      args.target = aot_target(args.gpu, len(args.hosts))
    except ValueError as e:
      p.error(str(e))
  elif not args.skip_fit_check:
    p.error(f"give --gpu={'|'.join(gpu_names())}[:GPUS_PER_HOST]: the launcher compiles the step for "
            f"it before starting train.py, and refuses a setting that does not fit {SKIP_HINT}")
  try:
    args.coordinator = coordinator_host(args.hosts, args.coordinator)
  except ValueError as e:
    p.error(str(e))
  return args, train_args


def is_loopback(host: str) -> bool:
  """localhost, 127.x, ::1, or a name that resolves to one (Debian maps its own name to 127.0.1.1)."""
  if host in LOCAL or host == "::1":
    return True
  try:
    return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
  except (OSError, ValueError):
    return False  # a name this machine cannot resolve: the other hosts may; not ours to refuse


def route_address(peer: str) -> str | None:
  """This machine's address on the route to `peer` (a UDP connect sends nothing), or None."""
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
      s.connect((peer, 9))
      return s.getsockname()[0]
  except OSError:
    return None


def coordinator_host(hosts: list[str], coordinator: str | None) -> str:
  """The address the other processes reach process 0 at: never a loopback one in a multi-host job."""
  if len(hosts) == 1:
    return coordinator or hosts[0]
  if coordinator:
    if is_loopback(coordinator):
      raise ValueError(f"--coordinator={coordinator} is a loopback address: the other hosts would "
                       f"reach themselves; give an address of {hosts[0]} they can reach")
    return coordinator
  first = hosts[0]
  if not is_loopback(first):
    return first
  address = route_address(hosts[1])
  if address and not ipaddress.ip_address(address).is_loopback:
    print(f"launch_gpu: the first host, {first}, is a loopback name: the others reach the "
          f"coordinator at {address} (this machine's address towards {hosts[1]})", file=sys.stderr)
    return address
  raise ValueError(f"the first host, {first}, is a loopback name and this machine has no address "
                   f"on a route to {hosts[1]}: give --coordinator=ADDRESS (this host's address that "
                   f"the others reach), or list this host by such a name")


def commands(args, train_args) -> list[list[str]]:
  """One argv per host: ssh (or a local shell) running train.py as process i of len(hosts)."""
  coordinator = f"{args.coordinator}:{args.port}"
  out = []
  for i, host in enumerate(args.hosts):
    train = [*(["env", *args.env] if args.env else []), args.python, "train.py",
             f"--coordinator_address={coordinator}", f"--num_processes={len(args.hosts)}",
             f"--process_id={i}", *train_args]
    # `exec` keeps the shell's pid, reported first, so that SIGTERM can reach train.py itself.
    remote = f"cd {args.repo_dir} && echo {PID_PREFIX}$$ && exec {shlex.join(train)}"
    if host in LOCAL:
      out.append(["bash", "-c", remote])
    else:
      out.append([*shlex.split(args.ssh), "-o", "BatchMode=yes", host, remote])
  return out


def fit_check_command(args, train_args, json_path: str) -> list[str]:
  """`python -m vit_cls.aot` for the hosts' GPUs: train and eval, the two programs train.py runs.
  VIT_CLS_AOT replaces the command (the tests put a fake there)."""
  aot = shlex.split(os.environ.get("VIT_CLS_AOT", "")) or [sys.executable, "-m", "vit_cls.aot"]
  config = config_flags(train_args)
  return [*aot, *config[:1], f"--target={args.target}", *config[1:], "--programs=train,eval",
          "--json", json_path]


def fit_check_environment(args) -> dict:
  """This environment, with the --env value of XLA_PYTHON_CLIENT_MEM_FRACTION when one is given: the
  share of memory the check allows is then the one train.py gets. Nothing else of --env: it is for
  train.py on a GPU host, not for a compile on this one."""
  env = dict(os.environ)
  for e in args.env:
    name, value = e.split("=", 1)
    if name == MEM_FRACTION:
      env[name] = value
  return env


def _gib(n: float) -> str:
  """GiB, or MiB below one GiB: a small model would read 0.0 GiB."""
  return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fit_check(args, train_args) -> str | None:
  """None when the setting fits the GPUs (or the check is skipped), else why not, in one line."""
  if args.skip_fit_check:
    return None
  if not os.environ.get("VIT_CLS_AOT"):
    # Refused, like launch_tpu.py without libtpu: a launch the user asked to be checked is not started
    # unchecked; --skip_fit_check is the explicit way to do that.
    aot = _aot()
    try:
      aot.check_installed(aot.parse_target(args.target))
    except aot.TargetError as e:  # the CUDA plugin is missing; its message names requirements-gpu.txt
      return f"{' '.join(str(e).split()).rstrip('.')} {SKIP_HINT}"
  env = fit_check_environment(args)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "fit.json")
    cmd = fit_check_command(args, train_args, path)
    print(f"launch_gpu: fit check: compiling train.py's step for {args.target} "
          f"({len(args.hosts)} host(s))", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if out.returncode != 0 or not os.path.exists(path):
      last = (out.stderr.strip().splitlines() or ["no output"])[-1]
      return (f"the fit check failed (`{shlex.join(cmd[:4])} ...` exited {out.returncode}: {last}) "
              f"{SKIP_HINT}")
    with open(path) as f:
      fit = json.load(f)
  try:
    fits = bool(fit["fits"])
    # The worst program decides (eval's batch may be the larger); a report without them has the train
    # step's figure only.
    needed = max([fit[p]["per_chip_bytes"] for p in ("train", "eval") if isinstance(fit.get(p), dict)]
                 or [fit["per_chip_bytes"]])
    memory = fit["chip_memory_bytes"]
  except (KeyError, TypeError) as e:
    return f"the fit check's JSON lacks {e} (fits, per_chip_bytes, chip_memory_bytes) {SKIP_HINT}"
  fraction = float(fit.get("usable_fraction", env.get(MEM_FRACTION, 0.75)))
  numbers = (f"{_gib(needed)} per GPU needed, {_gib(memory * fraction)} usable of the GPU's "
             f"{_gib(memory)} ({MEM_FRACTION}={fraction:g}) on {fit.get('target', args.target)}")
  if not fits:
    # A larger preallocated share, only where it is the whole answer (JAX and CUDA keep the rest).
    larger_share = f" or --env={MEM_FRACTION}=0.9" if needed <= 0.9 * memory and fraction < 0.9 else ""
    return (f"does not fit: {numbers}; try --config.fsdp=True, --config.model.remat_policy=block, "
            f"--config.accum_steps, more GPUs{larger_share} {SKIP_HINT}")
  print(f"launch_gpu: fits: {numbers}", file=sys.stderr)
  return None


def stop_command(args, host: str, pid: int) -> list[str]:
  if host in LOCAL:
    return ["kill", "-TERM", str(pid)]
  return [*shlex.split(args.ssh), "-o", "BatchMode=yes", host, f"kill -TERM {pid}"]


def main(argv=None) -> int:
  args, train_args = parse(sys.argv[1:] if argv is None else argv)
  cmds = commands(args, train_args)
  if args.dry_run:
    if args.skip_fit_check:
      print("# fit check skipped (--skip_fit_check)")
    else:
      print("# fit check, on this machine: no train.py starts unless the worst per_chip_bytes fits in "
            "chip_memory_bytes x usable_fraction")
      print(shlex.join(fit_check_command(args, train_args, "/tmp/vit_cls-fit.json")))
    for i, cmd in enumerate(cmds):
      print(f"# process {i} of {len(cmds)}, on {args.hosts[i]} (all start at once)")
      print(shlex.join(cmd))
    print(f"# on SIGTERM/Ctrl-C, for each host: {shlex.join(stop_command(args, args.hosts[-1], 1234))}"
          f" (1234: the pid the host printed as '{PID_PREFIX}...')")
    return 0
  refused = fit_check(args, train_args)
  if refused:
    print(f"launch_gpu: {refused}", file=sys.stderr)
    return 2

  # Each child in a session (and process group) of its own: the terminal's Ctrl-C reaches the launcher
  # alone. Otherwise the local train.py would get SIGINT (not the SIGTERM its checkpoint-and-stop path
  # listens for) and the ssh clients would die before the SIGTERM below is forwarded through them.
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True) for c in cmds]
  pids: dict[int, int] = {}

  def pump(i, proc):
    for line in proc.stdout:
      if line.startswith(PID_PREFIX) and i not in pids:
        pids[i] = int(line[len(PID_PREFIX):])
        continue
      sys.stdout.write(line if i == 0 else f"[{args.hosts[i]}] {line}")
      sys.stdout.flush()

  threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
  for t in threads:
    t.start()

  def forward(signum, frame):  # pylint: disable=unused-argument
    print(f"launch_gpu: signal {signum}, asking every train.py to checkpoint and stop", file=sys.stderr)
    for i, pid in pids.items():
      subprocess.run(stop_command(args, args.hosts[i], pid), check=False)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  codes = [p.wait() for p in procs]
  for t in threads:
    t.join(timeout=5)
  if any(codes):
    print(f"launch_gpu: exit codes {codes}", file=sys.stderr)
  return max(codes, key=abs)


if __name__ == "__main__":
  sys.exit(main())
