"""vit_cls.orbax_fix: a restore that fails on a damaged array lets its other reads finish first."""

import glob
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_cls import orbax_fix


def test_a_failed_restore_leaves_no_read_to_a_closed_event_loop(tmp_path, monkeypatch):
  orbax_fix.apply()
  tree = {f"a{i}": np.arange(200_000, dtype=np.float32) + i for i in range(16)}
  with ocp.CheckpointManager(tmp_path, item_names=("state",)) as mngr:
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
  data = [p for p in glob.glob(str(tmp_path / "1" / "state" / "d" / "*")) if os.path.isfile(p)]
  biggest = max(data, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  # Unfixed, each read still in flight when orbax closed its loop reported "Event loop is closed" here.
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  mngr = ocp.CheckpointManager(tmp_path, item_names=("state",))
  for _ in range(3):
    with pytest.raises(ValueError, match="OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT"):
      mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  time.sleep(1)
  mngr.close()
  assert [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable] == []
