"""timm (PyTorch, eager) ViT training and inference throughput: the PyTorch anchor of the CPU targets.

Run it with a Python that has torch and timm (a separate venv; this project's own environment has
neither, and must not need them):

    python3 -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch==2.13.0 numpy pyyaml safetensors huggingface_hub pillow
    /tmp/timmvenv/bin/pip install --no-deps timm torchvision
    /tmp/timmvenv/bin/python benchmarks/timm_benchmark.py --model Ti/16 --batch 32

Two modes:
* standalone (default): build, warm up, time, print a table line and a JSON line;
* `--serve`: a JSON-lines server on stdin/stdout, so that `benchmarks/benchmark.py --compare timm` can
  interleave timm's timed steps with the JAX models' steps in one run. On a shared, noisy CPU only ratios
  measured that way mean anything; two separate runs minutes apart do not compare.

The model is timm's `VisionTransformer` built with the same architecture fields as `vit_cls.variants`
(the table is repeated here, since this file runs without the vit_cls package or JAX), so parameter
counts match the JAX model exactly (timm's GELU is the erf form, the JAX models' the tanh form: the same
cost class). Training is forward + cross-entropy + backward + `torch.optim.AdamW` step, eager, float32.

PyPI's torchvision does not import beside the torch 2.13 CPU wheel ("operator torchvision::nms does not
exist"), and timm imports torchvision at import time for a few utilities ViT does not use; registering the
two missing operator schemas with `torch.library` before importing timm lets the import finish.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# name: (hidden, mlp, heads, layers, patch); mirrors vit_cls/variants.py.
VARIANTS = {
    "testing": (32, 64, 2, 2, 4),
    "Ti/16": (192, 768, 3, 12, 16), "S/16": (384, 1536, 6, 12, 16), "S/32": (384, 1536, 6, 12, 32),
    "B/16": (768, 3072, 12, 12, 16), "B/32": (768, 3072, 12, 12, 32), "B/8": (768, 3072, 12, 12, 8),
    "L/16": (1024, 4096, 16, 24, 16), "L/32": (1024, 4096, 16, 24, 32), "H/14": (1280, 5120, 16, 32, 14),
}


def _load_allocator():
  """vit_cls/allocator.py loaded by its path (standard library only): this file runs in a Python that
  has neither vit_cls nor JAX. None when this file was copied out of the repository."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vit_cls",
                      "allocator.py")
  if not os.path.exists(path):
    return None
  spec = importlib.util.spec_from_file_location("vit_cls_allocator", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_allocator = None  # that module, as loaded in __main__: it remembers what it did to this process


def _allocator_info() -> dict:
  allocator = _allocator or _load_allocator()
  return dict(allocator=allocator.describe() if allocator else "unknown (vit_cls/allocator.py not found)",
              allocator_kind=allocator.kind() if allocator else "unknown")


def _import_timm():
  """Imports torch and timm, working around the torchvision operator-schema mismatch (see the docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    import torchvision  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass  # no torchvision at all: timm may still import, or fail below with its own message
  except RuntimeError as e:
    if "torchvision::nms" not in str(e):
      raise
    for k in [k for k in sys.modules if k.startswith("torchvision")]:
      del sys.modules[k]
    lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=unused-variable
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_timm.lib = lib  # keep the registration alive
  import timm  # pylint: disable=g-import-not-at-top
  return torch, timm


class TimmRunner:
  """Owns one timm ViT, its AdamW optimizer and a synthetic batch; times train and inference steps."""

  def __init__(self, model: str, batch: int, resolution: int, num_classes: int, threads: int | None):
    torch, timm = _import_timm()
    from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
    self.torch = torch
    if threads:
      torch.set_num_threads(threads)
    hidden, mlp, heads, layers, patch = VARIANTS[model]
    torch.manual_seed(0)
    self.model = VisionTransformer(
        img_size=resolution, patch_size=patch, embed_dim=hidden, depth=layers, num_heads=heads,
        mlp_ratio=mlp / hidden, num_classes=num_classes, class_token=True, global_pool="token")
    self.params = sum(p.numel() for p in self.model.parameters())
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
    self.x = torch.randn(batch, 3, resolution, resolution)
    self.y = torch.randint(0, num_classes, (batch,))
    self.batch = batch
    self.info = dict(timm_version=timm.__version__, torch_version=torch.__version__,
                     torch_threads=torch.get_num_threads(), params=self.params,
                     fused_attn=bool(getattr(self.model.blocks[0].attn, "fused_attn", False)))

  def train(self, steps: int) -> list[float]:
    torch = self.torch
    self.model.train()
    times, self.cpu_times = [], []
    for _ in range(steps):
      t, c = time.perf_counter(), time.process_time()
      self.opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
      loss.backward()
      self.opt.step()
      times.append(time.perf_counter() - t)
      self.cpu_times.append(time.process_time() - c)
    return times

  def infer(self, steps: int) -> list[float]:
    torch = self.torch
    self.model.eval()
    times, self.cpu_times = [], []
    with torch.inference_mode():
      for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        self.model(self.x)
        times.append(time.perf_counter() - t)
        self.cpu_times.append(time.process_time() - c)
    return times


def serve(stream_in=sys.stdin, stream_out=sys.stdout) -> None:
  """JSON-lines protocol: {"cmd": "setup"|"train"|"infer"|"quit", ...} -> one JSON reply per line."""
  runner = None
  for line in stream_in:
    req = json.loads(line)
    try:
      if req["cmd"] == "setup":
        t = time.perf_counter()
        runner = TimmRunner(req["model"], req["batch"], req["resolution"], req["num_classes"],
                            req.get("threads"))
        # The first steps are timm's "compile": allocator warm-up, oneDNN primitive creation.
        runner.train(1)
        runner.infer(1)
        reply = dict(ok=True, setup_s=time.perf_counter() - t, **runner.info)
      elif req["cmd"] == "train":
        reply = dict(ok=True, times=runner.train(req["steps"]), cpu_times=runner.cpu_times)
      elif req["cmd"] == "infer":
        reply = dict(ok=True, times=runner.infer(req["steps"]), cpu_times=runner.cpu_times)
      elif req["cmd"] == "allocator":
        reply = dict(ok=True, **_allocator_info())
      elif req["cmd"] == "quit":
        stream_out.write(json.dumps(dict(ok=True)) + "\n")
        stream_out.flush()
        return
      else:
        reply = dict(ok=False, error=f"unknown command {req['cmd']!r}")
    except Exception as e:  # pylint: disable=broad-except
      reply = dict(ok=False, error=f"{type(e).__name__}: {e}")
    stream_out.write(json.dumps(reply) + "\n")
    stream_out.flush()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="Ti/16", choices=sorted(VARIANTS))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--serve", action="store_true", help="JSON-lines server for benchmark.py")
  a = p.parse_args(argv)
  if a.serve:
    serve()
    return
  r = TimmRunner(a.model, a.batch, a.resolution, a.num_classes, a.threads)
  r.train(a.warmup)
  r.infer(a.warmup)
  train = statistics.median(r.train(a.steps))
  infer = statistics.median(r.infer(a.steps))
  out = dict(model=a.model, batch=a.batch, resolution=a.resolution, train_img_s=a.batch / train,
             infer_img_s=a.batch / infer, **r.info, **_allocator_info())
  print(f"timm {a.model} batch {a.batch}: train {out['train_img_s']:.2f} img/s, "
        f"infer {out['infer_img_s']:.2f} img/s")
  print("JSON: " + json.dumps(out))


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  # The allocator first, before torch allocates (VIT_CLS_ALLOCATOR; benchmark.py passes its own). The
  # server's stdout is the JSON protocol: there the choice is only reported, by the "allocator" command.
  _allocator = _load_allocator()
  if _allocator and "--serve" in sys.argv[1:]:
    try:
      _allocator.select()
    except ValueError as e:
      raise SystemExit(f"error: timm server: {e}") from None
  elif _allocator:
    _allocator.setup()
  main()
