"""Fine-tuning recipe of the ViT paper (Dosovitskiy et al., ICLR 2021, appendix B.1.1 and table 4).

    python train.py --config=configs/finetune.py:cifar10 --config.init_from=ViT-B_16.npz --workdir=...
    python train.py --config=configs/finetune.py:imagenet2012,L/16 --config.init_from=... --workdir=...

What the paper fixes for every dataset (table 4's caption and B.1.1): SGD with momentum 0.9, batch 512,
cosine decay, no weight decay, gradient clipping at global norm 1, resolution 384, the pre-training
`pre_logits` dropped and a fresh zero-initialised linear head. Per dataset, table 4's steps and its
learning-rate grid, with the development split the paper holds out of the training set:

| dataset | steps | lr grid (table 4) | train split |
|---|---|---|---|
| imagenet2012 | 20,000 | 0.003, 0.01, 0.03, 0.06 | train[:99%] |
| cifar100 | 10,000 | 0.001, 0.003, 0.01, 0.03 | train[:98%] |
| cifar10 | 10,000 | 0.001, 0.003, 0.01, 0.03 | train[:98%] |
| oxford_iiit_pet | 500 | 0.001, 0.003, 0.01, 0.03 | train[:90%] |

The learning rate is 0.03, in every grid, and the `vit_jax` repository's default. Not in the paper, from
`vit_jax`'s fine-tuning code: 500 warmup steps (100 for the 500-step Pets run, where 500 would be the
whole run), inception crop (5-100% of the area) and a random flip for training, a plain resize for eval.
No dropout and no label smoothing. `init_from` is an orbax checkpoint of this project or a published
`.npz`; the conversion drops `pre_logits`, replaces the head and resizes the position embeddings to the
384 grid. `tests/test_configs.py` pins every number above.
"""

import ml_collections

from configs import base
from configs import models
from vit_cls import errors

BATCH_SIZE = 512
IMAGE_SIZE = 384
LEARNING_RATE = 0.03

_DATASETS = {
    # name: (train split, eval split, total steps, warmup steps)
    "cifar10": ("train[:98%]", "test", 10_000, 500),
    "cifar100": ("train[:98%]", "test", 10_000, 500),
    "oxford_iiit_pet": ("train[:90%]", "test", 500, 100),
    "imagenet2012": ("train[:99%]", "validation", 20_000, 500),
}


def get_config(arg: str = "cifar10") -> ml_collections.ConfigDict:
  dataset, _, model_name = arg.partition(",")
  if dataset not in _DATASETS:
    raise errors.ConfigError(
        f"unknown fine-tuning dataset {dataset!r}: choose one of {', '.join(_DATASETS)}.")
  train_split, eval_split, steps, warmup = _DATASETS[dataset]
  config = base.get_config()
  config.dataset = dataset
  config.train_split, config.eval_split = train_split, eval_split
  config.image_size = IMAGE_SIZE
  config.shuffle_buffer = 50_000
  config.pp = ml_collections.ConfigDict(dict(
      crop="inception", crop_min_area=0.05, flip=True, pad_crop=0, eval_crop="resize", to_rgb=True))

  config.model = models.get_model_config(model_name or "B/16")
  config.model.dtype = "bfloat16"
  # representation_size stays None: the fine-tuning head is a single zero-initialised linear layer;
  # dropout stays 0.

  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = LEARNING_RATE
  config.weight_decay = 0.0
  config.grad_clip_norm = 1.0
  config.label_smoothing = 0.0
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = BATCH_SIZE
  config.warmup_steps = warmup
  config.decay_type = "cosine"
  config.total_steps = steps

  config.log_every = 50
  config.eval_every = 1_000 if steps > 1_000 else 100
  config.checkpoint_every = 1_000
  return config
