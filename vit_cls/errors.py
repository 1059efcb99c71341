"""The project's error types: bad input, as opposed to bugs.

`train.py` prints an error of these types as one line (`error: <message>`, exit status 1), because its
message already names the thing, the value and the fix, and a traceback through XLA or orbax would only
bury it. Any other exception is a bug, in this project or in a user's own code (a shape error in a
custom model, say), and keeps its full traceback.

Raise them for what a user can fix without reading code: a config value, a dataset, a checkpoint, the
disk. Each also derives from the built-in type that code calling the library caught before these types
existed (ValueError, OSError), so `except ValueError` around a load keeps working.
"""


class VitClsError(Exception):
  """Base class: an input or an environment the user can fix, described in a one-line message."""


class ConfigError(VitClsError, ValueError):
  """A config field (or a command-line value) that is not allowed, or that contradicts another one."""


class DataError(VitClsError, ValueError):
  """A dataset that is unknown, not prepared, or holds files that are not what they claim to be."""


class CheckpointError(VitClsError, ValueError):
  """A checkpoint that cannot be used: another model or optimizer, unreadable, damaged, or unsaved."""


class StorageError(VitClsError, OSError):
  """The workdir or its storage refuses a read or a write (permissions, I/O errors, a stale handle) in a
  way that says nothing about the files themselves: nothing is renamed or deleted because of it."""
