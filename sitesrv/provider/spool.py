"""The provider's spool: documents, job records and unacknowledged reports on disk.

Layout under the spool directory::

    jobs/<uuid>/document    the document as received
    jobs/<uuid>/job.json    the job's record (`SpooledJob`), replaced atomically
    reports/<seq>.json      a report the server has not acknowledged yet (`Report`)
    incoming/               documents being copied in (removed at start-up)
    state.json              the next IPP job id

Everything survives a restart: `Spool.load` reads it back. A finished job (printed,
failed, denied, cancelled, expired) loses its document at once and keeps only its small
record for ``keep_finished`` seconds, so that Get-Jobs can show it and a release pushed
again after a reconnect is recognised as done. The documents' total size is held under
a quota. Files are written on one IO thread (``run``), in the order asked, never on the
reactor thread; `load` runs once at start-up before the reactor serves anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()

T = TypeVar("T")

#: Runs ``fn(*args)`` off the reactor thread (in order) and fires with its result.
Runner = Callable[..., Deferred[Any]]

#: Job states at the provider.
PENDING = "pending"  # spooled, no decision from the server yet (offline "hold" policy)
HELD = "held"  # the server said hold: waiting for a Release
RELEASING = "releasing"  # being delivered to ``target`` for ``release_id``
PRINTED = "printed"
FAILED = "failed"
DENIED = "denied"
CANCELLED = "cancelled"
EXPIRED = "expired"

#: States whose document is still in the spool.
ACTIVE_STATES = frozenset({PENDING, HELD, RELEASING})
#: States of a job that is over (only its record remains, for a while).
FINISHED_STATES = frozenset({PRINTED, FAILED, DENIED, CANCELLED, EXPIRED})

#: Report kinds, one per provider→server report command.
REPORT_KINDS = ("printed", "failed", "cancelled")

_FORMAT = 1


class SpoolFull(Exception):
    """A document would take the spool over its quota."""


@attrs.frozen
class SpooledJob:
    """One job at the provider: what it is, and what has been decided about it."""

    uuid: str
    ipp_id: int
    queue: str
    printer: str
    owner: str
    title: str
    document_format: str
    size: int
    pages: int
    copies: int
    colour: bool
    duplex: bool
    submitted_at: float
    state: str = PENDING
    reason: str = ""
    # The server's absolute expiry time for a held job (0: not known).
    expires_at: float = 0.0
    # Set when the job is to be printed: the release id reports quote, and where to.
    release_id: str = ""
    target: str = ""
    target_uri: str = ""
    # False for a job printed while offline under the "print-untracked" policy.
    tracked: bool = True
    # When the job reached its current state (for expiry of finished records).
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        """Whether the document is still spooled."""
        return self.state in ACTIVE_STATES

    def to_json(self) -> dict[str, Any]:
        """The record as stored in job.json."""
        return {"format": _FORMAT, **attrs.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpooledJob:
        """Read a job.json record (unknown keys from a newer version are ignored)."""
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@attrs.frozen
class Report:
    """A report to the server (``printed``, ``failed`` or ``cancelled``), kept until
    the server acknowledges it. ``job`` holds the job's details (for ``printed``)."""

    seq: int
    kind: str
    job: SpooledJob
    release_id: str
    printer: str = ""
    reason: str = ""
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as stored in reports/<seq>.json."""
        return {
            "format": _FORMAT,
            "seq": self.seq,
            "kind": self.kind,
            "job": self.job.to_json(),
            "release_id": self.release_id,
            "printer": self.printer,
            "reason": self.reason,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """Read a stored report."""
        if data.get("kind") not in REPORT_KINDS:
            raise ValueError(f"unknown report kind {data.get('kind')!r}")
        return cls(
            seq=int(data["seq"]),
            kind=data["kind"],
            job=SpooledJob.from_json(data["job"]),
            release_id=str(data["release_id"]),
            printer=str(data.get("printer", "")),
            reason=str(data.get("reason", "")),
            at=float(data.get("at", 0.0)),
        )


# -- blocking file operations (run on the IO thread) ------------------------------------


def write_json_atomically(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path``: a temporary file, fsync, rename, fsync the dir."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_document(source: BinaryIO, offset: int, incoming: str, limit: int | None) -> int:
    """Copy ``source`` from ``offset`` to the file ``incoming``, fsynced; return its size."""
    source.seek(offset)
    size = 0
    with open(incoming, "wb") as out:
        while True:
            chunk = source.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if limit is not None and size > limit:
                raise SpoolFull(f"the document is larger than the {limit} bytes reserved")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return size


class Spool:
    """Jobs and reports on disk, with an in-memory index used on the reactor thread."""

    def __init__(
        self,
        directory: str,
        quota: int,
        run: Runner,
        *,
        keep_finished: float = 86400.0,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.quota = quota
        self.keep_finished = keep_finished
        #: Runs blocking file operations on the IO thread, in order.
        self.run = run
        self.jobs: dict[str, SpooledJob] = {}
        self.reports: dict[int, Report] = {}
        self._next_ipp_id = 1
        self._next_seq = 1
        self._reserved = 0

    # -- paths --------------------------------------------------------------------------

    @property
    def jobs_dir(self) -> str:
        """Where job directories are."""
        return os.path.join(self.directory, "jobs")

    @property
    def reports_dir(self) -> str:
        """Where unacknowledged reports are."""
        return os.path.join(self.directory, "reports")

    @property
    def incoming_dir(self) -> str:
        """Where documents are copied before they become a job."""
        return os.path.join(self.directory, "incoming")

    def job_dir(self, uuid: str) -> str:
        """The directory of one job."""
        return os.path.join(self.jobs_dir, uuid)

    def document_path(self, uuid: str) -> str:
        """The spooled document of one job."""
        return os.path.join(self.job_dir(uuid), "document")

    # -- start-up -----------------------------------------------------------------------

    def load(self) -> None:
        """Create the directories and read back jobs and reports (blocking; start-up only).

        Leftovers of an interrupted copy are removed; a job directory without a readable
        record, or an active job whose document is missing, is removed with a warning.
        A job being released for which a ``printed`` or ``failed`` report is already
        stored finished before the restart and is marked so (never delivered twice).
        """
        for path in (self.jobs_dir, self.reports_dir, self.incoming_dir):
            os.makedirs(path, exist_ok=True)
        for name in os.listdir(self.incoming_dir):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.incoming_dir, name))
        self._load_state()
        self._load_reports()
        self._load_jobs()

    def _load_state(self) -> None:
        try:
            with open(os.path.join(self.directory, "state.json"), encoding="utf-8") as f:
                self._next_ipp_id = max(1, int(json.load(f).get("next_ipp_id", 1)))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as e:
            log.warn("spool state unreadable ({error}); IPP job ids restart", error=e)

    def _load_reports(self) -> None:
        for name in sorted(os.listdir(self.reports_dir)):
            path = os.path.join(self.reports_dir, name)
            if name.startswith(".tmp-"):
                os.unlink(path)
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    report = Report.from_json(json.load(f))
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.error("unreadable report {path} ignored: {error}", path=path, error=e)
                continue
            self.reports[report.seq] = report
            self._next_seq = max(self._next_seq, report.seq + 1)

    def _load_jobs(self) -> None:
        reported = {(r.job.uuid, r.release_id): r for r in self.reports.values()}
        for uuid in sorted(os.listdir(self.jobs_dir)):
            directory = self.job_dir(uuid)
            try:
                with open(os.path.join(directory, "job.json"), encoding="utf-8") as f:
                    job = SpooledJob.from_json(json.load(f))
            except (OSError, ValueError, TypeError) as e:
                log.warn(
                    "removing spooled job {uuid}: no usable record ({error})", uuid=uuid, error=e
                )
                shutil.rmtree(directory, ignore_errors=True)
                continue
            if job.active and not os.path.exists(self.document_path(uuid)):
                log.warn("removing spooled job {uuid}: its document is missing", uuid=uuid)
                shutil.rmtree(directory, ignore_errors=True)
                continue
            report = reported.get((job.uuid, job.release_id))
            if job.state == RELEASING and report is not None and report.kind != "cancelled":
                # Delivered (or given up) just before the restart: finish, never redeliver.
                job = attrs.evolve(job, state=PRINTED if report.kind == "printed" else FAILED)
                self._finish_files(job)
            self.jobs[uuid] = job
            self._next_ipp_id = max(self._next_ipp_id, job.ipp_id + 1)

    # -- quota --------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes of spooled documents, plus those being copied in."""
        return sum(j.size for j in self.jobs.values() if j.active) + self._reserved

    def has_room(self, size: int) -> bool:
        """Whether a document of ``size`` bytes fits under the quota now."""
        return self.used + size <= self.quota

    @property
    def full(self) -> bool:
        """Whether the spool is at (or over) its quota."""
        return self.used >= self.quota

    # -- jobs ---------------------------------------------------------------------------

    def allocate_ipp_id(self) -> int:
        """The next IPP job id (persisted with the next job record)."""
        ipp_id = self._next_ipp_id
        self._next_ipp_id += 1
        return ipp_id

    def by_ipp_id(self, ipp_id: int) -> SpooledJob | None:
        """The job with this IPP job id, or None."""
        for job in self.jobs.values():
            if job.ipp_id == ipp_id:
                return job
        return None

    def active_jobs(self) -> list[SpooledJob]:
        """Jobs whose document is spooled, oldest first."""
        return sorted((j for j in self.jobs.values() if j.active), key=lambda j: j.ipp_id)

    async def add(self, job: SpooledJob, source: BinaryIO, offset: int, size: int) -> SpooledJob:
        """Spool the document (``size`` bytes of ``source`` from ``offset``) and the record.

        Raises `SpoolFull` if the document does not fit under the quota.
        """
        if not self.has_room(size):
            raise SpoolFull(
                f"the spool is full ({self.used} of {self.quota} bytes used; "
                f"the document has {size})"
            )
        self._reserved += size
        try:
            stored = await self.run(self._thdAdd, job, source, offset, size, self._next_ipp_id)
        finally:
            self._reserved -= size
        self.jobs[job.uuid] = stored
        return stored

    def _thdAdd(
        self, job: SpooledJob, source: BinaryIO, offset: int, size: int, next_id: int
    ) -> SpooledJob:
        incoming = os.path.join(self.incoming_dir, job.uuid)
        try:
            copied = _copy_document(source, offset, incoming, size)
            os.makedirs(self.job_dir(job.uuid))
            os.replace(incoming, self.document_path(job.uuid))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(incoming)
            shutil.rmtree(self.job_dir(job.uuid), ignore_errors=True)
            raise
        stored = attrs.evolve(job, size=copied)
        write_json_atomically(os.path.join(self.job_dir(job.uuid), "job.json"), stored.to_json())
        write_json_atomically(os.path.join(self.directory, "state.json"), {"next_ipp_id": next_id})
        return stored

    async def update(self, job: SpooledJob) -> SpooledJob:
        """Store a changed record of an active job (its state, release, expiry)."""
        self.jobs[job.uuid] = job
        await self.run(self._thdWriteJob, job)
        return job

    def _thdWriteJob(self, job: SpooledJob) -> None:
        if os.path.isdir(self.job_dir(job.uuid)):
            write_json_atomically(os.path.join(self.job_dir(job.uuid), "job.json"), job.to_json())

    async def finish(self, job: SpooledJob) -> SpooledJob:
        """Record that ``job`` is over (its state is one of FINISHED_STATES) and delete
        its document; the record stays for ``keep_finished`` seconds."""
        if job.state not in FINISHED_STATES:
            raise ValueError(f"{job.state!r} is not a finished state")
        self.jobs[job.uuid] = job
        await self.run(self._finish_files, job)
        return job

    def _finish_files(self, job: SpooledJob) -> None:
        if not os.path.isdir(self.job_dir(job.uuid)):
            return
        write_json_atomically(os.path.join(self.job_dir(job.uuid), "job.json"), job.to_json())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.document_path(job.uuid))

    async def remove(self, uuid: str) -> None:
        """Forget a job altogether (its directory is deleted)."""
        self.jobs.pop(uuid, None)
        await self.run(shutil.rmtree, self.job_dir(uuid), True)

    def expired(self, now: float, max_age: float) -> tuple[list[SpooledJob], list[SpooledJob]]:
        """(active jobs spooled more than ``max_age`` ago, finished records past keeping)."""
        stale = [j for j in self.active_jobs() if now - j.submitted_at > max_age]
        done = [
            j
            for j in self.jobs.values()
            if not j.active and now - j.updated_at > self.keep_finished
        ]
        return stale, done

    # -- reports ------------------------------------------------------------------------

    async def add_report(
        self,
        kind: str,
        job: SpooledJob,
        *,
        printer: str = "",
        reason: str = "",
        at: float = 0.0,
    ) -> Report:
        """Store a report until the server acknowledges it (`remove_report`)."""
        if kind not in REPORT_KINDS:
            raise ValueError(f"unknown report kind {kind!r}")
        report = Report(
            seq=self._next_seq,
            kind=kind,
            job=job,
            release_id=job.release_id,
            printer=printer,
            reason=reason,
            at=at,
        )
        self._next_seq += 1
        self.reports[report.seq] = report
        await self.run(write_json_atomically, self._report_path(report.seq), report.to_json())
        return report

    async def remove_report(self, report: Report) -> None:
        """The server acknowledged ``report``: forget it."""
        self.reports.pop(report.seq, None)
        await self.run(self._thdUnlink, self._report_path(report.seq))

    def pending_reports(self) -> list[Report]:
        """Unacknowledged reports, oldest first."""
        return [self.reports[seq] for seq in sorted(self.reports)]

    def _report_path(self, seq: int) -> str:
        return os.path.join(self.reports_dir, f"{seq:012d}.json")

    @staticmethod
    def _thdUnlink(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
