"""The original vit_jax model's training step compiled for a TPU or GPU target, beside vit_cls's.

    python benchmarks/aot_reference.py --config=configs/pretrain_imagenet.py:B/16,imagenet2012 \\
        --target=v5e:2x4 --config.batch_size=2048 --json=/tmp/ref.json

Everything but the model is train.py's step as `python -m vit_cls.aot` compiles it (AdamW, clipping,
data-parallel layout, donation, bfloat16): the model is `reference_vit_jax.from_vit_cls(<the config's
model>)`, a re-statement of the original (google-research/vision_transformer) with the same parameters.
Writes both reports (vit_cls and the reference) to --json and prints one line per model. BENCHMARKS.md
keeps the table; the original is the anchor: vit_cls should need no more memory and no more FLOPs.
"""

import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  from vit_cls import aot  # pylint: disable=g-import-not-at-top
  target = aot.parse_target(next(a.split("=", 1)[1] for a in argv if a.startswith("--target=")))
  aot.check_installed(target)
  aot.prepare_environment(target)
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
  flags.DEFINE_string("target", None, "TPU slice or GPU node, as vit_cls.aot.")
  flags.DEFINE_string("json", None, "Write both reports here.")
  flags.DEFINE_list("models", ["vit_cls", "reference"], "Which models to compile.")
  flags.FLAGS(argv)
  import reference_vit_jax  # pylint: disable=g-import-not-at-top
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  classes = aot.KNOWN_NUM_CLASSES.get(config.dataset, 1000)
  reports = {}
  for name in flags.FLAGS.models:
    model = None if name == "vit_cls" else reference_vit_jax.from_vit_cls(
        train.create_model(config, classes))
    r = aot.compile_for_target(config, target, programs=("train",), num_classes=classes, model=model)
    reports[name] = r
    t = r["train"]
    print(f"{name:10s} {target.name}: {t['per_chip_bytes'] / 2**30:.2f} GiB per chip, "
          f"{(t['flops_per_chip'] or 0) / 1e12:.2f} TFLOP per chip ({t.get('flops_source')}), "
          f"temporaries {t['temp_bytes'] / 2**30:.2f} GiB, attention {t['attention'] and t['attention']['kernel']}, "
          f"compiled in {t['compile_seconds']:.0f} s", flush=True)
    if flags.FLAGS.json:
      with open(flags.FLAGS.json, "w") as f:
        json.dump(reports, f, indent=1)


if __name__ == "__main__":
  main(sys.argv)
