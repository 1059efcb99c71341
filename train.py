"""Trains a ViT: `python train.py --config=configs/default.py --workdir=/tmp/vit`.

Any config field can be overridden on the command line, e.g. `--config.total_steps=100
--config.model.pool=gap`. Running again with the same workdir resumes from its latest checkpoint.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data here; keep it quiet.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", required=True)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Orbax and TensorFlow log every file they touch at INFO; the progress lines are what users read.
  logging.set_verbosity(logging.WARNING)
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
