"""TFDS builders that need no network, registered with TFDS on import.

Importing this package defines the builder classes, and defining a TFDS builder class registers
its name, so ``tfds.builder("digits")`` works after ``import vit_cls.datasets``. The input
pipeline imports it; nothing on the model's import path does (it pulls in TensorFlow).
"""

from vit_cls.datasets.digits import Digits  # noqa: F401  (import registers the builder)

# Names (as users write them in config.dataset) of builders that prepare themselves offline, so
# the input pipeline may build them on first use even when downloads are off.
OFFLINE_BUILDERS = ("digits",)
