"""Training and inference throughput, compile time, FLOP/s, MFU and memory of a vit_cls model.

    python benchmarks/benchmark.py --model Ti/16 --batch 32                       # one model, CPU or GPU
    python benchmarks/benchmark.py --model B/16 --batch 256 --dtype bfloat16       # on a GPU
    python benchmarks/benchmark.py --model Ti/16 --batch 32 --compare reference,timm \\
        --timm_python /tmp/timmvenv/bin/python                                     # anchors, same run
    python benchmarks/benchmark.py --model Ti/16 --variant scan:scan_layers=true   # speed options
    python benchmarks/benchmark.py --model H/14 --compile_only --scan_layers       # compile time only
    python benchmarks/benchmark.py --quick                                         # seconds; for tests

What it measures, and why this way:
* Synthetic data (a fixed random batch already on the device), so the number is the step's speed, not the
  input pipeline's; no TensorFlow is imported (the GPU machine has none).
* Training step = forward + softmax cross-entropy + backward + optax AdamW update, jitted, with the
  optimizer state donated (`--no_donate` to compare). Inference = forward in eval mode.
* Every implementation being compared lives in the same process and is timed in interleaved rounds
  (round r runs each runner's steps in turn, in a rotated order): on a shared, noisy CPU only ratios
  measured that way mean anything. The timm anchor runs in a separate Python (it needs torch) as a
  JSON-lines server (`timm_benchmark.py --serve`) driven from the same rounds.
* Images/s is the batch over the median of the per-round step times, after `--warmup` untimed steps.
  Beside it, the process CPU-seconds per step (all threads): the work done, which other processes on a
  shared machine disturb far less than wall time (but spinning thread pools still inflate it).
* FLOPs: the MFU uses the analytic count of matmul FLOPs (2 per multiply-add: patch embedding, QKV, the
  two attention products, out projection, MLP, head; LayerNorm / softmax / GELU / optimizer not counted),
  training = 3 x forward. The compiled HLO's own count (`compiled.cost_analysis()["flops"]`, which also
  counts element-wise work and the optimizer) is printed beside it as a cross-check; for `scan_layers`
  XLA counts the loop body once, so only the analytic count is comparable across options.
* Peak: a square matmul probe in the benchmark dtype runs in every round of the same process, and its
  best time is the measured peak (what this machine delivered while the benchmark ran, not a
  datasheet). MFU is against `--peak_tflops` when given (a datasheet number: say which), else against
  the measured peak; with both, both MFUs are reported.
* Memory: the backend's peak bytes in use (`device.memory_stats()["peak_bytes_in_use"]`; GPUs report it,
  the CPU backend reports nothing and says so), and for each compiled step XLA's own estimate
  (arguments + outputs - donated aliases + temporaries), which works on every backend.
* Allocator: every runner runs under the same host memory allocator (`--allocator`, default tcmalloc
  when installed, else glibc tuned; see vit_cls/allocator.py); the table and the JSON record each
  runner's. On a CPU it can double the training throughput (BENCHMARKS.md), so a comparison where
  only one side has tcmalloc compares allocators, not models.
* `--max_batch` (GPU): for each remat policy, the largest training batch whose compiled footprint fits the
  device memory, from XLA's memory estimate at two batch sizes (footprint is affine in the batch), checked
  by running one step at the predicted size.

The output is a table and one JSON line (`JSON: {...}`), also written to `--json_out` if given.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Run from a checkout without `pip install -e .` (the bare GPU machine): the repository root is the
# fallback place to find `vit_cls`; an installed package still comes first.
sys.path.append(os.path.dirname(HERE))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--model", default="Ti/16", help="a vit_cls.create_model name (testing, Ti/16, B/16, ...)")
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--batch", type=int, default=32, help="global batch (split over --devices)")
  p.add_argument("--dtype", default="float32",
                 help="compute dtype of activations and matmuls (float32, bfloat16)")
  p.add_argument("--devices", type=int, default=1,
                 help="devices to shard the batch over; on CPU this many host devices are simulated")
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--attention_impl", default="fused")
  p.add_argument("--fuse_qkv", default="true")
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--remat_policy", default="none", help="none | block | dots")
  p.add_argument("--matmul_dtype", default=None,
                 help="bfloat16: bf16 matmul operands, float32 products and activations (CPU)")
  p.add_argument("--no_donate", action="store_true", help="do not donate the training state")
  p.add_argument("--batch_chunks", type=int, default=1,
                 help="compute each step's batch as this many independent parts (CPU: XLA overlaps them)")
  p.add_argument("--variant", action="append", default=[], metavar="LABEL:k=v,k=v",
                 help="an extra vit_cls runner with model fields overridden, e.g. scan:scan_layers=true")
  p.add_argument("--compare", default="",
                 help="comma list of anchors to time in the same rounds: reference (a re-statement "
                      "of the original vit_jax model, benchmarks/reference_vit_jax.py), timm")
  p.add_argument("--timm_python", default=os.environ.get("TIMM_PYTHON", "/tmp/timmvenv/bin/python"),
                 help="a Python with torch and timm, for --compare timm")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per runner after compiling")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps_per_round", type=int, default=2)
  p.add_argument("--no_infer", action="store_true", help="time training only")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak TFLOP/s for MFU; default: measured by a matmul probe in this run")
  p.add_argument("--probe_size", type=int, default=None, help="matmul probe n (n x n x n)")
  p.add_argument("--no_probe", action="store_true", help="skip the matmul probe (needs --peak_tflops)")
  p.add_argument("--compile_only", action="store_true",
                 help="only compile the training step (abstract inputs: no parameters allocated)")
  p.add_argument("--max_batch", default="",
                 help="comma list of remat policies for which to find the largest training batch")
  p.add_argument("--no_verify", action="store_true",
                 help="--max_batch: skip the check step at the predicted batch (estimate only)")
  p.add_argument("--memory_limit_gb", type=float, default=None,
                 help="device memory for --max_batch (default: what the backend reports)")
  p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS (set before JAX starts)")
  p.add_argument("--allocator", default=None, choices=("auto", "tcmalloc", "glibc-tuned", "system"),
                 help="host memory allocator of every runner: this process (vit_cls, the reference) and "
                      "timm's server get the same one (default: $VIT_CLS_ALLOCATOR, else auto; see "
                      "vit_cls/allocator.py)")
  p.add_argument("--json_out", default="", help="also write the JSON here")
  p.add_argument("--quick", action="store_true",
                 help="tiny model, tiny batch, one round of one step: checks that everything prints")
  a = p.parse_args(argv)
  if a.quick:
    a.model, a.resolution, a.batch, a.num_classes = "testing", 16, 4, 10
    a.warmup, a.rounds, a.steps_per_round = 1, 2, 1
    a.probe_size = a.probe_size or 256
  return a


def set_early_environment(a: argparse.Namespace) -> None:
  """XLA reads its flags once, when the backend starts: set them before JAX is imported."""
  flags = os.environ.get("XLA_FLAGS", "")
  wanted = max([a.devices] + [int(parse_variant(v)[1].get("devices", 1)) for v in a.variant])
  if wanted > 1 and "xla_force_host_platform_device_count" not in flags:
    # Harmless off CPU: the flag only shapes the host platform.
    flags += f" --xla_force_host_platform_device_count={wanted}"
  if a.xla_flags:
    flags += " " + a.xla_flags
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# ----------------------------------------------------------------------------------------------- FLOPs

def analytic_forward_flops(model, resolution: int) -> float:
  """Matmul FLOPs (2 per multiply-add) of one image's forward pass; see the module docstring."""
  ph, pw = model.patch_size
  patches = (resolution // ph) * (resolution // pw)
  tokens = patches + (model.pool == "cls") + model.num_registers
  d, m = model.hidden_size, model.mlp_dim
  macs = patches * ph * pw * 3 * d  # patch embedding
  per_layer = tokens * d * 3 * d + 2 * tokens * tokens * d + tokens * d * d + 2 * tokens * d * m
  macs += model.num_layers * per_layer
  width = d
  if model.representation_size:
    macs += d * model.representation_size
    width = model.representation_size
  macs += width * model.num_classes
  return 2.0 * macs


def _hlo_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):  # older JAX returned one dict per program
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def _compiled_bytes(compiled) -> int | None:
  """XLA's footprint estimate: arguments + outputs - donated aliases + temporaries."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes)


# --------------------------------------------------------------------------------------------- runners

def _parse_value(v: str):
  low = v.lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


def parse_variant(spec: str) -> tuple[str, dict]:
  """`label:k=v,k=v` -> (label, {k: v}); values parsed as bool/int/float/str."""
  label, _, rest = spec.partition(":")
  fields = {}
  for item in filter(None, rest.split(",")):
    k, sep, v = item.partition("=")
    if not sep:
      raise SystemExit(f"--variant {spec!r}: expected k=v items after 'label:', got {item!r}")
    fields[k.strip()] = _parse_value(v.strip())
  return label, fields


class JaxRunner:
  """One JAX model (vit_cls or the vit_jax reference) with its jitted train and inference steps."""

  def __init__(self, label: str, model, a: argparse.Namespace, mesh, abstract: bool = False,
               batch: int | None = None, impl: str = "vit_cls"):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

    self.label, self.model, self.a = label, model, a
    self.batch = batch or a.batch
    self.kind = "jax"
    self.errors = []
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    res = a.resolution
    tx = optax.adamw(1e-4, weight_decay=0.1)
    init_x = jnp.zeros((1, res, res, 3), jnp.float32)

    def init_state(key):
      params = model.init(key, init_x, train=False)["params"]
      return params, tx.init(params)

    from vit_cls.speed import apply_in_chunks  # pylint: disable=g-import-not-at-top
    chunks = a.batch_chunks

    def loss_fn(params, x, y):
      logits = apply_in_chunks(model, {"params": params}, x, chunks, train=True,
                               rngs={"dropout": jax.random.key(1)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(state, x, y):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    def infer_step(params, x):
      return apply_in_chunks(model, {"params": params}, x, chunks, train=False)

    donate = () if a.no_donate else (0,)
    self._train = jax.jit(train_step, donate_argnums=donate, out_shardings=(repl, repl))
    self._infer = jax.jit(infer_step, out_shardings=data)
    key = jax.random.key(0)
    x_shape = jax.ShapeDtypeStruct((self.batch, res, res, 3), jnp.float32, sharding=data)
    y_shape = jax.ShapeDtypeStruct((self.batch,), jnp.int32, sharding=data)
    if abstract:
      state = jax.eval_shape(init_state, key)
      self.state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), state)
      self.x, self.y = x_shape, y_shape
    else:
      self.state = jax.jit(init_state, out_shardings=repl)(key)
      kx, ky = jax.random.split(jax.random.key(42))
      self.x = jax.device_put(jax.random.uniform(kx, x_shape.shape, minval=-1, maxval=1), data)
      self.y = jax.device_put(jax.random.randint(ky, y_shape.shape, 0, max(1, model.num_classes)), data)
    self.params_count = int(sum(l.size for l in jax.tree.leaves(self.state[0])))
    from vit_cls import allocator  # pylint: disable=g-import-not-at-top
    self.result = dict(label=label, impl=impl, params=self.params_count, batch_chunks=a.batch_chunks,
                       allocator=allocator.describe(), allocator_kind=allocator.kind())

  def compile(self, infer: bool = True) -> None:
    t = time.perf_counter()
    self.train_c = self._train.lower(self.state, self.x, self.y).compile()
    self.result["compile_train_s"] = time.perf_counter() - t
    self.result["hlo_train_flops_per_image"] = (_hlo_flops(self.train_c) or float("nan")) / self.batch
    self.result["compiled_train_bytes"] = _compiled_bytes(self.train_c)
    if infer:
      t = time.perf_counter()
      self.infer_c = self._infer.lower(self.state[0], self.x).compile()
      self.result["compile_infer_s"] = time.perf_counter() - t
      self.result["hlo_infer_flops_per_image"] = (_hlo_flops(self.infer_c) or float("nan")) / self.batch
      self.result["compiled_infer_bytes"] = _compiled_bytes(self.infer_c)

  def train(self, steps: int) -> tuple[float, float]:
    """Runs `steps` training steps; returns (wall, process CPU) seconds per step (one sync at the end)."""
    t, c = time.perf_counter(), time.process_time()
    loss = None
    for _ in range(steps):
      self.state, loss = self.train_c(self.state, self.x, self.y)
    loss.block_until_ready()
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps

  def infer(self, steps: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    out = None
    for _ in range(steps):
      out = self.infer_c(self.state[0], self.x)
    out.block_until_ready()
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps

  def close(self) -> None:
    pass


class TimmProxy:
  """Drives `timm_benchmark.py --serve` in a torch venv, so timm's steps interleave with JAX's."""

  def __init__(self, a: argparse.Namespace, num_classes: int):
    self.label, self.kind, self.batch = "timm", "timm", a.batch
    self.errors = []
    if not os.path.exists(a.timm_python):
      raise FileNotFoundError(
          f"--compare timm needs a Python with torch and timm at {a.timm_python} (see the docstring of "
          f"benchmarks/timm_benchmark.py for the two pip commands), or --timm_python PATH.")
    from vit_cls import allocator  # pylint: disable=g-import-not-at-top
    # The server chooses its allocator when it starts, as this process did: ask it for the same one.
    mode = allocator.kind()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[allocator.ENV_MODE] = mode if mode in allocator.MODES else "system"
    env.pop("XLA_FLAGS", None)
    self.proc = subprocess.Popen(
        [a.timm_python, os.path.join(HERE, "timm_benchmark.py"), "--serve"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=env)
    self._setup = dict(cmd="setup", model=a.model, batch=a.batch, resolution=a.resolution,
                       num_classes=num_classes)
    reply = self._ask(dict(cmd="allocator"))
    self.result = dict(label="timm", impl="timm", allocator=reply["allocator"],
                       allocator_kind=reply["allocator_kind"])

  def _ask(self, req: dict) -> dict:
    self.proc.stdin.write(json.dumps(req) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the timm server exited (return code {self.proc.poll()}); see its stderr above")
    reply = json.loads(line)
    if not reply.get("ok"):
      raise RuntimeError(f"timm server: {reply.get('error')}")
    return reply

  def compile(self, infer: bool = True) -> None:
    del infer
    reply = self._ask(self._setup)
    self.result.update(compile_train_s=reply["setup_s"], compile_infer_s=None,
                       params=reply["params"], torch_version=reply["torch_version"],
                       timm_version=reply["timm_version"], torch_threads=reply["torch_threads"],
                       fused_attn=reply["fused_attn"])
    self.params_count = reply["params"]

  def train(self, steps: int) -> tuple[float, float]:
    reply = self._ask(dict(cmd="train", steps=steps))
    return statistics.fmean(reply["times"]), statistics.fmean(reply["cpu_times"])

  def infer(self, steps: int) -> tuple[float, float]:
    reply = self._ask(dict(cmd="infer", steps=steps))
    return statistics.fmean(reply["times"]), statistics.fmean(reply["cpu_times"])

  def close(self) -> None:
    try:
      self._ask(dict(cmd="quit"))
    except Exception:  # pylint: disable=broad-except
      pass
    self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ peak probe

class MatmulProbe:
  """Times an n x n x n matmul in the benchmark dtype on random data; the best time gives the peak."""

  def __init__(self, dtype, n: int, device):
    import jax  # pylint: disable=g-import-not-at-top
    self.n, self.dtype = n, dtype
    ka, kb = jax.random.split(jax.random.key(7))
    self.a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
    self.b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
    # A chain of products, so that one host sync covers many device launches on a GPU.
    self.reps = 1 if device.platform == "cpu" else 20

    def chain(a, b):
      acc = a @ b
      for _ in range(self.reps - 1):
        acc = acc + a @ b
      return acc

    self.f = jax.jit(chain).lower(self.a, self.b).compile()
    self.f(self.a, self.b).block_until_ready()
    self.best = float("inf")

  def run(self, repeats: int = 3) -> None:
    for _ in range(repeats):
      t = time.perf_counter()
      self.f(self.a, self.b).block_until_ready()
      self.best = min(self.best, (time.perf_counter() - t) / self.reps)

  @property
  def tflops(self) -> float:
    return 2.0 * self.n ** 3 / self.best / 1e12


# --------------------------------------------------------------------------------------------- driving

def build_model(a: argparse.Namespace, overrides: dict | None = None):
  import vit_cls  # pylint: disable=g-import-not-at-top
  fields = dict(num_classes=a.num_classes, dtype=a.dtype, attention_impl=a.attention_impl,
                fuse_qkv=_parse_value(a.fuse_qkv), scan_layers=a.scan_layers,
                remat_policy=a.remat_policy, matmul_dtype=a.matmul_dtype)
  fields.update(overrides or {})
  return vit_cls.create_model(a.model, **fields)


def _mesh(n: int):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  if len(devices) < n:
    raise SystemExit(f"{n} devices asked for, only {len(devices)} {jax.default_backend()} devices here")
  return Mesh(np.array(devices[:n]), ("data",))


def make_runners(a, mesh) -> list:
  """The base vit_cls runner, then each --variant, then the --compare anchors.

  Variant keys besides model fields: `impl` (vit_cls | reference), `devices` (shard this runner's batch
  over that many devices: simulated host devices on CPU), `donate` (true | false), `batch_chunks`.
  """
  sys.path.insert(0, HERE)
  import reference_vit_jax  # pylint: disable=g-import-not-at-top
  runners = [JaxRunner("vit_cls", build_model(a), a, mesh)]
  specs = [parse_variant(s) for s in a.variant]
  compare = [s.strip() for s in a.compare.split(",") if s.strip()]
  for anchor in compare:
    if anchor == "reference":
      specs.append(("vit_jax_ref", dict(impl="reference")))
    elif anchor != "timm":
      raise SystemExit(f"--compare {anchor!r}: choose from reference, timm")
  for label, fields in specs:
    fields = dict(fields)
    va = argparse.Namespace(**vars(a))
    donate = fields.pop("donate", None)
    if donate is not None:
      va.no_donate = not donate
    va.batch_chunks = int(fields.pop("batch_chunks", a.batch_chunks))
    impl = fields.pop("impl", "vit_cls")
    devices = int(fields.pop("devices", a.devices))
    if a.batch % devices:
      raise SystemExit(f"variant {label}: --batch {a.batch} is not divisible by devices={devices}")
    vmesh = mesh if devices == a.devices else _mesh(devices)
    model = build_model(va, fields)
    if impl == "reference":
      runners.append(JaxRunner(label, reference_vit_jax.from_vit_cls(model), va, vmesh,
                               impl="vit_jax_reference"))
    elif impl == "vit_cls":
      runners.append(JaxRunner(label, model, va, vmesh))
    else:
      raise SystemExit(f"variant {label}: impl={impl!r}: choose vit_cls or reference")
    runners[-1].result["devices"] = devices
  runners[0].result["devices"] = a.devices
  if "timm" in compare:
    runners.append(TimmProxy(a, a.num_classes))
  return runners


def _peak_memory(devices) -> int | None:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _bytes_limit(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def find_max_batch(a, mesh, devices, policies, out: dict) -> None:
  """Largest training batch per remat policy: XLA's footprint at two batches -> affine fit -> a check."""
  import jax  # pylint: disable=g-import-not-at-top
  limit = _bytes_limit(devices[0])
  if a.memory_limit_gb:
    limit = int(a.memory_limit_gb * 2 ** 30)
  if limit is None:
    out["max_batch"] = "n/a: the backend reports no memory limit (give --memory_limit_gb)"
    return
  per = len(devices)
  res = {}
  for policy in policies:
    t = time.perf_counter()
    try:
      model = build_model(a, dict(remat_policy=policy))
      b1, b2 = 32 * per, 128 * per
      sizes = []
      for b in (b1, b2):
        r = JaxRunner(f"max_batch_{policy}", model, a, mesh, abstract=True, batch=b)
        r.compile(infer=False)
        sizes.append(r.result["compiled_train_bytes"])
      slope = (sizes[1] - sizes[0]) / (b2 - b1)
      fixed = sizes[0] - slope * b1
      usable = 0.92 * limit  # headroom for the allocator's fragmentation and the runtime
      pred = int((usable - fixed) / slope) // (8 * per) * (8 * per)
      entry = dict(bytes_per_image=slope, fixed_bytes=fixed, predicted=pred, bytes_limit=limit)
      # Check: one real step at the predicted batch (and 15% less if that fails).
      for b in () if a.no_verify else (pred, int(pred * 0.85) // (8 * per) * (8 * per)):
        r = None
        try:
          r = JaxRunner(f"max_batch_{policy}", model, a, mesh, batch=b)
          r.compile(infer=False)
          step_s = r.train(1)[0]
          entry.update(verified_batch=b, verified_step_s=step_s, verified_img_s=b / step_s)
          break
        except Exception as e:  # pylint: disable=broad-except
          entry.setdefault("failures", []).append(f"batch {b}: {type(e).__name__}: {str(e)[:200]}")
        finally:
          del r  # free this batch's state and activations before the next try
          gc.collect()
      jax.clear_caches()
    except Exception as e:  # pylint: disable=broad-except
      entry = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    entry["search_s"] = time.perf_counter() - t
    res[policy] = entry
    out["max_batch"] = res
    print(f"max batch, remat_policy={policy}: {entry}", flush=True)
    if a.json_out:  # after each policy: a call cut off at its time limit keeps what finished
      with open(a.json_out, "w") as f:
        f.write(json.dumps(out, default=str) + "\n")


def main(argv=None) -> dict:
  a = parse_args(argv)
  set_early_environment(a)
  t_start = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if a.batch % a.devices:
    raise SystemExit(f"--batch {a.batch} is not divisible by --devices {a.devices}")
  mesh = _mesh(a.devices)
  devices = list(mesh.devices.flat)
  backend = jax.default_backend()
  model = build_model(a)
  fwd_flops = analytic_forward_flops(model, a.resolution)
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  out = dict(
      model=a.model, resolution=a.resolution, batch=a.batch, dtype=str(jnp.dtype(a.dtype)),
      allocator=allocator.describe(),
      devices=len(devices), backend=backend, device_kind=devices[0].device_kind,
      jax_version=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
      cpu_count=os.cpu_count(), load_avg_start=_load_avg(),
      options=dict(attention_impl=a.attention_impl, fuse_qkv=_parse_value(a.fuse_qkv),
                   scan_layers=a.scan_layers, remat_policy=a.remat_policy,
                   matmul_dtype=a.matmul_dtype, donate=not a.no_donate, batch_chunks=a.batch_chunks),
      flops_source="analytic matmul count (2/MAC), train = 3 x forward; HLO cost analysis beside it",
      analytic_forward_flops_per_image=fwd_flops, analytic_train_flops_per_image=3 * fwd_flops)

  if a.compile_only:
    r = JaxRunner("vit_cls", model, a, mesh, abstract=True)
    r.compile(infer=False)
    out["runners"] = [r.result]
    print(f"{a.model} {a.resolution}px batch {a.batch} {out['dtype']} scan_layers={a.scan_layers}: "
          f"train step compiled in {r.result['compile_train_s']:.1f} s "
          f"(XLA footprint {_fmt_bytes(r.result['compiled_train_bytes'])})")
    return _finish(a, out)

  if a.max_batch:
    find_max_batch(a, mesh, devices, [p.strip() for p in a.max_batch.split(",") if p.strip()], out)
    return _finish(a, out)

  # Peak probe: run even when a peak is given, so that both MFUs can be reported.
  probe = None
  if not a.no_probe:
    n = a.probe_size or (2048 if backend == "cpu" else 8192)
    probe = MatmulProbe(jnp.dtype(a.dtype), n, devices[0])

  runners = make_runners(a, mesh)
  try:
    for r in runners:
      r.compile(infer=not a.no_infer)
      for _ in range(a.warmup):
        r.train(1)
        if not a.no_infer:
          r.infer(1)
    n_run = len(runners)
    train_t = {r.label: [] for r in runners}
    infer_t = {r.label: [] for r in runners}
    for rnd in range(a.rounds):
      order = [runners[(rnd + i) % n_run] for i in range(n_run)]
      for r in order:
        train_t[r.label].append(r.train(a.steps_per_round))
      if not a.no_infer:
        for r in order:
          infer_t[r.label].append(r.infer(a.steps_per_round))
      if probe is not None:
        probe.run()
  finally:
    for r in runners:
      r.close()

  if probe is not None:
    out["measured_peak_tflops"] = probe.tflops
    out["measured_peak_source"] = f"best {probe.n}^3 {probe.dtype} matmul probe over {a.rounds} rounds"
  if a.peak_tflops:
    out.update(peak_tflops=a.peak_tflops, peak_source="given (--peak_tflops)")
  elif probe is not None:
    out.update(peak_tflops=probe.tflops, peak_source="measured: " + out["measured_peak_source"])
  else:
    raise SystemExit("--no_probe needs --peak_tflops")
  peak = out["peak_tflops"]
  out["peak_memory_bytes"] = _peak_memory(devices)
  out["peak_memory_note"] = ("device.memory_stats()['peak_bytes_in_use'], whole process"
                             if out["peak_memory_bytes"] is not None else
                             f"n/a: the {backend} backend reports no memory stats")
  for r in runners:
    res = r.result
    ts = [w for w, _ in train_t[r.label]]
    res["train_step_s"] = statistics.median(ts)
    res["train_step_s_all"] = ts
    # Process CPU seconds per step: the work done, nearly independent of how busy the machine was.
    res["train_cpu_s_per_step"] = statistics.median(c for _, c in train_t[r.label])
    res["train_img_s"] = a.batch / res["train_step_s"]
    res["train_tflops"] = res["train_img_s"] * 3 * fwd_flops / 1e12
    res["train_mfu"] = res["train_tflops"] / peak
    if not a.no_infer:
      ti = [w for w, _ in infer_t[r.label]]
      res["infer_step_s"] = statistics.median(ti)
      res["infer_cpu_s_per_step"] = statistics.median(c for _, c in infer_t[r.label])
      res["infer_img_s"] = a.batch / res["infer_step_s"]
      res["infer_tflops"] = res["infer_img_s"] * fwd_flops / 1e12
      res["infer_mfu"] = res["infer_tflops"] / peak
    if probe is not None and a.peak_tflops:
      res["train_mfu_vs_measured_peak"] = res["train_tflops"] / probe.tflops
  base = runners[0].result
  for r in runners[1:]:
    base[f"train_speedup_vs_{r.label}"] = base["train_img_s"] / r.result["train_img_s"]
    base[f"train_cpu_ratio_vs_{r.label}"] = r.result["train_cpu_s_per_step"] / base["train_cpu_s_per_step"]
    if not a.no_infer:
      base[f"infer_speedup_vs_{r.label}"] = base["infer_img_s"] / r.result["infer_img_s"]
      base[f"infer_cpu_ratio_vs_{r.label}"] = (r.result["infer_cpu_s_per_step"]
                                               / base["infer_cpu_s_per_step"])
  out["runners"] = [r.result for r in runners]
  out["allocators_differ"] = len({r.result["allocator_kind"] for r in runners}) > 1
  out["wall_s"] = time.perf_counter() - t_start
  out["load_avg_end"] = _load_avg()
  print_table(out, a)
  return _finish(a, out)


def _load_avg() -> float | None:
  """1-minute load average: above the core count, other processes were competing for the CPU."""
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def _fmt_bytes(b) -> str:
  if b is None:
    return "n/a"
  return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def _fmt(v, spec=".2f") -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float) and v != v:
    return "n/a"
  return format(v, spec)


def print_table(out: dict, a) -> None:
  print(f"\n{out['model']} @ {out['resolution']}px, batch {out['batch']}, {out['dtype']}, "
        f"{out['devices']} x {out['device_kind']} ({out['backend']}), jax {out['jax_version']}")
  if "measured_peak_tflops" in out and out["peak_source"].startswith("given"):
    print(f"measured matmul peak {out['measured_peak_tflops']:.4g} TFLOP/s "
          f"({out['measured_peak_source']})")
  print(f"peak {out['peak_tflops']:.4g} TFLOP/s ({out['peak_source']}); FLOPs: {out['flops_source']}: "
        f"{out['analytic_train_flops_per_image'] / 1e9:.2f} GFLOP/train image, "
        f"{out['analytic_forward_flops_per_image'] / 1e9:.2f} GFLOP/inference image")
  print(f"peak memory: {_fmt_bytes(out['peak_memory_bytes'])} ({out['peak_memory_note']})")
  la0, la1 = out.get("load_avg_start"), out.get("load_avg_end")
  print(f"load average (1 min) at start / end: {la0} / {la1} on {out['cpu_count']} CPUs" +
        # Only the load at the start says something about other work: by the end it includes this
        # benchmark's own thread pools (several per simulated device, and timm's server).
        ("  WARNING: the machine was busy with other work before the benchmark started; only same-run "
         "ratios mean anything, and an OpenMP runtime (timm) suffers more from shared cores than "
         "XLA's work-stealing pool"
         if out["backend"] == "cpu" and (la0 or 0) > (out["cpu_count"] or 1) + 0.5 else ""))
  if out.get("allocators_differ"):  # (this process's allocator is the run's first line)
    print("WARNING: the runners ran under different allocators (see the allocator column): the "
          "comparison measures the allocators too")
  cols = ["runner", "allocator", "compile train s", "compile infer s", "train img/s", "infer img/s",
          "train TFLOP/s", "train MFU", "infer TFLOP/s", "infer MFU", "HLO GFLOP/train img",
          "XLA train bytes", "train CPU-s/step", "infer CPU-s/step"]
  rows = []
  for r in out["runners"]:
    rows.append([r["label"], r.get("allocator_kind", "n/a"), _fmt(r.get("compile_train_s"), ".1f"), _fmt(r.get("compile_infer_s"), ".1f"),
                 _fmt(r["train_img_s"]), _fmt(r.get("infer_img_s")), _fmt(r["train_tflops"], ".4f"),
                 _fmt(r["train_mfu"], ".1%"), _fmt(r.get("infer_tflops"), ".4f"),
                 _fmt(r.get("infer_mfu"), ".1%"),
                 _fmt((r.get("hlo_train_flops_per_image") or float("nan")) / 1e9),
                 _fmt_bytes(r.get("compiled_train_bytes")), _fmt(r.get("train_cpu_s_per_step")),
                 _fmt(r.get("infer_cpu_s_per_step"))])
  widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  print(line(cols))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in rows:
    print(line(row))
  base = out["runners"][0]
  for k, v in base.items():
    if "_speedup_vs_" in k:
      other = k.split("_speedup_vs_")[1]
      cpu = base.get(k.replace("_speedup_vs_", "_cpu_ratio_vs_"))
      print(f"{base['label']} {k.split('_')[0]} speedup vs {other}: {v:.2f}x wall (same-run medians)"
            + (f", {cpu:.2f}x in process CPU-seconds per step" if cpu else ""))


def _finish(a, out: dict) -> dict:
  text = json.dumps(out, default=str)
  print("JSON: " + text, flush=True)
  if a.json_out:
    with open(a.json_out, "w") as f:
      f.write(text + "\n")
  return out


def choose_allocator(argv=None) -> None:
  """This process's memory allocator, before JAX is imported (`--allocator` wins over the environment;
  may restart the process once); prints it as the first line."""
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top  (standard library only)
  chosen = parse_args(argv).allocator
  if chosen:
    os.environ[allocator.ENV_MODE] = chosen  # kept across the restart, and passed to timm's server
  allocator.setup()


if __name__ == "__main__":
  choose_allocator()
  main()
