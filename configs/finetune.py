"""Fine-tuning recipe of the ViT paper (appendix B.1.1) and the vit_jax repository: ViT-B/16 pre-trained
with the MLP head, fine-tuned at 384x384 with a fresh zero-initialised linear head, SGD with momentum 0.9,
batch 512, base learning rate 0.03, 500 warmup steps then cosine decay, global-norm clipping at 1.

    python train.py --config=configs/finetune.py:cifar10 --config.init_from=ViT-B_16.npz --workdir=...

Steps per dataset as in vit_jax's configs: CIFAR-10/100 10k, Oxford-IIIT Pets 500, ImageNet 20k.
`init_from` is an orbax checkpoint directory of this project or a published `.npz`; the conversion drops
`pre_logits`, replaces the head and resizes the position embeddings to the 384 grid.
"""

import ml_collections

from configs import default
from configs import models

_DATASETS = {
    # name: (train split, eval split, total steps)
    "cifar10": ("train[:98%]", "test", 10_000),
    "cifar100": ("train[:98%]", "test", 10_000),
    "oxford_iiit_pet": ("train[:90%]", "test", 500),
    "imagenet2012": ("train[:99%]", "validation", 20_000),
}


def get_config(arg: str = "cifar10") -> ml_collections.ConfigDict:
  dataset, _, model_name = arg.partition(",")
  if dataset not in _DATASETS:
    raise ValueError(f"unknown fine-tuning dataset {dataset!r}: choose one of {', '.join(_DATASETS)}.")
  train_split, eval_split, steps = _DATASETS[dataset]
  config = default.get_config()
  config.dataset = dataset
  config.train_split, config.eval_split = train_split, eval_split
  config.image_size = 384
  config.shuffle_buffer = 50_000
  config.pp = ml_collections.ConfigDict(dict(
      crop="inception", crop_min_area=0.05, flip=True, pad_crop=0, eval_crop="resize", to_rgb=True))

  config.model = models.get_model_config(model_name or "B/16")
  config.model.dtype = "bfloat16"
  # representation_size stays None: the fine-tuning head is a single zero-initialised linear layer.

  config.optimizer = "sgd"
  config.momentum = 0.9
  config.learning_rate = 0.03
  config.weight_decay = 0.0
  config.grad_clip_norm = 1.0
  config.batch_size = 512
  config.eval_batch_size = 512
  config.warmup_steps = 500 if steps > 500 else 100
  config.decay_type = "cosine"
  config.total_steps = steps

  config.log_every = 50
  config.eval_every = 1_000 if steps > 1_000 else 100
  config.checkpoint_every = 1_000
  return config
