"""The tiny ViT and random images that the model-level tests share."""

import jax

from vit_cls import model as model_lib


def tiny(**kw):
  """A 2-layer width-32 ViT on 16x16 images (4x4 patches); keyword arguments override its fields."""
  fields = dict(num_classes=5, patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_heads=4,
                num_layers=2)
  fields.update(kw)
  return model_lib.VisionTransformer(**fields)


def images(n=2, size=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1, maxval=1)
