"""Trains a ViT: `python train.py --config=configs/default.py --workdir=/tmp/vit`.

Any config field can be overridden on the command line, e.g. `--config.total_steps=100
--config.model.pool=gap`. Running again with the same workdir resumes from its latest checkpoint.
"""

import atexit
import os
import re
import signal
import sys


class _SigtermLatch:
  """Remembers a SIGTERM that arrives before the training loop listens for one (imports, restore,
  compile), so that the run still stops at its first step with a checkpoint instead of dying unsaved;
  `vit_cls.train._Preemption` reads the flag when it takes over."""

  received = False

  def __call__(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True


class _ExitWithoutTeardown:
  """After a successful run, leave without tearing down the interpreter's modules.

  TensorFlow's and JAX's C++ destructors take 1.5 s or more after the last line is printed. Registered
  before any other exit handler, this runs after all of them (checkpoints are committed and logs
  closed by then); only the teardown is skipped, and only when `main` returned normally.
  """

  succeeded = False

  def __call__(self):
    if self.succeeded:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(0)  # pylint: disable=protected-access


_exit_without_teardown = _ExitWithoutTeardown()
if __name__ == "__main__":  # first thing, before the imports that take seconds
  signal.signal(signal.SIGTERM, _SigtermLatch())
  atexit.register(_exit_without_teardown)
  # Then, before JAX and TensorFlow allocate anything: the memory allocator, printed as the run's first
  # line (vit_cls.allocator imports only the standard library). It may restart this process once (same
  # pid) with tcmalloc preloaded; a SIGTERM during that restart reaches the latch above once it is back.
  # VIT_CLS_ALLOCATOR=system turns the selection off.
  from vit_cls import allocator  # pylint: disable=g-import-not-at-top
  allocator.setup()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data here; keep it quiet.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", required=True)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
# Multi-host GPU jobs (one process per host): all three, or the environment variables
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Cloud TPU slices, Slurm and Open MPI need
# none of them.
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the job (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1 (multi-host).")
FLAGS = flags.FLAGS


def _fail(message: str, now: bool = False) -> None:
  """A wrong input costs one line on stderr and exit status 1, not a traceback (bugs keep theirs).

  `now`: leave without the interpreter's shutdown, in which background threads (the writers of a save
  that failed) would print tracebacks of their own under the one line. Everything of value is on disk
  already: checkpoints are committed or not, metrics are flushed line by line.
  VIT_CLS_TRACEBACK=1 re-raises instead, for debugging the program rather than the input.
  """
  if os.environ.get("VIT_CLS_TRACEBACK"):
    raise  # pylint: disable=misplaced-bare-raise
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  if now:
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  sys.exit(1)


def _parse_flags(argv):
  """absl's flag parsing, with every way a command line or a config file can be wrong as one line.

  ml_collections raises a config file's SyntaxError as it is, an override of a field that does not
  exist as an AttributeError, get_config's own errors wrapped in a flags error that quotes the whole
  traceback, and a file it cannot open only when the config is first read.
  """
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys  # pylint: disable=pointless-statement  (a config file that failed to load raises)
    return rest
  except SyntaxError as e:
    _fail(f"--config: the config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}: "
          f"{(e.text or '').strip()}")
  except (AttributeError, KeyError) as e:
    text = str(e).replace("\\n", " ").replace("\\'", "'")
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    field = suggestion.group(2) if suggestion else (re.findall(r"'(\w+)'", text) or ["?"])[0]
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
             and a.split("=")[0].split(".")[-1] == field]
    _fail(f"{given[0] if given else '--config'}: the config has no field '{field}'"
          + (f"; did you mean '{suggestion.group(1)}'?" if suggestion else
             "; configs/default.py lists the fields."))
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1:  # get_config raised: the flags error quotes its traceback, the cause comes last
      flag = lines[0].split(": ")[0]
      _fail(f"{flag}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])}")
    _fail(lines[0] if lines else str(e))
  except (OSError, ValueError, TypeError) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f"--config: cannot load the config file: {lines[-1] if lines else e}")


def _drop_orbax_tracebacks(record) -> bool:
  """Orbax logs a failed background write with its whole traceback before the save raises; the run
  then reports that failure itself, in one line. The log record stays, as one line too."""
  if record.exc_info and "orbax" in (record.pathname or ""):
    record.exc_info, record.exc_text = None, None
  return True


def _import_tensorflow_without_keras() -> None:
  """Imports TensorFlow (for the input pipeline) about 3 s faster, by not loading Keras.

  `import tensorflow` eagerly imports `keras.src.optimizers`, which loads all of Keras and IPython, for
  a SavedModel registry this program never uses; TensorFlow catches an ImportError there. A `None`
  entry in `sys.modules` makes exactly that import fail at once. The entry is removed right after, so
  Keras still imports normally if anything asks for it later.
  """
  blocked = "keras.src.optimizers"
  if "tensorflow" in sys.modules or blocked in sys.modules:
    return
  from vit_cls import storage  # pylint: disable=g-import-not-at-top  (standard library only)
  sys.modules[blocked] = None
  try:
    with storage.native_stderr_captured() as captured:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    del sys.modules[blocked]
    # Warnings and errors of the import still reach stderr, after it; only the notices are dropped.
    kept = [line for line in "".join(captured).splitlines(keepends=True)
            if not any(notice in line for notice in _IMPORT_NOTICES)]
    sys.stderr.write("".join(kept))
    sys.stderr.flush()


# What TensorFlow's C++ code prints while it loads, at every start, whatever TF_CPP_MIN_LOG_LEVEL says
# (tensorflow-cpu 2.21, tried 0 to 3): absl's notice that logging is not initialised and the oneDNN
# notice, each twice.
_IMPORT_NOTICES = ("All log messages before absl::InitializeLog() is called",
                   "oneDNN custom operations are on")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Orbax and TensorFlow log every file they touch at INFO; the progress lines are what users read.
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(_drop_orbax_tracebacks)
  _import_tensorflow_without_keras()
  from vit_cls import errors  # pylint: disable=g-import-not-at-top
  from vit_cls import sharding  # pylint: disable=g-import-not-at-top
  from vit_cls import train  # pylint: disable=g-import-not-at-top
  try:
    sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                          FLAGS.process_id)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    _exit_without_teardown.succeeded = True
  except errors.VitClsError as e:
    # Bad configs, missing or unreadable data, wrong or damaged checkpoints, a full or failing disk,
    # NaN: raised as the project's error types with a one-line message that names the problem and
    # the fix. Anything else (a ValueError from a shape bug in a model, say) is a bug: absl prints
    # its traceback.
    _fail(str(e), now=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
