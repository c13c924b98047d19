"""vaetool vs diffusers on CUDA, in one process: time, peak memory, and the planner's estimate against the measured peak.

An SD-sized AutoencoderKL (diffusers' class, SD 1.x config, torch.manual_seed(0)) is saved as a
diffusers-layout .safetensors and loaded by both: diffusers (load_state_dict) and vaetool
(`load_vae(checkpoint=FILE, family="sd1")`). For each op (decode, encode), dtype (fp16, bf16,
fp32), size (512/1024/2048 px) and attention backend (sdpa; xformers when installed) it runs,
alternating which goes first, a warm-up and --repeats timed calls (torch.cuda.synchronize around
each; median) of
  untiled: vaetool (Tiling("off")) vs diffusers (.decode(z).sample / .encode(x).latent_dist.mode()),
  tiled:   vaetool Tiling("exact", T) and Tiling("fast", T) vs diffusers enable_tiling() (T = its
           tile, sample_size 512), for sizes above T,
and prints vaetool/diffusers ratios of the median time and of the peak (below 1: vaetool is
better). The peak is `vaetool.memory.measure_peak` (CUDA: max_memory_allocated above what was
allocated before the call; CPU: peak RSS growth) plus the weights of the coder that runs and the
input, for both tools alike. For each vaetool point the planner's estimate for that call
(memory.estimate_peak untiled, memory.estimate_tile_peak tiled: what memory.plan / tiling.choose
use) is divided by the measured peak (target 1.0-1.15), and the end suggests CONV_WORKSPACE[device]
and SAFETY that would put every point in range.

    python bench/bench_gpu.py --json gpu.json          # CUDA: the full grid (~5-8 min on one H200)
    python bench/bench_gpu.py --smoke                  # CPU (also without CUDA): tiny model, 64 px, fp32

The JSON file is rewritten after every point, so a run stopped by --max-seconds keeps its rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's vaetool, not an installed one
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_diffusers import SD_CONFIG, TINY_CONFIG, make_weights

from vaetool import memory, memory_estimate
from vaetool.api import Vae, load_vae
from vaetool.nn import attention as vattn
from vaetool.tiling import Tiling

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FULL = {"config": SD_CONFIG | {"sample_size": 512}, "sizes": [512, 1024, 2048], "dtypes": ["fp16", "bf16", "fp32"], "repeats": 3}
SMOKE = {"config": TINY_CONFIG | {"sample_size": 32}, "sizes": [64], "dtypes": ["fp32"], "repeats": 2}
# rough seconds per megapixel of one decode call on an H200 (encode about half), for the up-front runtime estimate
SECONDS_PER_MP = {"fp16": 0.05, "bf16": 0.05, "fp32": 0.15}
TILED_COST = {"exact": 6.0, "fast": 1.5, "diffusers": 1.5}  # cost of a tiled call relative to an untiled one (guess)
TARGET = (1.0, 1.15)


def fmt_mib(n: float | None) -> str:
    """MiB with no decimals, or '-' when not measured."""
    return "-" if n is None else f"{n / 2**20:.0f}"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_pair(weights: Path, config: dict, device: torch.device, dtype: torch.dtype) -> tuple[Vae, Any]:
    """The same weights in vaetool and in diffusers, on `device` in `dtype`."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = load_vae(checkpoint=weights, family="sd1").to(device, dtype)
    dif = AutoencoderKL(**config)
    dif.load_state_dict(load_file(str(weights)))
    dif.eval().requires_grad_(False).to(device, dtype)
    return vae, dif


def set_diffusers_attention(dif: Any, name: str) -> None:
    """diffusers' own processor for a vaetool backend name: sdpa (AttnProcessor2_0) or xformers."""
    from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor

    dif.set_attn_processor({"sdpa": AttnProcessor2_0, "xformers": XFormersAttnProcessor}[name]())


Calls = dict[str, Callable[[], torch.Tensor]]


def runners(vae: Vae, dif: Any, op: str, group: str, tile: int, attention: str, data: torch.Tensor) -> Calls:
    """The calls compared at one point: name -> fn() returning the output ([B, 3, H, W] or the latent mean)."""

    def vaetool_call(tiling: Tiling) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with vattn.use_attention(attention):
                if op == "decode":
                    return vae.decode(data, tiling=tiling, clamp=False)
                return vae.moments(data, tiling=tiling)[0]

        return call

    def diffusers_call(tiled: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            dif.enable_tiling() if tiled else dif.disable_tiling()
            with torch.inference_mode():
                if op == "decode":
                    return dif.decode(data).sample
                return dif.encode(data).latent_dist.mode()

        return call

    if group == "untiled":
        return {"vaetool": vaetool_call(Tiling("off")), "diffusers": diffusers_call(False)}
    return {"vaetool-exact": vaetool_call(Tiling("exact", tile_size=tile)), "vaetool-fast": vaetool_call(Tiling("fast", tile_size=tile)),
            "diffusers-tiled": diffusers_call(True)}  # fmt: skip


def estimate(arch: memory_estimate.Arch, row: dict[str, Any], device: torch.device) -> int:
    """The planner's estimate for the call of a vaetool row (untiled: estimate_peak; tiled: estimate_tile_peak)."""
    dtype, size = DTYPES[row["dtype"]], row["size"]
    kw = {"device": device, "attention": row["attention"]}
    if row["mode"] == "off":
        return memory.estimate_peak(arch, row["op"], size, size, 1, dtype, **kw)
    return memory.estimate_tile_peak(arch, row["op"], row["tile"], 1, dtype, row["mode"], height=size, width=size, **kw)


def measure(fns: Calls, repeats: int, device: torch.device) -> tuple[dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """Warm every fn up, then `repeats` timed rounds rotating who goes first; each one's first timed call is also peak-measured."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, int | None] = {}
    notes: dict[str, str] = {}
    last: dict[str, torch.Tensor] = {}
    for fn in fns.values():
        fn()  # warm-up: kernels, cudnn heuristics, allocator
    sync(device)
    names = list(fns)
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            out: list[torch.Tensor] = []

            def timed(name: str = name, out: list[torch.Tensor] = out) -> None:
                sync(device)
                start = time.perf_counter()
                out.append(fns[name]())
                sync(device)
                times[name].append(time.perf_counter() - start)

            last.pop(name, None)  # the previous output is not part of this call's peak
            if rep == 0:
                try:
                    peaks[name] = memory.measure_peak(timed, device)
                except RuntimeError as err:  # CPU peak needs Linux /proc; say so and go on
                    peaks[name], notes[name] = None, f"peak not measured: {err}"
                    if not times[name]:
                        timed()
            else:
                timed()
            last[name] = out[0]
    stats = {name: {"times": times[name], "seconds": statistics.median(times[name]), "grown": peaks.get(name), "note": notes.get(name)}
             for name in fns}  # fmt: skip
    return stats, last


def input_for(vae: Vae, op: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Seeded random input of one call: latents [1, C, size/f, size/f] for decode, images [1, 3, size, size] for encode."""
    gen = torch.Generator().manual_seed(size)
    shape = (1, vae.model.embed_dim, size // vae.downscale, size // vae.downscale) if op == "decode" else (1, 3, size, size)
    data = torch.randn(shape, generator=gen)
    return (data if op == "decode" else data.clamp(-1, 1)).to(device, dtype)


def points(opts: argparse.Namespace, tile: int) -> list[tuple[str, str, int, str, str]]:
    """(dtype, op, size, attention, group) in run order: every untiled point first, then the tiled ones above the tile size."""
    return [(dt, op, size, att, group) for group in ("untiled", "tiled") for dt in opts.dtypes for op in opts.ops
            for size in opts.sizes for att in opts.attention if group == "untiled" or size > tile]  # fmt: skip


def point_cost(point: tuple[str, str, int, str, str], repeats: int) -> float:
    """Guessed seconds of one point on an H200 (for the header and the ETA weights)."""
    dt, op, size, _, group = point
    calls = (repeats + 1) * (2 if group == "untiled" else 3)
    factor = 1.0 if group == "untiled" else sum(TILED_COST.values()) / 3
    return calls * factor * SECONDS_PER_MP[dt] * (size / 1000) ** 2 * (0.5 if op == "encode" else 1.0) + 1.0


def write_rows(path: Path | None, rows: list[dict[str, Any]]) -> None:
    """Write the rows atomically (a temp file renamed over the target)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


@contextlib.contextmanager
def patched_workspace(kind: str, value: float) -> Iterator[None]:
    """memory_estimate.CONV_WORKSPACE[kind] set to `value` within the block."""
    old = memory_estimate.CONV_WORKSPACE.get(kind)
    memory_estimate.CONV_WORKSPACE[kind] = value
    try:
        yield
    finally:
        if old is None:
            del memory_estimate.CONV_WORKSPACE[kind]
        else:
            memory_estimate.CONV_WORKSPACE[kind] = old


def suggest(rows: list[dict[str, Any]], arch: memory_estimate.Arch, device: torch.device) -> str:
    """CONV_WORKSPACE[device] and SAFETY that put every measured vaetool point at estimate/measured >= 1.0 with the least spread."""
    cal = [r for r in rows if r.get("estimate") and r.get("measured")]
    if not cal:
        return "no calibration points (peak not measured)"
    best: tuple[float, float, float] | None = None
    for ws in [i / 8 for i in range(0, 25)]:
        with patched_workspace(device.type, ws):
            ratios = [estimate(arch, r, device) / memory_estimate.SAFETY / r["measured"] for r in cal]
        safety = math.ceil(100 / min(ratios)) / 100
        spread = max(ratios) * safety
        if best is None or spread < best[2]:
            best = (ws, safety, spread)
    ws, safety, spread = best  # type: ignore[misc]
    now = [r["estimate_ratio"] for r in cal]
    verdict = "within target" if min(now) >= TARGET[0] and max(now) <= TARGET[1] else "OFF TARGET"
    fits = "within the target" if spread <= TARGET[1] else "still wider than the target: the structure, not only the constants, is off"
    return (f"now: estimate/measured {min(now):.3f}..{max(now):.3f} over {len(cal)} points ({verdict}, target {TARGET[0]}-{TARGET[1]}); "
            f"suggested: CONV_WORKSPACE[{device.type!r}] = {ws}, SAFETY = {safety} -> 1.00..{spread:.3f} ({fits})")  # fmt: skip


def point_rows(
    point: tuple[str, str, int, str, str],
    stats: dict[str, dict[str, Any]],
    outputs: dict[str, torch.Tensor],
    arch: memory_estimate.Arch,
    data: torch.Tensor,
    tile: int,
    device: torch.device,
    repeats: int,
    prefix: str,
) -> list[dict[str, Any]]:
    """One row per tool of a measured point (ratios and the estimate on vaetool's rows); prints vaetool's rows."""
    dt, op, size, att, group = point
    fixed = arch.weights[op] * DTYPES[dt].itemsize + data.numel() * data.element_size()  # resident before the call
    base = stats[next(n for n in stats if n.startswith("diffusers"))]
    base_measured = None if base["grown"] is None else base["grown"] + fixed
    diff = float((outputs["vaetool"].float() - outputs["diffusers"].float()).abs().max()) if group == "untiled" else None
    rows = []
    for name, st in stats.items():
        tool, _, mode = name.partition("-")
        row = {"op": op, "size": size, "dtype": dt, "attention": att, "group": group, "tool": tool,
               "mode": {"": "off", "tiled": "diffusers-tiling"}.get(mode, mode), "tile": None if group == "untiled" else tile,
               "device": device.type, "repeats": repeats} | st  # fmt: skip
        row["measured"] = None if st["grown"] is None else st["grown"] + fixed
        rows.append(row)
        if tool != "vaetool":
            continue
        row["time_ratio"] = st["seconds"] / base["seconds"]
        row["peak_ratio"] = None if row["measured"] is None or not base_measured else row["measured"] / base_measured
        row["estimate"] = estimate(arch, row, device)
        row["estimate_ratio"] = None if row["measured"] is None else row["estimate"] / row["measured"]
        row["max_abs_diff_vs_diffusers"] = diff
        peak = "-" if row["peak_ratio"] is None else f"{row['peak_ratio']:.2f}"
        ratio = row["estimate_ratio"]
        est = "-" if ratio is None else f"{ratio:.3f}" + ("" if TARGET[0] <= ratio <= TARGET[1] else " (off target)")
        print(f"{prefix} {op:6} {size:5} {dt} {att:8} {row['mode']:5}: "
              f"vaetool {st['seconds'] * 1e3:8.1f} ms {fmt_mib(row['measured']):>6} MiB | "
              f"diffusers {base['seconds'] * 1e3:8.1f} ms {fmt_mib(base_measured):>6} MiB | "
              f"ratio time {row['time_ratio']:.2f} peak {peak} | est/meas {est}" + ("" if diff is None else f" | max|diff| {diff:.2e}"),
              flush=True)  # fmt: skip
    return rows


def main() -> None:
    """Parse options, build the weights, run every point, print ratios and the calibration, write --json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 64 px, fp32 (automatic without CUDA)")
    parser.add_argument("--sizes", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--ops", nargs="+", choices=["decode", "encode"], default=["decode", "encode"])
    parser.add_argument("--attention", nargs="+", choices=["sdpa", "xformers"], default=["sdpa", "xformers"])
    parser.add_argument("--repeats", type=int, help="timed calls per tool and point (median); default 3 (smoke: 2)")
    parser.add_argument("--max-seconds", type=float, default=450.0, help="skip the points left after this long (default 450)")
    parser.add_argument("--json", type=Path, help="write every row here (rewritten after each point)")
    opts = parser.parse_args()
    cuda = torch.cuda.is_available() and not opts.smoke
    preset = FULL if cuda else SMOKE
    device = torch.device("cuda" if cuda else "cpu")
    opts.sizes, opts.repeats = opts.sizes or preset["sizes"], opts.repeats or preset["repeats"]
    opts.dtypes = opts.dtypes or preset["dtypes"]
    config, tile = preset["config"], preset["config"]["sample_size"]
    notes = [] if cuda else ["no CUDA (or --smoke): CPU smoke run, tiny config, the figures mean nothing for a GPU"]
    xformers_off = "not installed" if "xformers" not in vattn.BACKENDS else None if cuda else "needs CUDA"
    if "xformers" in opts.attention and xformers_off:
        notes.append(f"xformers skipped: {xformers_off}")
        opts.attention = [a for a in opts.attention if a != "xformers"]
    todo = points(opts, tile)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # not its "keep in float32" advice on every .to(dtype)

    print(f"== bench_gpu: vaetool vs diffusers on {torch.cuda.get_device_name(device) if cuda else 'CPU'} ==")
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, xformers {'yes' if 'xformers' in vattn.BACKENDS else 'no'}; "
        f"model {'SD 1.x AutoencoderKL' if cuda else 'tiny AutoencoderKL'} (random weights, seed 0)"
    )
    if cuda:
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        print(f"TF32: convolutions {tf32[0]}, matmul {tf32[1]} (the same for both tools)")
    print(
        f"sizes {opts.sizes} px, dtypes {opts.dtypes}, ops {opts.ops}, attention {opts.attention}, tiles {tile} px, "
        f"{opts.repeats} timed calls (median) + 1 warm-up per tool and point; {len(todo)} points"
    )
    if cuda:
        guess = sum(point_cost(p, opts.repeats) for p in todo)
        print(f"estimated total runtime: ~{guess / 60:.1f} min (a guess; stopped after --max-seconds {opts.max_seconds:.0f} s)")
    for note in notes:
        print(f"note: {note}")
    print("ratio = vaetool / diffusers (below 1: vaetool better); est/meas = planner estimate / measured peak (target 1.0-1.15)\n")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        weights = Path(tmp) / "vae.safetensors"
        make_weights({k: v for k, v in config.items() if k != "sample_size"}, weights)
        loaded: tuple[str, Vae, Any] | None = None
        arch = None
        for i, point in enumerate(todo):
            dt, op, size, att, group = point
            elapsed = time.perf_counter() - started
            if elapsed > opts.max_seconds:
                print(f"stopped after {elapsed:.0f} s (--max-seconds): {len(todo) - i} points skipped")
                rows.append({"skipped": len(todo) - i, "reason": "max-seconds"})
                break
            if loaded is None or loaded[0] != dt:
                loaded = None
                if cuda:
                    torch.cuda.empty_cache()
                loaded = (dt, *load_pair(weights, config, device, DTYPES[dt]))
            _, vae, dif = loaded
            arch = arch or memory.architecture(vae)
            set_diffusers_attention(dif, att)
            data = input_for(vae, op, size, DTYPES[dt], device)
            try:
                stats, outputs = measure(runners(vae, dif, op, group, tile, att, data), opts.repeats, device)
            except torch.OutOfMemoryError as err:
                print(f"{op} {size} {dt} {att} {group}: out of memory ({str(err).splitlines()[0]})")
                rows.append({"op": op, "size": size, "dtype": dt, "attention": att, "group": group, "error": "out of memory"})
                continue
            rows += point_rows(
                point,
                stats,
                outputs,
                arch,
                data,
                tile,
                device,
                opts.repeats,
                f"[{i + 1}/{len(todo)} {time.perf_counter() - started:4.0f}s]",
            )
            del outputs, data
            write_rows(opts.json, rows)
    total = time.perf_counter() - started
    print(f"\nplanner calibration ({device.type}): {suggest(rows, arch, device) if arch else 'no points ran'}")
    print(f"total runtime {total:.0f} s")
    write_rows(opts.json, rows)
    if opts.json:
        print(f"rows written to {opts.json}")


if __name__ == "__main__":
    main()
