"""Named ViT architectures as ml_collections configs: Ti/16, S/16, S/32, B/16, B/32, B/8, L/16, L/32, H/14
and `testing` (a tiny model for tests and CPU demos).

Training configs take one of these as `config.model` and may override any field (pool, representation
size, dropout, dtype, ...); `vit_cls.train` passes the fields to `VisionTransformer` unchanged. Every
field of `VisionTransformer` but `num_classes` (the dataset's) is here, at the model's own default, so
that `--config.model.FIELD=...` reaches it (the command line refuses fields a config does not have);
`tests/test_configs.py` checks that none is missing. docs/model.md's table says what each one does.

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
      head_bias_init=0.0,
      # Switches for imported checkpoints (timm, Hugging Face, CLIP); the defaults are the original ViT.
      causal=False,
      gelu_approximate=True,
      layernorm_epsilon=1e-6,
      class_token_posemb=True,
      layerscale=False,
      pre_norm=False,
      fc_norm=False,
      # Speed and memory: the same function, computed differently.
      dtype="float32",
      matmul_dtype=ml_collections.config_dict.placeholder(str),
      attention_impl="fused",
      fuse_qkv=True,
      remat_policy="none",
      scan_layers=False,  # blocks under nn.scan: stacked parameters, converted to the published layout
  ))


def get_config(name: str = "B/16") -> ml_collections.ConfigDict:
  """`--config=configs/models.py:B/16` prints or reuses one architecture."""
  return get_model_config(name)
