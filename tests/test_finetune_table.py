"""experiments/finetune_digits_table.py: its commands are train.py's flags, and its table reads its JSON.
(The runs themselves take minutes: `--quick` is the smoke test, not run here.)"""

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table():
  spec = importlib.util.spec_from_file_location(
      "finetune_digits_table", os.path.join(REPO, "experiments", "finetune_digits_table.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["finetune_digits_table"] = module
  spec.loader.exec_module(module)
  return module


def test_config_and_command_agree():
  t = _table()
  over = {**t.TIMM_MODEL, "seed": 2, "total_steps": 7, "init_from": "", "layer_decay": 0.75}
  config = t.make_config("configs/finetune_digits.py", over)
  assert config.seed == 2 and config.total_steps == 7 and config.layer_decay == 0.75
  assert not config.init_from and tuple(config.model.patch_size) == (4, 4)
  assert config.model.hidden_size == 24 and config.model.gelu_approximate is False
  cmd = t.command("configs/finetune_digits.py", "wd", over)
  assert cmd.startswith("python train.py --config=configs/finetune_digits.py --workdir=wd ")
  assert "--config.model.patch_size='(4,4)'" in cmd and "--config.init_from=''" in cmd


def test_table_has_mean_and_spread():
  t = _table()
  runs = [dict(method="full_ft", seed=s, steps=100, wall_s=10.0 + s, test_accuracy=a)
          for s, a in enumerate([0.95, 0.97, 0.96])]
  pre = dict(steps=1500, wall_s=400.0, test_accuracy=0.97, fewshot_digits_1shot=0.5,
             knn_digits_20nn_top1=0.9)
  text = t.table({"args": {"layer_decay": 0.75}, "runs": runs, "pretrain": {"row": pre}})
  assert "| full fine-tune (`configs/finetune_digits.py`, 32x32) | 96.0 ± 1.0 | 3 | 100 | 11 |" in text
  assert "| few-shot 1-shot, pre-trained features (ridge) | 50.0 |" in text
  assert "| few-shot 5-shot, pre-trained features (ridge) | — |" in text
