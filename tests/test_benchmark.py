"""The benchmark runs end to end on the tiny model in quick mode and prints every field it promises.

It runs as a subprocess (as a user runs it), with TensorFlow imports checked absent: the GPU machine
has no TensorFlow, and the benchmark must not need it. The vit_jax reference re-statement must compute
the same function as vit_cls (else the speed comparison compares different models).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "benchmark.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import reference_vit_jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Runs benchmark.py's main in this subprocess and fails if TensorFlow got imported along the way.
_RUNNER = ("import runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__'); "
           "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', "
           "'ml_collections')]; assert not bad, f'benchmark imported {bad}'")


def run_benchmark(*args, timeout=240):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # one CPU device, as a user runs it (conftest simulates 8 for other tests)
  proc = subprocess.run([sys.executable, "-c", _RUNNER, BENCH, *args], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("JSON: ")]
  assert len(lines) == 1, proc.stdout
  return proc.stdout, json.loads(lines[0][len("JSON: "):])


@pytest.fixture(scope="module")
def quick_run():
  return run_benchmark("--quick", "--compare", "reference")


def test_quick_mode_prints_every_field(quick_run):
  text, out = quick_run
  for column in ("compile train s", "compile infer s", "train img/s", "infer img/s", "train TFLOP/s",
                 "train MFU", "infer MFU", "HLO GFLOP/train img", "XLA train bytes",
                 "train CPU-s/step"):
    assert column in text, column
  assert "peak memory:" in text and "load average" in text
  assert out["model"] == "testing" and out["backend"] == "cpu" and out["devices"] == 1
  assert out["peak_tflops"] > 0 and out["peak_source"].startswith("measured")
  assert "analytic" in out["flops_source"] and "HLO" in out["flops_source"]
  # The CPU backend reports no memory stats: the field is there, with a reason.
  assert "peak_memory_bytes" in out and out["peak_memory_note"]
  base, ref = out["runners"]
  assert (base["label"], ref["label"], ref["impl"]) == ("vit_cls", "vit_jax_ref", "vit_jax_reference")
  for r in (base, ref):
    for key in ("compile_train_s", "compile_infer_s", "train_img_s", "infer_img_s", "train_tflops",
                "train_mfu", "infer_tflops", "infer_mfu", "hlo_train_flops_per_image",
                "compiled_train_bytes", "train_cpu_s_per_step"):
      assert isinstance(r[key], (int, float)) and r[key] > 0, (r["label"], key, r[key])
    assert r["params"] == base["params"]  # the same model
  assert base["train_speedup_vs_vit_jax_ref"] > 0 and base["infer_speedup_vs_vit_jax_ref"] > 0


def test_compile_only_with_scan_and_remat():
  text, out = run_benchmark("--quick", "--compile_only", "--scan_layers", "--remat_policy", "dots")
  assert "compiled in" in text
  (r,) = out["runners"]
  assert out["options"]["scan_layers"] and out["options"]["remat_policy"] == "dots"
  assert r["compile_train_s"] > 0 and r["compiled_train_bytes"] > 0


def test_max_batch_search_with_a_given_memory_limit():
  # Unrolled, with the check step at the predicted batch.
  _, out = run_benchmark("--quick", "--max_batch", "none", "--memory_limit_gb", "0.02")
  e = out["max_batch"]["none"]
  assert e["predicted"] > 0 and e["verified_batch"] == e["predicted"], e
  # With layer scan (estimate only): recomputing each block keeps fewer activations, more images fit.
  _, out = run_benchmark("--quick", "--scan_layers", "--max_batch", "none,block,dots", "--no_verify",
                         "--memory_limit_gb", "0.02")
  found = out["max_batch"]
  assert set(found) == {"none", "block", "dots"}
  assert found["block"]["bytes_per_image"] < found["dots"]["bytes_per_image"] < found["none"][
      "bytes_per_image"], found
  assert found["block"]["predicted"] > found["none"]["predicted"]


def test_analytic_flops_match_the_published_b16_count():
  import vit_cls  # pylint: disable=g-import-not-at-top
  fwd = benchmark.analytic_forward_flops(vit_cls.create_model("B/16", num_classes=1000), 224)
  assert abs(fwd / 2 / 17.6e9 - 1) < 0.01  # DESIGN.md: about 17.6 GFLOP multiply-adds per image


def test_variant_specs_parse():
  assert benchmark.parse_variant("scan:scan_layers=true,remat_policy=dots,devices=2") == (
      "scan", dict(scan_layers=True, remat_policy="dots", devices=2))
  assert benchmark.parse_variant("plain") == ("plain", {})
  with pytest.raises(SystemExit):
    benchmark.parse_variant("bad:scan_layers")


def test_reference_restatement_computes_the_same_function():
  import vit_cls  # pylint: disable=g-import-not-at-top
  ours = vit_cls.create_model("testing", num_classes=7)
  ref = reference_vit_jax.from_vit_cls(ours)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params = jax.jit(lambda k: ref.init(k, x, train=False))(jax.random.key(1))["params"]
  # Same tree as ours; a non-zero head so that the logits carry the whole computation.
  ours_shapes = jax.eval_shape(lambda: ours.init(jax.random.key(1), x, train=False))["params"]
  assert jax.tree.structure(ours_shapes) == jax.tree.structure(params)
  params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
  got = jax.jit(lambda p: ours.apply({"params": p}, x, train=False))(params)
  want = jax.jit(lambda p: ref.apply({"params": p}, x, train=False))(params)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  assert float(jnp.std(want)) > 1e-3


@pytest.mark.skipif(not os.path.exists("/tmp/timmvenv/bin/python"),
                    reason="needs the timm venv of benchmarks/timm_benchmark.py")
def test_timm_server_answers_the_protocol():
  proc = subprocess.run(
      ["/tmp/timmvenv/bin/python", os.path.join(ROOT, "benchmarks", "timm_benchmark.py"), "--serve"],
      input="\n".join(json.dumps(r) for r in (
          dict(cmd="setup", model="testing", batch=2, resolution=16, num_classes=10),
          dict(cmd="train", steps=1), dict(cmd="infer", steps=1), dict(cmd="quit"))) + "\n",
      capture_output=True, text=True, timeout=180)
  replies = [json.loads(l) for l in proc.stdout.splitlines()]
  assert all(r["ok"] for r in replies), replies
  # Same architecture, same parameter count as the JAX tiny model with a 10-class head.
  import vit_cls  # pylint: disable=g-import-not-at-top
  m = vit_cls.create_model("testing", num_classes=10)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
  assert replies[0]["params"] == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  assert len(replies[1]["times"]) == 1 and len(replies[2]["cpu_times"]) == 1
