"""Round trips: images -> latents -> images in memory, with metrics and golden checks.

Every image is encoded (posterior mode) and decoded in batches of equal size through the streaming
engine, cropped back to its size and written as an 8-bit PNG under the output folder (the input
tree mirrored, always replaced: the outputs are this run's measurements). PSNR, SSIM and max abs
diff against the input are computed on the 8-bit images as written. With a golden folder each
output is compared with its stored golden against the thresholds, a failure gets a heatmap under
OUT/heatmaps/, and `update_golden` (re)writes the goldens instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vaetool.errors import printable
from vaetool.golden import NO_THRESHOLDS, GoldenResult, Status, Thresholds
from vaetool.jobs.common import RunOptions, engine_options, model_text, png_text, prepare_output
from vaetool.jobs.encode import EncodeSettings, image_loader, latents_of
from vaetool.metrics import ImageMetrics
from vaetool.pipeline import Event, Job, Loaded, Stages, Summary, run_pipeline
from vaetool.precision import Fp32Fallback
from vaetool.report import Case

if TYPE_CHECKING:
    from vaetool.api import Vae
    from vaetool.io.inputs import InputFile

__all__ = ["ImageResult", "RoundtripSettings", "build_report", "roundtrip_files"]

SUFFIX = ".png"
HEATMAP_DIR = "heatmaps"


@dataclass(frozen=True)
class RoundtripSettings:
    """Where outputs go and what is checked: goldens (compare or update), thresholds."""

    out_dir: Path
    golden: Path | None = None
    update_golden: bool = False
    thresholds: Thresholds = NO_THRESHOLDS  # against the golden with --golden, else against the input
    force: bool = False  # with update_golden: rewrite goldens that still pass too


@dataclass
class ImageResult:
    """What happened to one image: its output, metrics against the input, and its golden check."""

    key: str
    source: Path
    output: Path | None = None
    size: tuple[int, int] | None = None  # (height, width)
    vs_input: ImageMetrics | None = None
    golden: GoldenResult | None = None
    reasons: list[str] = field(default_factory=list)  # broken limits (against the golden, or the input)
    limits: list[str] = field(default_factory=list)  # their names: psnr, ssim, max_diff
    heatmap: Path | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        """error, failed, missing (no golden), updated, unchanged, passed (limits checked) or ok (nothing to check)."""
        if self.error is not None:
            return "error"
        if self.golden is not None and self.golden.status is not Status.passed:
            return self.golden.status.value
        if self.reasons:
            return "failed"
        return "passed" if self.golden is not None else "ok"

    @property
    def ok(self) -> bool:
        """False for errors, regressions and missing goldens."""
        return self.status in ("passed", "updated", "unchanged", "ok")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as printable strings, infinite PSNR as null)."""
        g = self.golden
        return {
            "image": printable(self.key),
            "source": printable(self.source),
            "output": None if self.output is None else printable(self.output),
            "height": None if self.size is None else self.size[0],
            "width": None if self.size is None else self.size[1],
            "status": self.status,
            "vs_input": None if self.vs_input is None else self.vs_input.as_dict(),
            "vs_golden": None if g is None or g.metrics is None else g.metrics.as_dict(),
            "golden": None if g is None else printable(g.golden),
            "reasons": self.reasons,
            "limits_broken": self.limits,
            "heatmap": None if self.heatmap is None else printable(self.heatmap),
            "error": self.error,
        }

    def case(self) -> Case:
        """The JUnit test case of this image."""
        details = {k: v for k, v in self.as_dict().items() if k not in ("image", "reasons", "limits_broken", "error")}
        failed = self.status in ("failed", "missing")
        failures = tuple(self.reasons) if failed else ()
        return Case(printable(self.key), failures=failures, error=self.error, output=json.dumps(details, indent=2))


def _reference_loader(vae: Vae, settings: RoundtripSettings) -> Callable[[Job], Loaded]:
    """The load stage of encode (read, pad to the downscale), plus the input as 8-bit pixels for the metrics."""
    from vaetool.io.images import crop_to, to_uint8

    load_padded = image_loader(EncodeSettings(out_dir=settings.out_dir), vae.downscale)

    def load(job: Job) -> Loaded:
        loaded = load_padded(job)
        h, w = loaded.info["original_size"]
        loaded.info["reference"] = to_uint8(crop_to(loaded.tensor, (h, w)))  # [h, w, 3] uint8
        return loaded

    return load


def roundtrip_stages(vae: Vae, settings: RoundtripSettings, run: RunOptions, fallback: Fp32Fallback) -> Stages[Job]:
    """load: read and pad; compute: encode (posterior mode) then decode; write: PNG, metrics, golden check."""
    from vaetool import golden
    from vaetool.io.images import crop_to, save_png, to_uint8
    from vaetool.metrics import compare

    mode = EncodeSettings(out_dir=settings.out_dir)  # the posterior mode, raw

    def compute(images: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        keys = [j.key for j in jobs]
        latents = fallback(lambda v: latents_of(v, images, keys, mode, run), "an encoder batch")  # [B, C, h, w]
        return fallback(lambda v: v.decode(latents, tiling=run.tiling, clamp=False).float(), "a decoder batch")  # [B, 3, H, W]

    def write(job: Job, image: torch.Tensor, info: dict[str, Any]) -> ImageResult:
        h, w = info["original_size"]
        decoded = crop_to(image, (h, w))  # [3, h, w]
        pixels = to_uint8(decoded)  # [h, w, 3], exactly what the PNG holds
        output = Path(str(job.output))
        text = png_text(vae, str(job.source), **{"vaetool.roundtrip": "encode (posterior mode), decode"})
        save_png(output, decoded, bits=8, text=text, overwrite=True)
        result = ImageResult(job.key, job.source, output, (h, w), compare(pixels, info["reference"]))
        reference = info["reference"]
        out_rel = output.relative_to(settings.out_dir)  # cat.png, or cat.jpg.png when cat.png is an input too
        if settings.golden is not None:
            target = golden.golden_path(settings.golden, out_rel)
            if settings.update_golden:
                result.golden = golden.update(pixels, target, text, settings.thresholds, force=settings.force)
            else:
                result.golden = golden.check(pixels, target, settings.thresholds)
            result.reasons, result.limits, reference = result.golden.reasons, result.golden.broken, result.golden.reference
        else:
            broken = settings.thresholds.broken(result.vs_input)
            result.reasons, result.limits = list(broken.values()), list(broken)
        heat = settings.out_dir / HEATMAP_DIR / out_rel
        if result.status == "failed" and reference is not None and reference.shape == pixels.shape:
            against = "golden" if settings.golden is not None else "input"
            result.heatmap = golden.write_heatmap(heat, pixels, reference, {"vaetool.source": str(job.source), "vaetool.against": against})
        elif result.ok:
            heat.unlink(missing_ok=True)  # a heatmap of an earlier failed run no longer applies
        return result

    return Stages(load=_reference_loader(vae, settings), compute=compute, write=write)


def roundtrip_files(
    vae: Vae, files: Sequence[InputFile], settings: RoundtripSettings, run: RunOptions | None = None
) -> tuple[list[ImageResult], Summary]:
    """Round-trip every image; results in input order (images that could not be processed carry their error)."""
    from vaetool.io.inputs import output_path

    jobs = [Job(f.rel.as_posix(), f.path, output_path(f, settings.out_dir, SUFFIX)) for f in files]
    return roundtrip_jobs(vae, jobs, settings, run)


def roundtrip_jobs(
    vae: Vae, jobs: Iterable[Job], settings: RoundtripSettings, run: RunOptions | None = None
) -> tuple[list[ImageResult], Summary]:
    """Round-trip the images of jobs (files, or tar samples read lazily); results in the order the jobs came."""
    run = run or RunOptions()
    prepare_output(settings.out_dir)  # before any image is round-tripped
    done: dict[str, ImageResult] = {}
    order: list[tuple[str, Path]] = []  # (key, source) of every job, kept without the job (a tar sample holds its bytes)

    def on_event(event: Event) -> None:
        if event.kind == "done":
            done[event.job.key] = event.result
        if run.on_event is not None:
            run.on_event(event)

    def noted(source: Iterable[Job]) -> Iterator[Job]:
        for job in source:
            order.append((job.key, job.source))
            yield job

    fallback = Fp32Fallback(vae, run.on_notice)
    engine = replace(engine_options(vae, "decode", run, latent_items=False), on_event=on_event)
    summary = run_pipeline(noted(jobs), roundtrip_stages(vae, settings, run, fallback), engine)
    summary.fp32_retries = fallback.retries
    failed = {f.key: f.reason for f in summary.failed}
    results = []
    for key, source in order:
        if key in done:
            results.append(done[key])
        elif key in failed:
            results.append(ImageResult(key, source, error=f"{printable(source)}: {failed[key]}"))
    return results, summary


def build_report(vae: Vae, results: Sequence[ImageResult], settings: RoundtripSettings, summary: Summary) -> dict[str, Any]:
    """The JSON report: model, settings, every image, overall figures, counts and the verdict."""
    from vaetool import __version__
    from vaetool.metrics import pooled

    golden_metrics = [r.golden.metrics for r in results if r.golden is not None and r.golden.metrics is not None]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "vaetool_version": __version__,
        "model": json.loads(model_text(vae)),
        "dtype": str(vae.dtype).removeprefix("torch."),
        "device": str(vae.device),
        "golden": None if settings.golden is None else str(settings.golden),
        "update_golden": settings.update_golden,
        "thresholds": settings.thresholds.as_dict(),
        "thresholds_against": "golden" if settings.golden is not None else "input",
        "images": [r.as_dict() for r in results],
        "overall": {
            "vs_input": pooled([r.vs_input for r in results if r.vs_input is not None]),
            "vs_golden": pooled(golden_metrics) if settings.golden is not None else None,  # with --update-golden: as stored before
        },
        "counts": dict(sorted(counts.items())),
        "passed": all(r.ok for r in results) and not summary.stopped,
        "seconds": round(summary.seconds, 3),
    }
