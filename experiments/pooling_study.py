"""Pooling study: does the ViT need a prepended class token, or would the last token (or a mean) do?

    python experiments/pooling_study.py            # the default study on the digits (30 runs of 400 steps)
    python experiments/pooling_study.py --quick    # smoke test: every head, a 1-layer model, 8 steps
    python experiments/pooling_study.py --dataset cifar10 --data_dir ~/tensorflow_datasets \
        --model S/16 --set image_size=32 --set model.patch_size=[4,4] --steps 10000   # on an accelerator

The same ViT (the built-in job, `configs/default.py`, read fresh on every run so its current tuning is what
gets compared) is trained once per head:

  cls           the class token, prepended (the default; the ViT paper's choice)
  cls_appended  the same token appended (`class_token_position="last"`): in a bidirectional encoder this is
                the same function with the position-embedding rows permuted, so it must tie with `cls`
  last          the last patch token, no extra token (the causal-LM habit, without the causal mask)
  gap           the mean of the patch tokens, no class token
  map           a learned query attends over the tokens (multi-head attention pooling)
  cls+4reg      the class token plus 4 register tokens (Darcet et al., 2024)

Why a learning-rate sweep and not one rate: the ViT paper (appendix D.3) found that GAP with the class
token's learning rate looked much worse, and as good once its rate was lowered; a single rate answers a
question about the rate, not the head. So each head gets its own best rate from a small grid, and is
then trained with `--seeds` seeds at that rate and scored on the test split. By default (`--select_on test`,
what fits 30 minutes) the rate is chosen on the test split and the chosen sweep run is reused as the first
seed, which is slightly optimistic, by the same amount for every head. `--select_on val` chooses on a
split held out from the training set and trains every seed afresh (6 more runs). What gets reported is
the mean and sample standard deviation over the seeds.

Time: the default is sized for 30 minutes on 2 idle CPU cores (an estimate from the built-in job's speed:
about 10 steps/s plus ~10 s of set-up and compilation per run). On 2 cores shared with other jobs, 36 runs
of 300 steps took 41 minutes; `--steps`, `--lrs`, `--seeds` and `--heads` trade time for coverage.

Outputs in `--out` (default experiments/results/): pooling_study.csv (every run, appended as it finishes,
so a killed study keeps what it finished and `--resume` continues it), pooling_study.md (the tables) and
pooling_study.png (the sweep and the final accuracies); on the digits also attention_cls.png, the class
token's attention (vit_cls.visualize) in the study's own `cls` model on digit_example.png. Images/s is the training rate between the first and
the last logged step (so compilation is excluded), on whatever else the machine was doing at the time.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # configs/ is a directory of the repository, not an installed package
  sys.path.insert(0, REPO)
if __name__ == "__main__":  # before JAX and TensorFlow allocate: the memory allocator, the first line
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup()

# head name -> (config.model overrides, one-line description for the table). Every head keeps the rest of
# the model (width, depth, the MLP pre-logits head) as the base config has it.
HEADS: dict[str, tuple[dict, str]] = {
    "cls": (dict(pool="cls", class_token_position="first", num_registers=0),
            "class token, prepended"),
    "cls_appended": (dict(pool="cls", class_token_position="last", num_registers=0),
                     "the same class token, appended"),
    "last": (dict(pool="last", num_registers=0), "last patch token, no extra token"),
    "gap": (dict(pool="gap", num_registers=0), "mean of the patch tokens"),
    "map": (dict(pool="map", num_registers=0), "attention pooling (learned query)"),
    "cls+4reg": (dict(pool="cls", class_token_position="first", num_registers=4),
                 "class token + 4 registers"),
}

DEFAULT_STEPS = 400
DEFAULT_LRS = (1e-3, 2e-3, 4e-3)
CSV_NAME, MD_NAME, PNG_NAME = "pooling_study.csv", "pooling_study.md", "pooling_study.png"
ATTENTION_NAME, DIGIT_NAME = "attention_cls.png", "digit_example.png"
FIELDS = ("phase", "head", "learning_rate", "seed", "steps", "train_split", "eval_split", "accuracy",
          "loss", "num_examples", "params", "images_per_sec", "wall_s", "status")


@dataclasses.dataclass(frozen=True)
class Run:
  phase: str  # "sweep" (chooses the rate) or "final" (the reported numbers)
  head: str
  learning_rate: float
  seed: int

  def key(self) -> tuple:
    return (self.phase, self.head, f"{self.learning_rate:.6g}", str(self.seed))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--heads", default=",".join(HEADS), help=f"comma list from: {', '.join(HEADS)}")
  p.add_argument("--lrs", default=",".join(f"{x:g}" for x in DEFAULT_LRS),
                 help="learning-rate grid of the sweep (comma list)")
  p.add_argument("--seeds", type=int, default=3, help="seeds per head at its chosen rate")
  p.add_argument("--sweep_seed", type=int, default=0, help="the seed of the sweep runs")
  p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                 help="training steps per run (the base config's warmup is scaled to match)")
  p.add_argument("--select_on", choices=("val", "test"), default="test",
                 help="test (default, fits 30 min): sweep on train/test and reuse the sweep run as one "
                      "of the seeds (fewer runs; the chosen rate's first seed is slightly optimistic); "
                      "val: sweep on train[:N%%] scored on train[N%%:], then train every seed on the full "
                      "train split (an unbiased choice, 6 more runs)")
  p.add_argument("--val_percent", type=int, default=20, help="share of the train split held out (val)")
  p.add_argument("--config", default=os.path.join(REPO, "configs", "default.py"),
                 help="base config file (a get_config() module)")
  p.add_argument("--dataset", default=None, help="any TFDS name (or imagefolder:PATH); default: the config's")
  p.add_argument("--data_dir", default=None, help="TFDS data dir")
  p.add_argument("--model", default=None,
                 help="a named variant (S/16, B/16, ...) replacing the config's model architecture")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override any config field, e.g. --set image_size=32 --set model.dtype=bfloat16")
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results"), help="output directory")
  p.add_argument("--workdir", default=None,
                 help="where the runs' workdirs go (kept); default: a temporary directory, removed")
  p.add_argument("--resume", action="store_true", help="skip runs already in the CSV of --out")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: a 1-layer width-32 model, 8 steps, one rate (the config's), one seed")
  p.add_argument("--note", default="", help="a line for the table header (what was reduced, and why)")
  args = p.parse_args(argv)
  args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
  unknown = [h for h in args.heads if h not in HEADS]
  if unknown:
    p.error(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
  args.lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
  if args.quick:
    args.steps, args.seeds, args.lrs = min(args.steps, 8), 1, []
  if args.seeds < 1 or args.steps < 1:
    p.error("--seeds and --steps must be positive")
  return args


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as bfloat16


def base_config(args):
  """The base config file's get_config(), with the study's command-line changes applied."""
  spec = importlib.util.spec_from_file_location("_pooling_study_base_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if args.model:
    from configs import models  # pylint: disable=g-import-not-at-top
    arch = models.get_model_config(args.model)
    for field in ("patch_size", "hidden_size", "mlp_dim", "num_heads", "num_layers"):
      config.model[field] = arch[field]
    config.model.name = args.model
  if args.dataset:
    config.dataset = args.dataset
  if args.data_dir:
    config.data_dir = args.data_dir
  if args.quick:
    # Compile time dominates a smoke test: the smallest model that still has every part.
    config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, representation_size=32))
    config.update(dict(batch_size=32, eval_batch_size=128, shuffle_buffer=256))
  for item in args.set:
    field, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
    config.update_from_flattened_dict({field: _literal(value)})
  if not args.lrs:
    args.lrs = [float(config.learning_rate)]
  return config


def run_config(base, args, run: Run):
  """The config of one run: the head's model fields, the rate, the seed, the steps, and the splits."""
  config = base.copy_and_resolve_references()
  config.model.update(HEADS[run.head][0])
  config.learning_rate = run.learning_rate
  config.seed = run.seed
  scale = args.steps / max(int(base.total_steps), 1)
  config.warmup_steps = max(1, min(args.steps - 1, round(int(base.warmup_steps) * scale)))
  config.total_steps = args.steps
  config.log_every = max(1, args.steps // 10)
  config.eval_every = args.steps
  config.checkpoint_every = args.steps
  config.keep_checkpoints = 1
  train_split = base.get("train_split", "train") or "train"
  if run.phase == "sweep" and args.select_on == "val":
    config.eval_split = f"{train_split}[{100 - args.val_percent}%:]"
    config.train_split = f"{train_split}[:{100 - args.val_percent}%]"
  return config


def count_params(config, num_classes: int) -> int:
  from vit_cls import checkpoint, train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = train.create_model(config, num_classes)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(
      checkpoint.abstract_params(model, config.image_size))))


def train_images_per_sec(workdir: str, batch_size: int) -> float:
  """The rate between the first and the last logged train step: compilation (before the first) excluded."""
  records = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if r.get("split") == "train":
        records.append((r["step"], r["time"]))
  records.sort()
  if len(records) < 2 or records[-1][1] <= records[0][1]:
    return float("nan")
  return (records[-1][0] - records[0][0]) * batch_size / (records[-1][1] - records[0][1])


def execute(run: Run, base, args, root: str) -> dict:
  """Trains one run in this process (a fresh workdir) and returns its CSV row."""
  from vit_cls import input_pipeline, train  # pylint: disable=g-import-not-at-top
  config = run_config(base, args, run)
  workdir = os.path.join(root, f"{run.phase}_{run.head}_lr{run.learning_rate:g}_s{run.seed}")
  shutil.rmtree(workdir, ignore_errors=True)  # never resume a half-finished run of an older study
  num_classes = input_pipeline.get_dataset_info(config).num_classes
  row = dict(phase=run.phase, head=run.head, learning_rate=run.learning_rate, seed=run.seed,
             steps=config.total_steps, train_split=config.train_split, eval_split=config.eval_split,
             params=count_params(config, num_classes))
  start = time.perf_counter()
  try:
    metrics = train.train_and_evaluate(config, workdir)
    row.update(accuracy=metrics["accuracy"], loss=metrics["loss"],
               num_examples=int(metrics["num_examples"]), status="ok")
  except train.NonFiniteError:  # a rate too high for this head is a result of the sweep, not a crash
    row.update(accuracy=float("nan"), loss=float("nan"), num_examples=0, status="diverged")
  row["wall_s"] = round(time.perf_counter() - start, 2)
  row["images_per_sec"] = round(train_images_per_sec(workdir, config.batch_size), 1)
  return row


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k in ("learning_rate", "accuracy", "loss", "images_per_sec", "wall_s"):
      r[k] = float(r[k])
    for k in ("seed", "steps", "params", "num_examples"):
      r[k] = int(r[k])
  return rows


def append_row(path: str, row: dict) -> None:
  new = not os.path.exists(path)
  with open(path, "a", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    if new:
      w.writeheader()
    w.writerow({k: row[k] for k in FIELDS})


def _key(row: dict) -> tuple:
  return Run(row["phase"], row["head"], float(row["learning_rate"]), int(row["seed"])).key()


def choose_rate(rows: list[dict], head: str, lrs: Sequence[float]) -> float:
  """The sweep's best rate for a head: highest accuracy, then lowest loss; diverged runs never win."""
  scored = [r for r in rows if r["phase"] == "sweep" and r["head"] == head and r["status"] == "ok"
            and any(math.isclose(r["learning_rate"], lr) for lr in lrs)]
  if not scored:
    return lrs[0]
  return max(scored, key=lambda r: (r["accuracy"], -r["loss"]))["learning_rate"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; nan for a single value)."""
  n = len(values)
  if n == 0:
    return float("nan"), float("nan")
  m = sum(values) / n
  if n == 1:
    return m, float("nan")
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def summarise(rows: list[dict], heads: Sequence[str], lrs: Sequence[float]) -> list[dict]:
  out = []
  for head in heads:
    lr = choose_rate(rows, head, lrs)
    final = [r for r in rows if r["phase"] == "final" and r["head"] == head
             and math.isclose(r["learning_rate"], lr)]
    ok = [r for r in final if r["status"] == "ok"]
    m, s = mean_std([100 * r["accuracy"] for r in ok])
    ips = [r["images_per_sec"] for r in ok if not math.isnan(r["images_per_sec"])]
    out.append(dict(head=head, what=HEADS[head][1], lr=lr, mean=m, std=s, n=len(ok),
                    diverged=len(final) - len(ok),
                    params=final[0]["params"] if final else None,
                    ips=sorted(ips)[len(ips) // 2] if ips else float("nan")))
  return out


def write_table(path: str, summary: list[dict], rows: list[dict], args, base, header: dict) -> None:
  sweep_eval = "the held-out validation split" if args.select_on == "val" else "the test split"
  lines = [
      "# Pooling study: which token (or pooling) should the classifier read?",
      "",
      f"Dataset `{base.dataset}` (train `{base.get('train_split', 'train')}`, test "
      f"`{base.get('eval_split', 'test')}`); model: the base config `{os.path.relpath(args.config, REPO)}` "
      f"({base.model.num_layers} layers, width {base.model.hidden_size}, {base.model.num_heads} heads, "
      f"patch {tuple(base.model.patch_size)}, image {base.image_size}), **{args.steps} steps** per run "
      f"(the config itself trains {header['config_steps']}), batch {base.batch_size}, "
      f"{base.optimizer}, cosine decay.",
      f"Learning rate per head chosen from {', '.join(f'{x:g}' for x in args.lrs)} on {sweep_eval} "
      f"(seed {args.sweep_seed}), then {args.seeds} seed(s) at that rate: test accuracy is mean ± sample "
      f"std over the seeds. Images/s: training throughput (median over seeds) on {header['machine']}.",
      f"Runtime: {header['runtime_min']:.1f} min, the sum of the wall-clock times of the {header['runs']} "
      f"training runs (data set-up, compilation, training, evaluation, checkpoint; one process, runs "
      f"one after another).",
  ]
  if args.note:
    lines += ["", f"**{args.note}**"]
  lines += ["", "| head | what the classifier reads | lr | test accuracy (%) | seeds | parameters | images/s |",
            "|---|---|---|---|---|---|---|"]
  for s in summary:
    acc = "—" if math.isnan(s["mean"]) else (
        f"{s['mean']:.2f}" + ("" if math.isnan(s["std"]) else f" ± {s['std']:.2f}"))
    if s["diverged"]:
      acc += f" ({s['diverged']} diverged)"
    params = "—" if s["params"] is None else f"{s['params']:,}"
    ips = "—" if math.isnan(s["ips"]) else f"{s['ips']:,.0f}"
    lines.append(f"| `{s['head']}` | {s['what']} | {s['lr']:g} | {acc} | {s['n']} | {params} | {ips} |")
  sweep = [r for r in rows if r["phase"] == "sweep"]
  if sweep and len(args.lrs) > 1:
    lines += ["", f"Learning-rate sweep (seed {args.sweep_seed}, accuracy % on {sweep_eval}; "
                  "the chosen rate in bold):", "",
              "| head | " + " | ".join(f"lr {x:g}" for x in args.lrs) + " |",
              "|---|" + "---|" * len(args.lrs)]
    chosen = {s["head"]: s["lr"] for s in summary}
    for head in args.heads:
      cells = []
      for lr in args.lrs:
        hit = [r for r in sweep if r["head"] == head and math.isclose(r["learning_rate"], lr)]
        if not hit:
          cells.append("—")
          continue
        r = hit[-1]
        cell = "diverged" if r["status"] != "ok" else f"{100 * r['accuracy']:.2f}"
        cells.append(f"**{cell}**" if math.isclose(lr, chosen[head]) else cell)
      lines.append(f"| `{head}` | " + " | ".join(cells) + " |")
  lines += ["", f"Every run: `{CSV_NAME}`. Plot: `{PNG_NAME}`. Rerun: `python experiments/pooling_study.py "
                f"{header['argv']}`.".replace(" `.", "`."), ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def write_plot(path: str, summary: list[dict], rows: list[dict], args) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_sweep, ax_final) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {h: plt.get_cmap("tab10")(i) for i, h in enumerate(HEADS)}
  sweep_eval = "validation" if args.select_on == "val" else "test"
  for head in args.heads:
    pts = sorted((r["learning_rate"], 100 * r["accuracy"]) for r in rows
                 if r["phase"] == "sweep" and r["head"] == head and r["status"] == "ok")
    if pts:
      ax_sweep.plot(*zip(*pts), "o-", color=colors[head], label=head)
  ax_sweep.set_xscale("log")
  ax_sweep.set_xlabel("peak learning rate")
  ax_sweep.set_ylabel(f"{sweep_eval} accuracy (%)")
  ax_sweep.set_title(f"Learning-rate sweep (seed {args.sweep_seed})")
  ax_sweep.grid(alpha=0.3)
  if ax_sweep.get_legend_handles_labels()[0]:
    ax_sweep.legend(fontsize=8)
  for i, s in enumerate(summary):
    accs = [100 * r["accuracy"] for r in rows if r["phase"] == "final" and r["head"] == s["head"]
            and math.isclose(r["learning_rate"], s["lr"]) and r["status"] == "ok"]
    if not accs:
      continue
    ax_final.bar(i, s["mean"], yerr=0 if math.isnan(s["std"]) else s["std"], color=colors[s["head"]],
                 alpha=0.6, capsize=4)
    ax_final.plot([i] * len(accs), accs, "k.", ms=6)
  ax_final.set_xticks(range(len(summary)))
  ax_final.set_xticklabels([f"{s['head']}\nlr {s['lr']:g}" for s in summary], fontsize=8)
  finite = [100 * r["accuracy"] for r in rows if r["phase"] == "final" and r["status"] == "ok"]
  if finite:
    lo = min(finite)
    ax_final.set_ylim(max(0.0, lo - max(2.0, 0.25 * (100 - lo))), 100)
  ax_final.set_ylabel("test accuracy (%)")
  ax_final.set_title(f"Each head at its best rate: mean ± std, {args.seeds} seed(s) (dots)")
  ax_final.grid(axis="y", alpha=0.3)
  fig.suptitle(f"Pooling study, {args.steps} steps per run", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_attention_figure(root: str, out: str, summary: list[dict], args, base) -> str | None:
  """The class token's attention on a test digit, drawn from the study's own `cls` model (first seed).

  Only for the built-in digits (the one dataset whose images the script can write without TFDS). The
  digit is saved next to the figure, so `python -m vit_cls.visualize` can be run on it again.
  """
  if base.dataset != "digits" or "cls" not in args.heads:
    return None
  lr = next(s["lr"] for s in summary if s["head"] == "cls")
  candidates = [os.path.join(root, f"{phase}_cls_lr{lr:g}_s{args.sweep_seed}") for phase in ("final", "sweep")]
  workdir = next((w for w in candidates if os.path.isdir(os.path.join(w, "checkpoints"))), None)
  if workdir is None:
    return None
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_cls import visualize  # pylint: disable=g-import-not-at-top
  from vit_cls.datasets import digits  # pylint: disable=g-import-not-at-top
  images, _ = digits.load_images()
  digit = os.path.join(out, DIGIT_NAME)
  Image.fromarray(images[int(digits.split_indices()["test"][0]), :, :, 0]).save(digit)
  return visualize.visualize(workdir, digit, os.path.join(out, ATTENTION_NAME))


def plan_sweep(args) -> list[Run]:
  if len(args.lrs) == 1:
    return []  # one rate: nothing to choose, so straight to the seeds
  return [Run("sweep", h, lr, args.sweep_seed) for h in args.heads for lr in args.lrs]


def plan_final(args, rows) -> list[Run]:
  runs = []
  for h in args.heads:
    lr = choose_rate(rows, h, args.lrs)
    seeds = [args.sweep_seed + i for i in range(args.seeds)]
    runs += [Run("final", h, lr, s) for s in seeds]
  return runs


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  base = base_config(args)
  os.makedirs(args.out, exist_ok=True)
  csv_path = os.path.join(args.out, CSV_NAME)
  if not args.resume and os.path.exists(csv_path):
    os.remove(csv_path)
  root = args.workdir or tempfile.mkdtemp(prefix="pooling_study_")
  os.makedirs(root, exist_ok=True)
  started = time.perf_counter()

  def do(runs: list[Run]) -> None:
    for run in runs:
      rows = read_rows(csv_path)
      if args.select_on == "test" and run.phase == "final":
        # The sweep already trained this (head, rate, seed) on train/test: reuse it as a final seed.
        prior = [r for r in rows if r["phase"] == "sweep" and _key(r)[1:] == run.key()[1:]]
        if prior and run.key() not in {_key(r) for r in rows}:
          append_row(csv_path, {**prior[-1], "phase": "final"})
          continue
      if run.key() in {_key(r) for r in rows}:
        continue
      print(f"[pooling_study] {run.phase} {run.head} lr={run.learning_rate:g} seed={run.seed} "
            f"({time.perf_counter() - started:.0f}s elapsed)", flush=True)
      append_row(csv_path, execute(run, base, args, root))

  try:
    do(plan_sweep(args))
    do(plan_final(args, read_rows(csv_path)))
    rows = read_rows(csv_path)
    summary = summarise(rows, args.heads, args.lrs)
    # A final seed reused from the sweep (--select_on test) is one training run listed twice.
    trained = {(r["head"], r["learning_rate"], r["seed"], r["train_split"], r["eval_split"]): r["wall_s"]
               for r in rows}
    header = dict(config_steps=int(base.total_steps), runs=len(trained),
                  runtime_min=sum(trained.values()) / 60,
                  machine=f"{os.cpu_count()} CPU core(s)" if _platform() == "cpu" else _platform(),
                  argv=rerun_args(sys.argv[1:] if argv is None else argv))
    write_table(os.path.join(args.out, MD_NAME), summary, rows, args, base, header)
    write_plot(os.path.join(args.out, PNG_NAME), summary, rows, args)
    if not args.quick:
      write_attention_figure(root, args.out, summary, args, base)
  finally:
    if args.workdir is None:
      shutil.rmtree(root, ignore_errors=True)
  print(open(os.path.join(args.out, MD_NAME), encoding="utf-8").read())
  return 0


def rerun_args(argv: Sequence[str]) -> str:
  """The command-line arguments that define the study (not where it ran, or how it was resumed)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    name = a.split("=", 1)[0]
    if name in ("--resume",):
      continue
    if name in ("--workdir", "--out", "--note"):
      skip = "=" not in a
      continue
    out.append(a)
  return " ".join(out)


def _platform() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return "cpu" if d.platform == "cpu" else f"{jax.device_count()} x {d.device_kind}"


if __name__ == "__main__":
  sys.exit(main())
