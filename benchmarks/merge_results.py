"""Merges the per-step JSONs of `gpu_run.sh` into one results.json and a one-line-per-result summary.txt.

Why: the device tool returns at most eight files from a call, and a call cut off at its time limit must
still return what finished; so the script keeps each step's JSON in a scratch folder and re-merges after
every step into two files under $OUT.

    python benchmarks/merge_results.py SRC_DIR OUT_DIR
"""

import json
import os
import sys


def summarize(name: str, d: dict) -> list[str]:
  rows = []
  if isinstance(d.get("max_batch"), dict):
    for pol, e in d["max_batch"].items():
      rows.append(
          f"max batch {d['model']} {d['dtype']} scan={d['options']['scan_layers']} remat={pol}: "
          f"predicted {e.get('predicted')}, verified {e.get('verified_batch')} "
          f"({e.get('verified_img_s', float('nan')):.0f} img/s) {e.get('failures', '')}{e.get('error', '')}")
    return rows
  for r in d.get("runners", []):
    if "train_img_s" in r:
      rows.append(
          f"{name}: {d['model']} {d['dtype']} batch {d['batch']} on {d['device_kind']}: train "
          f"{r['train_img_s']:.1f} img/s, {r['train_tflops']:.2f} TFLOP/s, MFU {r['train_mfu']:.1%} of "
          f"{d['peak_tflops']:.4g} TFLOP/s ({r.get('train_mfu_vs_measured_peak', float('nan')):.1%} of the "
          f"measured {d.get('measured_peak_tflops', float('nan')):.4g}); infer {r.get('infer_img_s', 0):.1f} "
          f"img/s; compile {r['compile_train_s']:.1f} s; peak memory "
          f"{(d.get('peak_memory_bytes') or 0) / 2 ** 30:.1f} GiB")
    else:
      rows.append(f"{name}: {d['model']} {d['dtype']} scan={d['options']['scan_layers']}: train step "
                  f"compiled in {r['compile_train_s']:.1f} s")
  return rows


def main(src: str, out: str) -> None:
  results, rows = {}, []
  for f in sorted(os.listdir(src)):
    if not f.endswith(".json"):
      continue
    try:
      with open(os.path.join(src, f)) as fh:
        d = json.load(fh)
    except ValueError:
      continue
    results[f[:-5]] = d
    try:
      rows += summarize(f[:-5], d)
    except (KeyError, TypeError, ValueError) as e:
      rows.append(f"{f}: could not summarize ({type(e).__name__}: {e})")
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(results, fh, indent=1, default=str)
  with open(os.path.join(out, "summary.txt"), "w") as fh:
    fh.write("\n".join(rows) + "\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
