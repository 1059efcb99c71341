"""From-scratch pre-training recipe of the ViT paper (Dosovitskiy et al., ICLR 2021, section 4.1, table 3).

    python train.py --config=configs/pretrain_imagenet.py:B/16,imagenet2012 --workdir=gs://...
    python train.py --config=configs/pretrain_imagenet.py:B/16,imagenet21k ...

What the paper fixes for every model (section 4.1, table 3 and its caption): Adam with beta1 0.9 and
beta2 0.999, batch 4096, a linear learning-rate warmup of 10k steps, resolution 224, the MLP head
(`pre_logits` of the hidden size, tanh, then the classifier), dropout 0.1 after every dense layer except
the qkv projections and after the position embedding (none on the attention weights). Per dataset:

| dataset | epochs | base lr | decay | weight decay | dropout | clipping |
|---|---|---|---|---|---|---|
| imagenet2012 | 300 | 3e-3 | cosine | 0.3 | 0.1 | global norm 1 |
| imagenet21k | 90 | 1e-3 | linear | 0.03 | 0.1 | none |

("For ImageNet we found it beneficial to additionally apply gradient clipping at global norm 1": the
other rows are not clipped. ViT-L on ImageNet-21k trained 30 or 90 epochs; 90 here.)

The weight decay is Adam's decoupled one, scaled by the learning rate (`optimizer="adamw"`, see
vit_cls/optim.py): `param -= lr_t * (adam_update + weight_decay * param)`, on kernels only (never biases,
LayerNorm, cls or position embeddings; the paper does not say, big_vision decays kernels only). No label
smoothing. The steps are the epochs over the train split held out here (99%: the paper keeps 1% of
ImageNet's training set as a development set). `tests/test_configs.py` pins every number above.
Both datasets must be prepared in `--config.data_dir` beforehand (TFDS needs manual downloads for them).
"""

import ml_collections

from configs import base
from configs import models
from vit_cls import errors

BATCH_SIZE = 4096
WARMUP_STEPS = 10_000
IMAGE_SIZE = 224
DROPOUT = 0.1

_DATASETS = {
    # name: dict(tfds name, splits, train examples in the train split, and table 3's row)
    "imagenet2012": dict(tfds_name="imagenet2012", train_split="train[:99%]", eval_split="train[99%:]",
                         train_examples=1_268_355, epochs=300, learning_rate=3e-3, decay_type="cosine",
                         weight_decay=0.3, grad_clip_norm=1.0),
    "imagenet21k": dict(tfds_name="imagenet21k", train_split="full[:99%]", eval_split="full[99%:]",
                        train_examples=13_000_000, epochs=90, learning_rate=1e-3, decay_type="linear",
                        weight_decay=0.03, grad_clip_norm=0.0),
}


def get_config(arg: str = "B/16,imagenet2012") -> ml_collections.ConfigDict:
  model_name, _, dataset = arg.partition(",")
  if dataset not in _DATASETS:
    raise errors.ConfigError(
        f"unknown pre-training dataset {dataset!r}: choose one of {', '.join(_DATASETS)}.")
  row = _DATASETS[dataset]
  config = base.get_config()
  config.dataset = row["tfds_name"]
  config.train_split, config.eval_split = row["train_split"], row["eval_split"]
  config.image_size = IMAGE_SIZE
  config.shuffle_buffer = 250_000
  config.pp = ml_collections.ConfigDict(dict(
      crop="inception", crop_min_area=0.05, flip=True, pad_crop=0, eval_crop="resize", to_rgb=True))

  config.model = models.get_model_config(model_name)
  config.model.representation_size = config.model.hidden_size  # the pre-training MLP head
  config.model.dropout_rate = DROPOUT
  config.model.attention_dropout_rate = 0.0
  config.model.dtype = "bfloat16"

  config.optimizer = "adamw"  # Adam with decoupled, learning-rate-scaled weight decay
  config.b1, config.b2 = 0.9, 0.999
  config.learning_rate = row["learning_rate"]
  config.weight_decay = row["weight_decay"]
  config.grad_clip_norm = row["grad_clip_norm"]
  config.label_smoothing = 0.0
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = BATCH_SIZE
  config.warmup_steps = WARMUP_STEPS
  config.decay_type = row["decay_type"]
  config.total_steps = row["train_examples"] * row["epochs"] // BATCH_SIZE

  config.log_every = 100
  config.eval_every = 5_000
  config.checkpoint_every = 1_000
  return config
