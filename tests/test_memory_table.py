"""scripts/memory_table.py's table of compiled per-chip memory: the printing of saved --target runs
(no compiler needed) and docs/memory.md's JSON files, which must keep printing."""

import importlib.util
import json
import os

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  spec = importlib.util.spec_from_file_location(
      "memory_table", os.path.join(_REPO, "scripts", "memory_table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


memory_table = _load()


def _record(target, platform, peak_gib, fsdp=False, remat="none", compiled=True):
  return {"model": "B/16", "resolution": 224, "per_device_batch": 16, "remat": remat, "fsdp": fsdp,
          "target": target, "platform": platform, "peak_bytes": int(peak_gib * 2**30),
          "usable_fraction": 15.75 / 16 if platform == "tpu" else 0.75, "compiled": compiled,
          "flops_ratio": 1.0 if compiled else None}


def test_a_cell_is_checked_against_every_chip_of_its_platform():
  assert memory_table._fits_on(_record("v5e:1x1", "tpu", 10)) == "v5e, v4, v6e, v5p"
  assert memory_table._fits_on(_record("v5e:1x1", "tpu", 20)) == "v4, v6e, v5p"
  assert memory_table._fits_on(_record("v5e:1x1", "tpu", 120)) == "none"
  # GPU: the step must fit JAX's preallocated pool (0.75 of the memory): 59 GiB of an H100's 80.
  assert memory_table._fits_on(_record("h100:1", "cuda", 70)) == "H200"


def test_target_table_says_not_measured_and_refused():
  records = [_record("h100:1", "cuda", 2.5), _record("h100:4", "cuda", 1.5, fsdp=True),
             dict(_record("v5e:1x1", "tpu", 20, compiled=False), model="L/16")]
  text = memory_table.target_table(records)
  head = text.splitlines()[0]
  assert "replicated (v5e:1x1)" in head and "fsdp/4 (h100:4)" in head
  assert "2.5 (H100, H200) x1.00" in text
  assert "refused: needs 20.0 (v4, v6e, v5p)" in text
  assert "not measured" in text


@pytest.mark.parametrize("name", ["docs/memory_gpu.json", "docs/memory_tpu.json"])
def test_the_saved_runs_still_print(name, capsys, monkeypatch):
  path = os.path.join(_REPO, name)
  if not os.path.exists(path):
    pytest.skip(f"{name} not written yet")
  with open(path) as f:
    records = json.load(f)["records"]
  monkeypatch.setattr("sys.argv", ["memory_table.py", f"--from_json={path}"])
  memory_table.main()
  out = capsys.readouterr().out
  assert out.count("\n") >= 2 + len({(r["model"], r["resolution"], r["per_device_batch"])
                                      for r in records})
