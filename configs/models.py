"""Named ViT architectures as ml_collections configs: Ti/16, S/16, S/32, B/16, B/32, B/8, L/16, L/32, H/14
and `testing` (a tiny model for tests and CPU demos).

Training configs take one of these as `config.model` and may override any field (pool, representation
size, dropout, dtype, ...); `vit_cls.train` passes the fields to `VisionTransformer` unchanged.

    python train.py --config=configs/default.py --config.model.pool=gap
"""

import ml_collections

from vit_cls import variants


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """The architecture of a named variant, plus the per-run fields a training config usually sets."""
  fields = variants.variant(name)
  return ml_collections.ConfigDict(dict(
      name=name,
      patch_size=fields["patch_size"],
      hidden_size=fields["hidden_size"],
      mlp_dim=fields["mlp_dim"],
      num_heads=fields["num_heads"],
      num_layers=fields["num_layers"],
      dropout_rate=0.0,
      attention_dropout_rate=0.0,
      pool="cls",
      representation_size=ml_collections.config_dict.placeholder(int),
      num_registers=0,
      class_token_position="first",
      dtype="float32",
      attention_impl="fused",
      fuse_qkv=True,
      remat_policy="none",
  ))


def get_config(name: str = "B/16") -> ml_collections.ConfigDict:
  """`--config=configs/models.py:B/16` prints or reuses one architecture."""
  return get_model_config(name)
