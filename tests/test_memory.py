"""Memory sizes, free memory, the peak estimates (against a measurement) and the tile/batch planner."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaetool import memory
from vaetool.api import load_vae
from vaetool.errors import MemoryBudgetError, VaeToolError

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GiB", 2 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5G", int(1.5 * 2**30)),
        ("800000000", 800_000_000),
        (" 64 mib ", 64 * MiB),
        ("10kb", 10_000),
        ("3K", 3 * 1024),
        ("1TB", 10**12),
        ("100B", 100),
        (".5GiB", 2**29),
        (4096, 4096),
    ],
)
def test_parse_memory(text: str | int, expected: int) -> None:
    assert memory.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["2 GiBs", "-1G", "0", "abc", "", "1.2.3G", "5 XB", "0.0001B"])
def test_parse_memory_rejects_bad_strings(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        memory.parse_memory(text)


@pytest.mark.parametrize(
    "size, text, up",
    [
        (312 * MiB, "312 MiB", "312 MiB"),
        (int(1.53 * 2**30), "1.5 GiB", "1.6 GiB"),
        (300, "300 B", "300 B"),
        (312 * MiB + 1, "312 MiB", "313 MiB"),
    ],
)
def test_format_bytes(size: int, text: str, up: str) -> None:
    assert memory.format_bytes(size) == text
    assert memory.format_bytes(size, round_up=True) == up


def test_free_memory_cpu_and_unknown_device() -> None:
    import psutil

    free = memory.free_memory("cpu")
    assert 0 < free <= psutil.virtual_memory().total
    with pytest.raises(ValueError, match="'meta'"):
        memory.free_memory("meta")


def test_architecture_is_the_same_from_name_dict_and_loaded_model() -> None:
    from vaetool.config import load_vae_config

    vae = load_vae("tiny-f8")
    cfg = load_vae_config("tiny-f8").model
    by_name, by_cfg, by_model = memory.architecture("tiny-f8"), memory.architecture(cfg), memory.architecture(vae)
    ddconfig = memory.architecture(cfg["params"]["ddconfig"])  # a bare ddconfig gets the quant convs of AutoencoderKL
    assert by_name == by_cfg == by_model == ddconfig
    assert by_model.weights["encode"] + by_model.weights["decode"] == sum(p.numel() for p in vae.model.parameters())
    assert by_model.downscale == 8 and by_model.latent_channels == 4


@pytest.mark.parametrize("config", ["tiny-f8", "tiny-f4", "tiny-f8-16ch", "tiny-svd", "sd1"])
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_estimate_grows_with_size_and_batch(config: str, op: str) -> None:
    arch = memory.architecture(config)  # resolved once; the estimates take it as well
    sizes = [memory.estimate_peak(arch, op, s, s) for s in (64, 128, 256, 512)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    batches = [memory.estimate_peak(arch, op, 256, 256, b) for b in (1, 2, 4)]
    assert batches == sorted(batches) and len(set(batches)) == len(batches)
    assert memory.estimate_peak(arch, op, 256, 320) > memory.estimate_peak(arch, op, 256, 256)


def test_estimate_counts_dtype_and_the_score_matrix() -> None:
    fp32 = memory.estimate_peak("sd1", "decode", 512, 512)
    bf16 = memory.estimate_peak("sd1", "decode", 512, 512, dtype=torch.bfloat16)
    assert 0.45 * fp32 < bf16 < 0.65 * fp32  # half the activations and weights, plus the retained buffers (HALF_DECODE_RETAINED)
    fp32, bf16 = (memory.estimate_peak("sd1", "encode", 512, 512, dtype=dt) for dt in (torch.float32, torch.bfloat16))
    assert 0.45 * fp32 < bf16 < 0.6 * fp32
    n = (2048 // 8) ** 2  # latent positions of a 2048 px image: the score matrix dominates
    basic = memory.estimate_peak("sd1", "decode", 2048, 2048, attention="basic")
    sdpa = memory.estimate_peak("sd1", "decode", 2048, 2048, attention="sdpa")
    assert basic - sdpa > n * n * 4  # at least one fp32 score matrix more
    chunked = memory.estimate_peak("sd1", "decode", 2048, 2048, attention="chunked")
    assert chunked < basic


def test_estimate_rejects_bad_requests() -> None:
    with pytest.raises(ValueError, match="'encode' or 'decode'"):
        memory.estimate_peak("tiny-f8", "sample", 64, 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        memory.estimate_peak("tiny-f8", "decode", 0, 64)


def _measure(config: str, op: str, size: int, batch: int) -> int:
    """Peak bytes of one op measured in a fresh process by bench/calibrate_memory.py."""
    cmd = [sys.executable, str(ROOT / "bench" / "calibrate_memory.py"), "--point", config, op, str(size), "--batch", str(batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    point = json.loads(done.stdout.strip().splitlines()[-1])
    return point["grown"] + point["resident"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS measurement needs Linux")
def test_estimate_is_within_tolerance_of_a_measurement() -> None:
    measured = _measure("tiny-f8", "decode", 256, 2)
    estimate = memory.estimate_peak("tiny-f8", "decode", 256, 256, 2)
    assert measured <= estimate <= 1.3 * measured, (measured, estimate)


def test_tile_estimates() -> None:
    untiled = memory.estimate_peak("sd1", "decode", 1024, 1024)
    fast = [memory.estimate_tile_peak("sd1", "decode", t, height=1024, width=1024) for t in (128, 256, 512)]
    assert fast == sorted(fast) and fast[-1] < untiled
    exact_cpu = memory.estimate_tile_peak("sd1", "decode", 256, mode="exact", height=1024, width=1024)
    exact_gpu = memory.estimate_tile_peak("sd1", "decode", 256, mode="exact", height=1024, width=1024, device="cuda")
    untiled_gpu = memory.estimate_peak("sd1", "decode", 1024, 1024, device="cuda")
    assert fast[1] < exact_cpu  # exact holds full-size activations on the host (here: the CPU) ...
    assert untiled < exact_cpu  # ... about what the CPU's row-banded untiled forward holds (vaetool.nn.banded)
    assert exact_gpu < exact_cpu and exact_gpu < untiled_gpu < 2 * untiled  # no banding on an accelerator


def test_banded_steps_lower_the_cpu_estimate_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU estimate counts the row-banded forward where it runs (large activations), not below MIN_BYTES."""
    from vaetool.nn import banded

    def both(size: int, op: str = "decode", batch: int = 1) -> tuple[int, int]:
        with_bands = memory.estimate_peak("sd1", op, size, size, batch)
        with monkeypatch.context() as m:
            m.setattr(banded, "DEVICES", frozenset())  # the plain forward, as on an accelerator
            return with_bands, memory.estimate_peak("sd1", op, size, size, batch)

    big, big_plain = both(1024)
    assert big < 0.6 * big_plain  # measured on the CPU: 1812 MiB where the plain forward peaked at 3.6 GiB
    small, small_plain = both(128)
    assert small == small_plain  # nothing that small is banded
    for op in ("decode", "encode"):  # fp32 coders are NHWC on the CPU: a batch is banded image by image
        batch, batch_plain = both(512, op, 2)
        assert batch < 0.75 * batch_plain, op


def test_plan_untiled_when_it_fits() -> None:
    p = memory.plan("tiny-f8", "decode", 128, 128, batch=3, max_memory="1GiB")
    assert p == memory.Plan(True, None, 3, memory.estimate_peak("tiny-f8", "decode", 128, 128, 3), 2**30)
    default = memory.plan("tiny-f8", "decode", 128, 128)
    assert default.fits_untiled and 0 < default.budget <= memory.free_memory("cpu")


def test_plan_splits_the_batch_before_tiling() -> None:
    one, four = (memory.estimate_peak("sd1", "decode", 512, 512, b) for b in (1, 4))
    p = memory.plan("sd1", "decode", 512, 512, batch=4, max_memory=(one + four) // 2)
    assert p.fits_untiled and p.tile is None and 1 <= p.batch_size < 4
    assert p.estimate <= p.budget < memory.estimate_peak("sd1", "decode", 512, 512, p.batch_size + 1)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_plan_with_a_small_budget_picks_the_largest_tile_that_fits(mode: str) -> None:
    smallest = memory.estimate_tile_peak("sd1", "decode", 64, mode=mode, height=1024, width=768)
    budget = (smallest + memory.estimate_peak("sd1", "decode", 1024, 768)) // 2
    p = memory.plan("sd1", "decode", 1024, 768, batch=2, max_memory=budget, mode=mode)
    assert not p.fits_untiled and p.tile is not None and p.tile % 64 == 0 and p.tile <= 1024
    assert p.budget == budget and p.estimate <= budget
    bigger = memory.estimate_tile_peak("sd1", "decode", p.tile + 64, mode=mode, height=1024, width=768)
    assert bigger > budget


def test_plan_budget_too_small_names_the_smallest_budget_that_works() -> None:
    # the smallest tile still runs the decoder's latent-resolution head on the whole 256 x 256 latent: 1.5 GiB
    with pytest.raises(MemoryBudgetError, match=r"max_memory 100 MiB is too small .* needs [\d.]+ GiB") as err:
        memory.plan("sd1", "decode", 2048, 2048, max_memory="100MiB")
    assert isinstance(err.value, VaeToolError) and "\n" not in str(err.value)
    needed = memory.parse_memory(re.search(r"needs ([\d.]+ GiB)", str(err.value)).group(1).replace(" ", ""))
    smallest = memory.estimate_tile_peak("sd1", "decode", 64, height=2048, width=2048)
    assert smallest <= needed < smallest + 0.1 * 2**30  # rounded up to the shown digit
    assert memory.plan("sd1", "decode", 2048, 2048, max_memory=needed).tile is not None
    with pytest.raises(MemoryBudgetError):
        memory.plan("sd1", "decode", 2048, 2048, max_memory=smallest - 1)


def test_plan_keeps_a_clip_together_by_tiling_it() -> None:
    """min_batch frames that must run in one call are tiled together rather than split into untiled calls."""
    untiled_2 = memory.estimate_peak("tiny-svd", "decode", 128, 128, 2)
    free = memory.plan("tiny-svd", "decode", 128, 128, 4, max_memory=untiled_2)
    assert free.fits_untiled and free.batch_size == 2
    clip = memory.plan("tiny-svd", "decode", 128, 128, 4, max_memory=untiled_2, min_batch=4)
    assert not clip.fits_untiled and clip.batch_size == 4 and clip.tile is not None and clip.estimate <= untiled_2
