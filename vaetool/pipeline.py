"""The streaming batch engine behind `vaetool encode` (and any command that maps files to files).

    jobs ──► loader threads (decode files, bounded look-ahead) ──► size buckets ──► compute (this
    thread, equal-size batches) ──► writer thread (atomic writes) ──► events / Summary

Loading and writing overlap with compute; the order of batches depends only on the order and
sizes of the jobs, never on thread timing, so a run is deterministic. A job whose file cannot be
read or written fails alone (reported with its reason) unless `fail_fast`; a batch whose
half-precision output holds NaN/inf is redone once with the fp32 `fallback`.
"""

from __future__ import annotations

import copy
import importlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from vaetool.errors import OutputError, VaeToolError

if TYPE_CHECKING:
    from vaetool.api import Vae

# Exceptions that fail one job (a bad file, a failed write); anything else is a bug and propagates.
ITEM_ERRORS: tuple[type[BaseException], ...] = (VaeToolError, OSError)


class LostWrites(OutputError):
    """A write failure that also lost writes already reported done (the queued items of a shard)."""

    def __init__(self, problem: str, path: str | Path | None, jobs: Sequence[Job]) -> None:
        super().__init__(problem, path)
        self.jobs = tuple(jobs)


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
    fallback: Callable[[torch.Tensor, Sequence[J]], torch.Tensor] | None = None  # fp32 redo of a non-finite batch
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
    on_notice: Callable[[str], None] | None = None  # one-off notices, e.g. the first fp32 redo


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
        self.noticed = False

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
        """The model call, redone with the fp32 fallback when the output is not finite."""
        start = time.perf_counter()
        out = self.stages.compute(batch, jobs).cpu()  # [B, ...]
        if self.stages.fallback is not None and non_finite_rows(out):
            if not self.noticed and self.options.on_notice is not None:
                self.options.on_notice(
                    "NaN/inf in a half-precision batch: redoing it in fp32 (and any later such batch; counted as fp32_retries)"
                )
            self.noticed = True
            self.summary.fp32_retries += 1
            out = self.stages.fallback(batch, jobs).cpu()
        self.summary.compute_seconds += time.perf_counter() - start
        self.summary.batches += 1
        return out

    def run_batch(self, items: list[tuple[J, Loaded]], writer: ThreadPoolExecutor) -> None:
        jobs = [job for job, _ in items]
        batch = torch.stack([loaded.tensor for _, loaded in items])  # [B, C, H, W]
        out = self.compute(batch, jobs)
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
            except ITEM_ERRORS as err:
                reason = f"cannot write output: {describe_error(err)}"
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



# ---------------------------------------------------------------- model-side helpers: precision, tiling, batch size

HALF_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_BATCH_SIZE = 4  # when neither --batch-size nor the memory planner decides
MAX_AUTO_BATCH = 16  # the most images per batch the planner is asked for
MomentsFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images [B, 3, H, W] -> (mean, logvar)
# --tile mode -> (module, function) of the tiled encoder; each returns moments [B, 2C, h, w]
TILED_ENCODERS: dict[str, tuple[str, str]] = {
    "exact": ("vaetool.tiling.exact", "encode_exact"),
    "fast": ("vaetool.tiling.fast", "encode_fast"),
}


def fp32_copy(vae: Vae) -> Vae:
    """The same VAE with float32 weights (a separate copy: the half-precision one stays as it is)."""
    from vaetool.api import Vae as VaeClass

    return VaeClass(copy.deepcopy(vae.model).float(), vae.latent_format, dict(vae.source))


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments [B, 2C, h, w] -> (mean, logvar clamped like Vae.moments), each [B, C, h, w]."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def memory_plan(vae: Vae, op: str, height: int, width: int, batch: int, max_memory: str | None) -> Any:
    """The memory planner's plan for an op (None when this installation has no planner)."""
    try:
        from vaetool.memory import plan
    except ImportError:
        return None
    return plan(vae, op, height, width, batch, vae.dtype, max_memory, vae.device, mode="exact")


def encoder_moments(tile: str, tile_size: int | None = None, max_memory: str | None = None) -> Callable[[Vae], MomentsFn]:
    """Posterior moments of a batch: untiled ("off"), tiled ("exact"/"fast"), or tiled only when the planner says so ("auto")."""

    def make(vae: Vae) -> MomentsFn:
        if tile == "off":
            return vae.moments

        @torch.inference_mode()
        def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mode, size = tile, tile_size
            if tile == "auto":
                planned = memory_plan(vae, "encode", images.shape[-2], images.shape[-1], images.shape[0], max_memory)
                if planned is None or planned.fits_untiled:
                    return vae.moments(images)
                mode, size = "exact", size or planned.tile
            module, name = TILED_ENCODERS[mode]
            encode = getattr(importlib.import_module(module), name)
            return split_moments(encode(vae.model, images, **({} if size is None else {"tile": size})))

        return run

    return make


def planned_batch_size(vae: Vae, op: str, batch_size: int | None, max_memory: str | None) -> int | Callable[[tuple[int, ...]], int]:
    """`batch_size` when given, else per item shape [C, H, W] the planner's batch size (at most MAX_AUTO_BATCH)."""
    if batch_size is not None:
        return batch_size
    planned: dict[tuple[int, ...], int] = {}

    def size(shape: tuple[int, ...]) -> int:
        if shape not in planned:
            p = memory_plan(vae, op, shape[-2], shape[-1], MAX_AUTO_BATCH, max_memory)
            planned[shape] = DEFAULT_BATCH_SIZE if p is None else max(1, p.batch_size)
        return planned[shape]

    return size
