"""A mover's TaskFlow conductor: it claims migration jobs from the jobboard and runs them.

- **Which jobs.** Those placed on this mover; and, when this mover reaches both of the job's
  transports, those queued for any mover (every one was busy at submission), those placed on a mover
  that is no longer in the group (it died, or left: the takeover), and those its mover left unclaimed
  for a claim expiry (placement is advisory: that mover may be full).
- **Claims expire.** A claim is made with an expiry (``claim_expiry``) and renewed three times per
  expiry while the job runs. A mover that dies stops renewing, its claims lapse, and another mover
  claims the job. A mover that finds its claim taken by another, or that cannot reach Redis for longer
  than the expiry, hands the migration back (the ``stop`` of ``Migrator.run_placed``): it stops before
  its next write, and the journal stays as recorded for the next mover.
- **One run at a time.** The claim is what the conductor dispatches on; the migration's lock and the
  journal's owner (see migration/owners.py) are what make a second run impossible: a mover that claims
  a job whose previous mover still holds the lock (its claim lapsed while it ran) waits for that lock,
  and the previous mover's journal writes are refused once another owns the migration.
- **A per-backend limit.** A job submitted with a backend limit is claimed only while fewer jobs than
  that are claimed on each of its volumes' backends, across the fleet (the count and the claim are
  made under a lock of the group's).
- **Slots and bandwidth.** The conductor runs at most ``slots`` jobs at once, and the mover publishes
  the slots in use and its rate. The running copies share ``bandwidth`` (rate.BandwidthBudget): each
  gets an equal part, or its own rate limit when lower, and the parts change as copies start and end,
  so a copy alone gets the whole budget and together they never exceed it.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
import warnings

from oslo_log import log as logging

from ..migration.errors import JournalError, LostOwnership
from ..migration.migrator import Migrator
from ..migration.volumes import VolumeRef
from ..rate import BandwidthBudget
from . import flow, jobboard, membership
from .flow import RunAgain
from .membership import one_line
from .metrics import MoverMetrics

log = logging.getLogger(__name__)

LOCK_WAIT = 5.0  # seconds a claim waits for the group's lock of the backends' counts
WAIT_FOR_LOCK = 1.0  # seconds between tries at the lock of a migration its previous mover still holds
ERROR_PAUSE = 5.0  # seconds a job that failed waits before it is abandoned, to run again


class _Claimed:
    def __init__(self, job):
        self.job = job
        self.renewed_at = time.monotonic()
        self.stop = threading.Event()  # set: its migration stops here, for another mover
        self.reason = ""
        self.done = 0  # bytes its copy has done, and the part of it counted in the mover's rate
        self.counted: int | None = None

    def progress(self, done: int, total: int) -> None:
        if self.counted is None:  # a resumed copy starts at its checkpoint: not moved by this run
            self.counted = done
        self.done = done

    def newly_moved(self) -> int:
        """Bytes moved since the last call."""
        if self.counted is None:
            return 0
        done, moved = self.done, max(0, self.done - self.counted)
        self.counted = done
        return moved


class _MoversBoard:
    """The jobboard as this mover's conductor sees it: only the jobs it may take, claimed with an
    expiry, and each claim remembered until the job is consumed or abandoned."""

    def __init__(self, conductor: Conductor):
        self._conductor = conductor
        self._board = conductor.board

    def __getattr__(self, name):
        return getattr(self._board, name)

    def iterjobs(self, only_unclaimed=False, ensure_fresh=False):
        with _as_job_failure():
            yield from self._claimable(ensure_fresh)

    def _claimable(self, ensure_fresh: bool):
        live = None
        for job in self._board.iterjobs(only_unclaimed=True, ensure_fresh=ensure_fresh):
            details = job.details or {}
            if self._conductor.has_claimed(details.get("migration_id")):
                continue  # a job posted again for a migration this mover runs: not a second run here
            placed_on = details.get("mover")
            if placed_on == self._conductor.name:
                yield job
                continue
            if not set(details.get("transports") or ["?"]) <= set(self._conductor.transports):
                continue
            if details.get("fences") and self._conductor.migrator.compute is None:
                continue
            if not placed_on or _age(job) > self._conductor.claim_expiry:
                yield job
                continue
            if live is None:
                live = self._conductor.live_movers()
            if live is not None and placed_on not in live:
                yield job  # its mover is gone: taken over

    def claim(self, job, who):
        from taskflow import exceptions

        if self._conductor.stopping:
            raise exceptions.UnclaimableJob(f"mover {who} is stopping")
        limit = (job.details or {}).get("backend_limit")
        if not limit:
            with _as_job_failure():
                _claim(self._board, job, who, self._conductor.claim_expiry)
            self._conductor.claimed(job)
            return
        # The count and the claim under one lock of the group's: two movers never both take the last
        # place on a backend.
        lock = self._conductor.mover.lock("backend-claims")
        try:
            if not lock.acquire(blocking=LOCK_WAIT):
                raise exceptions.UnclaimableJob("the backends' lock is busy")
        except membership.BACKEND_ERRORS as exc:
            raise exceptions.JobFailure(f"the backends' lock: {one_line(exc)}") from None
        try:
            busy = self._claimed_on(job.details["backends"])
            if busy >= limit:
                raise exceptions.UnclaimableJob(f"{busy} migrations run on its backend (limit {limit})")
            with _as_job_failure():
                _claim(self._board, job, who, self._conductor.claim_expiry)
            self._conductor.claimed(job)
        finally:
            try:
                lock.release()
            except membership.BACKEND_ERRORS:
                pass  # it expires with its own lease

    def _claimed_on(self, backends: list[str]) -> int:
        """The most claimed jobs on any one of these backends, across the fleet."""
        from taskflow import states

        counts = dict.fromkeys(backends, 0)
        with _as_job_failure():
            for other in self._board.iterjobs(ensure_fresh=True):
                shared = set((other.details or {}).get("backends") or []) & set(counts)
                if shared and other.state == states.CLAIMED:  # its state: a call to the backend
                    for backend in shared:
                        counts[backend] += 1
        return max(counts.values())

    def consume(self, job, who):
        self._conductor.finished(job)
        with _as_job_failure():
            self._board.consume(job, who)
        self._conductor.forget(job)

    def abandon(self, job, who):
        self._conductor.finished(job)
        with _as_job_failure():
            return self._board.abandon(job, who)

    def trash(self, job, who):
        self._conductor.finished(job)
        with _as_job_failure():
            return self._board.trash(job, who)


def _claim(board, job, who: str, expiry: int) -> None:
    board.claim(job, who, expiry=expiry)
    # TaskFlow's etcd job keeps the lease of the first claim it extended, for ever: this claim has its own
    if hasattr(job, "_lease"):
        job._lease = None


@contextlib.contextmanager
def _as_job_failure():
    """The backend's client errors as TaskFlow's JobFailure, which its conductor rides out (a round
    later): TaskFlow's Redis jobboard translates redis-py's, its etcd jobboard passes etcd3gw's on."""
    from taskflow import exceptions

    try:
        yield
    except membership.BACKEND_ERRORS as exc:
        raise exceptions.JobFailure(f"the jobboard: {one_line(exc)}") from None


def _age(job) -> float:
    """Seconds since the job was posted, by the poster's clock (jobboard.post writes it: TaskFlow's etcd
    jobboard does not give a job's created_on back)."""
    return time.time() - (job.details or {}).get("posted_at", time.time())


def _aware(moment: datetime.datetime) -> datetime.datetime:
    """SQLite gives UTC times without a zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


class Conductor:
    def __init__(
        self,
        mover,
        journal_url: str,
        checkpoint_dir: str | None,
        claim_expiry: int,
        metrics: MoverMetrics,
        compute=None,
    ):
        """compute: a NovaCompute, to fence attached volumes with (None: detached ones only)."""
        self.mover = mover
        self.name = mover.name
        self.transports = mover.transports
        self.claim_expiry = claim_expiry
        self.metrics = metrics
        self.migrator = Migrator(journal_url, compute=compute, checkpoint_dir=checkpoint_dir)
        self.backend = jobboard.persistence(journal_url)
        self.board = jobboard.connect(mover.url, mover.group, self.backend)
        # The bandwidth budget, shared by the running copies: together they never exceed it.
        self.migrator.bandwidth = BandwidthBudget(mover.bandwidth) if mover.bandwidth else None
        self._claims: dict[str, _Claimed] = {}  # by migration id
        self._guard = threading.Lock()
        self.stopping = False  # set by stop(): nothing more is claimed
        self.failed: str | None = None  # why the conductor's loop ended on its own
        self._stopping = threading.Event()  # ends the claims' thread
        self._threads: list[threading.Thread] = []
        self._rate_at = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from taskflow.conductors import backends as conductors
        self._taskflow = conductors.fetch(
            "nonblocking",
            self.name,
            _MoversBoard(self),
            persistence=self.backend,
            engine="serial",
            max_simultaneous_jobs=mover.slots,
            wait_timeout=0.5,
        )
        flow.RUNNER = self.run

    # ------------------------------------------------------------------ the conductor's loop

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._dispatch, name="conductor", daemon=True),
            threading.Thread(target=self._renew_claims, name="claims", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops claiming, hands back every running migration (each stops before its next write; its job
        is abandoned for another mover) and waits for the runs to end."""
        self.stopping = True
        self._taskflow.stop()
        with self._guard:
            claims = list(self._claims.values())
        for claim in claims:
            self._hand_back(claim, f"mover {self.name} is stopping")
        conductor, *others = self._threads or [None]
        if conductor is not None:
            conductor.join(timeout)  # its executor waits for the runs
            if conductor.is_alive():
                # A run that does not stop keeps its lock until this process exits, which ends it.
                log.error("a migration did not stop in %.0f s: its lock goes with this process", timeout)
                self._stopping.set()
                return
        self._stopping.set()
        for thread in others:
            thread.join(timeout)
        self.migrator.close()
        self.board.close()

    def _dispatch(self) -> None:
        """TaskFlow's loop; if it ends on its own (an error it does not ride out), the mover stops
        rather than advertise slots nobody fills."""
        try:
            self._taskflow.run()
        except Exception as exc:  # noqa: BLE001 - whatever it was, this mover can run nothing more
            log.exception("the conductor stopped")
            self.failed = one_line(exc)
        if not self.stopping:
            self.failed = self.failed or "the conductor stopped"
            self.mover.stopping.set()

    def has_claimed(self, migration_id: str | None) -> bool:
        with self._guard:
            return migration_id in self._claims

    def live_movers(self) -> set[str] | None:
        return self.mover.live_names()

    @staticmethod
    def _hand_back(claim: _Claimed, reason: str) -> None:
        log.warning("migration %s: handed back: %s", claim.job.details["migration_id"], reason)
        claim.reason = reason
        claim.stop.set()

    # ------------------------------------------------------------------ claims

    def claimed(self, job) -> None:
        claim = _Claimed(job)
        with self._guard:
            self._claims[job.details["migration_id"]] = claim
        if self.stopping:  # stop() began after the claim was made: it did not see this one
            self._hand_back(claim, f"mover {self.name} is stopping")
        placed_on = job.details.get("mover")
        if placed_on and placed_on != self.name:
            self.metrics.takeovers.inc()
        log.info("claimed %s (placed on %s)", job.name, placed_on or "any mover")

    def _still_running(self, claim: _Claimed) -> bool:
        with self._guard:
            return self._claims.get(claim.job.details["migration_id"]) is claim

    def finished(self, job) -> None:
        with self._guard:
            claim = self._claims.get(job.details["migration_id"])
            if claim is None or claim.job.uuid != job.uuid:
                return
            del self._claims[job.details["migration_id"]]
            moved = claim.newly_moved()
        self.metrics.bytes_copied.inc(moved)

    def _renew_claims(self) -> None:
        rounds = 0
        while not self._stopping.wait(self.claim_expiry / 3):
            self.renew()
            self._publish_rate()
            rounds += 1
            if rounds % 3 == 0:
                try:
                    self.repost_lost_jobs()
                except Exception as exc:  # noqa: BLE001 - Redis or the journal does not answer: next time
                    log.warning("lost jobs not looked for: %s", one_line(exc))

    def repost_lost_jobs(self) -> None:
        """Posts again the job of each placed migration that is not finished and that the jobboard no
        longer has (a Redis restarted empty loses every job). The journal's record of the job is
        replaced only if it is still the lost one, so of several movers doing this one wins; the
        others' jobs find the migration running or ended, and end."""
        journal = self.migrator.journal
        placements = journal.placements()
        unfinished = [m for m in journal.list(unfinished_only=True) if m.id in placements]
        if not unfinished:
            return
        on_board = self._on_board()
        # A submitter records a migration, then posts its job: a job-less one is lost after a while only.
        now = datetime.datetime.now(datetime.timezone.utc)
        posting_since = now - datetime.timedelta(seconds=self.claim_expiry)
        for m in unfinished:
            placement = placements[m.id]
            if placement.job in on_board:
                continue
            if not placement.job and _aware(placement.placed_at) > posting_since:
                continue
            src, dst = VolumeRef.from_json(m.src), VolumeRef.from_json(m.dst)
            job = jobboard.post(
                self.board,
                self.backend,
                m.id,
                placement.placed_on,
                (src.transport, dst.transport),
                bool(m.attachments),
                placement.backends,
                placement.backend_limit,
            )
            if journal.replace_job(m.id, placement.job, job):
                log.warning("migration %s: its job was lost from the jobboard: posted again", m.id)

    def _on_board(self) -> set[str]:
        """The uuids of every job on the jobboard, claimed or not, read afresh."""
        return {job.uuid for job in self.board.iterjobs(ensure_fresh=True)}

    def forget(self, job) -> None:
        """A consumed job's logbook, which TaskFlow's persistence would otherwise keep for ever."""
        try:
            with contextlib.closing(self.backend.get_connection()) as connection:
                connection.destroy_logbook(job.book_uuid)
        except Exception as exc:  # noqa: BLE001 - a logbook left behind is only a row too many
            log.info("the logbook of %s is left: %s", job.name, one_line(exc))

    def _publish_rate(self) -> None:
        """The mover's rate: what its copies did since the last time, over that time."""
        now = time.monotonic()
        with self._guard:
            moved = sum(claim.newly_moved() for claim in self._claims.values())
        rate = moved / max(now - self._rate_at, 1e-3)
        self.mover.set_rate(rate)
        self.metrics.rate.set(rate)
        self.metrics.bytes_copied.inc(moved)
        self._rate_at = now

    def renew(self) -> None:
        """Extends the claims of the running jobs. A migration whose claim another mover holds now, or
        that could not be renewed for a whole expiry, is handed back. A claim that lapsed unseen is
        taken again; one whose job is gone (a Redis restarted empty) runs on: the migration's lock
        still keeps any other mover out, and the job is posted again (repost_lost_jobs)."""
        from taskflow import exceptions, states

        with self._guard:
            claims = [claim for claim in self._claims.values() if not claim.stop.is_set()]
        for claim in claims:
            job = claim.job
            try:
                state = job.state
                if state == states.COMPLETE:  # no longer on the jobboard
                    log.warning("%s is gone from the jobboard; its migration runs on", job.name)
                    claim.renewed_at = time.monotonic()
                    continue
                if state == states.UNCLAIMED:
                    try:
                        _claim(self.board, job, self.name, self.claim_expiry)
                    except (exceptions.UnclaimableJob, exceptions.NotFound):
                        pass  # claimed by another meanwhile, or gone: asked again below or next time
                    else:
                        if not self._still_running(claim):  # its run abandoned the job meanwhile
                            self.board.abandon(job, self.name)
                            continue
                        claim.renewed_at = time.monotonic()
                        continue
                owner = self.board.find_owner(job)
                if owner is None:
                    continue  # the claim lapsed since its state was read: taken again next time
                if owner != self.name:
                    self._hand_back(claim, f"its job's claim is held by {owner}")
                    continue
                if not job.extend_expiry(self.claim_expiry):
                    raise exceptions.JobFailure("the claim's expiry was not extended")
                claim.renewed_at = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - the backend does not answer: the claim may lapse
                if time.monotonic() - claim.renewed_at >= self.claim_expiry:
                    why = f"its job's claim could not be renewed for {self.claim_expiry:g} s: {one_line(exc)}"
                    self._hand_back(claim, why)

    # ------------------------------------------------------------------ running a job

    def _duplicate(self, migration_id: str, job) -> bool:
        """True for a job that the journal does not name as its migration's while the named one is on
        the jobboard: one posted again while the first was still being posted. The named job runs the
        migration, and this one is consumed. When the named job is not on the jobboard (lost, or itself
        dropped before the journal named it), this job becomes the named one."""
        journal = self.migrator.journal
        while True:
            named = journal.placement(migration_id)
            if named is None or not named.job or named.job == job.uuid:
                return False
            with _as_job_failure():
                on_board = self._on_board()
            if named.job in on_board:
                log.info(
                    "migration %s: %s is not its job (%s is): dropped", migration_id, job.name, named.job
                )
                return True
            if journal.replace_job(migration_id, named.job, job.uuid):
                log.warning("migration %s: its job %s is gone: %s runs it", migration_id, named.job, job.uuid)
                return False

    def run(self, migration_id: str) -> str:
        """The job's task: runs the migration; returns the state it ended in, or raises RunAgain."""
        with self._guard:
            claim = self._claims.get(migration_id)
        if claim is None:
            raise RunAgain("not claimed by this mover")
        self.mover.reserve()
        self.metrics.running.inc()
        outcome = "error"
        try:
            while True:
                if claim.stop.is_set():
                    outcome = "handed_back"
                    raise RunAgain(claim.reason)
                try:
                    if self._duplicate(migration_id, claim.job):
                        outcome = "duplicate"
                        return outcome
                    m = self.migrator.run_placed(migration_id, self.name, claim.stop, claim.progress)
                except (LostOwnership, JournalError) as exc:
                    log.warning("migration %s: stopped here, to run again: %s", migration_id, exc)
                    if claim.stop.is_set():
                        outcome = "handed_back"
                    raise RunAgain(str(exc)) from None
                except Exception as exc:
                    # Not an ending: the job is abandoned, not consumed, so that the migration is never
                    # left without one; after a pause, so that a lasting fault does not spin.
                    log.exception("migration %s: failed on this mover; its job runs again", migration_id)
                    claim.stop.wait(ERROR_PAUSE)
                    raise RunAgain(one_line(exc)) from None
                if m is not None and m.finished:
                    log.info("migration %s: %s", migration_id, m.state)
                    outcome = m.state
                    return m.state
                if m is not None:  # stopped as recorded, for recover() to go on: its job does that
                    claim.stop.wait(ERROR_PAUSE)
                    raise RunAgain(f"migration {migration_id} stays {m.state}: {m.reason}")
                # Its previous mover still holds its lock: its claim lapsed while it ran.
                claim.stop.wait(WAIT_FOR_LOCK)
        finally:
            self.metrics.running.dec()
            self.metrics.ended[outcome].inc()
            if outcome == "error":
                self.metrics.errors.inc()
            self.mover.release()
