"""Export a vit_cls checkpoint for PyTorch users: a timm or Hugging Face model folder in safetensors.

  python -m vit_cls.formats.export --checkpoint WORKDIR --format timm --out my_vit/
  python -m vit_cls.formats.export --checkpoint WORKDIR --format hf --out my_vit_hf/

The timm folder (`model.safetensors` + `config.json`) loads with
`timm.create_model("local-dir:my_vit", pretrained=True)` (or upload it to the hub and use `hf-hub:`); the
Hugging Face folder (`model.safetensors`, `config.json`, `preprocessor_config.json`) with
`ViTForImageClassification.from_pretrained("my_vit_hf")` (`ViTModel` for a pooler-only model). Any
checkpoint `vit_cls.load` reads can be exported, also one imported from the other library. Architectures
the target library does not have are refused with the reason (vit_cls/formats/timm.py, hf.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

FORMATS = ("timm", "hf")


def export(params, config, out_dir: str, fmt: str, *, preprocessing: dict | None = None,
           label_names: list | None = None) -> list[str]:
  """Writes `out_dir` in format `fmt` ("timm" | "hf"); returns the files written.

  `config`: the model's config (a dict with `image_size`, or the `VisionTransformer` plus
  `image_size` in the dict form); `preprocessing`: mean/std/interpolation/crop to record.
  """
  from vit_cls.formats import hf, safetensors as st, timm  # pylint: disable=g-import-not-at-top
  if fmt == "timm":
    tensors, config_json = timm.from_vit_cls(params, config, preprocessing)
    if label_names:
      config_json["label_names"] = list(label_names)
    extra = {}
  elif fmt == "hf":
    tensors, config_json, preprocessor = hf.from_vit_cls(params, config, preprocessing, label_names)
    extra = {"preprocessor_config.json": preprocessor}
  else:
    raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}.")
  os.makedirs(out_dir, exist_ok=True)
  written = [os.path.join(out_dir, "model.safetensors")]
  st.write(written[0], tensors, {"format": "pt"})  # the metadata Transformers checks for
  for name, value in {"config.json": config_json, **extra}.items():
    written.append(os.path.join(out_dir, name))
    with open(written[-1], "w", encoding="utf-8") as f:
      json.dump(value, f, indent=2)
  return written


def export_checkpoint(checkpoint, out_dir: str, fmt: str, num_heads: int | None = None) -> list[str]:
  """`export` of anything `vit_cls.load` reads (workdir, step, .npz, safetensors, model folder), or of
  an open `CheckpointSource`.

  `num_heads`: for a timm / HF file that does not say its heads (see `vit_cls.formats.read`).
  """
  from vit_cls import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  loaded = ckpt_lib.load_with_info(checkpoint, **({"num_heads": num_heads} if num_heads else {}))
  return export(loaded.params, loaded.config, out_dir, fmt, preprocessing=loaded.preprocessing,
                label_names=loaded.label_names)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_cls.formats.export", description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", required=True, help="workdir, step dir, .npz, safetensors or folder")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num_heads", type=int, default=None,
                      help="attention heads of a timm / HF file that does not say them")
  args = parser.parse_args(argv)
  try:
    written = export_checkpoint(args.checkpoint, args.out, args.format, num_heads=args.num_heads)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("wrote " + ", ".join(written))
  return 0


if __name__ == "__main__":
  sys.exit(main())
