"""gs:// paths everywhere (vit_cls/storage.py), against a local Cloud Storage emulator.

The emulator (tests/gcs_emulator.py: gcp-storage-emulator on 127.0.0.1) is started once for this
module. Each client reaches it through its own setting: tensorstore (orbax's arrays, the lock, the
access check) through TENSORSTORE_GCS_HTTP_URL; TensorFlow's GCS file system (etils.epath, orbax's
directories, TFDS, tf.data, TensorBoard) through a TLS-terminating proxy, since it has no endpoint
setting; google-cloud-storage (orbax's bucket-layout check) through STORAGE_EMULATOR_HOST.
"""

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import fault_harness as fh
from tests import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's environment, set in this process too (in-process clients read it on first use);
  yields the bucket URL."""
  proc, env = gcs_emulator.start(str(tmp_path_factory.mktemp("gcs")))
  with pytest.MonkeyPatch.context() as mp:
    for k, v in env.items():
      mp.setenv(k, v)
    yield f"gs://{env['GCS_BUCKET']}"
  proc.kill()
  proc.wait()


def _tiny_config(**overrides):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.update(dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                           representation_size=32, attention_impl="einsum"))
  config.update(dict(total_steps=6, warmup_steps=2, batch_size=32, eval_batch_size=64, log_every=2,
                     eval_every=6, checkpoint_every=3, shuffle_buffer=256, keep_checkpoints=3))
  config.update(overrides)
  return config


def _copy_tree(src: str, dst: str) -> None:
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  for root, _, files in storage.walk(src):
    for name in files:
      data = storage.read_bytes(storage.join(root, name))
      rel = root[len(src):].lstrip("/")
      storage.write_bytes(storage.join(dst, rel, name) if rel else storage.join(dst, name), data)


def _upload_tree(local: str, dst: str) -> None:
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  for root, _, files in os.walk(local):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local)
      storage.upload(os.path.join(root, name), storage.join(dst, *rel.split(os.sep)))


# ----------------------------------------------------------------------------------------------------
# The storage functions and the lock.


def test_storage_reads_writes_lists_renames_and_removes_in_a_bucket(gcs):
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  root = f"{gcs}/storage_test"
  storage.write_bytes(f"{root}/a/x.txt", b"hello")
  storage.write_bytes(f"{root}/a/b/y.bin", bytes(range(256)))
  storage.makedirs(f"{root}/empty")  # a folder marker object: a folder, no file
  assert storage.read_bytes(f"{root}/a/x.txt") == b"hello" and storage.isfile(f"{root}/a/x.txt")
  assert storage.isdir(f"{root}/a") and not storage.exists(f"{root}/nothing")
  assert storage.listdir(f"{root}/a") == ["b", "x.txt"]
  assert list(storage.walk(root)) == [(root, ["a", "empty"], []), (f"{root}/a", ["b"], ["x.txt"]),
                                      (f"{root}/a/b", [], ["y.bin"]), (f"{root}/empty", [], [])]
  storage.rename(f"{root}/a", f"{root}/c")  # (exists() may answer from TF's stat cache for 5 s)
  assert storage.listdir(root) == ["c", "empty"]
  assert storage.read_bytes(f"{root}/c/b/y.bin") == bytes(range(256))
  with storage.local_copy(f"{root}/c") as local:
    assert open(os.path.join(local, "b", "y.bin"), "rb").read() == bytes(range(256))
  storage.rmtree(root)
  assert "storage_test" not in storage.listdir(gcs)


def _plant(wd, record):
  """Writes `record` as the lock object of `wd`, whatever is there."""
  from vit_cls import workdir  # pylint: disable=g-import-not-at-top
  probe = workdir.lock_for(wd)
  current = probe._read()  # pylint: disable=protected-access
  assert probe._write(record, current.stamp.generation)  # pylint: disable=protected-access


class _Clock:
  """The lease's injected clock: the wall clock `ahead` seconds off this machine's; with `virtual`,
  sleeping takes no time (the monotonic clock jumps instead)."""

  def __init__(self, ahead: float = 0.0, virtual: bool = False):
    self.ahead, self.virtual, self.slept = ahead, virtual, 0.0

  def time(self):
    return time.time() + self.ahead

  def monotonic(self):
    return time.monotonic() + (self.slept if self.virtual else 0.0)

  def sleep(self, seconds):
    if self.virtual:
      self.slept += seconds
    else:
      time.sleep(seconds)


_HOLDER = """
import sys, time
from vit_cls import workdir
lock = workdir._GcsLock(sys.argv[1])
for name, value in zip(("HEARTBEAT_S", "RETRY_S", "LEASE_S", "MARGIN_S"), sys.argv[2:6]):
  setattr(lock, name, float(value))
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[6]))
lock.release()
print("released", flush=True)
"""


def _hold_in_child(workdir, endpoint, hold_s, heartbeat_s=0.2, retry_s=0.1, lease_s=3.0,
                   margin_s=1.0):
  """A run holding the lease of `workdir` for `hold_s` seconds (then releasing it), in a process
  of its own (losing the lease ends it), talking to storage through `endpoint`; fast timings."""
  env = {**os.environ, "TENSORSTORE_GCS_HTTP_URL": endpoint, "PYTHONPATH": REPO}
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, workdir,
       *map(str, (heartbeat_s, retry_s, lease_s, margin_s, hold_s))],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  line = proc.stdout.readline()
  assert line == "held\n", (line, proc.stderr.read() if proc.poll() is not None else "")
  return proc


def _lease_writes(workdir):
  """The fault rule's test for an upload of `workdir`'s lock object: None, "create" or "renew"."""
  name = workdir.split("/", 3)[3].replace("/", "%2F") + "%2F.lock"

  def kind(method, url):
    if method != "POST" or f"name={name}&" not in url + "&":
      return None
    return "create" if "ifGenerationMatch=0" in url else "renew"

  return kind


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_the_workdir_lock_in_a_bucket(gcs):
  """Created only if absent; the holder is named; a dead holder on this host, or one whose lease ran
  out elsewhere, is taken over; a live one elsewhere is not; release deletes it."""
  from vit_cls import workdir  # pylint: disable=g-import-not-at-top
  wd = f"{gcs}/lock_test"
  held = workdir.lock_for(wd).acquire()
  with pytest.raises(workdir.WorkdirBusyError,
                     match=rf"^workdir {wd} is in use by another run: pid {os.getpid()} on host "
                     rf"{re.escape(socket.gethostname())} \(started .*\), last heartbeat \d+ s "
                     r"ago \(taken over after 120 s without one\); wait"):
    workdir.lock_for(wd).acquire()
  held.release()
  assert workdir.lock_for(wd).holder() is None  # deleted

  now = time.time()
  dead_pid = {"host": socket.gethostname(), "pid": 2**22 + 12345, "heartbeat": now,
              **workdir._pid_space()}  # pylint: disable=protected-access
  lease_ran_out = {"host": "elsewhere", "pid": 1, "heartbeat": now - 500}
  for stale in (dead_pid, lease_ran_out):
    _plant(wd, stale)
    clock = _Clock(virtual=True)  # the lease ran out is seen by watching it for 120 s: no time here
    taken = workdir._GcsLock(wd, clock=clock).acquire()  # pylint: disable=protected-access
    assert workdir.lock_for(wd).holder()["pid"] == os.getpid()
    assert clock.slept == (0 if stale is dead_pid else pytest.approx(120, abs=1))
    taken.release()
  _plant(wd, {"host": "elsewhere", "pid": 1, "heartbeat": now})
  with pytest.raises(workdir.WorkdirBusyError, match="pid 1 on host elsewhere"):
    workdir.lock_for(wd).acquire()
  # Two runs that read "absent" at the same moment: the precondition lets one create it.
  probe, other = workdir.lock_for(f"{gcs}/race"), workdir.lock_for(f"{gcs}/race")
  absent = probe._read().stamp.generation  # pylint: disable=protected-access
  assert probe._write({"pid": 1}, absent)  # pylint: disable=protected-access
  assert not other._write({"pid": 2}, absent)  # pylint: disable=protected-access


def test_a_lease_write_whose_answer_is_lost_is_recognised_as_the_runs_own(gcs):
  """The create and the first renewal land, their answers are dropped: tensorstore's retry (or the
  next renewal) then fails its precondition against the run's own new generation. The run
  re-reads the object, finds its own record (host, pid, token) and keeps the lease."""
  wd = f"{gcs}/lease_lost_answer"
  kind, dropped = _lease_writes(wd), set()

  def drop_first_of_each(method, url):
    what = kind(method, url)
    if what and what not in dropped:
      dropped.add(what)
      return "drop"
    return None

  proxy = gcs_emulator.FaultyProxy(os.environ["TENSORSTORE_GCS_HTTP_URL"], drop_first_of_each)
  try:
    holder = _hold_in_child(wd, proxy.url, hold_s=2.0, lease_s=5.0)
    out, err = holder.communicate(timeout=60)
  finally:
    proxy.close()
  assert (holder.returncode, out, _error_lines(err)) == (0, "released\n", []), err
  assert dropped == {"create", "renew"}
  renewals = [action for method, url, action in proxy.seen if kind(method, url) == "renew"]
  assert renewals[0] == "drop" and len(renewals) >= 3  # renewed on after the lost answer
  from vit_cls import workdir  # pylint: disable=g-import-not-at-top
  assert workdir.lock_for(wd).holder() is None  # released: deleted


def test_a_run_that_cannot_renew_stops_before_its_lease_can_be_taken(gcs):
  """Renewals hang from the second on (a partition): the holder exits with one line once its last
  successful renewal is LEASE_S - MARGIN_S old, before a newcomer watching the generation it
  wrote could take over (LEASE_S after that write)."""
  wd = f"{gcs}/lease_partition"
  kind, renewals, cut = _lease_writes(wd), [], []

  def partition_after_first_renewal(method, url):
    if kind(method, url) != "renew":
      return None
    renewals.append(url)
    if len(renewals) == 1:
      return None
    if not cut:
      cut.append(time.monotonic())
    return "hang"

  proxy = gcs_emulator.FaultyProxy(os.environ["TENSORSTORE_GCS_HTTP_URL"],
                                   partition_after_first_renewal)
  try:
    holder = _hold_in_child(wd, proxy.url, hold_s=10.0, heartbeat_s=0.2, lease_s=3.0,
                            margin_s=1.0)
    try:
      out, err = holder.communicate(timeout=20)
    except subprocess.TimeoutExpired:
      holder.kill()
      pytest.fail(f"the holder still ran 20 s after its renewals stopped: {holder.communicate()}")
    ended = time.monotonic()
  finally:
    proxy.close()
  assert holder.returncode == 1 and out == "", (out, err)
  assert _error_lines(err) == [
      f"error: workdir {wd}: this run could not renew its lock for 2 s (another run may take it "
      f"over after 3 s); stopping without writing anything more."
  ], err
  assert ended - cut[0] < 3.0  # the last renewal that landed was sent before the cut


def test_a_live_lease_is_not_taken_by_a_newcomer_whose_clock_runs_ahead(gcs):
  """A newcomer whose wall clock is 130 s ahead reads the holder's heartbeat as 130 s old, past
  its 3-s lease; it watches the object instead, sees the generation move, and refuses."""
  from vit_cls import workdir  # pylint: disable=g-import-not-at-top
  wd = f"{gcs}/lease_clock_ahead"
  holder = _hold_in_child(wd, os.environ["TENSORSTORE_GCS_HTTP_URL"], hold_s=3.0,
                          heartbeat_s=0.3, lease_s=3.0)
  newcomer = workdir._GcsLock(wd, clock=_Clock(ahead=130))  # pylint: disable=protected-access
  newcomer.POLL_S = 0.1
  try:
    with pytest.raises(workdir.WorkdirBusyError, match=rf"pid {holder.pid} on host"):
      newcomer.acquire()
  finally:
    newcomer.release()  # (only when it took the lease: without the fix)
    out, err = holder.communicate(timeout=60)
  assert (holder.returncode, out, _error_lines(err)) == (0, "released\n", []), err


def test_a_missing_pid_on_this_host_is_a_dead_owner_only_in_the_same_boot_and_pid_namespace(gcs):
  """Host networking gives containers one hostname and separate pid namespaces: a pid missing here
  may live next door. Only a record of this boot and pid namespace is taken over at once."""
  from vit_cls import workdir  # pylint: disable=g-import-not-at-top
  wd = f"{gcs}/lease_pid_space"
  here = workdir._pid_space()  # pylint: disable=protected-access
  assert here["boot_id"] and here["pid_ns"].startswith("pid:[")
  dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "heartbeat": time.time()}
  for other in ({"boot_id": here["boot_id"], "pid_ns": "pid:[1]"},  # another container
                {"boot_id": "another-boot", "pid_ns": here["pid_ns"]},  # rebooted: reused ids
                {}):  # a record that does not say
    _plant(wd, {**dead, **other})
    with pytest.raises(workdir.WorkdirBusyError, match=rf"pid {dead['pid']} on host"):
      workdir.lock_for(wd).acquire()
  _plant(wd, {**dead, **here})
  clock = _Clock(virtual=True)
  taken = workdir._GcsLock(wd, clock=clock).acquire()  # pylint: disable=protected-access
  assert clock.slept == 0  # at once, without watching the lease
  token = taken._record["token"]  # pylint: disable=protected-access
  assert workdir.lock_for(wd).holder()["token"] == token
  taken.release()
  taken.release()


def test_no_network_fails_in_one_line_within_seconds_before_compiling(gcs, tmp_path):
  """Cloud Storage unreachable (a closed port stands for no network), no credentials anywhere."""
  from vit_cls import errors, storage  # pylint: disable=g-import-not-at-top
  closed = gcs_emulator._free_port()  # pylint: disable=protected-access
  env = fh.child_env(None,
                     TENSORSTORE_GCS_HTTP_URL=f"http://127.0.0.1:{closed}",
                     HOME=str(tmp_path),
                     GCE_METADATA_ROOT=f"127.0.0.1:{closed}")
  for k in ("GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_APPLICATION_CREDENTIALS"):
    env.pop(k, None)
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, fh.TRAIN_PY, *fh.tiny_train_args(f"{gcs}/offline")],
                       capture_output=True, text=True, env=env, timeout=120)
  took = time.monotonic() - t0
  assert out.returncode == 1, out.stderr[-3000:]
  assert "Training" not in out.stdout  # before the dataset and the compile
  assert out.stderr.strip().splitlines() == [
      f"error: workdir {gcs}/offline: cannot write to Cloud Storage (no network: cannot connect to "
      f"Cloud Storage; no Google credentials found (run `gcloud auth application-default login`, "
      f"set GOOGLE_APPLICATION_CREDENTIALS, or use a VM with a service account))."
  ], out.stderr
  print(f"train.py with no network: exit 1 after {took:.1f} s")  # for the record, not asserted
  # The same check guards config.init_from, config.data_dir, image folders and vit_cls.load:
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://127.0.0.1:{closed}")
    with pytest.raises(errors.StorageError,
                       match=rf"^checkpoint {gcs}/x: cannot read from Cloud Storage \(no network"):
      from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
      checkpoint.restore_params(f"{gcs}/x")
    with pytest.raises(errors.StorageError, match=r"^config.data_dir gs://"):
      storage.check_access(f"{gcs}/tfds", write=False, what="config.data_dir")


def test_a_missing_credentials_file_is_named_in_the_error():
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  why = storage._why(  # pylint: disable=protected-access
      ValueError("UNAUTHENTICATED: 401"),
      "E google_auth_provider.cc] Could not find the credentials file in the standard gcloud "
      "location")
  assert why.startswith("not authenticated; no Google credentials found (run `gcloud auth "
                        "application-default login`")


def test_launcher_uses_the_bucket_natively_and_gcsfuse_only_when_asked():

  def train_and_install(*extra):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "launch_tpu.py"), "--name=n", "--zone=z",
         "--accelerator=v4-8", "--bucket=b", *extra, "--dry-run", "--",
         "--config=configs/default.py"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    install = next(line for line in out.splitlines() if "pip install" in line)
    train = next(line for line in out.splitlines() if "train.py" in line)
    return re.search(r"train\.py --workdir=(\S+)", train).group(1), install

  workdir, install = train_and_install()
  assert workdir == "gs://b/vit_cls/n" and "gcsfuse" not in install
  workdir, install = train_and_install("--gcsfuse")
  assert workdir == "/mnt/gcs/vit_cls/n" and "gcsfuse --implicit-dirs b /mnt/gcs" in install


# ----------------------------------------------------------------------------------------------------
# Data from a bucket.


def test_a_prepared_tfds_dataset_and_an_image_folder_read_from_a_bucket(gcs, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_cls import input_pipeline, storage  # pylint: disable=g-import-not-at-top
  local = _tiny_config(data_dir=str(tmp_path / "tfds"), batch_size=8, eval_batch_size=64)
  input_pipeline.get_dataset_info(local)  # prepares the built-in digits locally
  _upload_tree(str(tmp_path / "tfds"), f"{gcs}/tfds")
  remote = _tiny_config(data_dir=f"{gcs}/tfds", batch_size=8, eval_batch_size=64)
  assert input_pipeline.get_dataset_info(remote) == input_pipeline.get_dataset_info(local)
  for a, b in zip(input_pipeline.create_train_iterator(remote),
                  input_pipeline.create_train_iterator(local)):
    np.testing.assert_array_equal(a["image"], b["image"])  # the same examples, the same order
    np.testing.assert_array_equal(a["label"], b["label"])
    break
  assert sum(int(b["mask"].sum()) for b in input_pipeline.create_eval_iterator(remote)) == 360

  rng = np.random.default_rng(0)
  for split, per_class in (("train", 4), ("test", 2)):
    for cls in ("cat", "dog"):
      for i in range(per_class):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(png, "PNG")
        storage.write_bytes(f"{gcs}/images/{split}/{cls}/{i}.png", png.getvalue())
  storage.write_bytes(f"{gcs}/images/train/README.txt", b"not a class")
  folder = _tiny_config(dataset=f"imagefolder:{gcs}/images", batch_size=8, eval_batch_size=8)
  info = input_pipeline.get_dataset_info(folder)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples,
          info.label_names) == (2, 8, 4, ["cat", "dog"])
  batch = next(input_pipeline.create_train_iterator(folder))
  assert batch["image"].shape == (8, 16, 16, 3) and np.abs(batch["image"]).max() <= 1.0
  assert sum(int(b["mask"].sum()) for b in input_pipeline.create_eval_iterator(folder)) == 4


# ----------------------------------------------------------------------------------------------------
# Training into a bucket, and reading its checkpoints.


@pytest.fixture(scope="module")
def trained(gcs):
  """A 6-step run into gs://.../trained (checkpoints at 3 and 6), in this process."""
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  workdir = f"{gcs}/trained"
  metrics = train.train_and_evaluate(_tiny_config(), workdir)
  return {"workdir": workdir, "metrics": metrics}


@pytest.mark.slow
def test_a_run_in_a_bucket_writes_everything_a_local_run_does(gcs, trained):
  from vit_cls import manifest, metrics_log, storage  # pylint: disable=g-import-not-at-top
  wd = trained["workdir"]
  assert storage.listdir(f"{wd}/checkpoints") == ["3", "6"]
  assert storage.exists(f"{wd}/checkpoints/6/commit_success.txt")
  assert manifest.read(f"{wd}/checkpoints/6") and manifest.damage_evidence(f"{wd}/checkpoints/6") is None
  records = metrics_log.read_metrics(wd)
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 3, 4, 6]  # 3: a checkpoint
  assert [r["step"] for r in records if r["split"] == "eval"] == [6]
  assert records[0]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
  assert storage.read_bytes(f"{wd}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert '"total_steps": 6' in storage.read_bytes(f"{wd}/config.json").decode()
  assert not storage.exists(f"{wd}/.lock")  # released at the end
  from tensorboard.backend.event_processing import event_accumulator
  with storage.local_copy(f"{wd}/tensorboard") as local:
    events = event_accumulator.EventAccumulator(local)
    events.Reload()
  assert [e.step for e in events.Tensors("eval/accuracy")] == [6]


@pytest.mark.slow
def test_load_convert_predict_and_init_from_read_gcs_checkpoints(gcs, trained, tmp_path):
  import vit_cls  # pylint: disable=g-import-not-at-top
  from vit_cls import checkpoint, convert, predict, storage, train
  wd = trained["workdir"]
  with storage.local_copy(wd) as local:
    reference, _ = checkpoint.restore_params(local)
  model, params = vit_cls.load(wd)
  assert fh.same_params(params, reference) and model.num_classes == 10
  assert fh.same_params(checkpoint.restore_params(f"{wd}/checkpoints/6")[0], reference)

  convert.convert_checkpoint(wd, f"{gcs}/converted/ft.npz", num_classes=5, image_size=32)
  converted, _ = checkpoint.restore_params(f"{gcs}/converted/ft.npz")
  assert converted["head"]["kernel"].shape == (32, 5) and "pre_logits" not in converted

  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = io.BytesIO()
  Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(png, "PNG")
  storage.write_bytes(f"{gcs}/images_predict/a.png", png.getvalue())
  (path, ranked), = predict.predict(wd, [f"{gcs}/images_predict/a.png"], k=3)
  assert path.endswith("a.png") and len(ranked) == 3 and ranked[0][0] in [str(i) for i in range(10)]

  config = _tiny_config(init_from=wd)
  config.model.representation_size = None
  train.check_init_from(config, train.create_model(config, 10))  # shapes checked, no compile


def _read_params(workdir):
  from vit_cls import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.restore_params(workdir)[0]


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_in_a_bucket_falls_back_to_the_previous_one(
    gcs, trained, capsys):
  from vit_cls import storage, train  # pylint: disable=g-import-not-at-top
  wd = f"{gcs}/damaged"
  _copy_tree(trained["workdir"], wd)
  biggest = max(storage.listdir(f"{wd}/checkpoints/6/state/d"),
                key=lambda f: len(storage.read_bytes(f"{wd}/checkpoints/6/state/d/{f}")))
  path = f"{wd}/checkpoints/6/state/d/{biggest}"
  storage.write_bytes(path, storage.read_bytes(path)[:100])  # truncated
  train.train_and_evaluate(_tiny_config(), wd)
  out = capsys.readouterr().out
  assert re.search(
      rf"checkpoint {re.escape(wd)}/checkpoints/6 is damaged .*falling back to "
      rf"{re.escape(wd)}/checkpoints/3", out), out
  assert storage.isdir(f"{wd}/checkpoints/6.damaged") and storage.listdir(f"{wd}/checkpoints") == [
      "3", "6", "6.damaged"
  ]
  assert fh.same_params(_read_params(wd), _read_params(trained["workdir"]))  # retrained to the same


@pytest.mark.slow
def test_an_unreadable_newest_checkpoint_in_a_bucket_stops_and_is_not_moved_aside(gcs, trained):
  """A 403 on the newest step's objects (a service account without storage.objects.get on them) is the
  storage refusing, not damage: one line naming the step and Cloud Storage's error, nothing renamed."""
  from vit_cls import errors, storage, train  # pylint: disable=g-import-not-at-top
  wd = f"{gcs}/unreadable"
  _copy_tree(trained["workdir"], wd)
  deny = os.environ["GCS_EMULATOR_DENY_FILE"]
  with open(deny, "w", encoding="utf-8") as f:
    f.write("unreadable/checkpoints/6/\n")
  try:
    with pytest.raises(errors.StorageError) as e:
      train.train_and_evaluate(_tiny_config(), wd)
  finally:
    os.remove(deny)
  message = str(e.value)
  # orbax's manager already fails as it lists the steps (it asks whether step 6 was committed).
  assert "\n" not in message and re.fullmatch(
      rf"the checkpoints in {re.escape(wd)}/checkpoints could not be listed \(PermissionDeniedError: "
      r".*403.*\): stopping without renaming anything; fix the storage .*", message), message
  assert "damaged" not in message
  assert storage.listdir(f"{wd}/checkpoints") == ["3", "6"]


@pytest.mark.slow
def test_train_py_into_a_bucket_killed_and_resumed_ends_with_the_uninterrupted_parameters(
    gcs, tmp_path):
  from vit_cls import storage  # pylint: disable=g-import-not-at-top
  env = fh.child_env(str(tmp_path / "xla_cache"))
  run = ("--config.total_steps=8", "--config.checkpoint_every=4", "--config.log_every=1",
         "--config.eval_every=8")
  reference = fh.TrainRun(fh.tiny_train_args(f"{gcs}/uninterrupted", *run), env=env)
  assert reference.wait(timeout=600) == 0, reference.text()[-3000:]

  wd = f"{gcs}/killed"
  first = fh.TrainRun(fh.tiny_train_args(wd, *run), env=env)
  try:
    assert first.wait_for(lambda line: line.startswith("step      5/"), timeout=300), first.text()
    deadline = time.monotonic() + 120
    while not storage.exists(f"{wd}/checkpoints/4/commit_success.txt"):
      assert time.monotonic() < deadline and first.proc.poll() is None, first.text()[-3000:]
      time.sleep(0.2)
  finally:
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
  assert workdir_holder(wd)["pid"] == first.proc.pid  # a dead owner's lock is left behind
  resumed = fh.TrainRun(fh.tiny_train_args(wd, *run), env=env)
  assert resumed.wait(timeout=600) == 0, resumed.text()[-3000:]
  assert re.search(rf"Resumed from {re.escape(wd)}/checkpoints/4\.", resumed.text("out"))
  assert resumed.steps_printed()[0] == 5 and resumed.steps_printed()[-1] == 8
  assert fh.same_params(_read_params(wd), _read_params(f"{gcs}/uninterrupted"))
  assert storage.exists(f"{wd}/curves.png") and storage.listdir(f"{wd}/tensorboard")
  assert not storage.exists(f"{wd}/.lock")


def workdir_holder(workdir):
  from vit_cls import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  return workdir_lib.lock_for(workdir).holder()
