"""scripts/launch_gpu.py: a coordinator every host can reach; signals reach train.py as SIGTERM."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "launch_gpu.py")


def _launch(*args, expect_rc=0):
  out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
  assert out.returncode == expect_rc, out.stderr
  return out


def _module():
  spec = importlib.util.spec_from_file_location("launch_gpu", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["launch_gpu"] = mod
  spec.loader.exec_module(mod)
  return mod


TRAIN = ["--", "--config=configs/default.py", "--workdir=/shared/run"]


def test_a_loopback_coordinator_in_a_multi_host_job_is_refused():
  # localhost as the first host, and no route to the second one to find a better address: refused.
  err = _launch("--hosts=localhost,gpu-1.invalid", "--dry-run", *TRAIN, expect_rc=2).stderr
  assert "the first host, localhost, is a loopback name" in err and "--coordinator=ADDRESS" in err
  err = _launch("--hosts=gpu-0.invalid,gpu-1.invalid", "--coordinator=127.0.0.1", "--dry-run", *TRAIN,
                expect_rc=2).stderr
  assert "--coordinator=127.0.0.1 is a loopback address" in err
  # An address the others reach is taken as given; one host alone may use its loopback.
  out = _launch("--hosts=localhost,gpu-1.invalid", "--coordinator=10.1.2.3", "--dry-run", *TRAIN).stdout
  assert "--coordinator_address=10.1.2.3:12355" in out
  out = _launch("--hosts=localhost", "--dry-run", *TRAIN).stdout
  assert "--coordinator_address=localhost:12355" in out


def test_a_loopback_first_host_is_resolved_to_this_machines_address(monkeypatch):
  mod = _module()
  monkeypatch.setattr(mod, "route_address", lambda peer: "10.0.0.7" if peer == "gpu-1" else None)
  assert mod.coordinator_host(["localhost", "gpu-1"], None) == "10.0.0.7"
  assert mod.coordinator_host(["127.0.0.1", "gpu-1"], None) == "10.0.0.7"
  monkeypatch.setattr(mod, "route_address", lambda peer: "127.0.0.1")
  with pytest.raises(ValueError, match="loopback name"):
    mod.coordinator_host(["localhost", "gpu-1"], None)
  assert mod.coordinator_host(["gpu-0.invalid", "gpu-1"], None) == "gpu-0.invalid"


FAKE_TRAIN = textwrap.dedent("""\
    import os, signal, sys, time
    def on(signum, frame):
      open("got", "w").write(signal.Signals(signum).name)
      sys.exit(0 if signum == signal.SIGTERM else 1)
    signal.signal(signal.SIGTERM, on)
    signal.signal(signal.SIGINT, on)
    open("ready", "w").write(" ".join(sys.argv[1:]))
    while True:
      time.sleep(0.05)
    """)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_reach_train_py_as_sigterm(tmp_path, signum):
  (tmp_path / "train.py").write_text(FAKE_TRAIN)
  # The launcher in a group of its own, signalled as a terminal does it: the whole foreground group.
  proc = subprocess.Popen([sys.executable, SCRIPT, "--hosts=localhost", f"--repo_dir={tmp_path}",
                           f"--python={sys.executable}", *TRAIN], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  deadline = time.monotonic() + 60
  while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  time.sleep(0.3)  # the launcher reads the pid line train.py's shell printed first
  os.killpg(proc.pid, signum)
  _, err = proc.communicate(timeout=60)
  assert (tmp_path / "got").read_text() == "SIGTERM", err
  assert proc.returncode == 0, err
  assert "asking every train.py to checkpoint and stop" in err
