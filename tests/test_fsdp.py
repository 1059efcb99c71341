"""config.fsdp: parameters and optimizer state sharded over the data devices, same updates as replicated.

In one process with 8 simulated devices (tests/test_multihost.py repeats the comparison across two real
processes). The tiny test model's kernels are below `sharding.FSDP_MIN_SIZE`, so the tests lower it.
"""

import functools
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_cls import optim
from vit_cls import sharding
from vit_cls import train


@pytest.fixture(autouse=True)
def shard_small_arrays(monkeypatch):
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)


def test_fsdp_spec_shards_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((768, 3072), 8, 0) == P(None, "data")
  assert sharding.fsdp_spec((3072, 768), 8, 0) == P("data", None)
  assert sharding.fsdp_spec((1, 197, 768), 8, 0) == P(None, None, "data")  # 197 is not divisible
  assert sharding.fsdp_spec((12, 64, 768), 16, 0) == P(None, None, "data")
  assert sharding.fsdp_spec((12, 60, 770), 16, 0) == P()  # nothing divides: replicated
  assert sharding.fsdp_spec((768,), 8, 1024) == P()  # small: replicated
  assert sharding.fsdp_spec((), 8, 0) == P()
  assert sharding.fsdp_spec((768, 3072), 1, 0) == P()


def _setup(config, fsdp, mesh):
  config.fsdp = fsdp
  model = train.create_model(config, 10)
  tx, schedule = optim.create_optimizer(config)
  state, abstract = train.init_state(model, tx, config, mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, abstract)
  step_model = sharding.BatchShardedModel(model, mesh) if fsdp else model  # as train.py does
  fn = jax.jit(functools.partial(train.train_step, model=step_model, tx=tx, schedule=schedule,
                                 config=config, num_classes=10),
               in_shardings=(state_sh, sharding.batch_sharding(mesh)),
               out_shardings=(state_sh, sharding.replicated(mesh)))
  return state, abstract, fn


def _batches(n, steps, size=16):
  rng = np.random.default_rng(0)
  return [{"image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, 10, (n,)).astype(np.int32)} for _ in range(steps)]


def test_fsdp_parameters_and_optimizer_state_are_sharded(tiny_config):
  mesh = sharding.create_mesh()
  state, abstract, _ = _setup(tiny_config, True, mesh)
  kernel = state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (32, 64) and kernel.sharding.spec == P(None, "data")
  assert {s.data.shape for s in kernel.addressable_shards} == {(32, 8)}  # 1/8 on each device
  assert len({s.index[1].start for s in kernel.addressable_shards}) == 8  # eight different pieces
  bias = state.params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["bias"]
  assert bias.sharding.spec == P()  # 64 elements: replicated
  # Adam's moments (and every other state leaf) follow the layout of their parameter.
  for moment in (leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
                 if "Dense_0" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)):
    assert moment.sharding.spec == P(None, "data")
  assert state.step.sharding.spec == P()
  assert jax.tree.map(lambda x: x.sharding, abstract) == jax.tree.map(lambda x: x.sharding, state)
  _, replicated_abstract, _ = _setup(tiny_config, False, mesh)
  ratio = sharding.bytes_per_device(abstract) / sharding.bytes_per_device(replicated_abstract)
  assert ratio < 0.3  # biases, LayerNorm and cls stay whole; everything else is 1/8


@pytest.mark.parametrize("optimizer,rtol,atol", [("sgd", 1e-5, 1e-6), ("adamw", 1e-4, 1e-5)])
def test_fsdp_steps_equal_replicated_steps(tiny_config, optimizer, rtol, atol):
  tiny_config.optimizer = optimizer
  tiny_config.model.dropout_rate = 0.1
  mesh = sharding.create_mesh()
  batches = _batches(tiny_config.batch_size, 3)
  out = {}
  for fsdp in (False, True):
    state, _, fn = _setup(tiny_config, fsdp, mesh)
    for b in batches:
      state, metrics = fn(state, sharding.global_batch(b, mesh))
    out[fsdp] = jax.device_get((state.params, metrics["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               out[False], out[True])


def test_fsdp_step_needs_less_memory_per_device(tiny_config):
  """What lets a model that does not fit replicated train: the compiled step's own memory analysis."""
  mesh = sharding.create_mesh()
  batch = jax.ShapeDtypeStruct((tiny_config.batch_size, 16, 16, 3), np.float32,
                               sharding=sharding.batch_sharding(mesh))
  labels = jax.ShapeDtypeStruct((tiny_config.batch_size,), np.int32,
                                sharding=sharding.batch_sharding(mesh))
  sizes = {}
  for fsdp in (False, True):
    _, abstract, fn = _setup(tiny_config, fsdp, mesh)
    stats = fn.lower(abstract, {"image": batch, "label": labels}).compile().memory_analysis()
    sizes[fsdp] = stats.argument_size_in_bytes
  assert sizes[True] < 0.4 * sizes[False]


def test_checkpoints_move_between_fsdp_and_replicated(tiny_config, tmp_path):
  mesh = sharding.create_mesh()
  state, abstract_fsdp, _ = _setup(tiny_config, True, mesh)
  _, abstract_repl, _ = _setup(tiny_config, False, mesh)
  mngr = train.Checkpoints(str(tmp_path / "a"), tiny_config)
  mngr.save(state, {"note": "fsdp"})
  restored = train.restore_checkpoint(mngr, 0, abstract_repl)
  assert restored.params["head"]["kernel"].sharding.spec == P()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
  mngr2 = train.Checkpoints(str(tmp_path / "b"), tiny_config)
  mngr2.save(restored, {"note": "replicated"})
  back = train.restore_checkpoint(mngr2, 0, abstract_fsdp)
  assert back.params["head"]["kernel"].sharding.spec == P("data", None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(back))


def test_fsdp_on_gpus_gets_one_collective_per_gradient_and_nothing_else_does():
  """GPU fsdp steps compile with XLA's collective combining off (sharding.GPU_FSDP_STEP_OPTIONS); a CPU
  or TPU mesh, one device, or a replicated state keep the compiler's defaults."""
  def mesh(platform, n):
    return types.SimpleNamespace(devices=np.asarray([types.SimpleNamespace(platform=platform)] * n))
  assert sharding.step_compiler_options(mesh("gpu", 4), True) == sharding.GPU_FSDP_STEP_OPTIONS
  assert sharding.step_compiler_options(mesh("gpu", 4), False) is None
  assert sharding.step_compiler_options(mesh("gpu", 1), True) is None
  assert sharding.step_compiler_options(mesh("tpu", 4), True) is None
  assert sharding.step_compiler_options(mesh("cpu", 8), True) is None
