"""Where one training (or inference) step spends its time, per op class, for vit_cls and its anchors.

    python benchmarks/profile_step.py --model B/16 --batch 8 --compare reference
    python benchmarks/profile_step.py --model Ti/16 --batch 32 --compare reference --variant x:fuse_qkv=false

Takes `benchmarks/benchmark.py`'s model options (`--model --batch --variant --compare reference ...`;
timm is skipped: it is not XLA). Each runner's step is compiled, warmed up, and `--profile_steps` steps
are traced with `jax.profiler` (runner after runner, so the traces do not overlap). Every XLA operation of
the trace (a thunk: one fusion, product, copy, ...) is matched to its instruction in the compiled HLO and
classed by the op_name metadata JAX writes there (the flax module path and, in vit_cls/speed.py, named
scopes): patch embedding, QKV projection, attention core, attention out projection, MLP products, MLP
element-wise (bias, GELU), layer norms, residual/position adds, head + loss, optimizer update, other.

Why this way: on a CPU there is no per-kernel hardware counter to read; the trace's thunk durations are
what XLA's runtime actually spent, and the op_name is the only link back to the model's source. Thunks
can overlap (XLA's CPU runtime runs independent thunks concurrently), so the per-class sums can add up
to more than the step's wall time; both are printed.

Output: one table per runner (milliseconds per step and share, per class; products vs other work) and a
side-by-side table of all runners, then the slowest single operations. `--json_out` writes it all.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchmark  # noqa: E402  pylint: disable=wrong-import-position

CLASSES = ("patch embedding", "QKV projection", "attention core", "attention out proj", "MLP products",
           "MLP element-wise", "layer norms", "residual/pos adds", "head + loss", "optimizer update",
           "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+)\s+([\w\-]+)\(")
_COMP = re.compile(r"^\s*%?([\w.\-]+)\s.*\{\s*$")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")


def classify(op_name: str, scoped: bool = False) -> str:
  """The op class of one HLO op_name (a '/'-joined path of jit, transforms, flax modules, named scopes).

  `scoped`: the module marks its attention core with a named scope (vit_cls/speed.py does), so what is
  left in the attention module besides the QKV scope is the out projection; without it (the reference:
  flax's attention with query/key/value/out submodules) what is left is the core.
  """
  p = op_name
  if p.startswith("o[") or ("VisionTransformer" not in p and "jvp()" not in p
                            and "transpose(jvp" not in p):
    return "optimizer update" if "jit(" in p or p.startswith("o[") else "other"
  if "/embedding" in p:
    return "patch embedding"
  if "MultiHeadDotProductAttention" in p:
    if "qkv_projection" in p or re.search(r"/(query|key|value)(/|$)", p):
      return "QKV projection"
    if "attention_core" in p:
      return "attention core"
    if scoped or re.search(r"/out(/|$)", p):
      return "attention out proj"
    return "attention core"
  if "MlpBlock" in p:
    return "MLP products" if "dot_general" in p else "MLP element-wise"
  if "LayerNorm" in p or "encoder_norm" in p or "pre_norm" in p or "fc_norm" in p:
    return "layer norms"
  if re.search(r"encoderblock_?\d*/add", p) or "posembed_input" in p:
    return "residual/pos adds"
  if "/head" in p or "pre_logits" in p or "VisionTransformer" not in p:
    return "head + loss"
  return "other"


def parse_hlo(text: str) -> dict:
  """{instruction name: (class, opcode, shape, has_dot)} for every instruction of the compiled module.

  A fusion (or call) is classed by the products inside it when it has any, else by the most frequent
  class among its instructions' op_names.
  """
  scoped = "attention_core" in text
  comps, cur = collections.defaultdict(list), None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      cur = m.group(1)
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      name, shape, opcode = m.groups()
      op = _OPNAME.search(line)
      calls = _CALLS.findall(line)
      comps[cur].append((name, shape, opcode, op.group(1) if op else "", calls))

  def inner(comp, seen=()):
    """op_names of the products and of all instructions reachable from a computation."""
    dots, alls = [], []
    for _, _, opcode, op, calls in comps.get(comp, ()):
      if op:
        (dots if opcode in ("dot", "convolution") else alls).append(op)
      for c in calls:
        if c not in seen:
          d, a = inner(c, seen + (comp,))
          dots += d
          alls += a
    return dots, alls

  out = {}
  for comp, instrs in comps.items():
    for name, shape, opcode, op, calls in instrs:
      dots, alls = ([op] if opcode in ("dot", "convolution") and op else []), ([op] if op else [])
      for c in calls:
        d, a = inner(c)
        dots += d
        alls += a
      names = dots or alls
      votes = collections.Counter(classify(n, scoped) for n in names)
      cls = votes.most_common(1)[0][0] if names else "other"
      if dots and cls == "MLP element-wise":  # a weight gradient's op_name says transpose, not dot
        cls = "MLP products"
      out[name] = (cls, opcode, shape, bool(dots))
  return out


def read_trace(trace_dir: str) -> list[dict]:
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return [dict(e, thread=threads.get((e["pid"], e.get("tid")), "")) for e in events if e.get("ph") == "X"]


def _shares_ms(spans) -> tuple[dict, float]:
  """({key: ms}, busy ms) from (start us, end us, key) spans: while k ops overlap, each gets 1/k.

  XLA's CPU runtime runs independent operations concurrently; charging each its full duration would
  count the shared time twice. The shares add up to the time anything ran (the union of the spans).
  """
  points = sorted({t for s, e, _ in spans for t in (s, e)})
  index = {t: i for i, t in enumerate(points)}
  delta = collections.defaultdict(list)  # point index -> (+1/-1, key)
  for s, e, key in spans:
    delta[index[s]].append((1, key))
    delta[index[e]].append((-1, key))
  active, shares, busy = collections.Counter(), collections.defaultdict(float), 0.0
  for i, t in enumerate(points[:-1]):
    for sign, key in delta[i]:
      active[key] += sign
      if not active[key]:
        del active[key]
    n = sum(active.values())
    if n:
      dt = (points[i + 1] - t) / 1e3
      busy += dt
      for key, c in active.items():
        shares[key] += dt * c / n
  return shares, busy


def profile_runner(r, steps: int, infer: bool, top: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  compiled = r.infer_c if infer else r.train_c
  hlo = parse_hlo(compiled.as_text())
  run = (lambda: r.infer(1)) if infer else (lambda: r.train(1))
  run()
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        run()
    wall = (time.perf_counter() - t) / steps
    events = read_trace(d)
  intervals = []
  durations = collections.defaultdict(list)  # op -> its duration (ms) in each traced step
  unmatched = 0.0
  for e in events:
    name = e["name"]
    if name not in hlo or "XLA" not in e["thread"] and "Pjrt" not in e["thread"].replace("PjRt", "Pjrt"):
      if name.startswith(("fusion", "dot", "copy", "ynn", "convolution")):
        unmatched += e["dur"] / 1e3
      continue
    durations[name].append(e["dur"] / 1e3)
    intervals.append((e["ts"], e["ts"] + e["dur"], name))
  shares, busy = _shares_ms(intervals)
  # Per op, the mean over the traced steps and the fastest of them: on a shared machine the fastest
  # occurrence of each op is the least disturbed estimate of what it costs.
  per_class, per_class_dot, per_class_min, per_class_share = (collections.defaultdict(float)
                                                              for _ in range(4))
  ops = {}
  for name, ds in durations.items():
    cls, opcode, shape, has_dot = hlo[name]
    mean, fastest = sum(ds) / steps, min(ds) if len(ds) >= steps else 0.0
    per_class[cls] += mean
    per_class_min[cls] += fastest
    per_class_share[cls] += shares[name] / steps
    if has_dot:
      per_class_dot[cls] += mean
    ops[name] = dict(name=name, ms=mean, min_ms=fastest, share_ms=shares[name] / steps, cls=cls,
                     opcode=opcode, shape=shape)
  busy /= steps
  slow = sorted(ops.values(), key=lambda o: -o["ms"])[:top]
  return dict(label=r.label, mode="infer" if infer else "train", wall_ms=wall * 1e3, busy_ms=busy,
              sum_ms=sum(per_class.values()), sum_min_ms=sum(per_class_min.values()),
              per_class_ms=dict(per_class), per_class_min_ms=dict(per_class_min),
              per_class_share_ms=dict(per_class_share),
              per_class_product_ms=dict(per_class_dot), unmatched_ms=unmatched / steps, slowest=slow,
              ops=sorted(ops.values(), key=lambda o: -o["ms"]))


def print_results(results: list[dict]) -> None:
  for res in results:
    print(f"\n{res['label']} {res['mode']}: wall {res['wall_ms']:.0f} ms/step, XLA ops busy "
          f"{res['busy_ms']:.0f} ms (union), summed {res['sum_ms']:.0f} ms"
          + (f", unmatched {res['unmatched_ms']:.0f} ms" if res["unmatched_ms"] > 1 else ""))
    for s in res["slowest"]:
      print(f"  {s['ms']:8.1f} ms (fastest {s['min_ms']:7.1f})  {s['cls']:<20} {s['opcode']:<12} "
            f"{s['shape'][:60]:<60} {s['name']}")
  labels = [r["label"] + " " + r["mode"] for r in results]
  w = max(12, *(len(l) for l in labels))
  print("\nms per step by op class: time share (overlapping ops split the time) | mean duration (of "
        "which in products) / sum of each op's fastest step:")
  print(f"{'class':<20}" + "".join(f" | {l:>{w + 14}}" for l in labels))
  for cls in CLASSES + ("(summed)", "(busy, union)", "(wall)"):
    cells = []
    for r in results:
      if cls == "(summed)":
        cells.append(f"{r['sum_ms']:.0f} / {r['sum_min_ms']:.0f}")
      elif cls == "(busy, union)":
        cells.append(f"{r['busy_ms']:.0f}")
      elif cls == "(wall)":
        cells.append(f"{r['wall_ms']:.0f}")
      else:
        v, d = r["per_class_ms"].get(cls, 0.0), r["per_class_product_ms"].get(cls, 0.0)
        cells.append(f"{r['per_class_share_ms'].get(cls, 0.0):.0f} | {v:.0f} ({d:.0f}) / "
                     f"{r['per_class_min_ms'].get(cls, 0.0):.0f}" if v else "-")
    print(f"{cls:<20}" + "".join(f" | {c:>{w + 14}}" for c in cells))


def split_args(argv=None):
  """(this script's options, the rest for benchmark.py's parser)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
  p.add_argument("--profile_steps", type=int, default=1)
  p.add_argument("--rounds", type=int, default=2,
                 help="profile each runner this many times, rotating the order; keep its fastest")
  p.add_argument("--infer", action="store_true", help="profile the inference step instead")
  p.add_argument("--top", type=int, default=12, help="slowest single operations to list per runner")
  p.add_argument("--help", "-h", action="store_true")
  return p.parse_known_args(argv)


def main(argv=None) -> list[dict]:
  own, rest = split_args(argv)
  if own.help:
    print(__doc__)
    print("benchmark.py options accepted here:")
    benchmark.parse_args(["--help"])
  a = benchmark.parse_args(rest)
  a.compare = ",".join(c for c in a.compare.split(",") if c.strip() and c.strip() != "timm")
  benchmark.set_early_environment(a)
  mesh = benchmark._mesh(a.devices)  # pylint: disable=protected-access
  runners = benchmark.make_runners(a, mesh)
  for r in runners:
    r.compile(infer=own.infer)
    for _ in range(a.warmup):
      r.infer(1) if own.infer else r.train(1)  # pylint: disable=expression-not-assigned
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  # Rounds in rotated order, the fastest (least disturbed) round of each runner kept: on a shared
  # machine one traced step can land in a busy moment of other work.
  best = {}
  for rnd in range(own.rounds):
    for r in runners[rnd % len(runners):] + runners[:rnd % len(runners)]:
      res = profile_runner(r, own.profile_steps, own.infer, own.top)
      res["round"] = rnd
      print(f"round {rnd}: {r.label} {res['wall_ms']:.0f} ms/step (load {benchmark._load_avg()})",
            flush=True)  # pylint: disable=protected-access
      if r.label not in best or res["wall_ms"] < best[r.label]["wall_ms"]:
        best[r.label] = res
  results = [best[r.label] for r in runners]
  for res in results:
    res.update(model=a.model, batch=a.batch, allocator=allocator.describe(),
               load_avg=benchmark._load_avg())  # pylint: disable=protected-access
  print_results(results)
  if a.json_out:
    with open(a.json_out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  benchmark.choose_allocator(split_args()[1])
  main()
