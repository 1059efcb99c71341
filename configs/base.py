"""The fields every training config has, at neutral values: the base the recipes build on.

Why a base and not `configs/default.py`: the default config is the built-in digits job, tuned for a tiny
model on 1,437 images (label smoothing, a random-resized crop of 50..100% of the area, a short cosine
schedule). A paper recipe that started from it would silently inherit those choices. Here every
regulariser is off (no weight decay, dropout, label smoothing or clipping), and the fields that define a
recipe (dataset, resolution, model, optimizer, learning rate, schedule, steps, batch) are absent, so a
config that forgets one fails `vit_cls.train.validate_config` with the field's name instead of running
with someone else's value.

Every field a recipe may override on the command line (`--config.FIELD=VALUE`) must exist, so new
fields of the training loop belong here, not in one recipe. `configs/default.py` documents each field.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data (vit_cls/input_pipeline.py): the recipe sets dataset, splits, image_size and pp.
  config.data_dir = ml_collections.config_dict.placeholder(str)  # None: ~/tensorflow_datasets
  config.train_split = "train"
  config.eval_split = "test"
  config.allow_download = False
  config.shuffle_buffer = 10_000

  # Optimisation: the recipe sets optimizer, learning_rate, warmup_steps, decay_type, total_steps,
  # batch_size; these are the optimizers' own defaults and regularisers off.
  config.b1 = 0.9
  config.b2 = 0.999
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.grad_clip_norm = 0.0  # 0: no clipping
  config.label_smoothing = 0.0
  config.accum_steps = 1
  config.batch_chunks = 1  # >1: the step computes the batch as that many independent parts
  config.fsdp = False  # True: parameters + optimizer state sharded over the devices
  config.seed = 0

  # Bookkeeping.
  config.log_every = 100
  config.eval_every = 1_000
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 3
  # True: a save returns once the state is in host memory and is written while training goes on
  # (vit_cls.train.Checkpoints says what it keeps); False: every save blocks until committed.
  config.async_checkpoints = True
  # A damaged newest checkpoint: False falls back to the previous one (and says so); True stops the run.
  config.strict_checkpoints = False
  config.init_from = ml_collections.config_dict.placeholder(str)  # checkpoint to fine-tune from
  # Fine-tuning tools (vit_cls/optim.py): layer-wise lr decay (None = off; BEiT/timm convention), and a
  # regular expression over parameter names ("" = nothing frozen; configs/linear_probe.py freezes all
  # but the head).
  config.layer_decay = ml_collections.config_dict.placeholder(float)
  config.frozen = ""
  # FlexiViT patch-size change (vit_cls/convert.py), only with init_from: the model's patch size in place
  # of model.patch_size; init_from's patch embedding is resampled to it (pseudo-inverse of the bilinear
  # patch resize, exact when the patch grows) and its position embeddings to the new grid. None: off.
  config.init_patch_size = ml_collections.config_dict.placeholder(int)
  # Evaluators beyond accuracy (vit_cls/evaluators.py; configs/default.py documents each field), run at
  # every evaluation on the frozen pre-logits features: few-shot ridge regression and kNN. Off while
  # `datasets` is empty.
  config.feature_eval = ml_collections.ConfigDict(dict(
      datasets=(), train_split="train", eval_split="test", shots=(1, 5, 10, 25), l2_reg=2.0**10,
      num_seeds=3, seed=0, knn_k=(20,), knn_temperature=0.07))
  return config
