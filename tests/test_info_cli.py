"""`vaetool info` as a user runs it: good files described, every kind of bad file a one-line error."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vaetool.cli import app
from vaetool.config import instantiate_from_config, load_vae_config


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    model = instantiate_from_config(load_vae_config("tiny-f8").model)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _one_line_error(result: object, *needles: str) -> str:
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_info_describes_a_whole_model_checkpoint_as_json(runner: CliRunner, tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "model.safetensors"
    save_file({f"first_stage_model.{k}": v for k, v in tiny_state.items()} | {"model.diffusion_model.x": torch.zeros(1)}, str(path))
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["layout"] == "original"
    assert summary["prefix"] == "first_stage_model."
    assert summary["latent_channels"] == 4 and summary["downscale"] == 8 and summary["ch_mult"] == [1, 1, 2, 2]
    assert summary["parameters"] == sum(v.numel() for v in tiny_state.values())
    assert set(summary["candidate_families"]) == {"sd1", "sd2", "sdxl"}


def test_info_table_for_a_config_and_a_ckpt(runner: CliRunner, tmp_path: Path, tiny_state: dict) -> None:
    result = runner.invoke(app, ["info", "sd3", "--build"])  # building the model counts its parameters
    assert result.exit_code == 0, result.stderr
    assert "83,819,683" in result.stdout and "sd3" in result.stdout
    ckpt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": tiny_state, "global_step": 10}, ckpt)
    result = runner.invoke(app, ["info", str(ckpt), "--family", "sdxl"])
    assert result.exit_code == 0, result.stderr
    assert "0.13025" in result.stdout


def test_truncated_safetensors(runner: CliRunner, tmp_path: Path, tiny_state: dict) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(tiny_state, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _one_line_error(runner.invoke(app, ["info", str(path)]), str(path))


def test_empty_file(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    _one_line_error(runner.invoke(app, ["info", str(path)]), str(path), "empty")


class _Payload:
    marker: Path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_never_runs(runner: CliRunner, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": payload}, f)
    _one_line_error(runner.invoke(app, ["info", str(path)]), str(path), "unsafe")
    assert not marker.exists()


def test_wrong_shape_is_named(runner: CliRunner, tmp_path: Path, tiny_state: dict) -> None:
    bad = dict(tiny_state)
    bad["decoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "wrong.safetensors"
    save_file(bad, str(path))
    _one_line_error(runner.invoke(app, ["info", str(path)]), str(path), "decoder.mid.block_1.conv1.weight")


def test_unknown_target_config(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("model:\n  target: subprocess.Popen\n  params: {args: [touch, x]}\n")
    _one_line_error(runner.invoke(app, ["info", str(path)]), "subprocess.Popen", "not allowed")


def test_missing_file_and_debug_traceback(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    _one_line_error(runner.invoke(app, ["info", str(missing)]), str(missing), "no such file")
    result = runner.invoke(app, ["info", str(missing), "--debug"])
    assert result.exit_code != 0 and result.exception is not None
