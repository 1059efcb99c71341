"""vit_cls: a JAX/Flax Vision Transformer with a learnable [CLS] class token.

`create_model("B/16", num_classes=10)` builds a named model; `load(path)` returns `(model, params)` from
a checkpoint of this project or a published ViT `.npz`. Nothing here imports TensorFlow.
"""

from vit_cls.model import VisionTransformer
from vit_cls.variants import MODEL_VARIANTS


def create_model(name: str, **overrides) -> VisionTransformer:
  """A named variant (see `MODEL_VARIANTS`), with any `VisionTransformer` field overridden.

  >>> model = create_model("B/16", num_classes=10, pool="gap")
  """
  from vit_cls.variants import variant  # pylint: disable=g-import-not-at-top
  fields = variant(name)
  fields.update(overrides)
  fields.setdefault("num_classes", 1000)
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
