"""Test-wide setup: 8 simulated CPU devices (so sharding is tested), and caches kept out of $HOME."""

import os
import tempfile

# Must happen before jax initialises its backends, or the device count silently stays 1.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_cache = tempfile.mkdtemp(prefix="vit_cls_test_cache_")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_cache, "mpl"))
os.environ.setdefault("KERAS_HOME", os.path.join(_cache, "keras"))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_cache, "tfds"))
