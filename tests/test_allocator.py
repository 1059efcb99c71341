"""The memory allocator: what each mode selects, the one restart under tcmalloc, and that the choice never
changes the numbers (three short train.py runs on the digits job: tcmalloc, glibc tuned, system default).

Tests that need tcmalloc are skipped where it is not installed (`apt-get install libtcmalloc-minimal4`);
the absent case is tested everywhere by pointing VIT_CLS_TCMALLOC at a file that does not exist.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_cls import allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCMALLOC = allocator.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="tcmalloc is not installed")
MISSING = "/nonexistent/libtcmalloc_minimal.so.4"

# A process that selects its allocator as an entry point does, then reports on itself and on a child.
_PROBE = """
import json, os, subprocess, sys
print(json.dumps(dict(phase="before", pid=os.getpid())), flush=True)
from vit_cls import allocator
text = allocator.setup(file=sys.stderr)
maps = open("/proc/self/maps").read()
child = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"],
                       capture_output=True, text=True).stdout
print(json.dumps(dict(phase="after", pid=os.getpid(), argv=sys.argv[1:], text=text, kind=allocator.kind(),
                      tcmalloc_mapped="tcmalloc" in maps, child_tcmalloc_mapped="tcmalloc" in child,
                      ld_preload=os.environ.get("LD_PRELOAD"),
                      marker=[k for k in os.environ if k.startswith("_VIT_CLS")])))
"""


def _env(**overrides):
  env = {k: v for k, v in os.environ.items() if k not in ("VIT_CLS_ALLOCATOR", "LD_PRELOAD")}
  env["XLA_FLAGS"] = ""  # one CPU device, as a user runs it (conftest simulates 8 for other tests)
  env.update({k: v for k, v in overrides.items() if v is not None})
  return env


def _probe(**env):
  proc = subprocess.run([sys.executable, "-c", _PROBE, "--flag", "x y"], capture_output=True, text=True,
                        env=_env(**env), timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  return lines, proc.stderr


@needs_tcmalloc
def test_auto_restarts_once_under_tcmalloc_and_children_choose_for_themselves():
  lines, err = _probe()
  # The process ran its first lines twice (before and after the exec), as one pid.
  assert [l["phase"] for l in lines] == ["before", "before", "after"]
  assert len({l["pid"] for l in lines}) == 1
  after = lines[-1]
  assert after["kind"] == "tcmalloc" and after["tcmalloc_mapped"]
  assert after["text"].startswith("tcmalloc (/") and "tcmalloc" in os.path.basename(
      after["text"][len("tcmalloc ("):-1])
  assert err.splitlines()[0] == f"allocator: {after['text']}"
  assert after["argv"] == ["--flag", "x y"]
  # The preload and the marker are gone from the environment: a child is not preloaded.
  assert after["ld_preload"] is None and after["marker"] == [] and not after["child_tcmalloc_mapped"]


# A SIGTERM that arrives while the process restarts (sent just before the exec, in the first image).
_SIGNAL_PROBE = f"""
import os, signal
restarted = {allocator._ENV_RESTARTED!r} in os.environ
image = "restarted" if restarted else "first"
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM handled in the", image, "image", flush=True))
if not restarted:
  _execve = os.execve
  def execve(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    _execve(*args)
  os.execve = execve
from vit_cls import allocator
allocator.select()
print("then", allocator.kind(), flush=True)
"""


@needs_tcmalloc
def test_a_signal_during_the_restart_reaches_the_handler_afterwards():
  proc = subprocess.run([sys.executable, "-c", _SIGNAL_PROBE], capture_output=True, text=True,
                        env=_env(), timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == ["SIGTERM handled in the restarted image", "then tcmalloc"]


@needs_tcmalloc
def test_restart_keeps_the_users_own_preload():
  import ctypes.util  # pylint: disable=g-import-not-at-top
  own = ctypes.util.find_library("z")  # any harmless library: zlib's
  if not own:
    pytest.skip("no zlib to preload")
  lines, _ = _probe(LD_PRELOAD=own)
  assert [l["phase"] for l in lines] == ["before", "before", "after"]
  assert lines[-1]["kind"] == "tcmalloc" and lines[-1]["ld_preload"] == own


@needs_tcmalloc
def test_an_already_loaded_tcmalloc_is_left_alone():
  lines, _ = _probe(LD_PRELOAD=TCMALLOC)
  assert [l["phase"] for l in lines] == ["before", "after"]  # no restart
  assert lines[-1]["kind"] == "tcmalloc" and lines[-1]["ld_preload"] == TCMALLOC


@pytest.mark.parametrize("env, text, kind", [
    (dict(VIT_CLS_ALLOCATOR="system"), "glibc (system default)", "system"),
    (dict(VIT_CLS_ALLOCATOR="glibc-tuned"),
     "glibc (tuned: mmap threshold 32 MiB, trim threshold 1 GiB, top pad 256 MiB)", "glibc-tuned"),
    (dict(VIT_CLS_TCMALLOC=MISSING),  # auto, tcmalloc absent
     "glibc (tuned: mmap threshold 32 MiB, trim threshold 1 GiB, top pad 256 MiB); tcmalloc is "
     "faster: apt-get install libtcmalloc-minimal4", "glibc-tuned"),
])
def test_glibc_modes_do_not_restart(env, text, kind):
  lines, err = _probe(**env)
  assert [l["phase"] for l in lines] == ["before", "after"]
  after = lines[-1]
  assert (after["text"], after["kind"], after["tcmalloc_mapped"]) == (text, kind, False)
  assert err.splitlines()[0] == f"allocator: {text}"


@pytest.mark.parametrize("env, message", [
    (dict(VIT_CLS_ALLOCATOR="jemalloc"), "VIT_CLS_ALLOCATOR='jemalloc': not an allocator mode; choose "
                                         "one of auto, tcmalloc, glibc-tuned, system (system turns "
                                         "the selection off)."),
    (dict(VIT_CLS_ALLOCATOR="tcmalloc", VIT_CLS_TCMALLOC=MISSING),
     f"VIT_CLS_ALLOCATOR=tcmalloc: VIT_CLS_TCMALLOC={MISSING} does not exist; install it "
     f"(apt-get install libtcmalloc-minimal4) or set VIT_CLS_ALLOCATOR=auto."),
])
def test_bad_settings_fail_train_py_with_one_line(env, message, tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--workdir", str(tmp_path),
                         "--config", os.path.join(REPO, "configs", "default.py")],
                        capture_output=True, text=True, env=_env(**env), timeout=60)
  assert proc.returncode == 1 and proc.stdout == ""
  assert proc.stderr.splitlines() == [f"error: {message}"], proc.stderr


def test_importing_the_library_changes_nothing():
  code = ("import os, sys, vit_cls, vit_cls.allocator, vit_cls.predict, vit_cls.visualize;"
          "assert 'tcmalloc' not in open('/proc/self/maps').read();"
          "assert not vit_cls.allocator._state['tuned'];"
          "print(os.getpid())")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().isdigit()  # one line: the pid, no allocator report
  # And `import vit_cls` alone loads no JAX (so `python -m vit_cls.predict` can choose first).
  code = "import sys, vit_cls, vit_cls.allocator; assert 'jax' not in sys.modules, 'jax'"
  assert subprocess.run([sys.executable, "-c", code], env=_env(), timeout=60).returncode == 0


# ---------------------------------------------------------------------------------------- benchmark

@pytest.mark.slow
def test_benchmark_runs_every_jax_runner_under_the_allocator_asked_for():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "benchmark.py"), "--quick",
                         "--no_infer", "--compare", "reference", "--allocator", "glibc-tuned"],
                        capture_output=True, text=True, env=_env(), timeout=240, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("allocator: glibc (tuned: ")  # the flag wins over auto
  out = json.loads(next(l for l in lines if l.startswith("JSON: "))[len("JSON: "):])
  assert out["allocator"] == lines[0][len("allocator: "):] and not out["allocators_differ"]
  assert [(r["label"], r["allocator_kind"]) for r in out["runners"]] == [
      ("vit_cls", "glibc-tuned"), ("vit_jax_ref", "glibc-tuned")]
  assert any("| allocator " in l for l in lines)  # the table's column


# timm's server is started the way benchmark.py starts it, with this Python (no torch needed: only the
# "allocator" command is asked), from a process that chose its allocator as an entry point does.
_PROXY_PROBE = f"""
import argparse, json, sys
sys.path.insert(0, {os.path.join(REPO, "benchmarks")!r})
from vit_cls import allocator
allocator.select()
import benchmark
proxy = benchmark.TimmProxy(argparse.Namespace(timm_python=sys.executable, model="testing", batch=2,
                                               resolution=16), 10)
print(json.dumps(dict(parent=allocator.kind(), timm=proxy.result["allocator_kind"])))
proxy.close()
"""


@pytest.mark.parametrize("mode, expected", [
    pytest.param("auto", "tcmalloc", marks=needs_tcmalloc), ("glibc-tuned", "glibc-tuned"),
    ("system", "system")])
def test_timm_server_gets_the_benchmarks_allocator(mode, expected):
  proc = subprocess.run([sys.executable, "-c", _PROXY_PROBE], capture_output=True, text=True,
                        env=_env(VIT_CLS_ALLOCATOR=mode), timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == dict(parent=expected, timm=expected)


# ------------------------------------------------------------------------------------- train.py runs

def _train(workdir, **env):
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "default.py"), "--workdir", str(workdir),
         "--config.model.hidden_size=32", "--config.model.mlp_dim=64", "--config.model.num_heads=2",
         "--config.model.num_layers=1", "--config.model.representation_size=32",
         "--config.batch_size=32", "--config.eval_batch_size=64", "--config.warmup_steps=2",
         "--config.shuffle_buffer=256", "--config.total_steps=5", "--config.log_every=1",
         "--config.eval_every=5", "--config.checkpoint_every=5"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [{k: v for k, v in json.loads(l).items() if k != "time"} for l in f]
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  params = checkpoint.restore_params(str(workdir))[0]
  return proc.stdout.splitlines()[0], records, params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Five digits steps under each allocator this machine has: tcmalloc (if installed), the glibc
  fallback when tcmalloc is absent, and the switch turned off."""
  settings = {"glibc-tuned": dict(VIT_CLS_TCMALLOC=MISSING), "system": dict(VIT_CLS_ALLOCATOR="system")}
  if TCMALLOC:
    settings = {"tcmalloc": {}, **settings}
  return {name: _train(tmp_path_factory.mktemp(name), **env) for name, env in settings.items()}


@pytest.mark.slow
def test_train_py_reports_its_allocator_first(runs):
  first = {name: run[0] for name, run in runs.items()}
  assert first["system"] == "allocator: glibc (system default)"
  assert first["glibc-tuned"].startswith("allocator: glibc (tuned: mmap threshold 32 MiB")
  if TCMALLOC:
    path = first["tcmalloc"][len("allocator: tcmalloc ("):-1]
    assert first["tcmalloc"].startswith("allocator: tcmalloc (/") and os.path.isfile(path)
    assert os.path.realpath(path) == os.path.realpath(TCMALLOC)


@pytest.mark.slow
def test_the_allocator_does_not_change_the_results(runs):
  import jax  # pylint: disable=g-import-not-at-top
  (_, records, params), *others = runs.values()
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5]
  assert all(np.isfinite(r["loss"]) for r in records)
  for _, other_records, other_params in others:
    assert other_records == records  # every logged loss, accuracy and gradient norm, bit for bit
    assert jax.tree.all(jax.tree.map(np.array_equal, params, other_params))
