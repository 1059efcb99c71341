"""The built-in offline job: a small ViT with the class token and the pre-training MLP head, trained from
scratch on the handwritten digits that ship inside scikit-learn (8x8 grayscale, 10 classes).

    python train.py --config=configs/default.py --workdir=workdirs/digits

Runs in minutes on 2 CPU cores, no network needed. Every field below can be overridden with
`--config.FIELD=VALUE`; `configs/models.py` documents the model fields.
"""

import ml_collections

from configs import models


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data (vit_cls/input_pipeline.py).
  config.dataset = "digits"
  config.data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/tensorflow_datasets
  config.train_split = "train"
  config.eval_split = "test"
  config.allow_download = False
  config.image_size = 8
  config.shuffle_buffer = 2_000
  config.pp = ml_collections.ConfigDict(dict(
      crop="resize",      # 8x8 digits: no random-resized crop, it would cut strokes away
      crop_min_area=0.05,
      flip=False,         # a flipped digit is another digit (or none)
      pad_crop=1,         # pad 1 pixel and crop back at random: small shifts
      eval_crop="resize",
      to_rgb=True,
  ))

  # Model: a narrow ViT, 2x2 patches -> 16 patch tokens + the class token.
  config.model = models.get_model_config("testing")
  config.model.update(dict(patch_size=(2, 2), hidden_size=64, mlp_dim=128, num_heads=4,
                           num_layers=4, representation_size=64, pool="cls"))
  config.model.name = "digits-vit"

  # Optimisation: the from-scratch recipe (Adam(W), warmup, cosine decay, clipping), scaled down.
  config.optimizer = "adamw"
  config.learning_rate = 2e-3
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.999
  config.momentum = 0.9
  config.grad_clip_norm = 1.0
  config.label_smoothing = 0.0
  config.warmup_steps = 200
  config.decay_type = "cosine"
  config.total_steps = 3_000
  config.batch_size = 128
  config.eval_batch_size = 128
  config.accum_steps = 1
  config.seed = 0

  # Bookkeeping.
  config.log_every = 100
  config.eval_every = 1_000
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 3
  config.init_from = ml_collections.config_dict.placeholder(str)  # checkpoint to fine-tune from
  return config
