"""`vaetool roundtrip`: metrics on the written 8-bit images, reports, determinism, golden runs."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from typer.testing import CliRunner

from vaetool import golden as golden_mod
from vaetool import metrics
from vaetool.api import load_vae
from vaetool.cli import app, common

MODEL = ["--model", "tiny-f8"]


def _rgb(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))  # smooth, so the model keeps something
    pixels = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """in/a.png 20x12 (padded to 24x16 and cropped back), in/sub/b.png 16x16."""
    _rgb(tmp_path / "in" / "a.png", 20, 12, 1)
    _rgb(tmp_path / "in" / "sub" / "b.png", 16, 16, 2)
    return tmp_path / "in"


def _roundtrip(runner, *args: str):
    return runner.invoke(app, ["roundtrip", *args, *MODEL])


def test_metrics_are_those_of_the_written_pngs(runner, tmp_path: Path, images: Path) -> None:
    out, report = tmp_path / "out", tmp_path / "report.json"
    result = _roundtrip(runner, str(images), "-r", "-o", str(out), "--report", str(report), "--junit", str(tmp_path / "j.xml"))
    assert result.exit_code == 0, result.output
    assert "overall (2)" in result.stdout and "a.png" in result.stdout
    doc = json.loads(report.read_text())
    rows = {row["image"]: row for row in doc["images"]}
    assert set(rows) == {"a.png", "sub/b.png"}
    for key, row in rows.items():
        written, original = _pixels(out / key), _pixels(images / key)
        assert written.shape == original.shape
        assert row["vs_input"]["psnr"] == pytest.approx(metrics.psnr(written, original), abs=1e-3)
        assert row["vs_input"]["ssim"] == pytest.approx(metrics.ssim(written, original), abs=1e-5)
        assert row["vs_input"]["max_diff"] == metrics.max_abs_diff(written, original)
        assert row["status"] == "ok"
    assert doc["overall"]["vs_input"]["max_diff"] == max(r["vs_input"]["max_diff"] for r in rows.values())
    assert doc["passed"] is True and doc["model"]["config"] == "tiny-f8"
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")


def test_output_is_what_the_library_round_trip_gives(runner, tmp_path: Path, images: Path) -> None:
    from vaetool.io.images import load_image, pad_to_multiple, to_uint8

    result = _roundtrip(runner, str(images / "a.png"), "-o", str(tmp_path / "out"), "--quiet")
    assert result.exit_code == 0, result.output
    vae = load_vae("tiny-f8")
    padded, (h, w) = pad_to_multiple(load_image(images / "a.png"), 8)  # [3, 16, 24]
    want = to_uint8(vae.decode(vae.encode(padded[None]))[0, :, :h, :w])
    assert np.abs(_pixels(tmp_path / "out" / "a.png").astype(int) - want.astype(int)).max() <= 1


def test_same_inputs_and_settings_give_bit_identical_files(runner, tmp_path: Path, images: Path) -> None:
    for run in ("one", "two"):
        result = _roundtrip(runner, str(images), "-r", "-o", str(tmp_path / run), "--quiet")
        assert result.exit_code == 0, result.output
    for key in ("a.png", "sub/b.png"):
        assert (tmp_path / "one" / key).read_bytes() == (tmp_path / "two" / key).read_bytes()


def _perturbed_checkpoint(path: Path) -> Path:
    """tiny-f8's weights plus 2 % noise: a deliberate regression."""
    gen = torch.Generator().manual_seed(1)
    state = load_vae("tiny-f8").model.state_dict()
    noisy = {k: (v + 0.02 * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v).contiguous() for k, v in state.items()}
    safetensors.torch.save_file(noisy, path)
    return path


def test_golden_run_passes_then_catches_a_changed_model(runner, tmp_path: Path, images: Path) -> None:
    golden, out, junit = tmp_path / "golden", tmp_path / "out", tmp_path / "junit.xml"
    result = _roundtrip(runner, str(images), "-r", "-o", str(out), "--golden", str(golden), "--update-golden", "--quiet")
    assert result.exit_code == 0, result.output
    assert (golden / "a.png").exists() and (golden / "sub" / "b.png").exists()

    result = _roundtrip(runner, str(images), "-r", "-o", str(out), "--golden", str(golden), "--junit", str(junit))
    assert result.exit_code == 0, result.output
    assert "golden" in result.stdout.splitlines()[2]  # the second header line names what the metrics are against
    assert not (out / "heatmaps").exists()

    ckpt = _perturbed_checkpoint(tmp_path / "perturbed.safetensors")
    report = tmp_path / "report.json"
    result = _roundtrip(runner, str(images), "-r", "-o", str(out), "--golden", str(golden), "--junit", str(junit),
                        "--report", str(report), "--checkpoint", str(ckpt))
    assert result.exit_code == 1
    assert "regression: a.png" in result.stderr
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "2")
    failures = {tc.get("name"): tc.find("failure") for tc in suite.iter("testcase")}
    assert all(f is not None and "PSNR" in f.get("message") for f in failures.values())
    for key in ("a.png", "sub/b.png"):
        heat, (h, w, _) = _pixels(out / "heatmaps" / key), _pixels(images / key).shape
        assert heat.shape == (h + golden_mod.LEGEND_HEIGHT, max(w, golden_mod.LEGEND_WIDTH), 3)  # the image, the legend below
        want, _ = golden_mod.heatmap(_pixels(out / key), _pixels(golden / key))
        assert (heat[:h, :w] == want).all()
    rows = {row["image"]: row for row in json.loads(report.read_text())["images"]}
    assert all(row["status"] == "failed" and row["heatmap"] for row in rows.values())


def test_missing_goldens_and_input_thresholds_fail(runner, tmp_path: Path, images: Path) -> None:
    result = _roundtrip(runner, str(images), "-r", "-o", str(tmp_path / "out"), "--golden", str(tmp_path / "none"), "--quiet")
    assert result.exit_code == 1
    assert "no golden image" in result.stderr
    # without goldens, a limit given explicitly applies to the reconstruction of the input
    result = _roundtrip(runner, str(images / "a.png"), "-o", str(tmp_path / "rec"), "--min-psnr", "99", "--quiet")
    assert result.exit_code == 1
    assert (tmp_path / "rec" / "heatmaps" / "a.png").exists()
    assert _roundtrip(runner, str(images / "a.png"), "-o", str(tmp_path / "rec"), "--min-psnr", "1", "--quiet").exit_code == 0
    assert not (tmp_path / "rec" / "heatmaps" / "a.png").exists()  # the stale heatmap is gone


def test_a_bad_image_is_an_error_case_and_the_others_are_written(runner, tmp_path: Path, images: Path) -> None:
    (images / "text.png").write_text("not a png")
    junit = tmp_path / "j.xml"
    result = _roundtrip(runner, str(images), "-r", "-o", str(tmp_path / "out"), "--junit", str(junit), "--quiet")
    assert result.exit_code == 1
    assert "text.png" in result.stderr
    assert (tmp_path / "out" / "a.png").exists()
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("errors") == "1"


def test_update_golden_without_golden_is_a_usage_error(runner, tmp_path: Path, images: Path) -> None:
    assert _roundtrip(runner, str(images), "-o", str(tmp_path / "o"), "--update-golden").exit_code == 2


def test_table_reads_at_80_columns(runner, tmp_path: Path, images: Path, monkeypatch) -> None:
    golden = tmp_path / "golden"
    args = [str(images), "-r", "-o", str(tmp_path / "out"), "--golden", str(golden)]
    assert _roundtrip(runner, *args, "--update-golden", "-q").exit_code == 0
    (golden / "sub" / "b.png").unlink()  # one missing golden: the widest status word of a compare run
    monkeypatch.setattr(common.console, "width", 80)  # conftest pins 160
    narrow = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})
    result = _roundtrip(narrow, *args)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.stdout
    a = next(line.split() for line in lines if line.startswith("a.png"))
    assert a[1] == "20x12" and a[-1] == "passed" and len(a) == 9  # name, size, 3 metrics vs input, 3 vs golden, status
    b = next(line.split() for line in lines if line.startswith("sub/b.png"))
    assert b[1] == "16x16" and b[-4:] == ["-", "-", "-", "missing"]


def test_update_golden_rewrites_only_goldens_that_no_longer_pass(runner, tmp_path: Path, images: Path) -> None:
    golden, out, report = tmp_path / "golden", tmp_path / "out", tmp_path / "report.json"
    args = [str(images), "-r", "-o", str(out), "--golden", str(golden), "--update-golden", "--report", str(report), "-q"]
    assert _roundtrip(runner, *args).exit_code == 0
    a, b = golden / "a.png", golden / "sub" / "b.png"
    pixels = _pixels(b).astype(int)
    pixels[:4] = 255 - pixels[:4]  # a real change in b's golden; a's golden still passes
    Image.fromarray(pixels.astype(np.uint8)).save(b)
    for path in (a, b):
        os.utime(path, ns=(10**18, 10**18))
    before = a.read_bytes()

    assert _roundtrip(runner, *args).exit_code == 0
    statuses = {row["image"]: row["status"] for row in json.loads(report.read_text())["images"]}
    assert statuses == {"a.png": "unchanged", "sub/b.png": "updated"}
    assert a.read_bytes() == before and a.stat().st_mtime_ns == 10**18  # not touched: no diff in git
    assert b.stat().st_mtime_ns != 10**18 and (_pixels(b) == _pixels(out / "sub" / "b.png")).all()
    row_b = next(r for r in json.loads(report.read_text())["images"] if r["image"] == "sub/b.png")
    assert "max_diff" in row_b["limits_broken"] and row_b["reasons"]  # why it was rewritten

    assert _roundtrip(runner, *args, "--force").exit_code == 0
    statuses = {row["image"]: row["status"] for row in json.loads(report.read_text())["images"]}
    assert statuses == {"a.png": "updated", "sub/b.png": "updated"}
    assert a.stat().st_mtime_ns != 10**18
    assert _roundtrip(runner, str(images), "-o", str(out), "--golden", str(golden), "--force").exit_code == 2  # --force alone


def test_verbose_names_each_input_and_its_output(tmp_path: Path) -> None:
    from cli_helpers import noise_png

    src = noise_png(tmp_path / "in" / "cat.png", 16, 16)
    runner = CliRunner(env={"COLUMNS": "160", "NO_COLOR": "1"})
    result = runner.invoke(app, ["roundtrip", str(src), "-o", str(tmp_path / "out"), "-m", "tiny-f8", "--verbose"])
    assert result.exit_code == 0, result.output
    assert f"done: {src} -> {tmp_path / 'out' / 'cat.png'}" in result.stderr  # the output, not an internal object
    assert "ImageResult" not in result.output
