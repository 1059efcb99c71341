"""`python -m vit_cls.aot`: train.py's step compiled for TPU / GPU targets without the chips.

The compile tests need the target's compiler package (libtpu: `pip install -r requirements-tpu.txt`;
the CUDA plugin: `requirements-gpu.txt`) and skip cleanly without it. Target names, missing packages
and the odd-length attention padding are checked without either. Models are tiny: a compile for
v5e takes seconds, not minutes.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from vit_cls import aot
from vit_cls import sharding
from vit_cls import speed

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None
# CI's libtpu stage sets this, so that a libtpu that failed to install fails there instead of skipping.
if os.environ.get("VIT_CLS_TESTS_NEED_LIBTPU") == "1" and not HAS_LIBTPU:
  raise RuntimeError("VIT_CLS_TESTS_NEED_LIBTPU=1 but libtpu is not importable: pip install -r requirements-tpu.txt")
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (requirements-tpu.txt)")
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN,
                                       reason="CUDA plugin not installed (requirements-gpu.txt)")


def tiny_config(**model):
  """The digits job's config with a tiny model whose every array splits 4 ways (fsdp over 4 chips)."""
  config = default_config.get_config()
  config.batch_size = 32
  config.eval_batch_size = 32
  config.model.update(dict(hidden_size=64, mlp_dim=128, num_heads=4, num_layers=2,
                           representation_size=None, dropout_rate=0.0))
  config.model.update(model)
  return config


# ----------------------------------------------------------------------------------------------------
# One-line answers, no compiler needed.


@pytest.mark.parametrize("name", ["", "v5e", "v5e:2x2x2", "v4:2x2", "v9:2x2", "v5e:axb", "h100",
                                  "h100:9", "h100:0", "h100:2x", "b200:8", "v5litepod-16"])
def test_bad_target_names_give_one_line_with_examples(name):
  with pytest.raises(aot.TargetError) as e:
    aot.parse_target(name)
  message = str(e.value)
  assert "\n" not in message
  assert "--target=" in message and (":" in message.split("--target=")[1])


def test_target_names_parse():
  t = aot.parse_target("v5e:4x4")
  assert (t.platform, t.num_chips, t.topology) == ("tpu", 16, "v5e:4x4")
  assert aot.parse_target("tpu7x:2x2x1").num_chips == 4
  g = aot.parse_target("h100:2x8")
  assert (g.platform, g.num_chips, g.hosts, g.topology) == ("cuda", 16, 2, "1x2x8")
  assert aot.parse_target("H200:8").chip.name == "h200"


@pytest.mark.parametrize("target,package,requirements", [("v5e:2x2", "libtpu", "requirements-tpu.txt"),
                                                         ("h100:8", "jax_cuda12_plugin",
                                                          "requirements-gpu.txt")])
def test_missing_compiler_package_is_one_line(monkeypatch, capsys, target, package, requirements):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name.split(".")[0] in (package, "jax_plugins")
                      else real(name, *a))
  with pytest.raises(SystemExit) as e:
    aot.main(["aot", "--config=configs/default.py", f"--target={target}"])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and requirements in err and "pip install" in err


def test_bad_target_on_the_command_line_is_one_line(capsys):
  with pytest.raises(SystemExit):
    aot.main(["aot", "--config=configs/default.py", "--target=v5e:3"])
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --target='v5e:3'") and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/default.py", "--config.bogus=1"], "error: --config.bogus: the config has no field"),
    (["--config=configs/missing.py"], "error: --config: cannot load the config file"),
])
def test_bad_config_is_one_line(monkeypatch, capsys, args, expected):
  monkeypatch.setattr(aot, "check_installed", lambda target: None)  # fails before any compile
  with pytest.raises(SystemExit):
    aot.main(["aot", "--target=v5e:2x2"] + args)
  err = capsys.readouterr().err.strip()
  assert err.startswith(expected) and len(err.splitlines()) == 1, err


def test_collectives_are_read_from_hlo_text():
  text = "\n".join([
      "  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %p), replica_groups=[1,4]<=[4], "
      "to_apply=%add",
      "  %ags = (bf16[256,64]{1,0}, bf16[1024,64]{1,0}) all-gather-start(bf16[256,64]{1,0} %w), "
      "replica_groups={{0,1,2,3}}, dimensions={0}",
      "  %agd = bf16[1024,64]{1,0} all-gather-done(%ags)",
  ])
  got = aot.collectives(text, 4)
  assert got["all-reduce"] == {"count": 1, "result_bytes": 4096, "bytes_moved": 6144}
  assert got["all-gather"]["result_bytes"] == 1024 * 64 * 2  # the result half of the start's tuple
  assert got["all-gather"]["count"] == 1


def test_analytic_flops_of_b16_are_the_published_count():
  kwargs = dict(patch_size=(16, 16), hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12,
                pool="cls", num_registers=0, representation_size=None, num_classes=1000)
  assert aot.analytic_forward_flops(kwargs, 224) / 2 == pytest.approx(17.56e9, rel=0.01)


# ----------------------------------------------------------------------------------------------------
# The odd-length cuDNN path: padded and masked, the function stays the same (XLA implementation, CPU).


@pytest.mark.parametrize("tokens,causal", [(17, False), (197, False), (17, True), (16, False)])
def test_padded_attention_equals_the_unpadded_function(tokens, causal):
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (2, tokens, 4, 8)) for kk in keys[:3])
  cotangent = jax.random.normal(keys[3], (2, tokens, 4, 8))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * cotangent)

  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
  padded = lambda q, k, v: speed.padded_attention(q, k, v, causal=causal, implementation="xla")
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-5, rtol=1e-5)
  for g_pad, g_plain in zip(jax.grad(loss, (1, 2, 3))(padded, q, k, v),
                            jax.grad(loss, (1, 2, 3))(plain, q, k, v)):
    np.testing.assert_allclose(g_pad, g_plain, atol=1e-5, rtol=1e-5)


def test_attention_kernel_names_splash_from_hlo_text():
  splash = ('  %splash_mha_fwd_residuals.1 = (f32[128,128]{1,0}) custom-call(%a), '
            'custom_call_target="tpu_custom_call"')
  other = '  %my_kernel.3 = f32[8]{0} custom-call(%a), custom_call_target="tpu_custom_call"'
  assert aot.attention_kernel(splash)["kernel"] == "splash"
  assert aot.attention_kernel(other) == {"kernel": "pallas", "cudnn_forward_calls": 0,
                                         "cudnn_backward_calls": 0, "pallas_calls": 1, "splash_calls": 0}
  assert aot.attention_kernel("  %dot.1 = f32[8]{0} dot(%a, %b)")["kernel"] == "xla"


@needs_libtpu
def test_fused_attention_compiles_as_sharded_splash_for_v5e():
  """At >= SPLASH_MIN_TOKENS tokens, `fused` traced for TPU with the mesh (as build_steps traces) is
  splash in a shard_map over the batch, and libtpu compiles it over 4 chips: forward, dq and dkv
  kernels. Without the shard_map the compile stops at "Mosaic kernels cannot be automatically
  partitioned"."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  target = aot.parse_target("v5e:2x2")
  aot.prepare_environment(target)
  mesh = Mesh(np.asarray(aot.target_devices(target)), (sharding.DATA_AXIS,))
  sh = NamedSharding(mesh, P(sharding.DATA_AXIS))
  x = jax.ShapeDtypeStruct((4, 577, 1, 64), jnp.float32, sharding=sh)

  def grads(q, k, v):
    loss = lambda q, k, v: speed.attention(q, k, v, impl="fused")[0].sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with speed.compiling_for("tpu"):
    lowered = jax.jit(sharding.on_mesh(grads, mesh), in_shardings=sh).lower(x, x, x)
  got = aot.attention_kernel(lowered.compile().as_text())
  assert got["kernel"] == "splash" and got["splash_calls"] == 3


def test_attention_path_follows_the_compile_target():
  assert not speed.tokens_first("fused", jnp.bfloat16)  # this process is a CPU one
  with speed.compiling_for("cuda"):
    assert speed.tokens_first("fused", jnp.bfloat16)
    assert not speed.tokens_first("fused", jnp.float32)  # cuDNN has no float32 attention
  assert not speed.tokens_first("fused", jnp.bfloat16)


# ----------------------------------------------------------------------------------------------------
# TPU: the real compiler (libtpu), a tiny model on v5e:2x2.


@pytest.fixture(scope="module")
def v5e_report():
  return aot.compile_for_target(tiny_config(), "v5e:2x2", num_classes=8)


@needs_libtpu
def test_tpu_compile_reports_the_contract_keys(v5e_report):
  r = v5e_report
  for key in ("target", "chips", "chip_kind", "per_chip_bytes", "chip_memory_bytes", "fits",
              "flops_per_chip", "analytic_flops_per_chip", "compile_seconds"):
    assert key in r, key
  assert (r["target"], r["chips"], r["chip_kind"]) == ("v5e:2x2", 4, "TPU v5 lite")
  assert r["fits"] is True and r["chip_memory_bytes"] == 16 * 2**30
  assert {"train", "eval", "infer"} <= set(r)
  json.dumps(r)  # what --json writes
  # The compiled FLOPs are the model's: within 15% of the analytic matmul count for this tiny model
  # (its elementwise work is a larger share than a real ViT's).
  assert r["train"]["flops_ratio"] == pytest.approx(1.0, abs=0.15)
  # Data parallel: the gradients are all-reduced.
  assert "all-reduce" in r["train"]["collectives"]


@needs_libtpu
def test_state_bytes_follow_the_parameter_count(v5e_report, monkeypatch):
  params = v5e_report["params"]
  # AdamW: parameters + two moments, float32, whole on every chip (+ the step and Adam's count).
  assert v5e_report["state_bytes_per_chip"] == pytest.approx(3 * 4 * params, abs=64)
  assert v5e_report["train"]["argument_bytes"] >= v5e_report["state_bytes_per_chip"]
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 1)  # the tiny model's arrays are all "large"
  config = tiny_config()
  config.fsdp = True
  fsdp = aot.check_fits(config, "v5e:2x2", num_classes=8)
  assert fsdp["state_bytes_per_chip"] == pytest.approx(3 * 4 * params / 4, abs=64)
  assert fsdp["train"]["argument_bytes"] < v5e_report["train"]["argument_bytes"]
  assert "all-gather" in fsdp["train"]["collectives"]


@needs_libtpu
def test_one_chip_tpu_topology_compiles():
  # v5e:1x1 is smaller than libtpu's default host bounds (2x2x1); aot passes one chip's bounds.
  r = aot.check_fits(tiny_config(), "v5e:1x1", num_classes=8)
  assert (r["chips"], r["devices"], r["fits"]) == (1, 1, True)
  assert "all-reduce" not in r["train"]["collectives"]


@needs_libtpu
def test_remat_lowers_the_temporaries():
  # 257 tokens (64 px, 4x4 patches), 64 images per chip: activations, not the state, fill the step
  # (329 MB of temporaries, 179 MB with remat, on libtpu 0.0.42 and 0.0.50 alike). At 65 tokens and 32
  # per chip libtpu 0.0.50 kept a few hundred KB more with remat than without: too small to tell.
  config = tiny_config()
  config.image_size, config.batch_size = 64, 256
  plain = aot.check_fits(config, "v5e:2x2", num_classes=8)
  config.model.remat_policy = "block"
  remat = aot.check_fits(config, "v5e:2x2", num_classes=8)
  assert remat["train"]["temp_bytes"] < plain["train"]["temp_bytes"]
  assert remat["train"]["flops_per_chip"] > plain["train"]["flops_per_chip"]  # the recomputation


@needs_libtpu
def test_a_setting_that_cannot_fit_says_so(tmp_path):
  # 2 layers of width 8192: 1.6 G parameters, 19 GiB of AdamW state per chip, on 16 GiB chips.
  config = tiny_config(hidden_size=8192, mlp_dim=32768, num_heads=64)
  config.batch_size = 4
  r = aot.check_fits(config, "v5e:2x2", num_classes=8)
  assert r["fits"] is False and r["headroom_bytes"] < 0
  assert "DOES NOT FIT" in aot.format_report(r)


@needs_libtpu
def test_command_writes_the_json_contract(tmp_path, capsys):
  path = tmp_path / "report.json"
  assert aot.main(["aot", "--config=configs/default.py", "--target=v5e:2x2", "--programs=train",
                   "--config.batch_size=32", f"--json={path}"]) == 0
  report = json.loads(path.read_text())
  assert report["fits"] is True and report["target"] == "v5e:2x2"
  assert "FITS" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# GPU: XLA's GPU compiler for two H100s, without a GPU.


@needs_cuda_plugin
def test_gpu_compile_for_two_h100s_runs_cudnn_attention_with_a_class_token():
  config = tiny_config(dtype="bfloat16", hidden_size=128, num_heads=2)  # head dim 64, 17 tokens (odd)
  r = aot.check_fits(config, "h100:2", num_classes=8)
  assert (r["chips"], r["chip_kind"]) == (2, "NVIDIA H100 80GB HBM3")
  assert r["attention_kernel"] == "cudnn"
  attention = r["train"]["attention"]
  assert attention["cudnn_forward_calls"] >= 2 and attention["cudnn_backward_calls"] >= 2
  # XLA's GPU compiler gives no cost analysis without a device: the lowered program's FLOPs instead.
  assert r["train"]["flops_source"] == "lowered"
  assert r["train"]["flops_ratio"] == pytest.approx(1.0, abs=0.1)


@needs_cuda_plugin
def test_gpu_fsdp_step_reduces_each_gradient_on_its_own(monkeypatch):
  """fsdp on GPUs: one reduce-scatter per sharded gradient instead of XLA's one combined op for all
  layers, which kept every layer's rematerialised activations alive through the backward pass."""
  monkeypatch.setattr(sharding, "FSDP_MIN_SIZE", 256)
  config = tiny_config(dtype="bfloat16", remat_policy="block")
  config.fsdp = True
  r = aot.check_fits(config, "h100:2", num_classes=8)
  assert r["train"]["collectives"]["reduce-scatter"]["count"] > config.model.num_layers
