"""The README stays true: its loading example runs as written, CI runs its test command, and every relative link
and #anchor of README.md, docs/*.md and the other top-level pages leads somewhere inside the repository."""

import contextlib
import glob
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


def _slug(heading):
  """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
  return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _unfenced(text):
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _prose(text):
  """The text with fenced code blocks and inline code removed (links there are code, not links)."""
  return re.sub(r"`[^`]*`", "", _unfenced(text))


def _anchors(path):
  anchors, seen = set(), {}
  with open(path, encoding="utf-8") as f:
    for line in _unfenced(f.read()).splitlines():
      m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
      if m:
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


def _pages():
  return sorted(glob.glob(os.path.join(REPO, "*.md")) + glob.glob(os.path.join(REPO, "docs", "*.md")))


def test_every_relative_link_and_anchor_resolves():
  assert _slug("Starting from timm / Hugging Face weights") == "starting-from-timm--hugging-face-weights"
  assert _slug("Published ViT `.npz` files") == "published-vit-npz-files"
  pages = _pages()
  assert os.path.join(REPO, "README.md") in pages and len(pages) > 2
  broken = []
  for page in pages:
    with open(page, encoding="utf-8") as f:
      text = _prose(f.read())
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
      if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
        continue
      where = os.path.relpath(page, REPO)
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      if os.path.relpath(resolved, REPO).startswith(".."):
        broken.append(f"{where}: {target} points outside the repository")
      elif not os.path.exists(resolved):
        broken.append(f"{where}: {target}: no such file")
      elif anchor and anchor not in _anchors(resolved):
        broken.append(f"{where}: {target}: no heading with that anchor")
  assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page_it_moved_out():
  readme = _readme()
  for page in ("training", "cloud_tpu", "cloud_storage", "memory", "model", "zoo", "class_token_study"):
    assert f"](docs/{page}.md" in readme, page
  assert len(readme.splitlines()) < 250  # what a newcomer reads in ten minutes; the rest is in docs/
