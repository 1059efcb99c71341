"""Compile train.py's own step for a TPU slice or a GPU node that this machine does not have, and say
what it costs: memory per chip against the chip's, FLOPs, collectives, a roofline estimate.

    python -m vit_cls.aot --config=configs/pretrain_imagenet.py:B/16,imagenet2012 --target=v5e:4x4 \\
        --config.batch_size=4096 [--config.FIELD=VALUE ...] [--json=PATH]

Targets: TPU slices by their Cloud TPU topology names (`v4:2x2x1`, `v5e:2x4`, `v5e:4x4`, `v5p:2x2x2`,
`v6e:2x2`, `tpu7x:2x2x1`; single- and multi-host), GPU nodes as chip:GPUs per host (`h100:8`, `h200:8`,
`a100:8`) or chip:hosts x GPUs (`h100:2x8`). TPU targets need libtpu (`pip install -r
requirements-tpu.txt`), GPU targets the CUDA plugin (`requirements-gpu.txt`); neither needs the chips, a
driver or a dataset (the number of classes and the resolution come from the config).

What is compiled is not a copy: `vit_cls.train.build_steps` gives the jitted train and eval steps that
`train_and_evaluate` runs (model, optimizer, data or fsdp layout, remat, gradient accumulation,
donation, dtypes), over a mesh of the target's compile-only devices (`jax.experimental.topologies`),
lowered on ShapeDtypeStructs and compiled by the target's own compiler (libtpu's, or XLA's GPU compiler
given a GPU target description from vit_cls/gpu_targets/). The serving program is `model.apply` on a
batch, sharded the same way.

A compile gives memory (XLA's buffer assignment: exact for the program, before the runtime's own
reserve) and FLOPs (XLA's cost analysis of the compiled program, per device). It never gives a speed: the
roofline below is an upper bound from the vendors' peak figures (vit_cls/chips.py), not a measurement.

The JSON (`--json`) holds at least: target, chips, chip_kind, per_chip_bytes (the train step's total),
chip_memory_bytes, fits, flops_per_chip (compiled), analytic_flops_per_chip, compile_seconds, and
attention_kernel (`cudnn`, `splash`, `pallas` or `xla`; None when the first program is too large to
compile). Launchers rely on that contract (`scripts/launch_tpu.py` and `scripts/launch_gpu.py` read
`fits`); `check_fits(config, target)` returns the same dict in-process.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time

from vit_cls import chips as chips_lib
from vit_cls import errors

_GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")

TPU_EXAMPLES = "v5e:2x4, v5e:4x4, v4:2x2x1, v5p:2x2x2, v6e:2x2, tpu7x:2x2x1"
GPU_EXAMPLES = "h100:8, h200:8, a100:8, h100:2x8"
# Dimensions of a Cloud TPU topology name: v5e and v6e slices are 2-D tori, the others 3-D.
_TPU_DIMS = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2, "tpu7x": 3}
# v4 VMs run in megacore mode (one JAX device per chip); libtpu's default config splits its two cores.
_TPU_CHIP_CONFIG = {"v4": "megacore"}
# Classes of the datasets the shipped configs name; anything else: --num_classes, or the prepared dataset.
KNOWN_NUM_CLASSES = {"imagenet2012": 1000, "imagenet21k": 21843, "cifar10": 10, "cifar100": 100,
                     "oxford_iiit_pet": 37, "oxford_flowers102": 102, "digits": 10}


class TargetError(errors.ConfigError):
  """A target name that is unknown or malformed, or a compiler package that is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A named accelerator topology. `topology` is what `get_topology_desc` takes for it."""

  name: str
  chip: chips_lib.Chip
  topology: str
  hosts: int | None  # GPU: from the name; TPU: from libtpu's devices (None until compiled)
  num_chips: int

  @property
  def platform(self) -> str:
    return self.chip.platform


def parse_target(text: str) -> Target:
  """`v5e:4x4` or `h100:2x8` -> Target; a TargetError (one line, with examples) otherwise."""
  name = (text or "").strip().lower()
  head, sep, tail = name.partition(":")
  if head in _TPU_DIMS:
    dims = tail.split("x") if sep else []
    if len(dims) != _TPU_DIMS[head] or not all(d.isdigit() and int(d) > 0 for d in dims):
      shape = "x".join(["N"] * _TPU_DIMS[head])
      raise TargetError(f"--target={text!r}: a {head} slice is written {head}:{shape} (its Cloud TPU "
                        f"topology, e.g. {_example(head)}).")
    return Target(name, chips_lib.chip(head), name, None, math.prod(int(d) for d in dims))
  if head in chips_lib.GPU_NAMES:
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", tail) if sep else None
    if not m or int(m.group(2)) < 1 or int(m.group(2)) > 8 or (m.group(1) and int(m.group(1)) < 1):
      raise TargetError(f"--target={text!r}: a {head} node is written {head}:GPUS (1 to 8 per host, "
                        f"e.g. {head}:8) or {head}:HOSTSxGPUS (e.g. {head}:2x8).")
    hosts, per_host = int(m.group(1) or 1), int(m.group(2))
    return Target(name, chips_lib.chip(head), f"1x{hosts}x{per_host}", hosts, hosts * per_host)
  raise TargetError(f"--target={text!r} is not a known target: write a TPU slice ({TPU_EXAMPLES}) or a "
                    f"GPU node ({GPU_EXAMPLES}).")


def _example(head: str) -> str:
  return next(e for e in TPU_EXAMPLES.split(", ") if e.startswith(head + ":"))


def check_installed(target: Target) -> None:
  """TargetError naming what to install when the target's compiler is not there."""
  if target.platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      raise TargetError(f"compiling for {target.name} needs libtpu, the TPU compiler: pip install -r "
                        f"requirements-tpu.txt (libtpu, a 212 MB wheel; no TPU needed).")
  elif importlib.util.find_spec("jax_cuda12_plugin") is None and not _has_cuda_pjrt():
    raise TargetError(f"compiling for {target.name} needs JAX's CUDA plugin, the GPU compiler: pip "
                      f"install -r requirements-gpu.txt (jax-cuda12-plugin[with-cuda], about 5 GB "
                      f"installed; no GPU or driver needed).")


def _has_cuda_pjrt() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def prepare_environment(target: Target) -> None:
  """Before JAX starts a backend: keep the process on the CPU.

  The compile-only devices come from the target's plugin whatever the process's backend is; making
  that backend the CPU keeps libtpu from probing for a TPU (seconds, and warnings) and the CUDA plugin
  from calling cuInit on a machine without a driver (its version check fails there otherwise).
  """
  if "jax" not in sys.modules:
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif not _backends_initialized():  # imported, not started: its config read the variable already
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")
  if target.platform == "cuda":
    # Read when the plugin registers (at the first backend start): with a backend already started
    # on another platform list, the check would still call cuInit, which fails without a driver.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; compile-only use
  # drives none, and a second compile (a test, another engineer's check) would otherwise be refused
  # with "Internal error when accessing libtpu multi-process lockfile". Left alone on a TPU VM.
  if target.platform == "tpu" and not glob.glob("/dev/accel[0-9]*") and not glob.glob("/dev/vfio/[0-9]*"):
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except Exception:  # pylint: disable=broad-except
    return True


def gpu_target_config(target: Target) -> str:
  with open(os.path.join(_GPU_TARGETS_DIR, f"{target.chip.name}.txtpb")) as f:
    return f.read()


def target_devices(target: Target) -> list:
  """The target's compile-only devices, in JAX's global device order."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  try:
    # libtpu prints about a dozen lines on stderr when it does not find TPU metadata (this machine is
    # no TPU VM); they are noise here, so they are kept back and shown only if the call fails.
    with storage.native_stderr_captured() as captured:
      if target.platform == "tpu":
        kwargs = {}
        if target.chip.name in _TPU_CHIP_CONFIG:
          kwargs["chip_config_name"] = _TPU_CHIP_CONFIG[target.chip.name]
        if target.num_chips == 1:  # one chip (v5e:1x1, v6e:1x1): smaller than libtpu's default host
          kwargs["chips_per_host_bounds"] = [1, 1, 1]  # bounds (2x2x1), which it would refuse
        desc = topologies.get_topology_desc(target.topology, platform="tpu", **kwargs)
      else:
        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                            topology=target.topology)
  except Exception as e:  # pylint: disable=broad-except
    sys.stderr.write("".join(captured))
    text = " ".join(str(e).split())
    raise TargetError(f"--target={target.name}: the {target.platform.upper()} plugin refused it: "
                      f"{text[:300]}") from None
  devices = list(desc.devices)
  return sorted(devices, key=lambda d: (d.process_index, d.id))


# ----------------------------------------------------------------------------------------------------
# What the model should cost.


def analytic_forward_flops(model_kwargs: dict, image_size: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one image's forward pass: patch embedding, per layer the
  qkv, attention (q k^T and p v), output projection and MLP, the pre-logits layer and the head.
  The count of benchmarks/benchmark.py (ViT-B/16 at 224: 17.6 G multiply-adds)."""
  ph, pw = model_kwargs["patch_size"]
  patches = (image_size // ph) * (image_size // pw)
  tokens = patches + (model_kwargs.get("pool", "cls") == "cls") + model_kwargs.get("num_registers", 0)
  d, m = model_kwargs["hidden_size"], model_kwargs["mlp_dim"]
  macs = patches * ph * pw * 3 * d
  macs += model_kwargs["num_layers"] * (4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m)
  width = d
  if model_kwargs.get("representation_size"):
    macs += d * model_kwargs["representation_size"]
    width = model_kwargs["representation_size"]
  macs += width * model_kwargs["num_classes"]
  return 2.0 * macs


# ----------------------------------------------------------------------------------------------------
# Reading a compiled program.

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_OP_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(_COLLECTIVES)
                      + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _shape_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[dt] * math.prod(int(x) for x in dims.split(",") if x)
          for dt, dims in _SHAPE.findall(text)]


def _group_size(line: str, default: int) -> int:
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m and m.group(1):
    return len(m.group(1).split(","))
  return default


def collectives(hlo_text: str, num_devices: int) -> dict:
  """The collectives of a compiled program and the bytes each device sends for them, per kind.

  `result_bytes`: the size of what each op produces on one device. `bytes_moved`: what a device sends
  in a ring implementation over a group of n: all-reduce 2 (n-1)/n of the buffer, all-gather (n-1)/n of
  its result, reduce-scatter (n-1) x its result, all-to-all (n-1)/n, collective-permute the buffer.
  An op inside a loop (layer scan, gradient accumulation) is counted once per appearance in the text,
  not once per iteration, so with `scan_layers` or `accum_steps` these are lower bounds.
  """
  out: dict[str, dict] = {}
  for line in hlo_text.splitlines():
    m = _OP_LINE.match(line)
    if not m:
      continue
    shapes, kind, started = m.group(1), m.group(2), m.group(3)
    sizes = _shape_bytes(shapes)
    if not sizes:
      continue
    # An async start returns (operands..., results...): the results are the second half.
    size = sum(sizes[len(sizes) // 2:]) if started and len(sizes) > 1 else sum(sizes)
    n = _group_size(line, num_devices)
    if n <= 1:
      continue
    factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": n - 1,
              "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
    entry = out.setdefault(kind, {"count": 0, "result_bytes": 0, "bytes_moved": 0})
    entry["count"] += 1
    entry["result_bytes"] += size
    entry["bytes_moved"] += int(size * factor)
  return out


def attention_kernel(hlo_text: str) -> dict:
  """Which attention the compiled program runs: cuDNN's fused kernels (custom calls named
  `__cudnn$fmha...`, forward and backward counted apart), Pallas kernels on TPU (`splash` when they are
  jax's splash attention kernels, named `splash_mha_{fwd,dq,dkv}...` in the program; `pallas` for any
  other), or XLA's own."""
  calls = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo_text)
  backward = sum("Backward" in c for c in calls)
  pallas_lines = [line for line in hlo_text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  splash = sum("splash_" in line for line in pallas_lines)
  if calls:
    kernel = "cudnn"
  elif splash:
    kernel = "splash"
  elif pallas_lines:
    kernel = "pallas"
  else:
    kernel = "xla"
  return {"kernel": kernel, "cudnn_forward_calls": len(calls) - backward,
          "cudnn_backward_calls": backward, "pallas_calls": len(pallas_lines), "splash_calls": splash}


def _cost(compiled, lowered, num_devices: int) -> tuple[dict, str]:
  """XLA's cost analysis of one device's program, and which program it describes.

  "compiled": the compiled program's, where the backend gives one (libtpu does). XLA's GPU compiler,
  compiling without a device, gives none; then "lowered": XLA's HLO cost analysis of the program as
  lowered (the global program before SPMD partitioning and optimisation, divided by the device count).
  It counts every matmul of the function, remat's recomputation included (JAX writes it into the
  program), 0 for custom calls (cuDNN attention: about 4% of a B/16 step's FLOPs); its bytes are
  unfused, so the roofline uses its FLOPs only."""
  try:
    ca = compiled.cost_analysis()
    ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else ca
    if ca and ca.get("flops"):
      return dict(ca), "compiled"
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
    ca = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    return {"flops": float(ca.get("flops", 0.0)) / num_devices}, "lowered"
  except Exception:  # pylint: disable=broad-except
    return {}, "none"


# ----------------------------------------------------------------------------------------------------
# Compiling.


def usable_fraction(target: Target) -> float:
  """How much of a chip's memory a step may use before the run fails to allocate.

  TPU: libtpu's compiler refuses a program larger than the HBM it makes available, which for a v5e is
  15.75 of 16 GiB ("exceeds available HBM (15.75G)"): 0.984 of the chip, used for every TPU. GPU: JAX
  preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the memory (0.75 unless set) and a step must fit in
  that pool; launchers that set it higher get the larger share here too.
  """
  if target.platform == "tpu":
    return 15.75 / 16
  return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def _num_classes(config, override: int | None) -> int:
  if override:
    return int(override)
  name = str(config.dataset).split(":")[0].split("/")[0]
  if name in KNOWN_NUM_CLASSES:
    return KNOWN_NUM_CLASSES[name]
  try:
    from vit_cls import input_pipeline  # pylint: disable=g-import-not-at-top
    return int(input_pipeline.get_dataset_info(config).num_classes)
  except Exception:  # pylint: disable=broad-except
    raise errors.ConfigError(
        f"config.dataset={config.dataset!r}: its number of classes is not known here and the dataset is "
        f"not prepared: pass --num_classes=N.") from None


def _program_report(compiled, seconds: float, target: Target, num_devices: int, analytic_flops: float,
                    images: int, lowered=None) -> dict:
  """Per-chip figures of one compiled program, and its roofline estimate."""
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  chip, per_chip = target.chip, target.chip.devices_per_chip
  mem = train.compiled_bytes(compiled)
  cost, cost_source = _cost(compiled, lowered, num_devices)
  text = compiled.as_text()
  coll = collectives(text, num_devices)
  flops = float(cost.get("flops", 0.0)) * per_chip
  traffic = float(cost.get("bytes accessed", 0.0)) * per_chip
  moved = sum(c["bytes_moved"] for c in coll.values()) * per_chip
  hosts = target.hosts or 1
  link = chip.network_bytes_per_s if (target.platform == "cuda" and hosts > 1) else \
      chip.interconnect_bytes_per_s
  t_compute, t_memory = flops / chip.bf16_flops_per_s, traffic / chip.hbm_bytes_per_s
  t_comm = moved / link if link else 0.0
  step_s = max(t_compute, t_memory) + t_comm
  analytic_per_chip = analytic_flops / target.num_chips
  per_chip_images = images / target.num_chips
  return {
      "compile_seconds": round(seconds, 2),
      "per_chip_bytes": mem["total_bytes"] * per_chip,
      "argument_bytes": mem["argument_bytes"] * per_chip,
      "output_bytes": mem["output_bytes"] * per_chip,
      "alias_bytes": mem["alias_bytes"] * per_chip,
      "temp_bytes": mem["temp_bytes"] * per_chip,
      "flops_per_chip": flops,
      "flops_source": cost_source,
      "analytic_flops_per_chip": analytic_per_chip,
      "flops_ratio": flops / analytic_per_chip if analytic_per_chip else None,
      "bytes_accessed_per_chip": traffic,
      "collectives": coll,
      "collective_bytes_per_chip": moved,
      "roofline": {
          "compute_seconds": t_compute, "memory_seconds": t_memory, "collective_seconds": t_comm,
          "step_seconds": step_s, "bound": "compute" if t_compute >= t_memory else "memory",
          "images_per_second_per_chip": per_chip_images / step_s if step_s else None,
          "mfu": analytic_per_chip / step_s / chip.bf16_flops_per_s if step_s else None,
      },
      "attention": attention_kernel(text),
  }


_SIZE = re.compile(r"([\d.]+)([KMGT]?)(?:i?B)?\b")


def _parse_size(text: str) -> int:
  number, unit = _SIZE.fullmatch(text.strip()).groups()
  return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def _out_of_memory_report(message: str, seconds: float, target: Target, args, analytic_flops: float) -> dict:
  """What a program the compiler refused for lack of memory needs: its inputs (their shards' bytes)
  plus the temporaries the compiler's message names. No FLOPs: nothing was compiled."""
  from vit_cls import sharding  # pylint: disable=g-import-not-at-top
  m = re.search(r"required for HLO temporaries \(([^)]+)\) exceeds available HBM \(([^)]+)\)", message)
  temp = _parse_size(m.group(1)) if m else 0
  inputs = sharding.bytes_per_device(args)
  per_chip = target.chip.devices_per_chip
  return {
      "compiled": False, "error": " ".join(message.split())[:500], "compile_seconds": round(seconds, 2),
      "per_chip_bytes": (inputs + temp) * per_chip, "argument_bytes": inputs * per_chip,
      "output_bytes": 0, "alias_bytes": 0, "temp_bytes": temp * per_chip,
      "available_bytes": (_parse_size(m.group(2)) * per_chip) if m else None,
      "flops_per_chip": None, "analytic_flops_per_chip": analytic_flops / target.num_chips,
      "flops_ratio": None, "collectives": {}, "roofline": None, "attention": None,
  }


def compile_for_target(config, target: Target | str, *, programs=("train", "eval", "infer"),
                       inference_batch: int | None = None, num_classes: int | None = None,
                       model=None) -> dict:
  """Compiles the requested programs of `config` for `target`; returns the report (see the module
  docstring for the keys). Raises TargetError / errors.ConfigError with one-line messages.

  `model`: a Flax module to put in the step in place of the config's (same `apply(variables, images,
  train=...)` signature): benchmarks/aot_reference.py compiles the original vit_jax model's step
  with everything else of train.py unchanged, to compare the two on the same target."""
  target = parse_target(target) if isinstance(target, str) else target
  check_installed(target)
  prepare_environment(target)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from vit_cls import optim, sharding, speed, train  # pylint: disable=g-import-not-at-top

  devices = target_devices(target)
  target = dataclasses.replace(target, hosts=len({d.process_index for d in devices}))
  n = len(devices)
  # As train.py checks it, against the target's devices and hosts instead of this process's.
  train.validate_config(config, num_devices=n, num_processes=target.hosts)
  inference_batch = inference_batch or 8 * n
  if inference_batch % n:
    raise errors.ConfigError(f"--inference_batch={inference_batch} must be a multiple of the {n} "
                             f"devices of {target.name}.")
  classes = _num_classes(config, num_classes)
  mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
  model = model if model is not None else train.create_model(config, classes)
  tx, schedule = optim.create_optimizer(config)
  kwargs = train.model_kwargs(config, classes)
  forward = analytic_forward_flops(kwargs, config.image_size)
  # GPU compiles without a GPU: Triton's GEMM autotuner needs a device to pick tile sizes and fails
  # ("Couldn't find output tile sizes"), so matmuls go to cuBLAS, as XLA does for most of them anyway.
  options = {"xla_gpu_enable_triton_gemm": False} if target.platform == "cuda" else None
  platform = "gpu" if target.platform == "cuda" else "tpu"

  def compile_(name, fn, args, analytic, images):
    """Compiles one program into report[name]. A program too large for the chip is a report too:
    libtpu refuses to compile it (RESOURCE_EXHAUSTED, with the bytes it needed), which is the answer."""
    with speed.compiling_for(platform):
      lowered = fn.lower(*args)
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report[name] = _out_of_memory_report(str(e), time.perf_counter() - t0, target, args, analytic)
      return
    report[name] = _program_report(compiled, time.perf_counter() - t0, target, n, analytic, images,
                                   lowered)

  with speed.compiling_for(platform):
    _, abstract = train.abstract_train_state(model, tx, config, mesh)
  step_fn, eval_fn = train.build_steps(config, model, tx, schedule, classes, mesh, abstract)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
  report = {
      "target": target.name, "platform": target.platform, "chips": target.num_chips,
      "devices": n, "hosts": target.hosts, "chip_kind": devices[0].device_kind,
      "chip_memory_bytes": target.chip.memory_bytes, "usable_fraction": usable_fraction(target),
      "model": config.model.get("name", "ViT"), "image_size": config.image_size,
      "num_classes": classes, "batch_size": config.batch_size, "accum_steps": config.get("accum_steps", 1),
      "fsdp": bool(config.get("fsdp", False)), "remat_policy": config.model.get("remat_policy", "none"),
      "dtype": str(config.model.get("dtype", "float32")),
      "attention_impl": config.model.get("attention_impl", "fused"),
      "params": params,
      "param_bytes_per_chip": sharding.bytes_per_device(abstract.params) * target.chip.devices_per_chip,
      "state_bytes_per_chip": sharding.bytes_per_device(abstract) * target.chip.devices_per_chip,
      "analytic_forward_flops_per_image": forward,
      "jax": jax.__version__, "chip_facts_source": target.chip.source,
      "note": "memory and FLOPs from the target's compiler; the roofline is an estimate from peak "
              "figures, not a measured speed",
  }
  if "train" in programs:
    compile_("train", step_fn, (abstract, train.abstract_batch(config, mesh)),
             3 * forward * config.batch_size, config.batch_size)
  if "eval" in programs:
    eval_batch = config.get("eval_batch_size") or config.batch_size
    compile_("eval", eval_fn,
             (abstract.params, train.abstract_batch(config, mesh, eval_batch, eval_batch=True)),
             forward * eval_batch, eval_batch)
  if "infer" in programs:
    batch_sh = NamedSharding(mesh, P(sharding.DATA_AXIS))
    serve = jax.jit(sharding.on_mesh(lambda p, x: model.apply({"params": p}, x, train=False), mesh),
                    in_shardings=(jax.tree.map(lambda x: x.sharding, abstract.params), batch_sh),
                    out_shardings=batch_sh)
    images = jax.ShapeDtypeStruct((inference_batch, config.image_size, config.image_size, 3),
                                  np.float32, sharding=batch_sh)
    compile_("infer", serve, (abstract.params, images), forward * inference_batch, inference_batch)
    report["inference_batch"] = inference_batch
  first = report.get("train") or report.get("eval") or report.get("infer")
  usable = target.chip.memory_bytes * report["usable_fraction"]
  worst = max(report[p]["per_chip_bytes"] for p in ("train", "eval", "infer") if p in report)
  report.update({
      "per_chip_bytes": first["per_chip_bytes"],
      "fits": bool(worst <= usable) and all(report[p].get("compiled", True)
                                            for p in ("train", "eval", "infer") if p in report),
      "headroom_bytes": int(usable - worst),
      "flops_per_chip": first["flops_per_chip"],
      "analytic_flops_per_chip": first["analytic_flops_per_chip"],
      "compile_seconds": round(sum(report[p]["compile_seconds"] for p in ("train", "eval", "infer")
                                   if p in report), 2),
  })
  # None when the first program did not compile (too large: its report has no program to read).
  report["attention_kernel"] = (first.get("attention") or {}).get("kernel")
  return report


def check_fits(config, target: Target | str, **kwargs) -> dict:
  """The train step only (the one that decides): the report of `compile_for_target`, whose `fits`
  says whether it fits the target's chips. For launchers that want the answer in-process."""
  return compile_for_target(config, target, programs=("train",), **kwargs)


# ----------------------------------------------------------------------------------------------------
# The command.


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB below one GiB (tiny test models would read 0.00 GiB)."""
  return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
  lines = [f"{r['model']} at {r['image_size']} px, {r['num_classes']} classes, global batch "
           f"{r['batch_size']} (accum_steps {r['accum_steps']}), {r['dtype']}, remat "
           f"{r['remat_policy']}, {'fsdp' if r['fsdp'] else 'replicated'} state, on {r['target']}: "
           f"{r['chips']} x {r['chip_kind']} ({r['devices']} devices, {r['hosts']} host(s)); "
           f"{r['params'] / 1e6:.1f} M parameters.",
           f"Per chip (memory {_gib(r['chip_memory_bytes'])}, usable "
           f"{_gib(r['chip_memory_bytes'] * r['usable_fraction'])}):"]
  for name in ("train", "eval", "infer"):
    p = r.get(name)
    if not p:
      continue
    rf = p["roofline"]
    if rf is None:  # the compiler refused it for lack of memory
      lines.append(f"  {name}: needs {_gib(p['per_chip_bytes'])} = inputs {_gib(p['argument_bytes'])} + "
                   f"temporaries {_gib(p['temp_bytes'])}: the compiler refused it "
                   f"({p['error'][:160]})")
      continue
    coll = ", ".join(f"{k} x{v['count']} ({_gib(v['bytes_moved'])} sent)"
                     for k, v in sorted(p["collectives"].items())) or "none"
    title = {"train": "train step", "eval": "eval step",
             "infer": f"inference, batch {r.get('inference_batch')}"}[name]
    lines += [
        f"  {title}: {_gib(p['per_chip_bytes'])} = state/inputs {_gib(p['argument_bytes'])} + "
        f"outputs {_gib(p['output_bytes'])} - donated {_gib(p['alias_bytes'])} + temporaries "
        f"{_gib(p['temp_bytes'])}; compiled in {p['compile_seconds']:.1f} s",
        f"    FLOPs {p['flops_per_chip'] / 1e12:.2f} T ({p['flops_source']} program) vs "
        f"{p['analytic_flops_per_chip'] / 1e12:.2f} T analytic (x{p['flops_ratio'] or 0:.3f}); HBM "
        f"traffic {_gib(p['bytes_accessed_per_chip'])}",
        f"    collectives: {coll}",
        (f"    roofline: {rf['step_seconds'] * 1e3:.1f} ms ({rf['bound']}-bound "
         f"{max(rf['compute_seconds'], rf['memory_seconds']) * 1e3:.1f} ms + collectives "
         f"{rf['collective_seconds'] * 1e3:.1f} ms) -> at most {rf['images_per_second_per_chip']:.0f} "
         f"img/s per chip, MFU {rf['mfu']:.0%}" if rf["images_per_second_per_chip"] else
         "    roofline: none (this compiler gave no cost analysis)"),
        f"    attention: {p['attention']['kernel']}"
        + (f" ({p['attention']['cudnn_forward_calls']} forward, {p['attention']['cudnn_backward_calls']} "
           f"backward cuDNN calls)" if p['attention']['kernel'] == 'cudnn' else
           f" ({p['attention']['pallas_calls']} Pallas calls)" if p['attention']['pallas_calls'] else ""),
    ]
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  lines.append(f"{verdict}: headroom {_gib(r['headroom_bytes'])} per chip. (A compile gives memory and "
               f"FLOPs; the roofline is an upper bound from peak figures, not a measured speed.)")
  return "\n".join(lines)


def _fail(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(1)


def _flag_error(e: BaseException, argv) -> str:
  """absl / ml_collections errors as one line: an override of a field the config lacks names it; a
  config file that cannot be loaded gives its last line (the cause), not the wrapped traceback."""
  if isinstance(e, (AttributeError, KeyError)):
    fields = re.findall(r"'(\w+)'", str(e))
    given = [a.split("=")[0] for a in argv if a.startswith("--config.") and fields
             and a.split("=")[0].split(".")[-1] == fields[0]]
    if given:
      return f"{given[0]}: the config has no field '{fields[0]}'; configs/default.py lists the fields."
  causes, seen = [], e
  while seen is not None:
    causes.append(seen)
    seen = seen.__cause__
  lines = [l.strip() for c in reversed(causes) for l in str(c).splitlines() if l.strip()]
  if isinstance(e, OSError) and lines:  # "Attempted [Relative path]: ... [Errno 2] No such file ..."
    return f"--config: cannot load the config file: {lines[-1]}"
  return f"--config: {lines[0]}" if lines else repr(e)


def main(argv=None) -> int:
  """`python -m vit_cls.aot --config=... --target=... [--config.FIELD=...] [--json=PATH]`."""
  argv = list(sys.argv if argv is None else argv)
  # The target first, with the standard library only: a bad name or a missing package costs one
  # line and no JAX import.
  target_text = None
  for i, a in enumerate(argv):
    if a.startswith("--target="):
      target_text = a.split("=", 1)[1]
    elif a == "--target" and i + 1 < len(argv):
      target_text = argv[i + 1]
  if not target_text:
    _fail(f"--target is required: a TPU slice ({TPU_EXAMPLES}) or a GPU node ({GPU_EXAMPLES}).")
  try:
    target = parse_target(target_text)
    check_installed(target)
  except TargetError as e:
    _fail(str(e))
  prepare_environment(target)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()  # its own flags, so that launchers and tests may call main() repeatedly
  config_flags.DEFINE_config_file("config", None, "Training configuration file (as train.py).",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("target", None, f"TPU slice ({TPU_EXAMPLES}) or GPU node ({GPU_EXAMPLES}).",
                      flag_values=fv)
  flags.DEFINE_string("json", None, "Also write the report here as JSON.", flag_values=fv)
  flags.DEFINE_list("programs", ["train", "eval", "infer"], "Which programs to compile.",
                    flag_values=fv)
  flags.DEFINE_integer("inference_batch", None, "Serving batch (global); default 8 per device.",
                       flag_values=fv)
  flags.DEFINE_integer("num_classes", None, "Classes, for a dataset this command does not know.",
                       flag_values=fv)
  try:
    fv(argv)
    config = fv.config
    if config is None:
      _fail("--config is required, e.g. --config=configs/pretrain_imagenet.py:B/16,imagenet2012.")
    config.keys  # pylint: disable=pointless-statement  (a config file that failed to load raises here)
  except Exception as e:  # pylint: disable=broad-except  (every way a command line can be wrong: one line)
    _fail(_flag_error(e, argv))
  bad = [p for p in fv.programs if p not in ("train", "eval", "infer")]
  if bad:
    _fail(f"--programs={','.join(bad)}: choose from train, eval, infer.")
  try:
    report = compile_for_target(config, target, programs=tuple(fv.programs),
                                inference_batch=fv.inference_batch,
                                num_classes=fv.num_classes)
  except errors.VitClsError as e:
    _fail(str(e))
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(report, f, indent=1)
  print(format_report(report), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
