"""What every format module shares: nested <-> '/'-joined parameter trees, image sizes, one-line errors."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

Params = dict  # nested {name: {name: ... np.ndarray}}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}: the npz key format, and an easy way to compare two trees."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any], *, source: str = "parameters") -> Params:
  """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix of another is an error."""
  tree: dict = {}
  for path, value in flat.items():
    parts = path.split("/")
    if not all(parts):
      raise ValueError(f"{source}: bad parameter name {path!r} (empty path component).")
    node = tree
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"{source}: parameter {path!r} lies under another parameter's name.")
    if parts[-1] in node:
      raise ValueError(f"{source}: parameter {path!r} is given twice (or is also a sub-tree).")
    node[parts[-1]] = value
  return tree


def plain(tree: Any) -> Any:
  """FrozenDicts / `{'params': ...}` variable dicts -> the plain nested-dict params tree."""
  if isinstance(tree, Mapping):
    tree = {k: plain(v) for k, v in tree.items()}
    if set(tree) == {"params"} and isinstance(tree["params"], dict):
      tree = tree["params"]
  return tree


def hw(image_size) -> tuple[int, int]:
  """An image size as stored in configs (N, or [H, W] from JSON) -> (H, W)."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  h, w = image_size
  return int(h), int(w)


def square_grid(n: int) -> int | None:
  """The side of a square grid of `n` patches, None when `n` rows are not one."""
  g = math.isqrt(max(n, 0))
  return g if n > 0 and g * g == n else None


def first_line(e: BaseException) -> str:
  """The first line of an exception's message (its type name when it has none)."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
