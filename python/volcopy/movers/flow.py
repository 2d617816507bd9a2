"""The flow of a migration job: one task that runs the migration on this mover.

TaskFlow builds a job's flow again from its factory's import path (``migration_flow``) in whichever
conductor claims it, after a takeover too, so the task reaches the mover's runner through ``RUNNER``, set
once by the mover at start (``volcopy mover``, conductor.py). The migration's own steps and state are in
the journal, which is where a takeover resumes from; TaskFlow's persistence records that the job's task
ran and what it ended in.

The task's failures say what the conductor does with the job: RunAgain (a migration handed back, a
journal or lock that cannot be reached, a failed run) is an ExecutionFailure, so the job is abandoned (not
consumed) and runs again, on this mover or another; a migration that ended, completed or cancelled, and
a duplicate job consume it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation, through futurist
    from taskflow import exceptions, task
    from taskflow.patterns import linear_flow

# migration_id -> the state it ended in; set by the mover (conductor.Conductor)
RUNNER: Callable[[str], str] | None = None


class RunAgain(exceptions.ExecutionFailure):
    """The job is to run again later, here or on another mover: nothing was lost."""


class RunMigration(task.Task):
    def execute(self, migration_id: str) -> str:
        if RUNNER is None:
            raise RunAgain("this process is not a mover")
        return RUNNER(migration_id)


def migration_flow(migration_id: str):
    return linear_flow.Flow(f"migration-{migration_id}").add(
        RunMigration("run", inject={"migration_id": migration_id})
    )
