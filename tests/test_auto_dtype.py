"""`--dtype auto` on the CPU: bf16 for encode and decode where the CPU has native bf16, fp32 for round trips and elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from vaetool import devices
from vaetool.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "images" / "chelsea.png"


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma\n")
    native = devices.cpuinfo_has_bf16
    assert native(str(amx)) and not native(str(avx2)) and not native(str(tmp_path / "missing"))
    monkeypatch.setattr(devices, "cpuinfo_has_bf16", lambda: True)
    monkeypatch.setenv("VAETOOL_CPU_BF16", "1")
    assert devices.cpu_has_native_bf16()
    monkeypatch.setenv("VAETOOL_CPU_BF16", "0")  # the user's (and the test suite's) off switch
    assert not devices.cpu_has_native_bf16()


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_for_one_way_jobs_on_a_native_bf16_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert devices.resolve_dtype("auto", cpu, cpu_bf16=True) == (torch.bfloat16 if native else torch.float32)
    assert devices.resolve_dtype("auto", cpu) == torch.float32  # round trips
    assert devices.resolve_dtype("fp32", cpu, cpu_bf16=True) == torch.float32  # asked for
    assert devices.resolve_dtype("auto", torch.device("cuda"), cpu_bf16=True) == torch.float16


def test_cli_encode_and_decode_say_bf16_and_roundtrip_stays_fp32(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    img = tmp_path / "in" / "cat.png"
    img.parent.mkdir()
    Image.open(EXAMPLE).convert("RGB").resize((64, 48)).save(img)
    enc = runner.invoke(app, ["encode", str(img), "-o", str(tmp_path / "lat")])
    assert enc.exit_code == 0, enc.output
    assert "--dtype auto: bf16" in enc.stderr
    with safe_open(str(tmp_path / "lat" / "cat.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "bfloat16"
    dec = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "png")])
    assert dec.exit_code == 0 and "--dtype auto: bf16" in dec.stderr, dec.output
    rt = runner.invoke(app, ["roundtrip", str(img), "-o", str(tmp_path / "rt")])
    assert rt.exit_code == 0 and "bf16" not in rt.stderr, rt.output
    fp32 = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "png32"), "--dtype", "fp32"])
    assert fp32.exit_code == 0 and "bf16" not in fp32.stderr


def test_bf16_auto_decode_is_deterministic_and_within_45_db_of_fp32(runner: CliRunner, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    img = tmp_path / "in" / "cat.png"
    img.parent.mkdir()
    Image.open(EXAMPLE).convert("RGB").crop((0, 0, 256, 192)).save(img)
    assert runner.invoke(app, ["encode", str(img), "-o", str(tmp_path / "lat"), "--dtype", "fp32"]).exit_code == 0
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    outs = {}
    for name, extra in (("bf16", []), ("bf16 again", []), ("fp32", ["--dtype", "fp32"])):
        result = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        outs[name] = np.asarray(Image.open(tmp_path / name / "cat.png")).astype(np.float64)
    assert np.array_equal(outs["bf16"], outs["bf16 again"])
    mse = np.mean((outs["bf16"] - outs["fp32"]) ** 2)
    assert mse > 0 and 10 * np.log10(255**2 / mse) >= 45.0  # bf16 did run; the shipped mini: ~57 dB
