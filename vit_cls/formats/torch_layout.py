"""PyTorch tensor layouts <-> vit_cls's, shared by the timm and Hugging Face mappings.

PyTorch stores a linear layer's weight as (out, in) and applies `x @ W.T`; flax stores the kernel as
(in, out). Attention projections in vit_cls keep flax's `MultiHeadDotProductAttention` shapes: query/key/
value kernels (D, heads, head_dim) with (heads, head_dim) biases, the output kernel (heads, head_dim, D);
the head axis comes first in PyTorch's flattened heads*head_dim axis, as in flax's. A patch-embedding
convolution is (D, C, ph, pw) in PyTorch, (ph, pw, C, D) in flax. Every conversion here is a transpose
and a reshape, exact in both directions.

`Tensors` hands out a state dict's tensors by name and remembers which were taken, so a mapping can end
with `finish()`: a tensor that nothing took is a part of another architecture, and the error names it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vit_cls.errors import CheckpointError


def linear_in(w: np.ndarray) -> np.ndarray:
  """(out, in) PyTorch weight -> (in, out) flax kernel."""
  return np.ascontiguousarray(w.T)


def heads_in(w: np.ndarray, b: np.ndarray | None, heads: int) -> tuple[np.ndarray, np.ndarray]:
  """A q/k/v projection: (heads*hd, D) weight, (heads*hd,) bias -> (D, heads, hd) kernel, (heads, hd)."""
  out, d = w.shape
  kernel = np.ascontiguousarray(w.T).reshape(d, heads, out // heads)
  bias = np.zeros((out,), w.dtype) if b is None else b
  return kernel, bias.reshape(heads, out // heads)


def heads_out(w: np.ndarray, heads: int) -> np.ndarray:
  """The output projection: (D, heads*hd) weight -> (heads, hd, D) kernel."""
  d, inner = w.shape
  return np.ascontiguousarray(w.T).reshape(heads, inner // heads, d)


def patch_in(w: np.ndarray) -> np.ndarray:
  """(D, C, ph, pw) convolution weight -> (ph, pw, C, D) kernel."""
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def linear_out(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(kernel).T)


def heads_in_out(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(D, heads, hd) kernel, (heads, hd) bias -> (heads*hd, D) weight, (heads*hd,) bias."""
  d = kernel.shape[0]
  return np.ascontiguousarray(kernel.reshape(d, -1).T), bias.reshape(-1)


def heads_out_out(kernel: np.ndarray) -> np.ndarray:
  """(heads, hd, D) kernel -> (D, heads*hd) weight."""
  return np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T)


def patch_out(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(kernel, (3, 2, 0, 1)))


def norm_in(t: "Tensors", flat: dict, src: str, dst: str, d: int) -> None:
  """A LayerNorm: `src.weight`, `src.bias` of `t` -> `dst/scale`, `dst/bias` in `flat`."""
  flat[f"{dst}/scale"], flat[f"{dst}/bias"] = t.take(f"{src}.weight", (d,)), t.take(f"{src}.bias", (d,))


def dense_in(t: "Tensors", flat: dict, src: str, dst: str, n_in: int, n_out: int) -> None:
  """A linear layer: `src.weight` (out, in), `src.bias` of `t` -> `dst/kernel` (in, out), `dst/bias`."""
  flat[f"{dst}/kernel"] = linear_in(t.take(f"{src}.weight", (n_out, n_in)))
  flat[f"{dst}/bias"] = t.take(f"{src}.bias", (n_out,))


def norm_out(p: dict, out: dict, src: str, dst: str) -> None:
  """`norm_in` backwards, from a flat vit_cls tree `p` into a state dict `out`."""
  out[dst + ".weight"], out[dst + ".bias"] = p[src + "/scale"], p[src + "/bias"]


def dense_out(p: dict, out: dict, src: str, dst: str) -> None:
  """`dense_in` backwards."""
  out[dst + ".weight"], out[dst + ".bias"] = linear_out(p[src + "/kernel"]), p[src + "/bias"]


class Tensors:
  """A state dict being mapped: `take` hands out tensors (float32, shape-checked), `finish` finds leftovers.

  `source` (the file) and `kind` ("timm", "Hugging Face") go into every error: one line naming the file,
  the tensor and what was expected.
  """

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str, kind: str):
    self.tensors = dict(tensors)
    self.source, self.kind = source, kind
    self.taken: set[str] = set()

  def error(self, name: str, msg: str) -> CheckpointError:
    shape = f" {tuple(self.tensors[name].shape)}" if name in self.tensors else ""
    return CheckpointError(f"{self.source}: tensor '{name}'{shape}: {msg}.")

  def has(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str, shape: tuple | None = None, *, optional: bool = False):
    """The tensor as float32 (None when absent and `optional`); `shape` entries of None match anything."""
    if name not in self.tensors:
      if optional:
        return None
      raise CheckpointError(f"{self.source}: tensor '{name}' is missing; a {self.kind} ViT state dict "
                            f"has it{'' if shape is None else f' with shape {_fmt(shape)}'}.")
    a = self.tensors[name]
    if a.dtype.kind != "f":
      raise self.error(name, f"dtype {a.dtype}, expected a floating-point tensor")
    if shape is not None and (len(a.shape) != len(shape)
                              or any(w is not None and g != w for g, w in zip(a.shape, shape))):
      raise self.error(name, f"expected shape {_fmt(shape)}")
    self.taken.add(name)
    return a.astype(np.float32)

  def finish(self, expected: str) -> None:
    left = sorted(set(self.tensors) - self.taken)
    if left:
      more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
      raise self.error(left[0], f"not part of a ViT that vit_cls can build{more}; expected {expected}")


def _fmt(shape) -> str:
  return "(" + ", ".join("*" if d is None else str(d) for d in shape) + (",)" if len(shape) == 1 else ")")
