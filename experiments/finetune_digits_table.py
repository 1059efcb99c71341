"""Fine-tuning table on the built-in digits: what one pre-trained checkpoint gives under each way of using it.

    python experiments/finetune_digits_table.py                      # the table of README.md (sizes below)
    python experiments/finetune_digits_table.py --pretrain=workdirs/digits   # reuse a pre-training
    python experiments/finetune_digits_table.py --quick              # smoke test: a few steps per run

One pre-training (`configs/default.py`, with `--config.feature_eval.datasets=digits`, so its last evaluation
logs the few-shot and kNN scores of the pre-trained pre-logits features), then, for each seed of `--seeds`,
three fine-tunes from it, each the recipe of `configs/finetune_digits.py` (twice the resolution, a fresh
zero-initialised linear head, SGD with momentum, cosine decay) at `--steps` steps:

  linear_probe   configs/linear_probe.py: everything but the head frozen (lr 0.1)
  full_ft        configs/finetune_digits.py: every parameter trained (lr 0.01)
  ft_layer_decay configs/finetune_digits.py with --config.layer_decay=D (`--layer_decay`, 0.75)

and one fine-tune (`--timm_seeds`) started through `config.init_from` from the timm fixture
tests/fixtures/zoo/timm_augreg (saved by the real timm: vit_base_patch16_224's code at width 24, depth 2,
3 heads, patch 4, 16x16 input, **random timm initialisation, not trained weights**), with the same recipe
and the fixture's architecture switches, at 32x32 (its 4x4 patch grid resized to 8x8 bilinearly). Next to
it, the same architecture from scratch (no init_from, same seeds and steps), so the import's effect is read
against a baseline and not against the larger digits model.

Few-shot and kNN have no training seed: they score the one pre-training (few-shot: the mean over the
evaluator's 3 draws of the shots, `feature_eval.num_seeds`; kNN is deterministic).

Every run is `vit_cls.train.train_and_evaluate` in this process (no per-run interpreter start); the
equivalent `train.py` command of each run is in the JSON. Wall time is per run (compile included, start-up
of the interpreter excluded). Output: `--out`/finetune_digits_table.json (every run, written after each, so
`--resume` continues a killed table) and the markdown table on stdout and in finetune_digits_table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # configs/ is a directory of the repository, not an installed package
  sys.path.insert(0, REPO)
if __name__ == "__main__":  # before JAX allocates: the memory allocator, the first line of the run
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup()

TIMM_FIXTURE = os.path.join("tests", "fixtures", "zoo", "timm_augreg")
# The fixture's architecture (its config.json model_args) and the switches its import needs.
TIMM_MODEL = {"model.hidden_size": 24, "model.mlp_dim": 48, "model.num_heads": 3, "model.num_layers": 2,
              "model.patch_size": (4, 4), "model.pool": "cls", "model.gelu_approximate": False,
              "model.layernorm_epsilon": 1e-6}
FEATURE_FIELDS = ("fewshot_digits_1shot", "fewshot_digits_5shot", "fewshot_digits_10shot",
                  "fewshot_digits_25shot", "knn_digits_20nn_top1")


def _override(config, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  with config.unlocked() if hasattr(config, "unlocked") else _null():
    node[leaf] = value


class _null:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _flag(value) -> str:
  if value == "":
    return "''"
  if isinstance(value, tuple):
    return "'" + repr(value).replace(" ", "") + "'"
  return str(value)


def make_config(config_file: str, overrides: dict):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module("configs." + os.path.splitext(os.path.basename(config_file))[0])
  config = module.get_config()
  for key, value in overrides.items():
    _override(config, key, value)
  return config


def command(config_file: str, workdir: str, overrides: dict) -> str:
  return " ".join([f"python train.py --config={config_file} --workdir={workdir}"]
                  + [f"--config.{k}={_flag(v)}" for k, v in overrides.items()])


def last_eval(workdir: str) -> dict:
  from vit_cls import metrics_log  # pylint: disable=g-import-not-at-top
  evals = [r for r in metrics_log.read_metrics(workdir) if r["split"] == "eval"]
  return max(evals, key=lambda r: r["step"]) if evals else {}


def run(name: str, config_file: str, workdir: str, overrides: dict) -> dict:
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  config = make_config(config_file, overrides)
  cmd = command(config_file, workdir, overrides)
  print(f"== {name}: {cmd}", flush=True)
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  ev = last_eval(workdir)
  row = {"name": name, "command": cmd, "steps": int(ev.get("step", config.total_steps)),
         "wall_s": round(wall, 1), "test_accuracy": ev.get("accuracy")}
  row.update({k: ev[k] for k in FEATURE_FIELDS if k in ev})
  print(f"== {name}: test accuracy {row['test_accuracy']}, {wall:.0f} s", flush=True)
  return row


def _mean_std(values):
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return "—"
  if len(values) == 1:
    return f"{100 * values[0]:.1f}"
  return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _cell_time(rows):
  return f"{statistics.mean(r['wall_s'] for r in rows):.0f}"


def processor_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
  except OSError:
    return platform.processor() or platform.machine()
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
              platform.machine())
  family = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("cpu family")),
                "?")
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model\t")), "?")
  return f"{name} (family {family} model {model}), {os.cpu_count()} cores"


def table(results: dict) -> str:
  rows = results["runs"]
  by = {}
  for r in rows:
    by.setdefault(r["method"], []).append(r)
  pre = results["pretrain"]
  lines = ["| method | test accuracy (%) | runs | steps | wall s / run |", "|---|---|---|---|---|"]
  p = pre["row"]
  lines.append(f"| pre-training (`configs/default.py`, 16x16, MLP head) | {_mean_std([p['test_accuracy']])} | 1 | "
               f"{p['steps']} | {p['wall_s']:.0f} |")
  for k in ("fewshot_digits_1shot", "fewshot_digits_5shot", "fewshot_digits_10shot", "fewshot_digits_25shot"):
    shots = k.split("_")[2]
    lines.append(f"| few-shot {shots.replace('shot', '')}-shot, pre-trained features (ridge) | "
                 f"{_mean_std([p.get(k)])} | 1 (3 draws) | — | — |")
  lines.append(f"| kNN k=20, pre-trained features | {_mean_std([p.get('knn_digits_20nn_top1')])} | 1 | — | — |")
  labels = {
      "linear_probe": "linear probe (`configs/linear_probe.py`, 32x32)",
      "full_ft": "full fine-tune (`configs/finetune_digits.py`, 32x32)",
      "ft_layer_decay": f"fine-tune, layer decay d={results['args']['layer_decay']}",
      "timm_ft": "timm fixture `timm_augreg` via init_from (W24 D2, random timm init), fine-tune",
      "timm_scratch": "same W24 D2 model from scratch, same recipe",
  }
  for method, label in labels.items():
    if method in by:
      rs = by[method]
      lines.append(f"| {label} | {_mean_std([r['test_accuracy'] for r in rs])} | {len(rs)} | "
                   f"{rs[0]['steps']} | {_cell_time(rs)} |")
  return "\n".join(lines)


def save(results: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "finetune_digits_table.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--timm_seeds", default="0")
  ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run")
  ap.add_argument("--warmup", type=int, default=10, help="fine-tuning warmup steps")
  ap.add_argument("--pretrain_steps", type=int, default=None, help="default: configs/default.py's")
  ap.add_argument("--layer_decay", type=float, default=0.75)
  ap.add_argument("--pretrain", default=None, help="reuse this pre-trained workdir (with feature_eval logged)")
  ap.add_argument("--pretrain_command", default=None, help="with --pretrain: the command that made it")
  ap.add_argument("--pretrain_wall_s", type=float, default=float("nan"), help="with --pretrain: its time")
  ap.add_argument("--workdirs", default="workdirs/finetune_table")
  ap.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
  ap.add_argument("--methods", default="linear_probe,full_ft,ft_layer_decay,timm_ft,timm_scratch")
  ap.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
  ap.add_argument("--quick", action="store_true", help="smoke test: 4 steps everywhere, one seed")
  args = ap.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.pretrain_steps, args.seeds, args.timm_seeds = 4, 1, 4, "0", "0"
  seeds = [int(s) for s in args.seeds.split(",") if s]
  timm_seeds = [int(s) for s in args.timm_seeds.split(",") if s]
  methods = [m for m in args.methods.split(",") if m]
  json_path = os.path.join(args.out, "finetune_digits_table.json")
  results = {"args": vars(args), "processor": processor_name(), "runs": []}
  if args.resume and os.path.exists(json_path):
    with open(json_path, encoding="utf-8") as f:
      old = json.load(f)
    results["runs"] = old.get("runs", [])
    if "pretrain" in old and args.pretrain is None:
      results["pretrain"] = old["pretrain"]
  t0 = time.time()

  # 1. Pre-training (or the one given), with the feature evaluators on.
  if "pretrain" not in results:
    if args.pretrain:
      ev = last_eval(args.pretrain)
      row = {"name": "pretrain", "command": args.pretrain_command or f"(reused) {args.pretrain}",
             "steps": ev["step"], "wall_s": args.pretrain_wall_s, "test_accuracy": ev.get("accuracy"),
             **{k: ev[k] for k in FEATURE_FIELDS if k in ev}}
      pre_dir = args.pretrain
    else:
      pre_dir = os.path.join(args.workdirs, "pretrain")
      over = {"feature_eval.datasets": ("digits",)}
      if args.pretrain_steps:
        over.update({"total_steps": args.pretrain_steps, "warmup_steps": min(100, args.pretrain_steps // 4),
                     "eval_every": args.pretrain_steps, "checkpoint_every": args.pretrain_steps})
      row = run("pretrain", "configs/default.py", pre_dir, over)
    results["pretrain"] = {"workdir": pre_dir, "row": row}
    save(results, args.out)
  pre_dir = results["pretrain"]["workdir"]

  # 2. Fine-tunes.
  schedule = {"total_steps": args.steps, "warmup_steps": args.warmup, "eval_every": args.steps,
              "checkpoint_every": args.steps, "log_every": max(1, args.steps // 3)}
  plan = []
  for seed in seeds:
    for method in ("linear_probe", "full_ft", "ft_layer_decay"):
      if method not in methods:
        continue
      cfg = "configs/linear_probe.py" if method == "linear_probe" else "configs/finetune_digits.py"
      over = {"init_from": pre_dir, "seed": seed, **schedule}
      if method == "ft_layer_decay":
        over["layer_decay"] = args.layer_decay
      plan.append((method, seed, cfg, over))
  for seed in timm_seeds:
    for method in ("timm_ft", "timm_scratch"):
      if method not in methods:
        continue
      over = {**TIMM_MODEL, "seed": seed, **schedule}
      if method == "timm_ft":
        over["init_from"] = TIMM_FIXTURE
      else:
        over["init_from"] = ""  # finetune_digits.py's default points at workdirs/digits: off
      plan.append((method, seed, "configs/finetune_digits.py", over))
  # The imported-checkpoint pair right after the first seed's three runs: a table cut short still has it.
  first = [x for x in plan if x[1] == seeds[0] and not x[0].startswith("timm")] if seeds else []
  plan = first + [x for x in plan if x[0].startswith("timm")] + [x for x in plan if x not in first
                                                                 and not x[0].startswith("timm")]
  done = {(r["method"], r["seed"]) for r in results["runs"]}
  for method, seed, cfg, over in plan:
    if (method, seed) in done:
      continue
    row = run(f"{method} seed {seed}", cfg, os.path.join(args.workdirs, f"{method}_s{seed}"), over)
    row.update(method=method, seed=seed)
    results["runs"].append(row)
    save(results, args.out)
  results["total_wall_s"] = round(time.time() - t0, 1)
  save(results, args.out)
  text = table(results)
  print(text)
  with open(os.path.join(args.out, "finetune_digits_table.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
