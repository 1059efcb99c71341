"""Test-wide setup: 8 simulated CPU devices (so sharding is tested), and caches kept out of $HOME."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax initialises its backends, or the device count silently stays 1.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_cache = tempfile.mkdtemp(prefix="vit_cls_test_cache_")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_cache, "mpl"))
os.environ.setdefault("KERAS_HOME", os.path.join(_cache, "keras"))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_cache, "tfds"))
# One persistent XLA compilation cache for the session, inherited by every train.py the tests start:
# the tiny test model's steps are compiled once instead of in every test and child process.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_cache, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The processes the tests start (train.py, workers) keep their temporary files there too, so that what a
# killed one leaves goes with the folder (TensorFlow's AutoGraph modules, deleted only at a normal exit,
# were about 150 files in /tmp per suite). This process had already fixed its own temporary folder.
os.makedirs(os.path.join(_cache, "tmp"), exist_ok=True)
os.environ.setdefault("TMPDIR", os.path.join(_cache, "tmp"))
atexit.register(shutil.rmtree, _cache, ignore_errors=True)


import pytest  # noqa: E402  (after the environment above is set)


@pytest.fixture
def tiny_config(tmp_path):
  """The built-in digits job shrunk to seconds: a 1-layer width-32 ViT, 8 devices' worth of batch."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                           representation_size=32, attention_impl="einsum"))
  config.update(dict(total_steps=12, warmup_steps=2, batch_size=32, eval_batch_size=64, log_every=4,
                     eval_every=12, checkpoint_every=6, shuffle_buffer=256))
  return config
