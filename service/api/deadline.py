"""A /verify call's answer deadline (IDV_REQUEST_DEADLINE_SECONDS) and the work left running past it.

The route runs a call's work as its own task and waits for it until the deadline; then the
caller gets 503 `deadline_exceeded` with Retry-After. A thread blocked on a locked or stopped
database cannot be stopped, so the work goes on: `Unanswered` keeps it (a bounded number; past
that, new calls are answered 503 `busy` at once), and `AnswerDeadline` makes sure the record it
writes then says the call was not answered (rejected, `deadline_exceeded`), never a decision.

The record and the answer agree by request id. A record commits with a decision only through
`begin_commit` (refused from `commit_by`, a margin before the deadline) and the route answers
with the decision only when `abandon` finds it committed; on PostgreSQL the server also refuses,
at COMMIT, a record whose transaction is past `commit_by` (migration 0007), so a COMMIT held up
by a stopped server or a held packet does not land. What no client can know is a COMMIT the
server had accepted and was writing when it stopped: that record, should it land after its
caller was answered 503, is logged as an error with its request id (docs/operations.md).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from service.errors import ApiError, deadline_exceeded
from service.records.engine import is_outage

log = logging.getLogger("idverify.verify")

COMMIT_GRACE_SECONDS = 0.25  # a record whose COMMIT is under way at the deadline gets this much longer
COMMIT_MARGIN_SECONDS = 1.0  # records commit at the latest this long before the deadline (a quarter of a short one)


class AnswerDeadline:
    """States: open -> committing -> committed (the caller gets the record's answer), or back to
    open when the commit fails; open or committing -> abandoned (the caller got 503)."""

    def __init__(self, seconds: float, request_id: str = "", clock=time.monotonic):
        self.seconds = seconds
        self.request_id = request_id
        self.clock = clock
        self.at = clock() + seconds
        # a COMMIT accepted by then has the margin to come back before the caller is answered
        self.commit_by = self.at - min(COMMIT_MARGIN_SECONDS, seconds / 4)
        self.state = "open"
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.at - self.clock()

    def passed(self) -> bool:
        return self.state == "abandoned" or self.remaining() <= 0

    def error(self) -> ApiError:
        return deadline_exceeded(self.seconds)

    def commit_remaining(self) -> float:
        """Seconds left to commit the record with the call's outcome (the server is told too)."""
        return self.commit_by - self.clock()

    def check(self) -> None:
        """Between stages: past the deadline, the call goes no further (ApiError deadline_exceeded)."""
        if self.passed():
            raise self.error()

    # --- the record's commit (service/records/audit.py append) ------------------------------

    def begin_commit(self) -> bool:
        with self._lock:
            if self.state == "abandoned" or self.commit_remaining() <= 0:
                return False
            self.state = "committing"
            return True

    def end_commit(self, committed: bool) -> None:
        with self._lock:
            if self.state != "abandoned":
                self.state = "committed" if committed else "open"
                return
        if committed:
            log.error("audit record %s committed after its caller was answered 503 deadline_exceeded "
                      "(the database stopped during the commit)", self.request_id)

    # --- the route, at the deadline -------------------------------------------------------

    def abandon(self) -> str:
        """The state the call was in: "committed" (answer with its record), else it is now
        abandoned and its caller gets 503."""
        with self._lock:
            previous = self.state
            if previous != "committed":
                self.state = "abandoned"
            return previous


class Unanswered:
    """Tasks of calls answered at their deadline, still running; at most `limit` of them."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.tasks: set[asyncio.Task] = set()

    def full(self) -> bool:
        return len(self.tasks) >= self.limit

    def keep(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, ApiError):
            return
        if is_outage(exc):   # e.g. authentication reached a database that was still away
            log.warning("an unanswered /verify call ended without a record: database unavailable (%s)",
                        (str(exc).splitlines() or [exc.__class__.__name__])[0][:200])
        else:
            log.error("work of an unanswered /verify call failed", exc_info=exc)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for the tasks to finish (their records to be written); returns
        how many are still running."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        return len(self.tasks)


async def within(deadline: AnswerDeadline, task: asyncio.Task) -> bool:
    """Wait for `task` until the deadline (plus COMMIT_GRACE_SECONDS while its record is being
    committed), without cancelling it. True when it finished."""
    done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline.remaining()))
    if not done and deadline.state == "committing":
        done, _ = await asyncio.wait({task}, timeout=COMMIT_GRACE_SECONDS)
    return bool(done)
