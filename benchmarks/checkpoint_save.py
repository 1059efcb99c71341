"""What an asynchronous checkpoint save saves the training loop, per checkpoint, for a given model.

Times `vit_cls.train.Checkpoints.save` (the training loop's own save: orbax, the JSON meta, the manifest
of sizes and checksums) of a full training state (parameters + AdamW moments, random values so that
nothing compresses away) into a local workdir, both ways, in alternating rounds:

* blocking (`config.async_checkpoints=False`): the loop waits for the whole save;
* asynchronous (the default): the loop waits only until the state is in host memory; the rest is
  written in a background thread (`Checkpoints.finish` then waits for it, timed separately).

The difference of the two waits is what the loop gains per checkpoint. On a CPU-only machine the
background write shares the cores with the training step, so the gain in wall time is smaller than that
difference; on an accelerator the step runs on the device and the write on the host.

    python benchmarks/checkpoint_save.py [--model B/16] [--rounds 3] [--dir /tmp/ckpt_bench]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_cls import allocator  # noqa: E402

if __name__ == "__main__":
  allocator.setup()  # before JAX allocates anything; prints the choice

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain_imagenet  # noqa: E402
from vit_cls import optim  # noqa: E402
from vit_cls import train  # noqa: E402


def make_state(model_name: str) -> train.TrainState:
  """The pre-training recipe's state for `model_name` at 224 (MLP head, 1000 classes, AdamW)."""
  config = pretrain_imagenet.get_config(f"{model_name},imagenet2012")
  config.model.dtype = "float32"
  model = train.create_model(config, 1000)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                      train=False)["params"])()
  tx, _ = optim.create_optimizer(config)
  rng = np.random.default_rng(0)
  # The moments of a trained state are dense: random values, not the zeros of tx.init.
  opt_state = jax.tree.map(
      lambda x: (jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype) * 1e-3)
                 if x.ndim and jnp.issubdtype(x.dtype, jnp.floating) else x), tx.init(params))
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_save(state, workdir: str, step: int, asynchronous: bool) -> tuple[float, float]:
  """(seconds until Checkpoints.save returns, seconds until the save is committed)."""
  config = ml_collections.ConfigDict(dict(keep_checkpoints=2, async_checkpoints=asynchronous))
  mngr = train.Checkpoints(workdir, config)
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  mngr.save(state, {"model": {}, "note": "benchmark"})
  returned = time.perf_counter() - t0
  mngr.finish()
  committed = time.perf_counter() - t0
  mngr.close()
  return returned, committed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="B/16")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
  args = parser.parse_args()

  state = make_state(args.model)
  size = nbytes(state)
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
  results = {"blocking": [], "async_return": [], "async_commit": []}
  step = 0
  for r in range(args.rounds + 1):  # round 0 warms up (first orbax use, page cache)
    order = (False, True) if r % 2 else (True, False)
    for asynchronous in order:
      step += 1
      workdir = os.path.join(root, "async" if asynchronous else "blocking")
      returned, committed = time_save(state, workdir, step, asynchronous)
      if r == 0:
        continue
      if asynchronous:
        results["async_return"].append(returned)
        results["async_commit"].append(committed)
      else:
        results["blocking"].append(committed)
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)

  med = {k: statistics.median(v) for k, v in results.items()}
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), "unknown")
  record = {"model": args.model, "state_bytes": size, "rounds": args.rounds, "cpu": cpu,
            "cores": os.cpu_count(), "allocator": allocator.describe(),
            "load_1min": os.getloadavg()[0], "seconds": results, "median": med,
            "saved_per_checkpoint_s": med["blocking"] - med["async_return"]}
  print(json.dumps(record))
  print(f"{args.model} training state {size / 2**30:.2f} GiB, {cpu}, {os.cpu_count()} cores, "
        f"{allocator.describe()}, load {record['load_1min']:.1f}")
  print(f"  blocking save                 {med['blocking']:.2f} s  (median of {args.rounds})")
  print(f"  asynchronous: the loop waits  {med['async_return']:.2f} s")
  print(f"  asynchronous: committed after {med['async_commit']:.2f} s (in the background)")
  print(f"  saved per checkpoint          {record['saved_per_checkpoint_s']:.2f} s")


if __name__ == "__main__":
  main()
