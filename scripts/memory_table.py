"""What fits where: per-device memory of the real training step, from XLA's own memory analysis.

    python scripts/memory_table.py                                   # the table in docs/memory.md
    python scripts/memory_table.py --models=L/16 --resolutions=384 --batches=32 --json=/tmp/l16.json
    python scripts/memory_table.py --platform=gpu --devices=1 --fsdp=false   # a real accelerator
    python scripts/memory_table.py --from_json=a.json,b.json         # print a table from saved runs
    python scripts/memory_table.py --target=h100:1 --fsdp_target=h100:4 --json=docs/memory_gpu.json
    python scripts/memory_table.py --target=v5e:1x1 --fsdp_target=v5e:2x2 --json=docs/memory_tpu.json

For each model x resolution x per-device batch x remat x fsdp, the train step of `vit_cls.train` (AdamW
with global-norm clipping, float32 parameters and optimizer state, bfloat16 matmuls by default) is
lowered on abstract inputs (ShapeDtypeStructs: nothing is allocated, no data is read) for a data mesh of
--devices devices, compiled, and `compiled.memory_analysis()` gives what one device needs: its
arguments (its part of the state and of the batch) + outputs + temporaries - what donation lets the
outputs reuse. Nothing is extrapolated: every cell is one compile at that batch size.

With --platform=cpu (the default) the devices are simulated (`--xla_force_host_platform_device_count`),
so fsdp over 8 devices can be measured on any machine. The numbers are then the CPU compiler's buffer
assignment of the same program: GPU and TPU compilers fuse more and, on GPU, `attention_impl="fused"`
runs cuDNN flash attention with no [tokens x tokens] buffers, so the CPU numbers overstate activation
memory (about 2x against the H200 compiler, docs/memory.md). --platform=gpu or tpu measures the real
compiler on the devices present (replicated data parallelism needs only one: its per-device memory does
not depend on the device count).

--target=CHIP:TOPOLOGY compiles each cell for a TPU slice or GPU node this machine does not have, with
that chip's own compiler (libtpu, or XLA's GPU compiler with the CUDA plugin), through
`vit_cls.aot.check_fits`: the step is train.py's own (`build_steps`) for configs/pretrain_imagenet.py's
recipe (dropout 0.1, AdamW, clipping, bfloat16) at the cell's model, resolution, remat and fsdp, with a
global batch of batch-per-chip x chips. Replicated cells compile on --target (one chip: no gradient
collectives; on several GPUs XLA schedules the weight-gradient work late, before the combined gradient
all-reduces, and the temporaries grow: B/16 224 x16 remat block 0.29 GiB on h100:1, 1.07 on h100:4, so
pass the fsdp target's chip count to compare the two), fsdp cells on --fsdp_target (several chips; fsdp
shards the state over all of them). Each record keeps per-chip bytes,
the compiled FLOPs (XLA's cost analysis; on GPU that of the lowered program, see vit_cls/aot.py) and the
analytic matmul FLOPs, with attention's share of the latter. A compile gives memory and FLOPs, never a
speed. A cell the TPU compiler refuses for lack of HBM is recorded with what the refusal says it needs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Memory per chip (GiB) of the accelerators a cell is checked against, smallest first.
ACCELERATORS = {"16G": 16, "32G": 32, "80G": 80, "95G": 95, "141G": 141}
ACCELERATOR_NOTE = ("16G: TPU v5e; 32G: TPU v4, v6e, V100/A100-40G (40); 80G: A100/H100; 95G: TPU v5p; "
                    "141G: H200")


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="B/16,L/16,H/14")
  p.add_argument("--resolutions", default="224,384",
                 help="images sizes; a size the patch does not divide is rounded down to a multiple "
                      "(H/14: 384 -> 378)")
  p.add_argument("--batches", default="16,64", help="per-device batch sizes")
  p.add_argument("--remat", default="none,block", help="remat policies (none, block, dots)")
  p.add_argument("--fsdp", default="false,true")
  p.add_argument("--devices", type=int, default=8, help="size of the data mesh; fsdp divides by it")
  p.add_argument("--dtype", default="bfloat16", help="matmul dtype (parameters stay float32)")
  p.add_argument("--attention", default="fused", help="attention_impl: fused or einsum")
  p.add_argument("--scan_layers", action="store_true", help="nn.scan over blocks (faster compiles)")
  p.add_argument("--usable", type=float, default=0.9, help="fraction of a chip's memory a step may use")
  p.add_argument("--platform", default="cpu", help="cpu (simulated devices), gpu or tpu (real ones)")
  p.add_argument("--json", default=None, help="also write the raw numbers here (after every compile)")
  p.add_argument("--from_json", default=None, help="comma-separated JSON files: print their table")
  p.add_argument("--grid", action="store_true",
                 help="with --from_json: a row for every --models x --resolutions x --batches cell "
                      "(resolutions rounded up to a multiple of the patch: H/14 384 -> 392)")
  p.add_argument("--target", default=None,
                 help="compile for this TPU slice or GPU node (vit_cls.aot names: v5e:1x1, v5e:2x2, "
                      "h100:1, h100:4, ...) with its own compiler instead of --platform's devices")
  p.add_argument("--fsdp_target", default=None,
                 help="the slice or node for fsdp cells (default: --target); fsdp shards over its chips")
  p.add_argument("--cells", default=None,
                 help="with --target: only these cells, ';'-separated MODEL/RES/BATCH/REMAT/FSDP, e.g. "
                      "'B/16/224/16/none/false;H/14/392/64/block/true' (in this order)")
  return p.parse_args()


def _setup_jax(args):
  if args.platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
  sys.path.insert(0, _REPO)
  try:
    import ml_collections  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    _stand_ins_for_data_modules()


def _setup_jax_imports_only():
  """--target: vit_cls.aot keeps the process on the CPU itself; only the stand-ins may be needed."""
  sys.path.insert(0, _REPO)
  try:
    import ml_collections  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    _stand_ins_for_data_modules()


def _stand_ins_for_data_modules():
  """vit_cls.train imports the input pipeline (TensorFlow) and ml_collections at module level, but the
  step needs neither. On accelerator hosts without them (JAX-only images), empty stand-ins let the step
  be imported and measured; nothing here reads data or configs."""
  import types  # pylint: disable=g-import-not-at-top
  for name in ("ml_collections", "tensorflow", "tensorflow_datasets"):
    try:
      __import__(name)
    except ImportError:
      sys.modules[name] = types.ModuleType(name)
  try:
    __import__("vit_cls.input_pipeline")
  except Exception:  # pylint: disable=broad-except
    stub = types.ModuleType("vit_cls.input_pipeline")
    stub.DatasetInfo = object
    sys.modules["vit_cls.input_pipeline"] = stub


class _Config(dict):
  """The few config fields the step and the optimizer read, as attributes (no ml_collections needed)."""
  __getattr__ = dict.__getitem__


def _train_config() -> _Config:
  """The pre-training recipe's optimizer (configs/pretrain_imagenet.py): AdamW, clipping, decay."""
  return _Config(optimizer="adamw", learning_rate=1e-3, weight_decay=0.1, b1=0.9, b2=0.999,
                 momentum=0.9, grad_clip_norm=1.0, warmup_steps=100, decay_type="cosine",
                 total_steps=10_000, seed=0, accum_steps=1, label_smoothing=0.0)


def measure(model_name, resolution, remat, fsdp, per_device_batch, args, mesh) -> dict:
  """Compiles the train step for one setting on abstract inputs; returns its per-device bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_cls import optim, sharding, train, variants  # pylint: disable=g-import-not-at-top
  from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top

  num_classes = 1000
  fields = variants.variant(model_name)
  patch = fields["patch_size"][0]
  resolution = resolution // patch * patch
  model = VisionTransformer(num_classes=num_classes, representation_size=fields["hidden_size"],
                            dtype=args.dtype, attention_impl=args.attention, remat_policy=remat,
                            scan_layers=args.scan_layers, **fields)
  config = _train_config()
  tx, schedule = optim.create_optimizer(config)

  def init():
    params = model.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)),
                        train=False)["params"]
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  # Exactly what train.py builds: the state layout of init_state, the step of train_and_evaluate.
  abstract = jax.eval_shape(init)
  state_sh = sharding.state_shardings(abstract, mesh, fsdp=fsdp)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_sh)
  n = mesh.shape[sharding.DATA_AXIS]
  batch_sh = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((per_device_batch * n, resolution, resolution, 3),
                                         jnp.float32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((per_device_batch * n,), jnp.int32, sharding=batch_sh)}
  step_model = sharding.BatchShardedModel(model, mesh) if fsdp else model
  step = jax.jit(functools.partial(train.train_step, model=step_model, tx=tx, schedule=schedule,
                                   config=config, num_classes=num_classes),
                 in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  stats = step.lower(abstract, batch).compile().memory_analysis()
  seconds = time.perf_counter() - t0
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)
  return {"model": model_name, "resolution": resolution, "remat": remat, "fsdp": fsdp,
          "devices": n, "per_device_batch": per_device_batch, "backend": jax.default_backend(),
          "params": sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
          "state_bytes_per_device": sharding.bytes_per_device(abstract),
          "argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
          "alias_bytes": stats.alias_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
          "peak_bytes": peak, "compile_s": round(seconds, 1)}


def target_config(model_name: str, resolution: int, remat: str, fsdp: bool, per_chip_batch: int,
                  chips: int):
  """configs/pretrain_imagenet.py's recipe for one cell (as train.py would run it)."""
  sys.path.insert(0, _REPO)
  from configs import pretrain_imagenet  # pylint: disable=g-import-not-at-top
  config = pretrain_imagenet.get_config(f"{model_name},imagenet2012")
  patch = config.model.patch_size[0]
  config.image_size = resolution // patch * patch
  config.model.remat_policy = remat
  config.fsdp = fsdp
  config.batch_size = config.eval_batch_size = per_chip_batch * chips
  return config


def attention_share(model_name: str, resolution: int) -> float:
  """Attention's (q k^T and p v) share of the analytic forward matmul FLOPs (vit_cls.aot's count)."""
  sys.path.insert(0, _REPO)
  from vit_cls import aot, variants  # pylint: disable=g-import-not-at-top
  f = dict(variants.variant(model_name), num_classes=1000)
  f["representation_size"] = f["hidden_size"]
  patch = f["patch_size"][0]
  res = resolution // patch * patch
  tokens = (res // patch) ** 2 + 1
  attention = 2.0 * f["num_layers"] * 2 * tokens * tokens * f["hidden_size"]
  return attention / aot.analytic_forward_flops(f, res)


def measure_target(model_name, resolution, remat, fsdp, per_chip_batch, target) -> dict:
  """One cell compiled by the target's own compiler (vit_cls.aot.check_fits): its per-chip record."""
  from vit_cls import aot  # pylint: disable=g-import-not-at-top
  config = target_config(model_name, resolution, remat, fsdp, per_chip_batch, target.num_chips)
  return record_from_report(aot.check_fits(config, target), model_name, per_chip_batch)


def record_from_report(r: dict, model_name: str, per_chip_batch: int) -> dict:
  """A table record from vit_cls.aot's report (check_fits, or `python -m vit_cls.aot --json`)."""
  t = r["train"]
  return {"model": model_name, "resolution": r["image_size"], "remat": r["remat_policy"],
          "fsdp": r["fsdp"], "devices": r["chips"], "per_device_batch": per_chip_batch,
          "global_batch": r["batch_size"], "target": r["target"], "chip_kind": r["chip_kind"],
          "platform": r["platform"], "params": r["params"],
          "state_bytes_per_device": r["state_bytes_per_chip"],
          "compiled": t.get("compiled", True), "error": t.get("error"),
          "argument_bytes": t["argument_bytes"], "output_bytes": t["output_bytes"],
          "alias_bytes": t["alias_bytes"], "temp_bytes": t["temp_bytes"], "peak_bytes": t["per_chip_bytes"],
          "chip_memory_bytes": r["chip_memory_bytes"], "usable_fraction": r["usable_fraction"],
          "fits": r["fits"], "flops_per_chip": t["flops_per_chip"],
          "flops_source": t.get("flops_source"),
          "analytic_flops_per_chip": t["analytic_flops_per_chip"], "flops_ratio": t["flops_ratio"],
          "attention_share_of_analytic": round(attention_share(model_name, r["image_size"]), 4),
          "attention_kernel": (t.get("attention") or {}).get("kernel"),
          "compile_s": t["compile_seconds"]}


def _compiler_label(platform: str, target_name: str) -> str:
  return f"{target_name.split(':')[0]} compiler" if platform == "tpu" else "GPU compiler"


def run_targets(args) -> None:
  """--target: every cell compiled for a real TPU or GPU target, saved after each compile."""
  sys.path.insert(0, _REPO)
  from vit_cls import aot  # pylint: disable=g-import-not-at-top
  targets = {False: aot.parse_target(args.target),
             True: aot.parse_target(args.fsdp_target or args.target)}
  for t in targets.values():
    aot.check_installed(t)
  aot.prepare_environment(targets[False])
  import jax  # pylint: disable=g-import-not-at-top
  meta = {"args": vars(args), "backend": targets[False].platform, "jax": jax.__version__,
          "note": "memory and FLOPs from the target's compiler (a compile, not a measured speed)"}
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    meta["libtpu"] = metadata.version("libtpu") if targets[False].platform == "tpu" else None
    meta["jaxlib"] = metadata.version("jaxlib")
  except Exception:  # pylint: disable=broad-except
    pass
  truthy = ("1", "true", "yes")
  if args.cells:
    cells = []
    for c in args.cells.split(";"):
      *model, res, batch, remat, fsdp = c.strip().split("/")
      cells.append(("/".join(model), int(res), int(batch), remat, fsdp.lower() in truthy))
  else:
    cells = [(m, int(res), int(b), remat, f.strip().lower() in truthy)
             for m in args.models.split(",") for res in args.resolutions.split(",")
             for b in args.batches.split(",") for remat in args.remat.split(",")
             for f in args.fsdp.split(",")]
  records = []
  if args.json and os.path.exists(args.json):  # resume: keep what an earlier run measured
    with open(args.json) as f:
      records = json.load(f)["records"]
  done = {(r["model"], r["resolution"], r["per_device_batch"], r["remat"], r["fsdp"], r["target"])
          for r in records}
  for model_name, res, batch, remat, fsdp in cells:
    target = targets[fsdp]
    patch = int(model_name.split("/")[1])
    if (model_name, res // patch * patch, batch, remat, fsdp, target.name) in done:
      continue
    t0 = time.perf_counter()
    r = measure_target(model_name, res, remat, fsdp, batch, target)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    records.append(r)
    print(f"# {target.name} {model_name} {r['resolution']} batch/chip {batch} remat={remat} fsdp={fsdp}: "
          f"{r['peak_bytes'] / 2**30:.2f} GiB{'' if r['compiled'] else ' (refused: too large)'}, "
          f"FLOPs x{r['flops_ratio'] or 0:.3f} of analytic (compile {r['compile_s']} s, "
          f"wall {r['wall_s']} s)", file=sys.stderr, flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({**meta, "records": records}, f, indent=1)
  print(target_table(records))


# Chips each column is checked against, by the platform whose compiler made it (vit_cls/chips.py's
# memory: 16, 32, 32, 95 GiB; H100 79.1 GiB (80 GB), H200 139.8 GiB (141 GB)).
TPU_CHIPS = (("v5e", "v5e"), ("v4", "v4"), ("v6e", "v6e"), ("v5p", "v5p"))
GPU_CHIPS = (("H100", "h100"), ("H200", "h200"))


def _fits_on(r: dict) -> str:
  """The chips of the record's platform whose memory (times the compiler's usable fraction) holds it.
  TPU records of one generation's compiler are checked against every TPU's memory."""
  sys.path.insert(0, _REPO)
  from vit_cls import chips as chips_lib  # pylint: disable=g-import-not-at-top
  chips = TPU_CHIPS if r.get("platform") == "tpu" else GPU_CHIPS
  usable = r.get("usable_fraction", 0.9)
  ok = [label for label, name in chips
        if r["peak_bytes"] <= chips_lib.chip(name).memory_bytes * usable]
  return ", ".join(ok) if ok else "none"


def target_table(records: list[dict], grid=()) -> str:
  """Rows: model x resolution x per-chip batch (those of `grid` too, measured or not). Columns: target x
  fsdp x remat. Cells: GiB per chip, the chips that hold it, and the compiled FLOPs over the analytic."""
  cells, columns, rows = {}, set(), set(grid)
  for r in records:
    col = (r.get("platform") != "tpu", r["target"].split(":")[0], r["fsdp"], r["remat"] != "none",
           r["remat"], r["target"])
    row = (r["model"], r["resolution"], r["per_device_batch"])
    cells[row, col] = r
    columns.add(col)
    rows.add(row)
  columns = sorted(columns)
  order = {m: i for i, m in enumerate(("Ti/16", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14"))}
  rows = sorted(rows, key=lambda r: (order.get(r[0], 99), r[0], r[1], r[2]))
  head = ["model", "res", "batch/chip"] + [
      f"{'fsdp/' + str(cells_target.split(':')[1]) if fsdp else 'replicated'}"
      f"{' + remat ' + remat if remat != 'none' else ''} ({cells_target})"
      for _, _, fsdp, _, remat, cells_target in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    out = [row[0], str(row[1]), str(row[2])]
    for col in columns:
      r = cells.get((row, col))
      if r is None:
        out.append("not measured")
      elif not r.get("compiled", True):
        out.append(f"refused: needs {r['peak_bytes'] / 2**30:.1f} ({_fits_on(r)})")
      else:
        out.append(f"{r['peak_bytes'] / 2**30:.1f} ({_fits_on(r)}) x{r['flops_ratio']:.2f}")
    lines.append("| " + " | ".join(out) + " |")
  return "\n".join(lines)


def smallest_fit(peak_bytes: float, usable: float) -> str:
  for name, gib in ACCELERATORS.items():
    if peak_bytes <= gib * 2**30 * usable:
      return name
  return ">141G"


def table(records: list[dict], usable: float) -> str:
  """Rows: model x resolution x per-device batch. Columns: compiler x fsdp x remat. Cells: GiB per
  device, and the smallest chip class whose memory (times `usable`) holds it."""
  def column(r):
    devices = f"fsdp/{r['devices']}" if r["fsdp"] else "replicated"
    return (r.get("backend", "cpu"), r["fsdp"], r["remat"] != "none", devices, r["remat"])

  cells, columns, rows = {}, set(), set()
  for r in records:
    col, row = column(r), (r["model"], r["resolution"], r["per_device_batch"])
    cells[row, col] = r["peak_bytes"]  # a later measurement of the same cell replaces an earlier one
    columns.add(col)
    rows.add(row)
  columns = sorted(columns, key=lambda c: (c[0] != "cpu", c[1], c[2]))
  order = {m: i for i, m in enumerate(("Ti/16", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14"))}
  rows = sorted(rows, key=lambda r: (order.get(r[0], 99), r[0], r[1], r[2]))
  head = ["model", "res", "batch/device"] + [
      f"{devices}{' + remat ' + remat if remat != 'none' else ''} ({backend})"
      for backend, _, _, devices, remat in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    out = [row[0], str(row[1]), str(row[2])]
    for col in columns:
      peak = cells.get((row, col))
      out.append("" if peak is None else f"{peak / 2**30:.1f} ({smallest_fit(peak, usable)})")
    lines.append("| " + " | ".join(out) + " |")
  return "\n".join(lines)


def note(meta: list[dict], usable: float) -> str:
  compilers = sorted({f"{m['backend']} (jax {m['jax']})" for m in meta})
  a = meta[0]["args"]
  return (f"GiB per device for one training step: AdamW, float32 parameters and optimizer state, "
          f"{a['dtype']} matmuls, attention_impl={a['attention']}; measured with the "
          f"{' and '.join(compilers)} compiler. In brackets: the smallest chip class that holds it "
          f"within {usable:.0%} of its memory ({ACCELERATOR_NOTE}).")


def main():
  args = _parse()
  if args.from_json:
    records, meta = [], []
    for path in args.from_json.split(","):
      with open(path) as f:
        data = json.load(f)
      records += [dict(r, backend=r.get("backend", data["backend"])) for r in data["records"]]
      meta.append(data)
    targeted = [r for r in records if "target" in r]
    if targeted:  # --target runs: their own table (per chip, checked against each chip's memory)
      grid = []
      if args.grid:  # every row of --models x --resolutions x --batches, "not measured" where so
        for m in args.models.split(","):
          patch = int(m.split("/")[1])
          grid += [(m, -(-int(res) // patch) * patch, int(b)) for res in args.resolutions.split(",")
                   for b in args.batches.split(",")]
      print(target_table(targeted, grid))
    rest = [r for r in records if "target" not in r]
    if rest:
      print(note([m for m in meta if not any("target" in r for r in m["records"])], args.usable)
            + "\n\n" + table(rest, args.usable))
    return
  if args.target:
    _setup_jax_imports_only()
    run_targets(args)
    return
  _setup_jax(args)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from vit_cls import sharding  # pylint: disable=g-import-not-at-top

  devices = jax.devices()[:args.devices]
  if len(devices) < args.devices:
    sys.exit(f"need {args.devices} devices, {jax.default_backend()} has {len(jax.devices())}: lower "
             f"--devices (or use --platform=cpu, which simulates them).")
  mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
  meta = {"args": vars(args), "backend": jax.default_backend(), "jax": jax.__version__}
  records = []
  for model_name in args.models.split(","):
    for res in (int(r) for r in args.resolutions.split(",")):
      for batch in (int(b) for b in args.batches.split(",")):
        for remat in args.remat.split(","):
          for fsdp in (f.strip().lower() in ("1", "true", "yes") for f in args.fsdp.split(",")):
            r = measure(model_name, res, remat, fsdp, batch, args, mesh)
            records.append(r)
            print(f"# {model_name} {r['resolution']} batch/device {batch} remat={remat} fsdp={fsdp}: "
                  f"{r['peak_bytes'] / 2**30:.2f} GiB (compiled in {r['compile_s']} s)",
                  file=sys.stderr, flush=True)
            if args.json:  # after every compile: a long run that is stopped keeps what it measured
              with open(args.json, "w") as f:
                json.dump({**meta, "records": records}, f, indent=1)
  print(note([meta], args.usable) + "\n\n" + table(records, args.usable))


if __name__ == "__main__":
  main()
