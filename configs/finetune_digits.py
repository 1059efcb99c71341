"""Step two of the built-in pre-train -> fine-tune demonstration.

Step one pre-trains with the MLP head (`configs/default.py`). This config fine-tunes that
checkpoint the way the paper fine-tunes ImageNet-21k models: at twice the pre-training resolution (the
patch grid doubles in each direction and the position embeddings are resized bilinearly), with `pre_logits` dropped and
a fresh zero-initialised linear head, SGD with momentum 0.9, short warmup, cosine decay, clipping at 1.

    python train.py --config=configs/default.py --workdir=workdirs/digits
    python train.py --config=configs/finetune_digits.py --workdir=workdirs/digits_ft \
        --config.init_from=workdirs/digits
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.image_size = 2 * config.image_size  # same patch size: 4x the patch tokens
  config.model.representation_size = None  # the fine-tuning head: one zero-initialised linear layer
  config.model.name = "digits-vit-finetuned"

  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.01
  config.weight_decay = 0.0
  config.label_smoothing = 0.0
  config.grad_clip_norm = 1.0
  config.warmup_steps = 50
  config.decay_type = "cosine"
  config.total_steps = 500
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 250
  # Where step one wrote its checkpoint (a workdir, an orbax step directory, or a published .npz).
  config.init_from = "workdirs/digits"
  return config
