"""The built-in offline job: a small ViT with the class token and the pre-training MLP head, trained from
scratch on the handwritten digits that ship inside scikit-learn (8x8 grayscale, 10 classes).

    python train.py --config=configs/default.py --workdir=workdirs/digits

Runs in minutes on 2 CPU cores, no network needed. Every field can be overridden with
`--config.FIELD=VALUE`: the job's own settings are below, the rest (at neutral values) come from
`configs/base.py`; `configs/models.py` documents the model fields.
"""

import ml_collections

from configs import base
from configs import models


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()

  # Data (vit_cls/input_pipeline.py).
  config.dataset = "digits"
  # Upsample the 8x8 digits to 16x16 so that the random-resized crop below has sub-pixel freedom:
  # the 8x8 source is cropped to a window of 50..100% of its area (aspect 3/4..4/3), then resized
  # to 16x16. That random scale + shift is what stops the tiny ViT from overfitting 1,437 images
  # (with crop="resize" at 8x8 and a 1-pixel pad_crop it reached 100% train / ~95% test).
  config.image_size = 16
  config.shuffle_buffer = 2_000
  config.pp = ml_collections.ConfigDict(dict(
      crop="inception",   # random-resized crop; min area 0.5 keeps most of every stroke
      crop_min_area=0.5,  # (the 0.05 ImageNet default would cut digits away)
      flip=False,         # a flipped digit is another digit (or none)
      pad_crop=0,         # off: the crop already translates the digit
      eval_crop="resize",  # eval: the whole 8x8 image, resized to 16x16
      to_rgb=True,
  ))

  # Model: a narrow ViT, 4x4 patches of the 16x16 image -> 16 patch tokens + the class token (the
  # same sequence length, hence about the same cost, as 2x2 patches of the raw 8x8 image).
  config.model = models.get_model_config("testing")
  config.model.update(dict(patch_size=(4, 4), hidden_size=64, mlp_dim=128, num_heads=4,
                           num_layers=4, representation_size=64, pool="cls",
                           # No dropout: with the crop and label smoothing, 0.1 cost ~20% more
                           # step time and did no better (worst of seeds 0-2: 97.2% vs 97.5%).
                           dropout_rate=0.0))
  config.model.name = "digits-vit"

  # Optimisation: the from-scratch recipe (Adam(W), warmup, cosine decay, clipping), scaled down.
  config.optimizer = "adamw"
  config.learning_rate = 2e-3
  config.weight_decay = 0.05
  config.grad_clip_norm = 1.0
  config.label_smoothing = 0.1  # with the crop: a little regularisation that costs no time
  config.warmup_steps = 100
  config.decay_type = "cosine"
  config.total_steps = 1_500  # ~134 epochs: 97.5-98.3% test on seeds 0-2, ~2 CPU-minutes
  config.batch_size = 128
  config.eval_batch_size = 128
  # batch_chunks (from configs/base.py, 1) > 1 computes the batch as that many independent parts,
  # which XLA's CPU runtime overlaps (faster on CPU for small models; see BENCHMARKS.md).

  # Bookkeeping (log_every 100, checkpoint_every 1,000, keep_checkpoints 3: configs/base.py).
  config.eval_every = 500

  # Few-shot and kNN evaluation (vit_cls/evaluators.py; docs/training.md), off here as in every recipe:
  # feature_eval.datasets=() (configs/base.py). `--config.feature_eval.datasets=digits` adds to every
  # evaluation, from the frozen pre-logits features, fewshot_digits_{1,5,10,25}shot (ridge regression
  # on k train images per class, big_vision's convention, mean of num_seeds draws) and
  # knn_digits_20nn_top1 / _top5 (DINO's weighted vote of the 20 most cosine-similar train images):
  # about 1-2 s per evaluation on 2 CPU cores, plus ~8 s once (compile, pipelines). Its fields, at
  # configs/base.py's values:
  #   datasets=()             names as for config.dataset: digits, a TFDS name, imagefolder:PATH
  #   train_split="train"     the support set (the shots, the kNN neighbours); TFDS slices work
  #   eval_split="test"       the queries that are scored
  #   shots=(1, 5, 10, 25)    examples per class; () = no few-shot
  #   l2_reg=2.0**10          the ridge regression's L2 strength (big_vision's)
  #   num_seeds=3, seed=0     draws of the shots, from their own seed (not config.seed)
  #   knn_k=(20,)             neighbours; () = no kNN
  #   knn_temperature=0.07    each neighbour's vote is exp(cosine / T)
  return config
