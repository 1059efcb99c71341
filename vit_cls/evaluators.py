"""Evaluators beyond accuracy: few-shot linear classification and k-nearest neighbours on frozen features.

Both score the model's **pre-logits features**, the input of its classification head (`pre_logits` of
`vit_cls.model.apply_with_aux`: the `tanh(Dense)` output with a `representation_size`, else the pooled
representation), computed by one jitted forward pass in inference mode over two splits of a dataset chosen
by name (`config.feature_eval.datasets`: the built-in `digits`, any TFDS dataset, or `imagefolder:PATH`):
the **support** split (`train_split`, default "train") and the **query** split (`eval_split`, default
"test"). Images get the run's evaluation preprocessing (`config.image_size`, `config.pp.eval_crop`,
`value_range`, `to_rgb`) on both splits; nothing is augmented, so the features are a function of the
parameters. Batches are laid out like `train.evaluate`'s (the global batch split over the mesh, the last
batch padded and masked), and the features come back replicated, so every process computes the same
numbers and process 0 logs them.

Few-shot (the convention of big_vision's `fewshot_lsr` evaluator, which the ViT papers report):

* For each of `num_seeds` seeds, every class's support examples are permuted by
  `np.random.default_rng([seed, i])` (i = 0..num_seeds-1; `seed` is `config.feature_eval.seed`, not the
  training seed, so runs with different training seeds are scored on the same examples) and the first k
  of each class form the k-shot training set. The sets are nested (the 5-shot set holds the 1-shot one)
  and the same at every evaluation of a run, so the curve over steps measures the features, not the draw.
* The features are standardised with the k-shot set's own per-dimension mean and standard deviation
  (+1e-5), a constant feature of 100 is appended (the bias: its weight is almost unregularised), the
  targets are one-hot scaled to {-1, +1}, and the closed-form ridge regression
  `W = (X^T X + l2 I)^-1 X^T Y` (or the equal `X^T (X X^T + l2 I)^-1 Y` when there are fewer examples than
  dimensions) is solved in float64 with `l2 = l2_reg` (big_vision's 2^10). A query's class is the argmax of
  its standardised features times W.
* Why this and not logistic regression: it is what the published few-shot numbers use, it has no
  optimiser, learning rate or iteration count to tune, and it costs one D x D (or N x N) solve, so it can
  run at every evaluation.

The accuracy logged is the mean over the seeds: `fewshot_<name>_<k>shot`.

kNN (the convention of DINO's `eval_knn.py`, Caron et al. 2021, whose k = 20 is the number it reports):
features are L2-normalised, each query's `k` support examples of highest cosine similarity vote for their
labels with weight `exp(similarity / knn_temperature)` (T = 0.07), and the class with the most weight wins.
Logged: `knn_<name>_<k>nn_top1`, and `knn_<name>_<k>nn_top5` (true label among the 5 classes with the most
weight) when the dataset has more than 5 classes. The whole support split is the neighbour set.

`<name>` is the dataset's name without a TFDS version or config (`oxford_iiit_pet:3.2.0` -> `oxford_iiit_pet`),
or an image folder's last path component, lower-cased with anything outside [a-z0-9_] turned into `_`.

Cost, per evaluation and dataset: one forward pass over both splits, one small solve per shot count and
seed, one [queries x support] similarity product for kNN (in chunks, on the default device). On the digits
with the default job's model (AMD EPYC, 2 shared cores): 1-2 s per evaluation, plus about 8 s once (the
compiles and the pipelines). Before training starts, each support split's labels are read once (no image
decoded) to check that every class has enough examples for the largest shot count.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_cls import errors
from vit_cls import input_pipeline
from vit_cls import sharding

FIELD = "feature_eval"  # the config group: config.feature_eval.*
BIAS_CONSTANT = 100.0  # the constant feature that stands for the ridge regression's bias
STD_EPSILON = 1e-5
# kNN: queries per chunk are chosen so that one chunk's [queries x support] similarities stay near this
# many float32 elements (256 MiB).
KNN_CHUNK_ELEMENTS = 2**26


# ----------------------------------------------------------------------------------------------------
# Configuration.


def _names(value) -> tuple:
  if isinstance(value, str):
    return (value,) if value else ()
  return tuple(value or ())


def dataset_key(name: str) -> str:
  """The `<name>` of a dataset's metric fields (module docstring)."""
  if name.startswith(input_pipeline.IMAGEFOLDER_PREFIX):
    path = name[len(input_pipeline.IMAGEFOLDER_PREFIX):].rstrip("/\\")
    base = os.path.basename(path) or "imagefolder"
  else:
    base = name.split(":")[0].split("/")[0]
  return re.sub(r"[^a-z0-9_]", "_", base.lower()) or "dataset"


def check_config(config) -> None:
  """One-line ConfigErrors naming the field, for what can be checked without reading data."""
  group = config.get(FIELD, None)
  if group is None:
    return

  def bad(field, allowed):
    raise errors.ConfigError(f"config.{FIELD}.{field}={group.get(field)!r} is not allowed: {allowed}.")

  datasets = group.get("datasets", ())
  if not isinstance(datasets, (str, tuple, list)) or not all(
      isinstance(d, str) and d for d in _names(datasets)):
    bad("datasets", "a tuple of dataset names (digits, a TFDS name, imagefolder:PATH); () turns the "
                    "evaluators off")
  names = _names(datasets)
  if not names:
    return
  keys = [dataset_key(n) for n in names]
  twice = sorted({k for k in keys if keys.count(k) > 1})
  if twice:
    bad("datasets", f"two datasets would log under the same name {twice[0]!r}")

  def counts(field):
    value = group.get(field, ())
    items = (value,) if isinstance(value, int) else tuple(value or ())
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in items):
      bad(field, "a tuple of positive integers (k >= 1); () turns it off")
    return items

  shots, knn_k = counts("shots"), counts("knn_k")
  if not shots and not knn_k:
    raise errors.ConfigError(
        f"config.{FIELD}.shots and config.{FIELD}.knn_k are both empty while config.{FIELD}.datasets="
        f"{names!r}: set one of them, or datasets=() to turn the evaluators off.")
  if not float(group.get("l2_reg", 1.0)) > 0:
    bad("l2_reg", "a positive number")
  if int(group.get("num_seeds", 1)) < 1:
    bad("num_seeds", "a positive integer")
  if int(group.get("seed", 0)) < 0:
    bad("seed", "a non-negative integer")
  if not float(group.get("knn_temperature", 0.07)) > 0:
    bad("knn_temperature", "a positive number")
  for field in ("train_split", "eval_split"):
    if not isinstance(group.get(field, "x"), str) or not group.get(field, "x"):
      bad(field, "a split name such as 'train' or 'train[:10%]'")
  model = config.get("model", None)
  if model is not None and model.get("pool", "cls") == "none":
    raise errors.ConfigError(
        f"config.{FIELD}.datasets={names!r} needs one feature vector per image, and "
        f"config.model.pool='none' returns every token: use another pool, or datasets=().")


# ----------------------------------------------------------------------------------------------------
# Few-shot ridge regression.


def sample_shots(labels: np.ndarray, num_classes: int, shots, seed) -> dict[int, np.ndarray]:
  """Indices into `labels` of the k-shot set of every k in `shots`: the first k of each class after a
  permutation drawn from `np.random.default_rng(seed)` (nested sets, classes in order)."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  out = {}
  for k in shots:
    short = [c for c, idx in enumerate(per_class) if len(idx) < k]
    if short:
      raise errors.ConfigError(
          f"config.{FIELD}.shots: {k} shots per class need {k} examples of every class, but class "
          f"{short[0]} has {len(per_class[short[0]])}.")
    out[int(k)] = np.concatenate([idx[:k] for idx in per_class])
  return out


def ridge_weights(x: np.ndarray, targets: np.ndarray, l2_reg: float) -> np.ndarray:
  """argmin_W |x W - targets|^2 + l2_reg |W|^2, in float64, by the smaller of the two normal equations."""
  x, targets = np.asarray(x, np.float64), np.asarray(targets, np.float64)
  n, d = x.shape
  if n >= d:
    return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)


def ridge_accuracy(train_x, train_y, test_x, test_y, num_classes: int, l2_reg: float) -> float:
  """Top-1 accuracy on (test_x, test_y) of the ridge classifier fitted on (train_x, train_y), with
  big_vision's standardisation, bias feature and {-1, +1} targets (module docstring)."""
  train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0) + STD_EPSILON

  def design(x):
    x = (x - mean) / std
    return np.concatenate([x, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)

  targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
  w = ridge_weights(design(train_x), targets, l2_reg)
  predicted = np.argmax(design(test_x) @ w, axis=1)
  return float(np.mean(predicted == np.asarray(test_y)))


def fewshot_accuracies(support_x, support_y, query_x, query_y, num_classes: int, *, shots,
                       l2_reg: float, num_seeds: int, seed: int) -> dict[int, float]:
  """{k: mean over seeds [seed, 0..num_seeds-1] of the k-shot ridge accuracy on the queries}."""
  support_y = np.asarray(support_y)
  totals = {int(k): 0.0 for k in shots}
  for i in range(num_seeds):
    for k, idx in sample_shots(support_y, num_classes, shots, [int(seed), i]).items():
      totals[k] += ridge_accuracy(support_x[idx], support_y[idx], query_x, query_y, num_classes,
                                  l2_reg)
  return {k: v / num_seeds for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------------
# k-nearest neighbours.


def _normalise(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _knn_votes_chunk(queries, support, support_y, *, k: int, num_classes: int, temperature):
  sims = jnp.dot(queries, support.T, precision=jax.lax.Precision.HIGHEST)  # cosine: both normalised
  top_sims, top_idx = jax.lax.top_k(sims, k)
  weights = jnp.exp(top_sims / temperature)
  return jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(support_y[top_idx], num_classes),
                    precision=jax.lax.Precision.HIGHEST)


def knn_votes(support_x, support_y, query_x, num_classes: int, *, k: int,
              temperature: float = 0.07) -> np.ndarray:
  """float32 [queries, num_classes]: each query's class weights from its k most cosine-similar support
  examples, `exp(similarity / temperature)` each (DINO's weighted vote)."""
  support = _normalise(support_x)
  queries = _normalise(query_x)
  support_y = jnp.asarray(np.asarray(support_y), jnp.int32)
  n, q = support.shape[0], queries.shape[0]
  if not 1 <= k <= n:
    raise errors.ConfigError(f"config.{FIELD}.knn_k: k={k} neighbours need k <= {n} support examples.")
  chunk = max(1, min(q, KNN_CHUNK_ELEMENTS // max(n, 1)))
  padded = -(-q // chunk) * chunk  # every chunk the same shape: one compile
  queries = jnp.pad(queries, ((0, padded - q), (0, 0)))
  votes = [_knn_votes_chunk(queries[i:i + chunk], support, support_y, k=int(k),
                            num_classes=int(num_classes), temperature=float(temperature))
           for i in range(0, padded, chunk)]
  return np.asarray(jax.device_get(jnp.concatenate(votes)))[:q]


def knn_accuracy(support_x, support_y, query_x, query_y, num_classes: int, *, k: int,
                 temperature: float = 0.07) -> dict[str, float]:
  """{"top1": ..., "top5": ... (more than 5 classes only)} of DINO's weighted kNN classifier."""
  votes = knn_votes(support_x, support_y, query_x, num_classes, k=k, temperature=temperature)
  query_y = np.asarray(query_y)
  out = {"top1": float(np.mean(np.argmax(votes, axis=1) == query_y))}
  if num_classes > 5:
    top5 = np.argsort(-votes, axis=1, kind="stable")[:, :5]
    out["top5"] = float(np.mean(np.any(top5 == query_y[:, None], axis=1)))
  return out


# ----------------------------------------------------------------------------------------------------
# The evaluator the training loop runs.


def feature_model(model):
  """`model` without its classification head: its output is the pre-logits features."""
  return model.clone(num_classes=0)


def _features_step(params, batch, *, model):
  params = {k: v for k, v in params.items() if k != "head"}
  features = model.apply({"params": params}, batch["image"], train=False)
  return features.astype(jnp.float32), batch["label"], batch["mask"]


@functools.lru_cache(maxsize=8)
def _features_fn(model, mesh, fsdp: bool):
  """The jitted features step: one per (model, mesh, fsdp), so that evaluators built again for the same
  model (a resumed run in the same process, the tests) reuse its compile."""
  step_model = sharding.BatchShardedModel(model, mesh) if fsdp else model
  return jax.jit(functools.partial(_features_step, model=step_model),
                 out_shardings=sharding.replicated(mesh))


@dataclasses.dataclass
class _Dataset:
  name: str
  key: str
  num_classes: int
  support: input_pipeline.EvalDataset
  query: input_pipeline.EvalDataset


class FeatureEvaluator:
  """Few-shot and kNN accuracies of the configured datasets: `run(params)` -> {field: value}.

  Construction reads nothing but the support splits' labels (to check the shot counts) and builds the
  data pipelines once per run; bad input (an unknown dataset or split, a shot count larger than a class,
  k larger than the support set) fails here, before training, with one line naming the field.
  """

  def __init__(self, config, model, mesh):
    check_config(config)
    group = config[FIELD]
    self._mesh = mesh
    self._shots = tuple(int(k) for k in ((group.shots,) if isinstance(group.shots, int)
                                         else group.shots or ()))
    self._knn_k = tuple(int(k) for k in ((group.knn_k,) if isinstance(group.knn_k, int)
                                         else group.knn_k or ()))
    self._l2_reg = float(group.l2_reg)
    self._num_seeds = int(group.num_seeds)
    self._seed = int(group.seed)
    self._temperature = float(group.knn_temperature)
    self._features_fn = _features_fn(feature_model(model), mesh, bool(config.get("fsdp", False)))
    self._datasets = [self._open(config, name, group) for name in _names(group.datasets)]
    self.seconds = 0.0  # the last `run`'s wall time

  def _open(self, config, name: str, group) -> _Dataset:
    sub = config.copy_and_resolve_references()
    with sub.unlocked():
      sub.dataset, sub.train_split, sub.eval_split = name, group.train_split, group.eval_split
    field = f"config.{FIELD}"
    try:
      info = input_pipeline.get_dataset_info(sub)
      counts = input_pipeline.label_counts(sub, group.train_split)
    except errors.VitClsError as e:
      message = (str(e).replace("config.dataset", f"{field}.datasets")
                 .replace("config.train_split/eval_split", f"{field}.train_split/eval_split"))
      if f"{field}." not in message:
        message = f"{field}.datasets={name!r}: {message}"
      raise type(e)(message) from None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      counts = np.sum(multihost_utils.process_allgather(counts), axis=0)
    if self._shots and counts.min() < max(self._shots):
      c = int(np.argmin(counts))
      raise errors.ConfigError(
          f"{field}.shots={self._shots!r}: {max(self._shots)} shots per class need that many examples "
          f"of every class, but class {info.label_names[c]!r} of {name!r} has {int(counts[c])} in split "
          f"{group.train_split!r} ({field}.train_split): use at most {int(counts.min())} shots, or a "
          f"larger split.")
    total = int(counts.sum())
    if self._knn_k and max(self._knn_k) > total:
      raise errors.ConfigError(
          f"{field}.knn_k={self._knn_k!r}: k={max(self._knn_k)} neighbours need at least that many "
          f"support examples, and split {group.train_split!r} of {name!r} has {total}.")
    return _Dataset(name=name, key=dataset_key(name), num_classes=info.num_classes,
                    support=input_pipeline.create_eval_dataset(sub, split=group.train_split),
                    query=input_pipeline.create_eval_dataset(sub, split=group.eval_split))

  def features(self, params, data: input_pipeline.EvalDataset) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, D] features, int [N] labels) of every example of a split, padding dropped."""
    feats, labels = [], []
    for local in data:
      f, y, m = jax.device_get(self._features_fn(params, sharding.global_batch(local, self._mesh)))
      m = np.asarray(m, bool)
      feats.append(np.asarray(f)[m])
      labels.append(np.asarray(y)[m])
    return np.concatenate(feats), np.concatenate(labels)

  def run(self, params) -> dict[str, float]:
    """Every configured dataset's few-shot and kNN accuracies, as metric fields (module docstring)."""
    start = time.perf_counter()
    out = {}
    for ds in self._datasets:
      support_x, support_y = self.features(params, ds.support)
      query_x, query_y = self.features(params, ds.query)
      if self._shots:
        accs = fewshot_accuracies(support_x, support_y, query_x, query_y, ds.num_classes,
                                  shots=self._shots, l2_reg=self._l2_reg, num_seeds=self._num_seeds,
                                  seed=self._seed)
        out.update({f"fewshot_{ds.key}_{k}shot": v for k, v in accs.items()})
      for k in self._knn_k:
        accs = knn_accuracy(support_x, support_y, query_x, query_y, ds.num_classes, k=k,
                            temperature=self._temperature)
        out.update({f"knn_{ds.key}_{k}nn_{name}": v for name, v in accs.items()})
    self.seconds = time.perf_counter() - start
    return out


def create(config, model, mesh) -> FeatureEvaluator | None:
  """The run's FeatureEvaluator, or None when `config.feature_eval.datasets` is empty (configs/base.py's
  default) or the config has no such group."""
  check_config(config)
  group = config.get(FIELD, None)
  if group is None or not _names(group.get("datasets", ())):
    return None
  return FeatureEvaluator(config, model, mesh)


__all__ = ["FeatureEvaluator", "create", "check_config", "dataset_key", "fewshot_accuracies",
           "knn_accuracy", "knn_votes", "ridge_accuracy", "ridge_weights", "sample_shots"]
