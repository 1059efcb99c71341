"""Inference speed of the serving exports (vit_cls.export_serving) beside jax.jit and timm's eager model.

  python benchmarks/serving_benchmark.py [--variant S/16] [--rounds 3] [--timm_python PY]

One random-weights ViT (written as an .npz, then exported in each format with the default uint8-input
preprocessing) is timed as:
  jax.jit     the same function the exports hold (`export_serving.serving_function`), jitted here;
  stablehlo   model.stablehlo, `jax.export.deserialize(...).call`;
  savedmodel  DIR/1's serving_default signature, in TensorFlow (XlaCallModule);
  onnx        model.onnx in ONNX Runtime (CPU execution provider, its default threads);
  timm        timm's VisionTransformer of the same architecture, eager PyTorch float32 inputs, run in a
              Python that has torch and timm (`--timm_python`; default /work/venvs/zoo/bin/python if it
              exists, skipped otherwise) through benchmarks/timm_benchmark.py's JSON-lines server.
Batch 1 latency (median ms per call) and batch 32 throughput (images/s from the median call). The
runners take turns, round by round, so that on a shared machine load changes hit all of them alike; only
same-run ratios mean much there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup(file=sys.stderr)

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

FORMATS = ("stablehlo", "savedmodel", "onnx")
ZOO_PYTHON = "/work/venvs/zoo/bin/python"


class TimmServer:
  """benchmarks/timm_benchmark.py --serve in the torch venv: build once per batch size, time infer."""

  def __init__(self, python: str):
    here = os.path.dirname(os.path.abspath(__file__))
    self.proc = subprocess.Popen([python, os.path.join(here, "timm_benchmark.py"), "--serve"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def ask(self, **req):
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    reply = json.loads(self.proc.stdout.readline())
    if not reply.get("ok"):
      raise RuntimeError(f"timm: {reply.get('error')}")
    return reply

  def close(self):
    self.ask(cmd="quit")
    self.proc.wait(timeout=60)


def build_runners(variant: str, batch_sizes, workdir: str) -> dict:
  """{name: {batch: callable()}} with inputs bound; every callable blocks until its result is ready."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import vit_cls  # pylint: disable=g-import-not-at-top
  from vit_cls import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from vit_cls import export_serving as es  # pylint: disable=g-import-not-at-top

  model = vit_cls.create_model(variant, num_classes=1000)
  params = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)["params"]
  npz = os.path.join(workdir, "vit.npz")
  ckpt_lib.save_npz(jax.device_get(params), npz)
  images = {b: np.random.RandomState(b).randint(0, 256, (b, 224, 224, 3)).astype(np.uint8)
            for b in batch_sizes}
  runners = {}
  export_s = {}

  loaded = ckpt_lib.load_with_info(npz)
  spec = es.serving_spec(loaded)
  fn = jax.jit(es.serving_function(loaded, spec))
  runners["jax.jit"] = {b: (lambda x=x: jax.block_until_ready(fn(x))) for b, x in images.items()}

  for fmt in FORMATS:
    out = os.path.join(workdir, fmt)
    t = time.perf_counter()
    es.export(npz, fmt, out)
    export_s[fmt] = time.perf_counter() - t
    if fmt == "stablehlo":
      with open(os.path.join(out, "model.stablehlo"), "rb") as f:
        program = jax.export.deserialize(bytearray(f.read()))
      runners[fmt] = {b: (lambda x=x: jax.block_until_ready(program.call(x)))
                      for b, x in images.items()}
    elif fmt == "savedmodel":
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      serve = tf.saved_model.load(os.path.join(out, "1")).signatures["serving_default"]
      runners[fmt] = {b: (lambda x=tf.constant(x): serve(images=x)["probabilities"].numpy())
                      for b, x in images.items()}
    else:
      import onnxruntime as ort  # pylint: disable=g-import-not-at-top
      session = ort.InferenceSession(os.path.join(out, "model.onnx"),
                                     providers=["CPUExecutionProvider"])
      runners[fmt] = {b: (lambda x=x: session.run(None, {"images": x})) for b, x in images.items()}
    print(f"exported {fmt} in {export_s[fmt]:.1f} s", file=sys.stderr)
  return runners, export_s


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="S/16")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps1", type=int, default=10, help="batch-1 calls per runner per round")
  p.add_argument("--steps32", type=int, default=2, help="batch-32 calls per runner per round")
  p.add_argument("--timm_python", default=ZOO_PYTHON if os.path.exists(ZOO_PYTHON) else "",
                 help="a Python with torch and timm ('' skips timm)")
  p.add_argument("--json", default="", help="also write the results here")
  a = p.parse_args(argv)
  steps = {1: a.steps1, 32: a.steps32}
  with tempfile.TemporaryDirectory(prefix="serving_benchmark_") as workdir:
    runners, export_s = build_runners(a.variant, steps, workdir)
    timm, timm_info = {}, None
    if a.timm_python:  # one server per batch size: timm's runner fixes its input at setup
      for b in steps:
        timm[b] = TimmServer(a.timm_python)
        info = timm[b].ask(cmd="setup", model=a.variant, batch=b, resolution=224, num_classes=1000)
      timm_info = {k: info[k] for k in ("timm_version", "torch_version", "torch_threads", "params")}
    times = {name: {b: [] for b in steps} for name in list(runners) + (["timm"] if timm else [])}
    for name, by_batch in runners.items():  # compile / warm up
      for b, run in by_batch.items():
        run()
        run()
    for _ in range(a.rounds):
      for b, n in steps.items():
        for name, by_batch in runners.items():
          for _ in range(n):
            t = time.perf_counter()
            by_batch[b]()
            times[name][b].append(time.perf_counter() - t)
        if timm:
          times["timm"][b] += timm[b].ask(cmd="infer", steps=n)["times"]
    for server in timm.values():
      server.close()
  rows = {name: {"batch1_ms": 1000 * statistics.median(t[1]),
                 "batch32_img_s": 32 / statistics.median(t[32]),
                 "export_s": export_s.get(name)} for name, t in times.items()}
  print(f"{a.variant} @ 224, float32, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end")
  print(f"{'runner':<12} {'batch 1 ms':>11} {'batch 32 img/s':>15}")
  for name, r in rows.items():
    print(f"{name:<12} {r['batch1_ms']:>11.1f} {r['batch32_img_s']:>15.1f}")
  result = dict(variant=a.variant, rows=rows, rounds=a.rounds, steps=steps,
                timm=timm_info)
  print("JSON: " + json.dumps(result))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
