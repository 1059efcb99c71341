#!/usr/bin/env python3
"""Runs vit_cls's train.py on a Cloud TPU VM or pod slice: create, install, train on every worker.

    python scripts/launch_tpu.py --name=vit-l16 --zone=us-central2-b --accelerator=v4-32 \
        --bucket=my-bucket --spot --dry-run -- \
        --config=configs/pretrain_imagenet.py:L/16,imagenet2012 \
        --config.data_dir=gs://my-bucket/tensorflow_datasets --config.fsdp=True

Everything after `--` goes to train.py unchanged. --dry-run prints every command, in order, exactly as it
would run (one cycle; the comment lines say when a cycle repeats) and runs none of them.

What it does, with the reasons:
1. Packs this checkout (no .git, no workdirs) into a tarball: the workers run the code you have.
2. `gcloud compute tpus tpu-vm create` (with --spot for Spot capacity).
3. Copies the tarball to every worker and installs it in a Python 3.11 venv (`jax[tpu]` at the version
   requirements.txt pins, then the rest). A multi-host job's checkpoints are written by every worker into
   one directory (orbax), so the workdir must be shared; and a Spot VM's disk is deleted with it, so it
   must live off the VM. With --bucket the workdir is `gs://BUCKET/vit_cls/NAME`, written natively:
   orbax writes checkpoint arrays to Cloud Storage with tensorstore and commits a step with a marker
   file (no directory rename, so any bucket works), everything else goes through TensorFlow's GCS
   file system, and the workdir's lock is an object with a generation precondition that every VM sees.
   --gcsfuse mounts the bucket at /mnt/gcs on every worker instead and uses
   `/mnt/gcs/vit_cls/NAME`: for tools that need a POSIX path; create the bucket with hierarchical
   namespace then (`gcloud storage buckets create gs://B --enable-hierarchical-namespace
   --uniform-bucket-level-access`), so that gcsfuse renames directories atomically, which orbax's
   commit on a mounted path relies on; its workdir lock holds between the processes of one VM only.
4. Runs train.py on all workers at once (`--worker=all`). Each one finds the others through
   the TPU metadata (train.py calls `jax.distributed.initialize()` on Cloud TPU), builds the same
   mesh, reads its own part of the data; only worker 0 prints progress lines.
5. Preemption: the VM's shutdown sends SIGTERM; JAX's preemption sync makes every worker save the same
   step, then exit. The ssh session then fails, the launcher sees the node PREEMPTED (or gone), deletes
   it, and goes back to 2; train.py resumes from the last checkpoint in the shared workdir. Up to
   --max_restarts times.
6. Deletes the TPU when training has finished (unless --keep).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "~/vit_cls"
VENV = "~/vit_cls_venv"
MOUNT = "/mnt/gcs"  # where --bucket is mounted on every worker with --gcsfuse
GONE_STATES = ("PREEMPTED", "TERMINATED", "NOT_FOUND")


def parse(argv):
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1:]
  else:
    train_args = []
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", required=True, help="TPU node name")
  p.add_argument("--zone", required=True)
  p.add_argument("--accelerator", required=True, help="accelerator type, e.g. v4-8, v4-32, v5litepod-16")
  p.add_argument("--project", default=None, help="default: gcloud's configured project")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software (runtime) version")
  p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted")
  p.add_argument("--bucket", default=None,
                 help="GCS bucket of the default workdir, gs://BUCKET/vit_cls/NAME")
  p.add_argument("--gcsfuse", action="store_true",
                 help=f"mount --bucket with gcsfuse at {MOUNT} on every worker and use "
                      f"{MOUNT}/vit_cls/NAME as the workdir instead of the gs:// path")
  p.add_argument("--workdir", default=None,
                 help="train.py --workdir on the workers (default: from --bucket)")
  p.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")
  p.add_argument("--max_restarts", type=int, default=20, help="recreations after preemption")
  p.add_argument("--keep", action="store_true", help="do not delete the TPU when training is done")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="print the commands that would run, run none")
  args = p.parse_args(argv)
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


def _gcloud(args, *words):
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
  return cmd + ([f"--project={args.project}"] if args.project else [])


def tarball(args) -> str:
  return f"/tmp/vit_cls-{args.name}.tgz"


def commands(args, train_args) -> dict[str, list[str]]:
  """Every command of one cycle, by role (the driver below runs them; --dry-run prints them)."""
  jax_pin = _jax_version()
  # TPU images ship an older Python than this project needs (3.11): a venv of its own on every worker.
  install = [
      "set -e",
      f"mkdir -p {REMOTE_DIR}",
      f"tar -xzf ~/vit_cls.tgz -C {REMOTE_DIR}",
      f"cd {REMOTE_DIR}",
      f"command -v {args.python} >/dev/null || (sudo apt-get update -q && "
      f"sudo apt-get install -y -q {args.python} {args.python}-venv)",
      f"test -x {VENV}/bin/python || {args.python} -m venv {VENV}",
      f"{VENV}/bin/pip install -q -r requirements.txt 'jax[tpu]{'==' + jax_pin if jax_pin else ''}'",
      f"{VENV}/bin/pip install -q --no-deps -e .",
  ]
  if args.gcsfuse:
    install += [
        "if ! command -v gcsfuse >/dev/null; then "
        "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
        "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
        "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" | "
        "sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; "
        "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi",
        f"sudo mkdir -p {MOUNT} && sudo chown $USER {MOUNT}",
        f"mountpoint -q {MOUNT} || gcsfuse --implicit-dirs {shlex.quote(args.bucket)} {MOUNT}",
    ]
  train = f"cd {REMOTE_DIR} && {VENV}/bin/python " + shlex.join(  # (~ must stay unquoted)
      ["train.py", f"--workdir={args.workdir}", *train_args])
  create = _gcloud(args, "create", args.name, f"--accelerator-type={args.accelerator}",
                   f"--version={args.version}") + (["--spot"] if args.spot else [])
  return {
      "pack": ["tar", "-czf", tarball(args), "--exclude=./.git", "--exclude=./workdirs",
               "--exclude=__pycache__", "--exclude=*.egg-info", "-C", REPO, "."],
      "create": create,
      "copy": _gcloud(args, "scp", tarball(args), f"{args.name}:~/vit_cls.tgz", "--worker=all"),
      "install": _gcloud(args, "ssh", args.name, "--worker=all", "--command=" + "; ".join(install)),
      "train": _gcloud(args, "ssh", args.name, "--worker=all", "--command=" + train),
      "state": _gcloud(args, "describe", args.name, "--format=value(state)"),
      "delete": _gcloud(args, "delete", args.name, "--quiet"),
  }


def dry_run(cmds) -> None:
  """The commands in the order main() runs them; `#` lines say which run when."""
  def show(role, comment=None):
    if comment:
      print(f"# {comment}")
    print(shlex.join(cmds[role]))

  show("pack", "pack this checkout")
  show("state", "cycle: the node's state (NOT_FOUND: create it; PREEMPTED or TERMINATED: delete, "
                "create; READY: reuse it)")
  show("delete", "only if PREEMPTED or TERMINATED")
  show("create", "only if not READY")
  show("copy", "every cycle: copy, install, train on every worker at once")
  show("install")
  show("train")
  show("state", "if train fails: PREEMPTED, TERMINATED or NOT_FOUND -> next cycle (train.py resumes "
                "from the workdir's last checkpoint), up to --max_restarts; else stop, keep the TPU")
  show("delete", "when train succeeds, unless --keep")


def _state(cmds) -> str:
  out = subprocess.run(cmds["state"], capture_output=True, text=True)
  if out.returncode != 0:
    return "NOT_FOUND" if "NOT_FOUND" in out.stderr or "not found" in out.stderr.lower() else "UNKNOWN"
  return out.stdout.strip()


def main(argv=None) -> int:
  args, train_args = parse(sys.argv[1:] if argv is None else argv)
  cmds = commands(args, train_args)
  if args.dry_run:
    dry_run(cmds)
    return 0
  subprocess.run(cmds["pack"], check=True)
  restarts = 0
  while True:
    state = _state(cmds)
    if state in GONE_STATES:
      if state != "NOT_FOUND":
        subprocess.run(cmds["delete"], check=True)
      subprocess.run(cmds["create"], check=True)
    subprocess.run(cmds["copy"], check=True)
    subprocess.run(cmds["install"], check=True)
    if subprocess.run(cmds["train"]).returncode == 0:
      break
    state = _state(cmds)
    if state not in GONE_STATES or restarts >= args.max_restarts:
      print(f"train.py failed and the TPU is {state}: not a preemption, or out of restarts "
            f"({restarts}/{args.max_restarts}); the TPU is kept for inspection.", file=sys.stderr)
      return 1
    restarts += 1
    print(f"TPU {args.name} was {state}: recreating it (restart {restarts}/{args.max_restarts}).",
          file=sys.stderr)
    time.sleep(10)
  if not args.keep:
    subprocess.run(cmds["delete"], check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
