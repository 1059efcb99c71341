"""From-scratch pre-training recipe of the ViT paper (Dosovitskiy et al., 2021, section 4.1 / table 3):
Adam (beta1 0.9, beta2 0.999), batch 4096, linear warmup of 10k steps then linear decay, global-norm
clipping at 1, the MLP head (`pre_logits` of the hidden size), at 224x224.

    python train.py --config=configs/pretrain_imagenet.py:B/16,imagenet2012 --workdir=gs://...
    python train.py --config=configs/pretrain_imagenet.py:B/16,imagenet21k ...

Hyper-parameters per dataset follow the paper: ImageNet (300 epochs, lr 3e-3, weight decay 0.3, dropout
0.1) and ImageNet-21k (90 epochs, lr 1e-3, weight decay 0.03, dropout 0.1). The weight decay here is
applied to kernels only (never biases, LayerNorm, cls or position embeddings). Both datasets must be
prepared in `--config.data_dir` beforehand (tfds needs manual downloads for them).
"""

import ml_collections

from configs import default
from configs import models

_DATASETS = {
    # name: (tfds name, train split, eval split, train examples, epochs, lr, weight decay)
    "imagenet2012": ("imagenet2012", "train[:99%]", "train[99%:]", 1_268_355, 300, 3e-3, 0.3),
    "imagenet21k": ("imagenet21k", "full[:99%]", "full[99%:]", 13_000_000, 90, 1e-3, 0.03),
}


def get_config(arg: str = "B/16,imagenet2012") -> ml_collections.ConfigDict:
  model_name, dataset = arg.split(",")
  if dataset not in _DATASETS:
    raise ValueError(f"unknown pre-training dataset {dataset!r}: choose one of {', '.join(_DATASETS)}.")
  tfds_name, train_split, eval_split, n_train, epochs, lr, wd = _DATASETS[dataset]
  config = default.get_config()
  config.dataset = tfds_name
  config.train_split, config.eval_split = train_split, eval_split
  config.image_size = 224
  config.shuffle_buffer = 250_000
  config.pp = ml_collections.ConfigDict(dict(
      crop="inception", crop_min_area=0.05, flip=True, pad_crop=0, eval_crop="resize", to_rgb=True))

  config.model = models.get_model_config(model_name)
  config.model.representation_size = config.model.hidden_size  # the pre-training MLP head
  config.model.dropout_rate = 0.1
  config.model.dtype = "bfloat16"

  config.optimizer = "adam"
  config.learning_rate = lr
  config.weight_decay = wd
  config.grad_clip_norm = 1.0
  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.warmup_steps = 10_000
  config.decay_type = "linear"
  config.total_steps = n_train * epochs // config.batch_size

  config.log_every = 100
  config.eval_every = 5_000
  config.checkpoint_every = 1_000
  return config
