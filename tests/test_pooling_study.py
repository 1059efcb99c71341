"""The pooling study (experiments/pooling_study.py): its quick mode runs end to end and writes what
docs/class_token_study.md quotes; its parts (data, optimizer, statistics, rate choice) compute what the
docstring says; and its `cls_appended` head is the `cls` head permuted, so any gap between the two is
noise, not architecture."""

import csv
import importlib.util
import math
import os
import re
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


def test_quick_study_writes_csv_with_mask_and_depth_table_with_intervals_and_plot(tmp_path):
  study = _study()
  out = tmp_path / "results"
  assert study.main(["--quick", "--out", str(out)]) == 0
  with open(out / study.CSV_NAME, newline="") as f:
    rows = list(csv.DictReader(f))
  cells = {(r["mask"], int(r["depth"]), r["head"]) for r in rows}
  assert cells == {("bidirectional", 1, "cls"), ("bidirectional", 1, "gap"), ("causal", 1, "cls"),
                   ("bidirectional", 2, "cls")}
  for cell in cells:
    mine = [r for r in rows if (r["mask"], int(r["depth"]), r["head"]) == cell]
    sweep = [r for r in mine if r["phase"] == "sweep"]
    final = [r for r in mine if r["phase"] == "final"]
    # Quick: 2 rates x 1 seed on train minus validation, scored on validation; 2 seeds on train/test.
    assert sorted(float(r["learning_rate"]) for r in sweep) == [2e-3, 4e-3]
    assert {(r["train_examples"], r["eval_split"], r["num_examples"]) for r in sweep} == {("1150", "val", "287")}
    assert sorted(int(r["seed"]) for r in final) == [0, 1]
    assert {(r["train_examples"], r["eval_split"], r["num_examples"]) for r in final} == {("1437", "test", "360")}
    assert len({r["learning_rate"] for r in final}) == 1
    assert all(r["status"] == "ok" and 0.0 <= float(r["accuracy"]) <= 1.0 for r in mine)
  params = {(r["mask"], int(r["depth"]), r["head"]): int(r["params"]) for r in rows}
  width = 32  # the --quick model: the class token adds the token and its position row
  assert params[("bidirectional", 1, "cls")] == params[("bidirectional", 1, "gap")] + 2 * width
  assert params[("causal", 1, "cls")] == params[("bidirectional", 1, "cls")]  # the mask adds nothing
  # Under the causal mask the prepended class token sees only itself: every test image gets the same
  # prediction, so the accuracy is the share of one class in the test split.
  from vit_cls.datasets import digits  # pylint: disable=g-import-not-at-top
  shares = np.bincount(digits.load_images()[1][digits.split_indices()["test"]], minlength=10) / 360
  for r in rows:
    if (r["mask"], r["head"], r["phase"]) == ("causal", "cls", "final"):
      assert np.isclose(shares, float(r["accuracy"])).any(), r["accuracy"]

  table = (out / study.MD_NAME).read_text()
  interval = r"\d+\.\d\d ± \d+\.\d\d \[-?\d+\.\d\d, -?\d+\.\d\d\]"
  for mask, depth, head in cells:
    assert re.search(rf"\| {mask} \| {depth} \| `{head}` \|.*\| {interval} \| 2 \|", table), (mask, depth, head)
  assert re.search(r"\| bidirectional 1L cls \| bidirectional 1L gap \| [+-]\d+\.\d\d \| \[[+-]\d+\.\d\d, "
                   r"[+-]\d+\.\d\d\] \|", table)
  assert "| causal 1L cls | bidirectional 1L cls |" in table
  assert "95% t-interval" in table and "Wall clock of this invocation" in table
  assert (out / study.PNG_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_cover_both_arms_and_the_depth_axis_once_and_registers_stay_out_of_the_causal_arm():
  study = _study()
  args = study.parse_args([])
  cells = study.plan_cells(args, study.base_config(args))
  assert len(cells) == len(set(cells)) == 14
  assert {c.head for c in cells if c.mask == "causal"} == {"cls", "cls_appended", "last", "gap"}
  assert {(c.depth, c.head) for c in cells if c.mask == "bidirectional" and c.head in ("cls", "last", "gap")} == {
      (d, h) for d in (1, 2, 4) for h in ("cls", "last", "gap")}
  with pytest.raises(SystemExit):
    study.parse_args(["--causal_heads", "cls,cls+4reg"])


def test_validation_is_a_fixed_part_of_train_and_never_test():
  study = _study()
  splits = study.load_splits(20)
  again = study.load_splits(20)
  assert [len(splits[k][1]) for k in ("fit", "val", "train", "test")] == [1150, 287, 1437, 360]
  np.testing.assert_array_equal(splits["val"][0], again["val"][0])
  from vit_cls.datasets import digits  # pylint: disable=g-import-not-at-top
  rows = digits.split_indices()
  val = study.validation_rows(rows["train"], 20)
  assert set(val) <= set(rows["train"]) and not set(val) & set(rows["test"])


def test_preprocessing_in_jax_matches_the_input_pipeline():
  """Eval images are the built-in pipeline's (decode, bilinear resize to 16, [-1, 1]); a train crop of a
  given window is tf.image's slice + resize; with a minimum area of 1 the crop is the whole image."""
  tf = pytest.importorskip("tensorflow")
  from configs import default  # pylint: disable=g-import-not-at-top
  from vit_cls import input_pipeline  # pylint: disable=g-import-not-at-top
  study = _study()
  images = study.load_splits(20)["test"][0][:6]
  config = default.get_config()
  tf_eval = input_pipeline._eval_preprocess(config, 1)  # pylint: disable=protected-access
  expected = np.stack([tf_eval(tf.io.encode_png(im[..., None])).numpy() for im in images])
  np.testing.assert_allclose(study.eval_images(images, 16), expected, atol=1e-5)

  windows = [(0, 0, 8, 8), (1, 2, 6, 5), (3, 0, 5, 8), (0, 4, 7, 4)]
  for image, (top, left, h, w) in zip(images, windows):
    want = tf.image.resize(image[top:top + h, left:left + w, None].astype(np.float32), [16, 16])
    got = study.to_model_input(image, study.resize_weights(top, h, 16, 8), study.resize_weights(left, w, 16, 8))
    np.testing.assert_allclose(got[..., 0], np.clip(want.numpy()[..., 0] * 2 / 255 - 1, -1, 1), atol=1e-5)

  np.testing.assert_allclose(study.train_images(jax.random.key(0), images, 16, 1.0),
                             study.eval_images(images, 16), atol=1e-6)
  top, left, h, w = (np.asarray(a) for a in study.crop_windows(jax.random.key(1), 4096, 8, 0.5))
  assert (h >= 1).all() and (w >= 1).all() and (top + h <= 8).all() and (left + w <= 8).all()
  assert (h * w >= 0.5 * 64 - 8).all()  # the area range, up to the rounding of each side
  assert len(set(zip(top, left, h, w))) > 50  # and it is random


def test_rate_times_unit_rate_update_is_the_configs_optimizer_at_that_rate():
  import optax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from vit_cls import optim  # pylint: disable=g-import-not-at-top
  study = _study()
  base = default.get_config()
  rate, steps = 3e-3, 40
  unit_tx = optim.create_optimizer(study.unit_rate_config(base, steps))[0]
  config = study.unit_rate_config(base, steps)
  config.learning_rate = rate
  tx = optim.create_optimizer(config)[0]
  params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
  p1, p2, s1, s2 = params, params, tx.init(params), unit_tx.init(params)
  for i in range(5):  # past the warmup (3 steps at this length), decay and clipping at work
    grads = jax.tree.map(lambda a: 5 * jax.random.normal(jax.random.key(i), a.shape), params)
    u1, s1 = tx.update(grads, s1, p1)
    u2, s2 = study.scaled_update(unit_tx, grads, s2, p2, rate)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), p1, p2)
  assert not np.allclose(p1["dense"]["kernel"], 1.0)


def test_rate_choice_uses_the_validation_mean_and_never_a_diverged_rate():
  study = _study()
  cell = study.Cell("bidirectional", 4, "gap")

  def row(lr, seed, acc, status="ok", loss=1.0, head="gap"):
    return dict(mask="bidirectional", depth=4, head=head, phase="sweep", learning_rate=lr, seed=seed,
                accuracy=acc, loss=loss, status=status)

  rows = [row(1e-3, 0, 0.90), row(1e-3, 1, 0.80),  # mean 0.85
          row(2e-3, 0, 0.95), row(2e-3, 1, 0.70),  # the best single run, mean 0.825
          row(4e-3, 0, 0.99), row(4e-3, 1, float("nan"), "diverged"),
          row(8e-3, 0, 0.99, head="cls"), row(8e-3, 1, 0.99, head="cls")]  # another cell
  assert study.choose_rate(rows, cell, [1e-3, 2e-3, 4e-3, 8e-3]) == 1e-3
  rows += [row(8e-3, 0, 0.85, loss=0.5), row(8e-3, 1, 0.85, loss=0.5)]  # same mean, lower loss
  assert study.choose_rate(rows, cell, [1e-3, 2e-3, 4e-3, 8e-3]) == 8e-3


def test_intervals_are_t_intervals_paired_by_seed_or_welch():
  study = _study()
  mean, half = study.t_interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and math.isclose(half, 4.302652729911275 / math.sqrt(3))  # t(0.975, 2) * s / sqrt(n)
  a = {0: 90.0, 1: 92.0, 2: 94.0}
  b = {0: 89.0, 1: 91.1, 2: 92.9}  # a - b = 1.0, 0.9, 1.1 per seed: sd 0.1
  diff, half, kind = study.difference(a, b)
  assert kind == "paired" and math.isclose(diff, 1.0)
  assert math.isclose(half, 4.302652729911275 * 0.1 / math.sqrt(3))
  diff, half, kind = study.difference(a, {0: 89.0, 1: 91.1, 3: 92.9})  # seed sets differ
  # Welch: variances 4 and 3.81, se^2 = 4/3 + 3.81/3, df = (se^2)^2 / ((4/3)^2/2 + (3.81/3)^2/2)
  se2 = 4 / 3 + 3.81 / 3
  df = se2 ** 2 / ((4 / 3) ** 2 / 2 + (3.81 / 3) ** 2 / 2)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  assert kind == "Welch" and math.isclose(diff, 1.0) and math.isclose(half, stats.t.ppf(0.975, df) * math.sqrt(se2))
  cls, gap = study.Cell("bidirectional", 4, "cls"), study.Cell("bidirectional", 4, "gap")
  rows = [dict(mask=c.mask, depth=c.depth, head=c.head, phase="final", seed=s, accuracy=v / 100, status="ok")
          for c, values in ((cls, a), (gap, b)) for s, v in values.items()]
  (result,) = study.compare(rows, [(cls, gap)])
  assert result["verdict"] == "real: cls higher" and math.isclose(result["diff"], 1.0)


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
