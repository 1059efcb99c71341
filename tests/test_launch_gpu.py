"""scripts/launch_gpu.py: a coordinator every host can reach; signals reach train.py as SIGTERM; the fit
check compiles for the GPUs before any train.py starts (a fake `vit_cls.aot` through VIT_CLS_AOT)."""

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
NO_CHECK = "--skip_fit_check"


def test_a_loopback_coordinator_in_a_multi_host_job_is_refused():
  # localhost as the first host, and no route to the second one to find a better address: refused.
  err = _launch("--hosts=localhost,gpu-1.invalid", NO_CHECK, "--dry-run", *TRAIN, expect_rc=2).stderr
  assert "the first host, localhost, is a loopback name" in err and "--coordinator=ADDRESS" in err
  err = _launch("--hosts=gpu-0.invalid,gpu-1.invalid", "--coordinator=127.0.0.1", NO_CHECK, "--dry-run",
                *TRAIN, expect_rc=2).stderr
  assert "--coordinator=127.0.0.1 is a loopback address" in err
  # An address the others reach is taken as given; one host alone may use its loopback.
  out = _launch("--hosts=localhost,gpu-1.invalid", "--coordinator=10.1.2.3", NO_CHECK, "--dry-run",
                *TRAIN).stdout
  assert "--coordinator_address=10.1.2.3:12355" in out
  out = _launch("--hosts=localhost", NO_CHECK, "--dry-run", *TRAIN).stdout
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
                           f"--python={sys.executable}", NO_CHECK, *TRAIN], stdout=subprocess.PIPE,
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


# ---------------------------------------------------------------------------------------------------
# The fit check. A fake vit_cls.aot (VIT_CLS_AOT) records its argv, its XLA_PYTHON_CLIENT_MEM_FRACTION
# and whether train.py had started when it ran, and writes the JSON of the contract; a fake train.py
# writes `ran` with its argv.

FAKE_AOT = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    d = os.environ["FAKE_AOT_DIR"]
    with open(os.path.join(d, "aot_calls.jsonl"), "a") as f:
      f.write(json.dumps({"argv": sys.argv[1:], "train_started": os.path.exists(os.path.join(d, "ran")),
                          "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}) + "\\n")
    if os.environ.get("FAKE_AOT_ERROR"):
      sys.stderr.write("compiling...\\nerror: " + os.environ["FAKE_AOT_ERROR"] + "\\n")
      sys.exit(1)
    fits = os.environ.get("FAKE_AOT_FITS", "1") == "1"
    target = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--target="))
    path = sys.argv[sys.argv.index("--json") + 1]
    report = {"fits": fits, "per_chip_bytes": (90 if not fits else 10) * 2**30,
              "chip_memory_bytes": 80 * 2**30, "usable_fraction": 0.75, "target": target}
    if os.environ.get("FAKE_AOT_EVAL_GIB"):  # per program; the top level has the train step's, as in aot
      report["per_chip_bytes"] = 10 * 2**30
      report["train"] = {"per_chip_bytes": report["per_chip_bytes"]}
      report["eval"] = {"per_chip_bytes": int(os.environ["FAKE_AOT_EVAL_GIB"]) * 2**30}
    json.dump(report, open(path, "w"))
    """)

FAKE_TRAIN_ONCE = 'import sys\nopen("ran", "w").write(" ".join(sys.argv[1:]))\n'


@pytest.fixture
def fit(tmp_path):
  """Runs the launcher on localhost with the fake aot and the fake train.py in tmp_path."""
  (tmp_path / "fake_aot").write_text(FAKE_AOT.replace("{python}", sys.executable))
  (tmp_path / "fake_aot").chmod(0o755)
  (tmp_path / "train.py").write_text(FAKE_TRAIN_ONCE)

  class Fit:
    dir = tmp_path

    def run(self, *flags, env=None, train=("--config=configs/default.py", "--workdir=/shared/run")):
      full_env = {**os.environ, "VIT_CLS_AOT": str(tmp_path / "fake_aot"), "FAKE_AOT_DIR": str(tmp_path),
                  **(env or {})}
      return subprocess.run([sys.executable, SCRIPT, "--hosts=localhost", f"--repo_dir={tmp_path}",
                             f"--python={sys.executable}", *flags, "--", *train],
                            capture_output=True, text=True, env=full_env, timeout=60)

    def aot_calls(self):
      path = tmp_path / "aot_calls.jsonl"
      return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

    def train_ran(self):
      return (tmp_path / "ran").exists()

  return Fit()


def test_fit_check_passes_then_train_starts(fit):
  out = fit.run("--gpu=h100", train=("--config", "configs/default.py", "--workdir=/shared/run",
                                     "--config.batch_size=256"))
  assert out.returncode == 0, out.stderr
  assert ("fits: 10.0 GiB per GPU needed, 60.0 GiB usable of the GPU's 80.0 GiB "
          "(XLA_PYTHON_CLIENT_MEM_FRACTION=0.75) on h100:8") in out.stderr
  [call] = fit.aot_calls()
  assert not call["train_started"]  # the check ran before train.py
  # train.py's config flags (`--config FILE` joined into one word), never its --workdir.
  assert call["argv"][:2] == ["--config=configs/default.py", "--target=h100:8"]
  assert call["argv"][2:] == ["--config.batch_size=256", "--programs=train,eval", "--json",
                              call["argv"][-1]]
  assert fit.train_ran()
  assert "--config.batch_size=256" in (fit.dir / "ran").read_text()


def test_does_not_fit_refuses_with_the_numbers_and_starts_nothing(fit):
  out = fit.run("--gpu=h200:4", env={"FAKE_AOT_FITS": "0"})
  assert out.returncode == 2
  [line] = [l for l in out.stderr.splitlines() if "does not fit" in l]
  assert line.startswith("launch_gpu: does not fit: 90.0 GiB per GPU needed, 60.0 GiB usable of the "
                         "GPU's 80.0 GiB (XLA_PYTHON_CLIENT_MEM_FRACTION=0.75) on h200:4")
  assert "--config.fsdp=True" in line and line.endswith("(--skip_fit_check launches without it)")
  # 90 GiB does not fit 90% of 80 GiB either: no larger share is suggested.
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" not in line
  assert len(fit.aot_calls()) == 1
  assert not fit.train_ran()


def test_the_larger_of_train_and_eval_is_the_number_given(fit):
  # The train step fits, the eval step (a larger eval batch) does not: the refusal names eval's bytes.
  out = fit.run("--gpu=h100", env={"FAKE_AOT_FITS": "0", "FAKE_AOT_EVAL_GIB": "70"})
  assert out.returncode == 2
  assert "does not fit: 70.0 GiB per GPU needed, 60.0 GiB usable" in out.stderr
  # 70 GiB fits in 90% of 80 GiB: a larger preallocated share is offered.
  assert "more GPUs or --env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (--skip_fit_check" in out.stderr


def test_config_flags_keep_the_file_first_and_join_two_word_flags():
  mod = _module()
  assert mod.config_flags(["--config.batch_size", "64", "--workdir=/w", "--config", "configs/x.py:B/16",
                           "--config.fsdp", "--seed=1", "--config.model.dtype=bfloat16"]) == [
      "--config=configs/x.py:B/16", "--config.batch_size=64", "--config.fsdp",
      "--config.model.dtype=bfloat16"]


def test_skip_fit_check_compiles_nothing(fit):
  out = fit.run("--gpu=h100", "--skip_fit_check")
  assert out.returncode == 0, out.stderr
  assert fit.aot_calls() == [] and fit.train_ran()
  # Without --gpu too: the GPU is asked for only to compile for it.
  (fit.dir / "ran").unlink()
  out = fit.run("--skip_fit_check")
  assert out.returncode == 0, out.stderr
  assert fit.aot_calls() == [] and fit.train_ran()


def test_a_failed_compile_refuses_with_its_last_line(fit):
  msg = "config.batch_size=100 must be a multiple of the 8 devices"
  out = fit.run("--gpu=a100", env={"FAKE_AOT_ERROR": msg})
  assert out.returncode == 2
  assert f"exited 1: error: {msg}) (--skip_fit_check launches without it)" in out.stderr
  assert not fit.train_ran()


def test_the_env_memory_fraction_reaches_the_check(fit):
  out = fit.run("--gpu=h100", "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--env=FOO=bar")
  assert out.returncode == 0, out.stderr
  assert fit.aot_calls()[0]["mem_fraction"] == "0.9"


@pytest.mark.parametrize("flags, expected", [
    (["--gpu=v100"], "--gpu=v100: expected one of h100, h200, a100, optionally :GPUS_PER_HOST"),
    (["--gpu=h100:9"], "--gpu=h100:9: write the GPUs per host as h100:N, N from 1 to 8"),
    (["--gpu=h100:eight"], "--gpu=h100:eight: write the GPUs per host as h100:N"),
    (["--gpu=h100:2x8"], "--gpu=h100:2x8 says 2 hosts but --hosts lists 1: write --gpu=h100:8"),
    ([], "give --gpu=h100|h200|a100[:GPUS_PER_HOST]"),
])
def test_a_bad_or_missing_gpu_is_one_line_and_compiles_nothing(fit, flags, expected):
  out = fit.run(*flags)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("launch_gpu.py: error: ") and expected in last, out.stderr
  assert fit.aot_calls() == [] and not fit.train_ran()


def test_the_target_counts_the_hosts_and_the_dry_run_prints_the_check():
  mod = _module()
  assert [mod.aot_target(g, hosts) for g, hosts in [("h100", 1), ("H200", 1), ("h100", 2), ("a100:4", 2),
                                                    ("h100:2x8", 2), ("h100:1", 4)]] == [
      "h100:8", "h200:8", "h100:2x8", "a100:2x4", "h100:2x8", "h100:4x1"]
  out = _launch("--hosts=localhost,gpu-1.invalid", "--coordinator=10.1.2.3", "--gpu=a100:4", "--dry-run",
                "--", "--config=configs/default.py", "--workdir=/shared/run",
                "--config.fsdp=True").stdout
  lines = out.splitlines()
  assert lines[0].startswith("# fit check")
  check = shlex.split(lines[1])
  assert check[1:] == ["-m", "vit_cls.aot", "--config=configs/default.py", "--target=a100:2x4",
                       "--config.fsdp=True", "--programs=train,eval", "--json", "/tmp/vit_cls-fit.json"]
  assert "--coordinator_address=10.1.2.3:12355" in lines[3]
  out = _launch("--hosts=localhost", "--skip_fit_check", "--dry-run", *TRAIN).stdout
  assert out.splitlines()[0] == "# fit check skipped (--skip_fit_check)" and "vit_cls.aot" not in out


def test_a_missing_cuda_plugin_refuses_in_one_line_naming_requirements_gpu(monkeypatch):
  mod = _module()
  monkeypatch.delenv("VIT_CLS_AOT", raising=False)
  args, train_args = mod.parse(["--hosts=localhost", "--gpu=h100", *TRAIN])
  real = importlib.util.find_spec
  missing = ("jax_cuda12_plugin", "jax_plugins.xla_cuda12")
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in missing else real(n, *a))
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the check must not compile"))
  why = mod.fit_check(args, train_args)
  assert "needs JAX's CUDA plugin" in why and "pip install -r requirements-gpu.txt" in why
  assert why.endswith("(--skip_fit_check launches without it)") and "\n" not in why
