"""A failed orbax read waits for its sibling reads before its event loop closes.

orbax-checkpoint (0.12.8) runs each restore in a fresh asyncio event loop
(`asyncio_utils._run_sync_via_new_loop`) and closes it as soon as the coroutine raises. A restore reads
many arrays at once (`asyncio.gather`): when one read fails (a damaged or truncated checkpoint), the
others are still in flight in tensorstore, and when each finishes tensorstore hands its result to the
closed loop: `RuntimeError: Event loop is closed`, printed by every such thread ("Exception ignored
in: None"), and a PytestUnraisableExceptionWarning in the tests. Here the loop first lets the reads
still pending finish (their results and errors dropped), then closes, and the restore's own error is
raised as before. Success is unchanged: nothing is pending then.

`apply()` is idempotent, and a no-op on an orbax without that function (a later release that
changed it: the tests show whether the fault is back).
"""

from __future__ import annotations

import asyncio

_applied = False


def _settle(loop) -> None:
  """Runs `loop` until every task still pending on it is done; their outcomes are dropped."""
  pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
  if pending:
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def _run_sync_via_new_loop(coro):
  """orbax's function of that name, but a failure first settles the loop's other tasks."""
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    try:
      return loop.run_until_complete(coro)
    except BaseException:
      _settle(loop)
      raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


def apply() -> None:
  global _applied
  if _applied:
    return
  from orbax.checkpoint._src import asyncio_utils  # pylint: disable=g-import-not-at-top
  if callable(getattr(asyncio_utils, "_run_sync_via_new_loop", None)):
    asyncio_utils._run_sync_via_new_loop = _run_sync_via_new_loop  # pylint: disable=protected-access
  _applied = True
