"""One process of a real multi-process JAX job on CPU, for tests/test_multihost.py.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py SPEC.json

Every process runs the same list of jobs, in order, as train.py's users would run it on every host: the
runtime starts through `sharding.maybe_initialize_distributed()` (the environment above), the mesh spans
both processes' devices, each process reads its own part of the data. Launching the processes once and
running several jobs in them keeps the test to one start-up of JAX, TensorFlow and the coordinator.

SPEC.json: {"config": {dotted.field: value}, "jobs": [{"kind": "train" | "layout", "name": str,
"workdir": str, "config": {overrides}, "fsdp_min_size": int | null}]}. Each job prints
"JOB <name> start" and "JOB <name> done in <seconds> s" on stdout; a "layout" job writes the fsdp shard
shapes of its state to `workdir/layout-<process>.json`.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_cls import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_config(overrides: dict):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def main(spec_path: str) -> None:
  if os.environ.get("WORKER_HANG_DUMP_S"):  # a hung collective shows its Python stacks before the kill
    import faulthandler  # pylint: disable=g-import-not-at-top
    faulthandler.dump_traceback_later(float(os.environ["WORKER_HANG_DUMP_S"]), exit=False)
  assert sharding.maybe_initialize_distributed(), "expected a multi-process environment"
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("WORKER_COMPILE_CACHE"):  # jobs with the same step program compile it once
    jax.config.update("jax_compilation_cache_dir", os.environ["WORKER_COMPILE_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from vit_cls import optim, train  # pylint: disable=g-import-not-at-top
  with open(spec_path) as f:
    spec = json.load(f)
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local, "
        f"{jax.device_count()} global devices", flush=True)
  default_min_size = sharding.FSDP_MIN_SIZE
  for job in spec["jobs"]:
    config = make_config({**spec["config"], **job.get("config", {})})
    sharding.FSDP_MIN_SIZE = job.get("fsdp_min_size") or default_min_size
    print(f"JOB {job['name']} start", flush=True)
    t0 = time.time()
    if job["kind"] == "train":
      train.train_and_evaluate(config, job["workdir"])
    elif job["kind"] == "layout":
      mesh = sharding.create_mesh()
      model = train.create_model(config, 10)
      tx, _ = optim.create_optimizer(config)
      state, _ = train.init_state(model, tx, config, mesh)
      flat = {jax.tree_util.keystr(path): {
                  "shape": list(x.shape),
                  "local_shards": [list(s.data.shape) for s in x.addressable_shards],
                  "spec": [s if s is None or isinstance(s, str) else list(s) for s in x.sharding.spec]}
              for path, x in jax.tree_util.tree_leaves_with_path(state)}
      os.makedirs(job["workdir"], exist_ok=True)
      with open(os.path.join(job["workdir"], f"layout-{jax.process_index()}.json"), "w") as f:
        json.dump(flat, f)
    else:
      raise ValueError(f"unknown job kind {job['kind']!r}")
    print(f"JOB {job['name']} done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
