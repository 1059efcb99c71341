"""Linear probe of the digits checkpoint: everything but the head frozen (`config.frozen`).

    python train.py --config=configs/default.py --workdir=workdirs/digits
    python train.py --config=configs/linear_probe.py --workdir=workdirs/digits_probe \
        --config.init_from=workdirs/digits

The fine-tuning recipe of `configs/finetune_digits.py` (same resolution change, a fresh zero-initialised
linear head) with the backbone frozen by the regular expression `^(?!head/)`: every parameter whose name
does not start with `head/`. The frozen parameters have no optimizer state and no gradient work
(`stop_gradient`: the backward pass stops at the head). What it does not do: cache the features. They are
recomputed every step, because the training crop and flip change them every step; on the built-in data the
forward pass is cheap. A probe is a convex problem, so a larger learning rate than full fine-tuning's
(0.1) and no warmup to speak of are safe.
"""

import ml_collections

from configs import finetune_digits


def get_config() -> ml_collections.ConfigDict:
  config = finetune_digits.get_config()
  config.model.name = "digits-vit-linear-probe"
  config.frozen = "^(?!head/)"  # all but head/kernel and head/bias
  config.learning_rate = 0.1
  config.warmup_steps = 10
  return config
