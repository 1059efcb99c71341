"""The host memory allocator of a run, chosen before JAX and TensorFlow allocate anything.

Why it matters: XLA's CPU runtime allocates and frees its large buffers on every step. glibc's malloc
serves blocks above its mmap threshold with mmap and hands them back to the kernel on free, so every step
page-faults the same memory in again: millions of minor faults and seconds of system time per minute of
training. tcmalloc keeps freed memory for reuse; glibc can be told to (larger thresholds). BENCHMARKS.md
has the measured effect.

Entry points (train.py, the benchmark, predict, visualize, the pooling study) call `setup()` before any
heavy import; it prints the choice as the first line of the run. Importing `vit_cls` or this module
changes nothing: the choice belongs to whoever owns the process. The environment selects the mode:

  VIT_CLS_ALLOCATOR=auto         (default) tcmalloc when installed, else glibc tuned
  VIT_CLS_ALLOCATOR=tcmalloc     tcmalloc, or a one-line error when it is not installed
  VIT_CLS_ALLOCATOR=glibc-tuned  glibc's malloc with the thresholds in GLIBC_TUNING
  VIT_CLS_ALLOCATOR=system       leave the process as it started (glibc's defaults, or your LD_PRELOAD)
  VIT_CLS_TCMALLOC=PATH          the tcmalloc library to use instead of searching the usual directories

tcmalloc can only replace malloc when it is loaded at process start (LD_PRELOAD), so `setup()` re-executes
the process once (same interpreter, same arguments, same pid) with the library added to LD_PRELOAD; a
marker variable stops it from ever doing so twice, and both are removed from the environment after the
restart, so that child processes make their own choice. SIGTERM, SIGINT and SIGHUP are blocked across the
exec and unblocked when `setup()` returns in the new image: one that arrives during the restart is
delivered then (to the handlers an entry point installed before calling `setup()`), not lost and not
fatal where it would not have been. On Debian/Ubuntu (and Cloud TPU VMs):
`apt-get install libtcmalloc-minimal4`. Nothing here imports more than the standard library.
"""

import os
import sys

ENV_MODE = "VIT_CLS_ALLOCATOR"
ENV_LIBRARY = "VIT_CLS_TCMALLOC"
_ENV_RESTARTED = "_VIT_CLS_ALLOCATOR_PRELOADED"  # the library the restart added; set for one exec only
_ENV_HELD = "_VIT_CLS_ALLOCATOR_HELD_SIGNALS"  # the signals blocked across that exec, to unblock after it
_HELD_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
MODES = ("auto", "tcmalloc", "glibc-tuned", "system")
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
INSTALL_HINT = "apt-get install libtcmalloc-minimal4"
_MALLOC_LIBRARIES = ("tcmalloc", "jemalloc", "mimalloc")  # what a mapped library's name says it is

# glibc's mallopt parameters (malloc.h) and the values `glibc-tuned` sets: blocks up to 32 MiB (glibc's
# largest mmap threshold on 64-bit) come from the heap instead of fresh mmaps, and up to 1 GiB of free
# heap stays mapped instead of being trimmed, so the next step reuses it without page faults.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_TUNING = (("mmap threshold", _M_MMAP_THRESHOLD, 32 << 20),
                ("trim threshold", _M_TRIM_THRESHOLD, 1 << 30),
                ("top pad", _M_TOP_PAD, 256 << 20))

_state = {"tuned": False, "note": ""}


def _size(n: int) -> str:
  return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def requested_mode(value=None) -> str:
  """The mode asked for (argument, else $VIT_CLS_ALLOCATOR, else auto); a bad value is a ValueError."""
  mode = (os.environ.get(ENV_MODE, "") if value is None else value).strip().lower() or "auto"
  if mode not in MODES:
    raise ValueError(f"{ENV_MODE}={mode!r}: not an allocator mode; choose one of {', '.join(MODES)} "
                     f"(system turns the selection off).")
  return mode


def find_tcmalloc():
  """Path (or loader name) of an installed tcmalloc, None when there is none.

  $VIT_CLS_TCMALLOC names the file (a path that does not exist means: not installed). Otherwise the
  usual library directories are searched, then the loader's cache (`ctypes.util.find_library`).
  """
  given = os.environ.get(ENV_LIBRARY)
  if given:
    return given if os.path.isfile(given) else None
  machine = os.uname().machine
  dirs = (f"/usr/lib/{machine}-linux-gnu", f"/lib/{machine}-linux-gnu", "/usr/lib64", "/usr/lib",
          "/usr/local/lib", "/lib64", "/lib")
  for name in TCMALLOC_NAMES:
    for d in dirs:
      if os.path.isfile(os.path.join(d, name)):
        return os.path.join(d, name)
  import ctypes.util  # pylint: disable=g-import-not-at-top  (runs ldconfig: only when the search failed)
  for name in ("tcmalloc_minimal", "tcmalloc"):
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def loaded_malloc():
  """The path of a malloc replacement (tcmalloc, jemalloc, mimalloc) mapped into this process, or None."""
  try:
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
      for line in f:
        path = line.split(None, 5)[-1].strip() if line.count(" ") >= 5 else ""
        if path.startswith("/") and any(n in os.path.basename(path) for n in _MALLOC_LIBRARIES):
          return path
  except OSError:  # not Linux
    pass
  return None


def kind() -> str:
  """A short name of the allocator in use: tcmalloc, jemalloc, mimalloc, glibc-tuned or system."""
  mapped = loaded_malloc()
  if mapped:
    return next(n for n in _MALLOC_LIBRARIES if n in os.path.basename(mapped))
  return "glibc-tuned" if _state["tuned"] else "system"


def describe() -> str:
  """One line for the start of a run: which allocator this process is using, and where it came from."""
  mapped = loaded_malloc()
  if mapped:
    return f"{kind()} ({mapped})"
  libc = "glibc" if _glibc() else "libc"
  if _state["tuned"]:
    text = f"{libc} (tuned: " + ", ".join(f"{n} {_size(v)}" for n, _, v in GLIBC_TUNING) + ")"
  else:
    text = f"{libc} (system default)"
  return text + (f"; {_state['note']}" if _state["note"] else "")


def _glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError):
    return False


def _tune_glibc() -> bool:
  """mallopt(GLIBC_TUNING): takes effect for every later allocation, in every arena."""
  if not (sys.platform.startswith("linux") and _glibc()):
    _state["note"] = "not glibc: left as it is"
    return False
  import ctypes  # pylint: disable=g-import-not-at-top
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _state["tuned"] = all([mallopt(param, value) == 1 for _, param, value in GLIBC_TUNING])
  if not _state["tuned"]:
    _state["note"] = "mallopt refused a setting"
  return _state["tuned"]


def _forget_restart(library: str) -> None:
  """After the restart: LD_PRELOAD as the user had it, so that child processes choose for themselves."""
  rest = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p != library]
  if rest:
    os.environ["LD_PRELOAD"] = " ".join(rest)
  else:
    os.environ.pop("LD_PRELOAD", None)


def _restart_with(library: str) -> None:
  """Re-executes this process (same interpreter, arguments and pid) with `library` preloaded."""
  argv = list(getattr(sys, "orig_argv", []) or [])
  if not sys.executable or len(argv) < 2 or sys.flags.interactive or sys.argv[0] in ("", "-"):
    return  # an interactive session or a script read from stdin cannot be started again
  env = dict(os.environ)
  env["LD_PRELOAD"] = " ".join(env.get("LD_PRELOAD", "").replace(":", " ").split() + [library])
  env[_ENV_RESTARTED] = library
  # tcmalloc reports every allocation above 1 GiB on stderr; a big model's buffers are not news.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 50))
  import signal  # pylint: disable=g-import-not-at-top
  wanted = {getattr(signal, name) for name in _HELD_SIGNALS if hasattr(signal, name)}
  blocked_before = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
  env[_ENV_HELD] = ",".join(str(int(s)) for s in sorted(wanted - set(blocked_before)))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked_before)
    return  # could not exec: the caller falls back to glibc


def select(mode=None) -> str:
  """Applies `mode` (default: $VIT_CLS_ALLOCATOR) to this process and returns `describe()`.

  For entry points only, before JAX/TensorFlow are imported: in `auto` and `tcmalloc` mode this may
  replace the running process (os.execve) and not return. A bad mode, or `tcmalloc` when it cannot be
  had, raises ValueError with a one-line message.
  """
  restarted = os.environ.pop(_ENV_RESTARTED, None)
  held = os.environ.pop(_ENV_HELD, "")
  if restarted is not None:
    _forget_restart(restarted)
  if held:  # a signal that came during the restart is delivered now, to the handlers installed by now
    import signal  # pylint: disable=g-import-not-at-top
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {int(s) for s in held.split(",")})
  mode = requested_mode(mode)
  mapped = loaded_malloc()
  if mapped and mode == "tcmalloc" and kind() != "tcmalloc":
    raise ValueError(f"{ENV_MODE}=tcmalloc: {mapped} is loaded already (LD_PRELOAD?); remove it from "
                     f"LD_PRELOAD or set {ENV_MODE}=system.")
  if mode == "system" or mapped:
    return describe()  # left alone, or already under a malloc replacement (ours, or the user's)
  if mode in ("auto", "tcmalloc"):
    library = None if restarted is not None else find_tcmalloc()
    if library:
      _restart_with(library)  # returns only when the process cannot be restarted
    if mode == "tcmalloc":
      why = (f"{restarted} was preloaded but is not mapped" if restarted is not None else
             f"{ENV_LIBRARY}={os.environ[ENV_LIBRARY]} does not exist" if os.environ.get(ENV_LIBRARY)
             else "no libtcmalloc_minimal.so.4 or libtcmalloc.so.4 found" if not library else
             "this process cannot be restarted with it preloaded")
      raise ValueError(f"{ENV_MODE}=tcmalloc: {why}; install it ({INSTALL_HINT}) or set "
                       f"{ENV_MODE}=auto.")
  _tune_glibc()
  if mode == "auto" and _state["tuned"]:
    _state["note"] = ("tcmalloc did not load" if restarted is not None else
                      f"tcmalloc is faster: {INSTALL_HINT}")
  return describe()


def setup(file=None) -> str:
  """What an entry point calls first: `select()`, then the line `allocator: ...` on `file` (stdout).

  Signal handlers the entry point needs from its first moment (train.py's SIGTERM latch) go before it.

  A bad $VIT_CLS_ALLOCATOR stops the program with that one line (exit status 1).
  """
  try:
    text = select()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"allocator: {text}", file=file or sys.stdout, flush=True)
  return text
