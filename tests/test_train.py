"""Training: the step's numerics (sharding, accumulation), learning, checkpoints, resume, SIGTERM, NaN."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from vit_cls import optim
from vit_cls import sharding
from vit_cls import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step_fn(config, mesh, num_classes=10):
  model = train.create_model(config, num_classes)
  tx, schedule = optim.create_optimizer(config)
  state, _ = train.init_state(model, tx, config, mesh)
  fn = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                 config=config, num_classes=num_classes),
               in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
               out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
  return state, fn


def _batch(n, size, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, 10, (n,)).astype(np.int32)}


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                       atol=atol), a, b)


def test_first_step_has_a_nonzero_learning_rate(tiny_config):
  schedule = optim.create_learning_rate_schedule(tiny_config)
  assert float(schedule(0)) > 0
  assert float(schedule(tiny_config.warmup_steps - 1)) == pytest.approx(tiny_config.learning_rate)
  assert float(schedule(tiny_config.total_steps)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_skips_biases_layernorm_cls_and_position_embeddings(tiny_config):
  model = train.create_model(tiny_config, 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)["params"]
  mask = optim.decay_mask(params)
  assert mask["head"]["kernel"] and mask["embedding"]["kernel"]
  assert not mask["cls"] and not mask["head"]["bias"]
  assert not mask["Transformer"]["posembed_input"]["pos_embedding"]
  assert not mask["Transformer"]["encoder_norm"]["scale"]


def test_step_on_8_devices_equals_1_device(tiny_config):
  assert jax.device_count() == 8
  tiny_config.model.dropout_rate = 0.1  # dropout keys must not depend on the layout either
  # SGD: its update is linear in the gradient, so float tolerance means something. (Adam divides by
  # sqrt(v): for a near-zero gradient, 1e-9 of summation-order noise becomes an update of +-lr.)
  tiny_config.optimizer = "sgd"
  batch = _batch(32, size=tiny_config.image_size)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
    state, fn = _step_fn(tiny_config, mesh)
    for _ in range(2):
      state, metrics = fn(state, sharding.global_batch(batch, mesh))
    results.append((jax.device_get(state.params), float(metrics["loss"])))
  _assert_trees_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


def test_accumulation_equals_one_large_batch(tiny_config):
  tiny_config.optimizer = "sgd"  # linear in the gradient: see the test above
  mesh = sharding.create_mesh()
  batch = _batch(64, size=tiny_config.image_size)
  out = {}
  for accum in (1, 4):
    tiny_config.accum_steps = accum
    state, fn = _step_fn(tiny_config, mesh)
    state, metrics = fn(state, sharding.global_batch(batch, mesh))
    out[accum] = (jax.device_get(state.params), float(metrics["loss"]))
  _assert_trees_close(out[1][0], out[4][0], rtol=1e-4, atol=1e-6)
  assert out[1][1] == pytest.approx(out[4][1], rel=1e-5)


def test_batch_chunks_compute_the_same_step(tiny_config):
  """Independent chunks of the batch (a CPU speed option) give the update of the whole batch at once."""
  tiny_config.optimizer = "sgd"
  mesh = sharding.create_mesh()
  batch = _batch(64, size=tiny_config.image_size)
  out = {}
  for accum, chunks in ((1, 1), (1, 4), (2, 2)):
    tiny_config.accum_steps, tiny_config.batch_chunks = accum, chunks
    state, fn = _step_fn(tiny_config, mesh)
    state, metrics = fn(state, sharding.global_batch(batch, mesh))
    out[accum, chunks] = (jax.device_get(state.params), float(metrics["loss"]),
                          float(metrics["accuracy"]))
  for key in ((1, 4), (2, 2)):
    _assert_trees_close(out[1, 1][0], out[key][0], rtol=1e-4, atol=1e-6)
    assert out[1, 1][1] == pytest.approx(out[key][1], rel=1e-5)
    assert out[1, 1][2] == pytest.approx(out[key][2], abs=1e-6)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_learns_the_digits(tiny_config, tmp_path):
  """A real learning check: 300 steps take the loss down and accuracy far above chance (10%)."""
  tiny_config.model.num_layers = 2
  tiny_config.update(dict(total_steps=300, warmup_steps=20, log_every=20, eval_every=300,
                          checkpoint_every=300, learning_rate=3e-3, batch_size=64))
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  losses = [r["loss"] for r in _records(tmp_path, "train")]
  assert losses[-1] < 0.8 * losses[0]
  assert final["num_examples"] == 360  # every test example scored, none dropped
  assert final["accuracy"] > 0.3  # chance is 0.1; this run reaches about 0.45


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path):
  train.train_and_evaluate(tiny_config, str(tmp_path))  # 12 good steps, checkpoints at 6 and 12
  ckpt = tmp_path / "checkpoints"
  assert sorted(os.listdir(ckpt)) == ["12", "6"]
  # Resume with a learning rate that blows the parameters up: Adam's steps are about lr in size.
  tiny_config.update(dict(total_steps=24, learning_rate=1e38))
  with pytest.raises(train.NonFiniteError, match=r"NaN/Inf at step 1[34].*step 12\) is intact"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert sorted(os.listdir(ckpt)) == ["12", "6"]
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  params, _ = checkpoint.restore_params(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def _train_cmd(workdir, *overrides):
  return [sys.executable, os.path.join(REPO, "train.py"), "--config",
          os.path.join(REPO, "configs", "default.py"), "--workdir", str(workdir),
          "--config.model.hidden_size=32", "--config.model.mlp_dim=64", "--config.model.num_heads=2",
          "--config.model.num_layers=1", "--config.model.representation_size=32",
          "--config.batch_size=32", "--config.eval_batch_size=64", "--config.warmup_steps=2",
          "--config.shuffle_buffer=256", *overrides]


def _final_params(workdir):
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.restore_params(str(workdir))[0]


@pytest.mark.slow
def test_train_py_end_to_end_writes_checkpoints_metrics_and_plot(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path, "--config.total_steps=10", "--config.log_every=5",
                                  "--config.eval_every=10", "--config.checkpoint_every=5"),
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step     10/10" in out.stdout and "ETA" in out.stdout and "img/s" in out.stdout
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]
  assert (tmp_path / "curves.png").stat().st_size > 1000
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert {"train/loss", "eval/accuracy"} <= set(events.Tags()["tensors"])
  assert [e.step for e in events.Tensors("eval/accuracy")] == [10]
  evals = _records(tmp_path, "eval")
  assert evals[-1]["step"] == 10 and evals[-1]["num_examples"] == 360


# Kill and preemption tests (SIGKILL at random moments incl. mid-save, SIGTERM) live in
# tests/test_reliability.py, with 10 cycles each.


@pytest.mark.slow
def test_digits_pretrain_then_finetune_at_a_higher_resolution(tiny_config, tmp_path):
  """The README's two-step path, shortened: MLP head at one resolution, then linear head at twice it."""
  from configs import finetune_digits  # pylint: disable=g-import-not-at-top
  tiny_config.model.num_layers = 2
  tiny_config.update(dict(total_steps=300, warmup_steps=20, log_every=50, eval_every=300,
                          checkpoint_every=300, learning_rate=3e-3, batch_size=64))
  pre = train.train_and_evaluate(tiny_config, str(tmp_path / "pre"))

  ft = finetune_digits.get_config()
  ft.model = tiny_config.model
  ft.model.representation_size = None
  ft.update(dict(image_size=2 * tiny_config.image_size, init_from=str(tmp_path / "pre"),
                 total_steps=100, warmup_steps=10, log_every=50, eval_every=100,
                 checkpoint_every=100, batch_size=64, eval_batch_size=64, shuffle_buffer=256))
  final = train.train_and_evaluate(ft, str(tmp_path / "ft"))
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  params, meta = checkpoint.restore_params(str(tmp_path / "ft"))
  assert "pre_logits" not in params and meta["image_size"] == 2 * tiny_config.image_size
  grid = (2 * tiny_config.image_size // tiny_config.model.patch_size[0]) ** 2
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape[1] == grid + 1
  # Chance is 0.1. 100 SGD steps with a fresh zero head at a new resolution recover part of what the
  # pre-trained encoder knows; the full-length configs/finetune_digits.py run is what the README reports.
  assert final["accuracy"] > 0.3, (pre, final)


def test_init_from_fills_a_layer_scan_model(tiny_config, tmp_path, monkeypatch):
  """`config.init_from` converts in the published layout; a `scan_layers` model gets the blocks stacked.
  The source `check_init_from` opened is the one converted: read once."""
  import types  # pylint: disable=g-import-not-at-top
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  tiny_config.model.num_layers = 2
  size = tiny_config.image_size
  source = train.create_model(tiny_config, 10).init(
      jax.random.key(3), jnp.zeros((1, size, size, 3)), train=False)["params"]
  checkpoint.save_npz(source, tmp_path / "source.npz")
  tiny_config.model.scan_layers = True
  tiny_config.init_from = str(tmp_path / "source.npz")
  model = train.create_model(tiny_config, 10)
  opened = train.check_init_from(tiny_config, model)  # shapes checked against the scanned stand-ins
  tx, _ = optim.create_optimizer(tiny_config)
  state, _ = train.init_state(model, tx, tiny_config, sharding.create_mesh())
  assert "encoderblock" in state.params["Transformer"]
  monkeypatch.setattr(checkpoint, "_read", None)  # a second read would fail
  state = train.initialise_from(state, tiny_config, types.SimpleNamespace(info=lambda _: None), model,
                                opened)
  got = checkpoint.scan_to_unrolled(jax.device_get(state.params))
  for i in range(2):
    _assert_trees_close(got["Transformer"][f"encoderblock_{i}"],
                        source["Transformer"][f"encoderblock_{i}"], rtol=0, atol=0)


def test_layer_scan_run_converts_and_fine_tunes(tiny_config, tmp_path, capsys):
  """`--config.model.scan_layers=True` trains; `python -m vit_cls.convert` reads its stacked checkpoint
  (published layout out); a scan model fine-tunes from the result, starting from the trained encoder."""
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_cls import convert  # pylint: disable=g-import-not-at-top
  tiny_config.model.update(dict(num_layers=2, scan_layers=True))
  tiny_config.update(dict(total_steps=2, warmup_steps=1, log_every=2, eval_every=2,
                          checkpoint_every=2))
  train.train_and_evaluate(tiny_config, str(tmp_path / "pre"))
  trained, meta = checkpoint.restore_params(str(tmp_path / "pre"))
  assert meta["model"]["scan_layers"] and "encoderblock_1" in trained["Transformer"]

  out = tmp_path / "ft_init.npz"
  assert convert.main(["--checkpoint", str(tmp_path / "pre"), "--out", str(out), "--num_classes", "5",
                       "--image_size", str(2 * tiny_config.image_size)]) == 0, capsys.readouterr()
  converted = checkpoint.load_npz(out)
  for i in range(2):
    _assert_trees_close(converted["Transformer"][f"encoderblock_{i}"],
                        trained["Transformer"][f"encoderblock_{i}"], rtol=0, atol=0)
  assert "pre_logits" not in converted and converted["head"]["kernel"].shape == (32, 5)

  ft = tiny_config.copy_and_resolve_references()
  ft.model.representation_size = None
  ft.update(dict(image_size=2 * tiny_config.image_size, init_from=str(out), optimizer="sgd",
                 learning_rate=1e-7, weight_decay=0.0, total_steps=1, warmup_steps=0, eval_every=1,
                 checkpoint_every=1, log_every=1))
  train.train_and_evaluate(ft, str(tmp_path / "ft"))
  assert "Initialised from" in capsys.readouterr().out
  tuned, meta = checkpoint.restore_params(str(tmp_path / "ft"))
  assert meta["model"]["scan_layers"]
  for i in range(2):  # one step at lr 1e-7: still the converted encoder
    _assert_trees_close(tuned["Transformer"][f"encoderblock_{i}"],
                        converted["Transformer"][f"encoderblock_{i}"], rtol=0, atol=1e-5)


def test_asynchronous_saves_write_what_blocking_saves_write(tiny_config, tmp_path, monkeypatch):
  """The default saves return before the files are written while the next steps donate the state's
  buffers: the checkpoints must still hold the saved steps' values, bit for bit. The eval split is
  built once per run, however many evaluations there are."""
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_cls import manifest  # pylint: disable=g-import-not-at-top
  built = []
  create = train.input_pipeline.create_eval_dataset
  monkeypatch.setattr(train.input_pipeline, "create_eval_dataset",
                      lambda config: built.append(1) or create(config))
  tiny_config.update(dict(total_steps=6, checkpoint_every=2, eval_every=2, log_every=2,
                          keep_checkpoints=None))
  assert tiny_config.async_checkpoints  # the default
  train.train_and_evaluate(tiny_config, str(tmp_path / "async"))
  assert len(built) == 1  # 3 evaluations
  tiny_config.async_checkpoints = False
  train.train_and_evaluate(tiny_config, str(tmp_path / "blocking"))
  for step in (2, 4, 6):
    a, b = (checkpoint.restore_params(str(tmp_path / run / "checkpoints" / str(step)))[0]
            for run in ("async", "blocking"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert manifest.damage_evidence(tmp_path / "async" / "checkpoints" / str(step)) is None
    assert manifest.read(tmp_path / "async" / "checkpoints" / str(step))  # recorded with the commit
