"""Usage errors in every command alike: exit 2 and one line on stderr that names the problem (issue 12.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vaetool.cli import app
from vaetool.io.latents import save_latent

REPO = Path(__file__).resolve().parent.parent
TINY = ["-m", "tiny-f8", "-q"]


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """In tmp_path: img/ (one image), nested/sub/ (an image in a subfolder only), lat/sub/ (a latent in a subfolder
    only), photo.png, notes.txt, clip.zip (a zip that is no torch file)."""
    monkeypatch.chdir(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for folder in ("img", "nested/sub"):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / folder / "a.png")
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    save_latent(tmp_path / "lat" / "sub" / "a.safetensors", torch.zeros(4, 2, 2), {})
    (tmp_path / "notes.txt").write_text("hello\n")
    import zipfile

    with zipfile.ZipFile(tmp_path / "clip.zip", "w") as zf:
        zf.writestr("readme.txt", "not weights")
    return tmp_path


CASES = {
    # bad option values: named, with the accepted form
    "encode --max-memory": (["encode", "img", "-o", "out", *TINY, "--max-memory", "lots"], ["--max-memory", "2GiB"]),
    "decode --max-memory": (["decode", "lat", "-o", "out", *TINY, "--max-memory", "lots"], ["--max-memory", "2GiB"]),
    "roundtrip --max-memory": (["roundtrip", "img", "-o", "out", *TINY, "--max-memory", "lots"], ["--max-memory"]),
    "video --max-memory": (["video", "encode", "img", "-o", "v.safetensors", *TINY, "--max-memory", "lots"], ["--max-memory"]),
    "encode --device": (["encode", "img", "-o", "out", *TINY, "--device", "tpu"], ["--device", "tpu"]),
    "train --device": (["train", "train-mini", "--device", "tpu"], ["--device", "tpu"]),
    "train --steps 0": (["train", "train-mini", "--steps", "0"], ["--steps"]),
    "missing -o": (["encode", "img", *TINY], ["--output"]),
    "unknown command": (["encodee"], ["encodee", "encode"]),
    # model names: close ones suggested
    "encode -m sdxll": (["encode", "img", "-o", "out", "-m", "sdxll"], ["sdxll", "did you mean sdxl"]),
    "decode -m sdxll": (["decode", "lat/sub", "-o", "out", "-m", "sdxll"], ["did you mean sdxl"]),
    # wrong kinds of file where a checkpoint goes
    "--checkpoint photo.png": (["encode", "img", "-o", "out", "-c", "tiny-f8", "--checkpoint", "photo.png"],
                               ["photo.png: not a checkpoint file (a PNG image)"]),
    "--checkpoint notes.txt": (["decode", "lat/sub", "-o", "out", "-c", "tiny-f8", "--checkpoint", "notes.txt"],
                               ["notes.txt: not a checkpoint file (a text file)"]),
    "--checkpoint clip.zip": (["roundtrip", "img", "-o", "out", "-c", "tiny-f8", "--checkpoint", "clip.zip"],
                              ["clip.zip: not a checkpoint file (a zip archive"]),
    "video --checkpoint": (["video", "encode", "img", "-o", "v.safetensors", "-c", "tiny-svd", "--checkpoint", "photo.png"],
                           ["not a checkpoint file (a PNG image)"]),
    "train --init photo.png": (["train", "train-mini", "--init", "photo.png"], ["photo.png: not a checkpoint file (a PNG image)"]),
    "train --init missing": (["train", "train-mini", "--init", "nope.safetensors"], ["nope.safetensors", "no such file"]),
    # inputs only in subfolders: -r suggested
    "encode without -r": (["encode", "nested", "-o", "out", *TINY], ["nested", "subfolders", "-r/--recursive"]),
    "decode without -r": (["decode", "lat", "-o", "out", *TINY], ["lat", "subfolders", "-r/--recursive"]),
    "roundtrip without -r": (["roundtrip", "nested", "-o", "out", *TINY], ["-r/--recursive"]),
    # video: outputs and inputs of the wrong kind
    "video no -o": (["video", "encode", "img", *TINY], ["needs at least one -o/--output"]),
    "video encode -o .txt": (["video", "encode", "img", "-o", "v.txt", *TINY], ["v.txt", ".safetensors"]),
    "video -o twice": (["video", "roundtrip", "img", "-o", "v.gif", "-o", "v.gif", *TINY], ["v.gif", "twice"]),
    "video -o .jpg": (["video", "roundtrip", "img", "-o", "v.jpg", *TINY], ["v.jpg", "a video output is"]),
    "video decode png": (["video", "decode", "photo.png", "-o", "frames", *TINY], ["photo.png", "video decode reads latents"]),
    "video encode txt": (["video", "encode", "notes.txt", "-o", "v.safetensors", *TINY], ["unsupported video input '.txt'"]),
    "video overlap": (["video", "roundtrip", "img", "-o", "v.gif", *TINY, "--chunk-frames", "4", "--overlap", "3"],
                      ["--overlap 3", "half"]),
    # train: recipes, not models or images
    "train png": (["train", "photo.png"], ["photo.png: not a YAML training recipe (a PNG image)"]),
    "train model config": (["train", str(REPO / "configs" / "mini.yaml")], ["a model config", "not a training recipe"]),
    "train --decoder-only": (["train", "train-mini", "--decoder-only"], ["--decoder-only", "--init"]),
    "train unknown name": (["train", "train-minii"], ["train-minii", "did you mean train-mini"]),
    "info recipe": (["info", "train-mini"], ["training recipe"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_usage_errors_exit_2_with_one_line(runner: CliRunner, files: Path, case: str) -> None:
    args, needles = CASES[case]
    result = runner.invoke(app, args)
    err = result.stderr.strip()
    assert result.exit_code == 2, (result.exit_code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    for needle in needles:
        assert needle in err, err
    assert not (files / "out").exists()  # refused before any work: not even an empty -o is left


def test_failed_inputs_still_exit_1(runner: CliRunner, files: Path) -> None:
    result = runner.invoke(app, ["encode", "missing.png", "-o", "out", *TINY])
    assert result.exit_code == 1 and "missing.png: no such file" in result.stderr
    (files / "empty").mkdir()
    result = runner.invoke(app, ["encode", "empty", "-o", "out", *TINY])
    assert result.exit_code == 1 and "no image files" in result.stderr  # never "encoded 0 of 0" and exit 0
