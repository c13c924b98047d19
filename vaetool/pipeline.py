"""The streaming batch engine behind `vaetool encode` (and any command that maps files to files).

    jobs ──► loader threads (decode files, bounded look-ahead) ──► size buckets ──► compute (this
    thread, equal-size batches) ──► writer thread (atomic writes) ──► events / Summary

Loading and writing overlap with compute; the order of batches depends only on the order and
sizes of the jobs, never on thread timing, so a run is deterministic. A job whose file cannot be
read or written fails alone (reported with its reason) unless `fail_fast`; an output row that
holds NaN/inf fails its job (the compute stage redoes half-precision batches in fp32 first, with
vaetool.precision.Fp32Fallback). The engine knows nothing of models: `Stages` are plain functions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from vaetool.errors import OutputError, VaeToolError

# Exceptions that fail one job (a bad file, a failed write); anything else is a bug and propagates.
ITEM_ERRORS: tuple[type[BaseException], ...] = (VaeToolError, OSError)


class LostWrites(OutputError):
    """A write failure that also lost writes already reported done (the queued items of a shard)."""

    def __init__(self, problem: str, path: str | Path | None, jobs: Sequence[Job]) -> None:
        super().__init__(problem, path)
        self.jobs = tuple(jobs)


class AlreadyWritten(Exception):
    """Raised by a write stage whose output another process wrote meanwhile, with this run's settings: "skipped"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One unit of work: a stable key (the input's relative path), its source and its output."""

    key: str
    source: Path
    output: Path | None = None


J = TypeVar("J", bound=Job)


@dataclass
class Loaded:
    """What a loader returns for one job: the tensor to batch ([C, H, W]) and facts for the writer."""

    tensor: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A job that failed, and why (one line)."""

    key: str
    source: str
    reason: str


@dataclass(frozen=True)
class Event:
    """Progress of one job: kind is "done", "skipped" or "failed"; `result` is what the writer returned.

    `reason`: why it failed, or for a skip found at write time why (e.g. "written by another run").

    `retracted`: a "failed" event for a job already reported "done" (its output was lost later).
    """

    kind: str
    job: Job
    reason: str | None = None
    result: Any = None
    retracted: bool = False


@dataclass
class Summary:
    """What a run did: counts, failures, fp32 redos, wall and compute time."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    fp32_retries: int = 0
    batches: int = 0
    stopped: bool = False
    seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Throughput of the jobs done, over the whole wall time."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for --json."""
        out = asdict(self)
        out["failed"] = [asdict(f) for f in self.failed]
        out["images_per_s"] = round(self.images_per_s, 3)
        out["seconds"] = round(self.seconds, 3)
        out["compute_seconds"] = round(self.compute_seconds, 3)
        return out


@dataclass(frozen=True)
class Stages(Generic[J]):
    """The work of a run as plain functions: load (worker threads), compute (caller's thread), write (writer thread)."""

    load: Callable[[J], Loaded]
    compute: Callable[[torch.Tensor, Sequence[J]], torch.Tensor]  # [B, C, H, W] -> [B, ...]
    write: Callable[[J, torch.Tensor, dict[str, Any]], Any]
    skip: Callable[[J], bool] | None = None  # True: the output exists already


@dataclass(frozen=True)
class EngineOptions:
    """Batching, threading and reporting of a run."""

    batch_size: int | Callable[[tuple[int, ...]], int] = 1  # or per item shape [C, H, W]
    workers: int = 2
    prefetch: int | None = None  # jobs loaded ahead (default: enough for two batches)
    max_pending_bytes: int = 1 << 30  # loaded items waiting for their size's batch to fill; then the fullest runs
    max_pending_writes: int = 64
    fail_fast: bool = False
    on_event: Callable[[Event], None] | None = None
    on_notice: Callable[[str], None] | None = None  # one-off notices for the user (e.g. the first fp32 redo)


def describe_error(err: BaseException) -> str:
    """The one-line reason of a job's failure."""
    if isinstance(err, VaeToolError):
        return err.problem
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return f"{type(err).__name__}: {err}"


def non_finite_rows(out: torch.Tensor) -> list[int]:
    """Indices of the batch rows of `out` [B, ...] that hold NaN or inf."""
    finite = torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)  # [B]
    return [int(i) for i in torch.nonzero(~finite).flatten()]


class _Run(Generic[J]):
    """The state of one run (local to `run_pipeline`)."""

    def __init__(self, stages: Stages[J], options: EngineOptions) -> None:
        self.stages, self.options = stages, options
        self.summary = Summary()
        self.buckets: dict[tuple[int, ...], list[tuple[J, Loaded]]] = {}
        self.writes: deque[tuple[J, Future[Any]]] = deque()

    def batch_size(self, shape: tuple[int, ...]) -> int:
        size = self.options.batch_size
        return max(1, size(shape) if callable(size) else size)

    def emit(self, event: Event) -> None:
        if self.options.on_event is not None:
            self.options.on_event(event)

    def fail(self, job: J, reason: str, retracted: bool = False) -> None:
        self.summary.failed.append(Failure(job.key, str(job.source), reason))
        self.summary.stopped = self.summary.stopped or self.options.fail_fast
        self.emit(Event("failed", job, reason, retracted=retracted))

    def add(self, job: J, loaded: Loaded, writer: ThreadPoolExecutor) -> None:
        """Put a loaded job in its size bucket; run the bucket when it is a full batch."""
        shape = tuple(loaded.tensor.shape)
        bucket = self.buckets.setdefault(shape, [])
        bucket.append((job, loaded))
        if len(bucket) >= self.batch_size(shape):
            self.run_batch(self.buckets.pop(shape), writer)

    def flush_largest(self, writer: ThreadPoolExecutor) -> None:
        """Run the fullest bucket as a partial batch (bounds memory when sizes are many)."""
        shape = max(self.buckets, key=lambda s: len(self.buckets[s]))
        self.run_batch(self.buckets.pop(shape), writer)

    def pending_bytes(self) -> int:
        return sum(loaded.tensor.nbytes for bucket in self.buckets.values() for _, loaded in bucket)

    def compute(self, batch: torch.Tensor, jobs: Sequence[J]) -> torch.Tensor:
        """The model call (timed)."""
        start = time.perf_counter()
        out = self.stages.compute(batch, jobs).cpu()  # [B, ...]
        self.summary.compute_seconds += time.perf_counter() - start
        self.summary.batches += 1
        return out

    def run_batch(self, items: list[tuple[J, Loaded]], writer: ThreadPoolExecutor) -> None:
        jobs = [job for job, _ in items]
        batch = torch.stack([loaded.tensor for _, loaded in items])  # [B, C, H, W]
        try:
            out = self.compute(batch, jobs)
        except VaeToolError as err:  # e.g. too big for the memory budget even tiled: these jobs fail, the run goes on
            for job in jobs:
                self.fail(job, describe_error(err))
            return
        bad = set(non_finite_rows(out))
        for i, (job, loaded) in enumerate(items):
            if i in bad:
                self.fail(job, "the model's output has NaN/inf values")
                continue
            self.writes.append((job, writer.submit(self.stages.write, job, out[i].clone(), loaded.info)))
        self.collect_writes(block_over=self.options.max_pending_writes)

    def collect_writes(self, block_over: int) -> None:
        """Report finished writes in order; wait while more than `block_over` are in flight."""
        while self.writes and (self.writes[0][1].done() or len(self.writes) > block_over):
            job, fut = self.writes.popleft()
            try:
                result = fut.result()
            except AlreadyWritten as skip:  # another run wrote the same output meanwhile
                self.summary.skipped += 1
                self.emit(Event("skipped", job, skip.reason))
                continue
            except ITEM_ERRORS as err:
                reason = f"cannot write output: {describe_error(err).removeprefix('cannot write: ')}"
                for lost in err.jobs if isinstance(err, LostWrites) else ():
                    self.summary.done -= 1
                    self.fail(lost, reason, retracted=True)  # type: ignore[arg-type]
                self.fail(job, reason)
                continue
            self.summary.done += 1
            self.emit(Event("done", job, result=result))


def run_pipeline(jobs: Iterable[J], stages: Stages[J], options: EngineOptions | None = None) -> Summary:
    """Load, batch by size, compute and write every job; bad jobs fail alone (or stop with fail_fast)."""
    options = options or EngineOptions()
    run = _Run(stages, options)
    summary = run.summary
    fixed = options.batch_size if isinstance(options.batch_size, int) else 8
    prefetch = options.prefetch or max(2 * fixed, 2 * options.workers, 4)
    start = time.perf_counter()
    source = iter(jobs)
    window: deque[tuple[J, Future[Loaded]]] = deque()
    loader = ThreadPoolExecutor(max(1, options.workers), thread_name_prefix="vaetool-load")
    writer = ThreadPoolExecutor(1, thread_name_prefix="vaetool-write")

    def refill() -> None:
        while len(window) < prefetch and not summary.stopped:
            job = next(source, None)
            if job is None:
                return
            summary.total += 1
            if stages.skip is not None and stages.skip(job):
                summary.skipped += 1
                run.emit(Event("skipped", job))
                continue
            window.append((job, loader.submit(stages.load, job)))

    try:
        refill()
        while window and not summary.stopped:
            job, fut = window.popleft()
            refill()
            try:
                loaded = fut.result()
            except ITEM_ERRORS as err:
                run.fail(job, describe_error(err))
                continue
            run.add(job, loaded, writer)
            while len(run.buckets) > 1 and run.pending_bytes() > options.max_pending_bytes:  # many sizes: partial batches
                run.flush_largest(writer)
        while run.buckets and not summary.stopped:
            run.run_batch(run.buckets.pop(next(iter(run.buckets))), writer)
    finally:
        for _, fut in window:
            fut.cancel()
        loader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)  # writes in flight finish: atomic files, never partial ones
        run.collect_writes(block_over=0)
        summary.seconds = time.perf_counter() - start
    return summary
