"""The pooling study (experiments/pooling_study.py): it runs end to end, and its `cls_appended` head is the
`cls` head permuted, so any gap between the two in the results is noise, not architecture."""

import csv
import importlib.util
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_cls.model import VisionTransformer, apply_with_aux

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study():
  spec = importlib.util.spec_from_file_location(
      "pooling_study", os.path.join(REPO, "experiments", "pooling_study.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["pooling_study"] = module  # its dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(module)
  return module


def test_quick_study_writes_csv_table_and_plot(tmp_path):
  study = _study()
  out = tmp_path / "results"
  # Three heads keep this under a minute on 2 idle cores (each run compiles its own step); between
  # them they cover a class token, no class token, and registers.
  heads = ["cls", "gap", "cls+4reg"]
  assert study.main(["--quick", "--steps", "4", "--heads", ",".join(heads), "--out", str(out),
                     "--workdir", str(tmp_path / "runs")]) == 0
  with open(out / study.CSV_NAME, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["head"] for r in rows] == heads  # --quick: one rate, one seed
  assert all(r["phase"] == "final" and r["status"] == "ok" for r in rows)
  assert all(0.0 <= float(r["accuracy"]) <= 1.0 and int(r["num_examples"]) == 360 for r in rows)
  params = {r["head"]: int(r["params"]) for r in rows}
  # Only the class token adds parameters to the encoder: the token and its position-embedding row;
  # registers add one width-sized vector each.
  width = 32  # the --quick model
  assert params["cls"] == params["gap"] + 2 * width
  assert params["cls+4reg"] == params["cls"] + 4 * width
  table = (out / study.MD_NAME).read_text()
  for head in heads:
    assert f"| `{head}` |" in table
  png = (out / study.PNG_NAME).read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_picks_each_heads_best_rate_and_reuses_it_for_the_seeds():
  study = _study()
  rows = [dict(phase="sweep", head="gap", learning_rate=lr, seed=0, accuracy=acc, loss=1.0, status=st)
          for lr, acc, st in ((1e-3, 0.9, "ok"), (3e-3, 0.8, "ok"), (1e-2, float("nan"), "diverged"))]
  rows += [dict(phase="sweep", head="cls", learning_rate=lr, seed=0, accuracy=acc, loss=1.0, status="ok")
           for lr, acc in ((1e-3, 0.7), (3e-3, 0.95))]
  lrs = [1e-3, 3e-3, 1e-2]
  assert study.choose_rate(rows, "gap", lrs) == 1e-3
  assert study.choose_rate(rows, "cls", lrs) == 3e-3
  args = study.parse_args(["--heads", "cls,gap", "--lrs", "1e-3,3e-3,1e-2", "--seeds", "3"])
  final = study.plan_final(args, rows)
  assert [(r.head, r.learning_rate, r.seed) for r in final] == [
      ("cls", 3e-3, 0), ("cls", 3e-3, 1), ("cls", 3e-3, 2), ("gap", 1e-3, 0), ("gap", 1e-3, 1),
      ("gap", 1e-3, 2)]
  m, s = study.mean_std([1.0, 2.0, 3.0])
  assert (m, s) == (2.0, 1.0)  # sample std (ddof=1)


@pytest.mark.parametrize("registers", [0, 4])
def test_appended_class_token_computes_the_prepended_models_function(registers):
  """The study's `cls_appended` vs `cls`: with the same parameters, the class token's position-embedding
  row moved from first to last, every output is the same (and so is every attention map, permuted).

  Self-attention without a mask is permutation-equivariant and the position embedding travels with its
  token, so where the token sits is a label, not a choice. (tests/test_model.py has the logits-only
  version of this check; this one covers the representation, the attention maps and registers too.)
  """
  kw = dict(num_classes=10, patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2,
            representation_size=16, num_registers=registers, attention_impl="einsum")
  first = VisionTransformer(class_token_position="first", **kw)
  last = VisionTransformer(class_token_position="last", **kw)
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
  p = first.init(jax.random.key(0), x, train=False)["params"]
  # Non-trivial values everywhere (the class token and the head start at zero).
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), p)
  pe = p["Transformer"]["posembed_input"]["pos_embedding"]  # (1, 1 + 16, D): row 0 is the class token's
  p_last = flax.core.copy(p, {})
  p_last["Transformer"] = {**p["Transformer"],
                           "posembed_input": {"pos_embedding": jnp.concatenate([pe[:, 1:], pe[:, :1]], 1)}}
  assert jax.tree.structure(p_last) == jax.tree.structure(last.init(jax.random.key(0), x, train=False)["params"])

  y1, aux1 = apply_with_aux(first, {"params": p}, x, train=False)
  y2, aux2 = apply_with_aux(last, {"params": p_last}, x, train=False)
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux2["pre_logits"], aux1["pre_logits"], rtol=1e-5, atol=1e-5)
  # The token sequence and the attention maps are the same up to moving token 0 to the end
  # (registers stay after it in both).
  n = 16
  perm = np.r_[np.arange(1, n + 1), 0, np.arange(n + 1, n + 1 + registers)]
  np.testing.assert_allclose(aux2["tokens"], aux1["tokens"][:, perm[:n + 1]], rtol=1e-5, atol=1e-5)
  for a1, a2 in zip(aux1["attention"], aux2["attention"]):
    np.testing.assert_allclose(a2, a1[:, :, perm][:, :, :, perm], rtol=1e-5, atol=1e-6)
  # Without the permuted row it is a different function: the position embedding is what carries order.
  p_unpermuted = {**p_last, "Transformer": p["Transformer"]}
  assert not np.allclose(last.apply({"params": p_unpermuted}, x, train=False), y1, atol=1e-4)
