"""Attention alone, compiled for one TPU chip: XLA's attention against jax's Pallas flash and splash kernels.

What it compiles: `jax.value_and_grad` of `sum(attention(q, k, v) * w)` (a fixed random `w`, so that the
backward pass is not a constant), bfloat16, [batch, tokens, heads, head_dim] inputs, for the first chip
of a TPU topology's compile-only devices (libtpu; no TPU needed). Paths:

* `explicit`: `speed.attention(impl="einsum")`, the explicit softmax(q k^T) v product that
  `attention_impl="fused"` compiles to on a TPU before this comparison (XLA fuses it as it likes).
* `xla`: `jax.nn.dot_product_attention(implementation="xla")` (the `xla` option).
* `flash`, `splash`: `speed.pallas_attention`, the tokens padded to a multiple of 128 and the padding
  masked (segment ids / a static mask).

Prints, per shape and path: XLA's memory analysis (temporaries, arguments, outputs), cost analysis (FLOPs,
bytes accessed) and the compile time. **Compiler figures, not measured speeds.** Pallas kernels are
custom calls that XLA's cost analysis does not look into: their FLOPs and bytes are missing from the
totals (the script says when a program holds such calls), so FLOPs are compared only between `explicit`
and `xla`.

  /work/venvs/aot/bin/python benchmarks/tpu_attention_compile.py --target=v5e:2x2 --json=/tmp/a.json
  ... --shapes=B16:197 --impls=explicit,flash   # one cell (time a compile first: 2 shared cores)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_cls import aot  # pylint: disable=g-import-not-at-top

# name: (heads, head_dim, description)
MODELS = {"B16": (12, 64, "ViT-B/16"), "L16": (16, 64, "ViT-L/16"), "L14": (16, 64, "DINOv2 L/14")}
# DINOv2 L/14 at 518 px: 1,369 patches + the class token = 1,370 tokens; 1,374 with its 4 registers.
DEFAULT_SHAPES = "B16:197,B16:577,L16:577,L14:1370,L14:1374"
IMPLS = ("explicit", "xla", "flash", "splash")


def build(impl: str, causal: bool = False):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_cls import speed  # pylint: disable=g-import-not-at-top

  def attn(q, k, v):
    if impl == "explicit":
      return speed.attention(q, k, v, impl="einsum", causal=causal)[0]
    if impl == "xla":
      return speed.attention(q, k, v, impl="xla", causal=causal)[0]
    return speed.pallas_attention(q, k, v, kernel=impl, causal=causal)

  def loss(q, k, v, w):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) * w)

  return jax.value_and_grad(loss, argnums=(0, 1, 2))


def compile_one(device, impl: str, batch: int, tokens: int, heads: int, head_dim: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sharding = jax.sharding.SingleDeviceSharding(device)
  qkv = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.bfloat16, sharding=sharding)
  w = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.float32, sharding=sharding)
  start = time.perf_counter()
  try:
    lowered = jax.jit(build(impl)).lower(qkv, qkv, qkv, w)
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": " ".join(str(e).split())[:300], "compile_s": time.perf_counter() - start}
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  text = compiled.as_text()
  return {
      "temp_bytes": mem.temp_size_in_bytes, "argument_bytes": mem.argument_size_in_bytes,
      "output_bytes": mem.output_size_in_bytes,
      "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "pallas_calls": len(re.findall(r'custom_call_target="tpu_custom_call"', text)),
      "compile_s": round(seconds, 1),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--target", default="v5e:2x2", help="a TPU topology (vit_cls.aot names); its first chip")
  p.add_argument("--batch", type=int, default=32, help="examples per chip")
  p.add_argument("--shapes", default=DEFAULT_SHAPES, help="MODEL:TOKENS,... (models: %s)" % ",".join(MODELS))
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  target = aot.parse_target(args.target)
  aot.check_installed(target)
  aot.prepare_environment(target)
  device = aot.target_devices(target)[0]
  rows = []
  for shape in args.shapes.split(","):
    name, tokens = shape.split(":")
    heads, head_dim, desc = MODELS[name]
    for impl in args.impls.split(","):
      r = compile_one(device, impl, args.batch, int(tokens), heads, head_dim)
      r.update(target=args.target, chip=str(device.device_kind), model=desc, tokens=int(tokens),
               heads=heads, head_dim=head_dim, batch=args.batch, impl=impl)
      rows.append(r)
      if "error" in r:
        print(f"{args.target} {desc:28s} {tokens:>5s} {impl:8s} ERROR {r['error']}", flush=True)
      else:
        mib = lambda n: f"{n / 2**20:8.1f} MiB"
        flops = "n/a (Pallas)" if r["pallas_calls"] else f"{r['flops'] / 1e9:8.1f} G"
        print(f"{args.target} {desc:28s} {tokens:>5s} {impl:8s} temp {mib(r['temp_bytes'])} "
              f"args {mib(r['argument_bytes'])} out {mib(r['output_bytes'])} FLOPs {flops:>12s} "
              f"bytes {r['bytes_accessed'] / 2**20:9.1f} MiB pallas_calls {r['pallas_calls']} "
              f"compile {r['compile_s']} s", flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
