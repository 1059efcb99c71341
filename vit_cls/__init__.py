"""vit_cls: a JAX/Flax Vision Transformer with a learnable [CLS] class token.

`create_model("B/16", num_classes=10)` builds a named model; `load(path)` returns `(model, params)` from
a checkpoint of this project or a published ViT `.npz`. Nothing here imports TensorFlow.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from vit_cls.model import VisionTransformer
  from vit_cls.variants import MODEL_VARIANTS


def __getattr__(name):
  """`VisionTransformer` and `MODEL_VARIANTS`, imported on first use: `import vit_cls` (which
  `python -m vit_cls.predict` does first) must not load JAX before an entry point has chosen the memory
  allocator (vit_cls.allocator)."""
  if name == "VisionTransformer":
    from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top,redefined-outer-name
    return VisionTransformer
  if name == "MODEL_VARIANTS":
    from vit_cls.variants import MODEL_VARIANTS  # pylint: disable=g-import-not-at-top,redefined-outer-name
    return MODEL_VARIANTS
  raise AttributeError(f"module 'vit_cls' has no attribute {name!r}")


def create_model(name: str, **overrides) -> "VisionTransformer":
  """A named variant (see `MODEL_VARIANTS`), with any `VisionTransformer` field overridden.

  >>> model = create_model("B/16", num_classes=10, pool="gap")
  """
  from vit_cls.variants import variant  # pylint: disable=g-import-not-at-top
  fields = variant(name)
  fields.update(overrides)
  fields.setdefault("num_classes", 1000)
  from vit_cls.model import VisionTransformer  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return VisionTransformer(**fields)


def load(path, **overrides):
  """`model, params = vit_cls.load(path)`: see `vit_cls.checkpoint.load`."""
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load(path, **overrides)


def load_nnx(path, **overrides):
  """The same checkpoint as a Flax NNX module: see `vit_cls.checkpoint.load_nnx`."""
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.load_nnx(path, **overrides)


__all__ = ["VisionTransformer", "MODEL_VARIANTS", "create_model", "load", "load_nnx"]
