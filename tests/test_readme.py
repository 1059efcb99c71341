"""The README stays true: its loading example runs as written, and CI runs its test command."""

import contextlib
import io
import os
import re

from configs import default
from vit_cls import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    return f.read()


def test_loading_example_runs_as_written(tmp_path, monkeypatch):
  config = default.get_config()  # the example loads a checkpoint of the default job: train it briefly
  config.update(dict(total_steps=4, warmup_steps=1, log_every=4, eval_every=4, checkpoint_every=4))
  train.train_and_evaluate(config, str(tmp_path / "workdirs" / "digits"))

  block = re.search(r"<!-- readme-example.*?-->\s*```python\n(.*?)```", _readme(), re.S).group(1)
  monkeypatch.chdir(tmp_path)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  # Every `print(...)  # expected` line of the block prints what its comment says.
  expected = [m.group(1) for m in re.finditer(r"^print\(.*\)[ \t]+# (.*)$", block, re.M)]
  assert out.getvalue().splitlines() == expected


def test_ci_runs_the_readme_test_command():
  command = re.search(r"Run the tests:\s*```bash\n(.*?)\n```", _readme(), re.S).group(1)
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  assert "python -m pytest -q" in command and "python3 -m pytest -q" in ci
  assert "pip install -r requirements.txt" in command and "-r requirements.txt" in ci
