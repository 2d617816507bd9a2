"""Named failure points: ``VOLCOPY_FAILPOINT=after-start-1`` (comma-separated for several) makes the
process kill itself with SIGKILL when it reaches that point, as a crash or a power cut would, so that
tests can check what recover() makes of every step boundary.

The points, in the order a migration passes them (N counts attachments from 1):
  after-record           the migration is in the journal, nothing else done
  before-start-N         start of attachment N is recorded as intended, not sent
  after-start-N          attachment N is fenced, not yet recorded as done
  checkpoint-restored    the copy's checkpoint is in place (the journal's, if further along), unread
  mid-copy               half the volume is copied (and a checkpoint taken, with a slow enough copy)
  after-copy             dst holds the copy, its digest not yet compared
  before-complete-N      complete of attachment N is recorded as intended, not sent
  after-complete-N       attachment N is on dst, not yet recorded as done
  before-cancel-N        (on the way to cancelled) cancel of attachment N is intended, not sent
  before-finish          every step is done, the final state is not yet written
"""

from __future__ import annotations

import os
import signal

ENVIRONMENT = "VOLCOPY_FAILPOINT"


def failpoint(name: str) -> None:
    armed = os.environ.get(ENVIRONMENT)
    if armed and name in armed.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
