"""`vaetool train`: loss goes down, EMA weights are saved, resume after a kill, decoder-only, bad input."""

from __future__ import annotations

import copy
import csv
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from vaetool.cli import app
from vaetool.config import instantiate_from_config
from vaetool.train import load_train_settings
from vaetool.train.data import random_batch

TINY_MODEL = {"target": "vaetool.AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def _images(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):  # smooth random pictures: low-resolution noise upsampled
        small = (torch.rand(6, 6, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(small).resize((48 + 8 * i, 40), Image.BICUBIC).save(folder / f"img{i}.png")
    return folder


def _config(tmp_path: Path, **top: object) -> Path:
    doc = {"model": TINY_MODEL, "data": {"train": [str(_images(tmp_path / "train", 3))],
                                          "val": [str(_images(tmp_path / "val", 1, seed=1))],
                                          "crop": 32, "batch_size": 2, "color_jitter": 0.1},
           "lr": 2e-3, "warmup": 1, "schedule": "constant", "steps": 12, "ema_decay": 0.9,
           "checkpoint_every": 4, "val_every": 6, "log_every": 1, "loss": {"l1": 1.0, "mse": 1.0}} | top
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _fixed_batch_loss(weights: dict[str, torch.Tensor], cfg: Path) -> float:
    settings = load_train_settings(cfg)
    from vaetool.train.data import load_folder_images

    x = random_batch(load_folder_images(settings.data.train, 32, print), settings.data, 10_000, 123)
    model = instantiate_from_config(TINY_MODEL).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        mean, _ = model.encode_moments(x).chunk(2, dim=1)
        return float((model.decode(mean) - x).abs().mean())


def test_training_lowers_the_loss_and_saves_ema_weights(runner: CliRunner, tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=30)
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    saved = safetensors.torch.load_file(str(tmp_path / "run" / "model.safetensors"))
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    raw = {k: v for k, v in state["model"].items() if not k.startswith("model_ema.")}
    ema = {k: v for k, v in state["model"].items() if k.startswith("model_ema.")}
    assert saved.keys() == raw.keys()
    with torch.random.fork_rng(devices=[]):  # the same seeded initial weights the trainer built
        torch.manual_seed(0)
        init = instantiate_from_config(TINY_MODEL).state_dict()
    assert _fixed_batch_loss(saved, cfg) < 0.9 * _fixed_batch_loss(init, cfg)
    name = "decoder.conv_out.weight"
    assert not torch.equal(saved[name], raw[name])  # the EMA differs from the raw weights ...
    torch.testing.assert_close(saved[name], ema["model_ema." + name.replace(".", "")], rtol=0, atol=0)  # ... and is saved
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) == 31 and log[-1].split(",")[6] != ""  # val PSNR logged


def _run(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaetool", "train", str(cfg), "-o", str(out), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_kill_continues_from_the_last_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=400, checkpoint_every=5, val_every=1000)
    out = tmp_path / "killed"
    proc = _run(cfg, out)
    deadline = time.time() + 120
    while not (out / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = int(torch.load(out / "state.pt", weights_only=True)["step"])  # never half-written (temp + rename)
    assert 0 < last < 400
    total = last + 3
    result = runner.invoke(app, ["train", str(cfg), "-o", str(out), "--steps", str(total), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert f'"resumed_from": {last}' in result.stdout and f'"step": {total}' in result.stdout
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # a save cut by the kill is cleaned up
    steps = [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, total + 1))  # unsaved steps of the killed run were dropped, none repeated
    straight = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "straight"), "--steps", str(total), "--quiet"])
    assert straight.exit_code == 0, straight.output
    a = safetensors.torch.load_file(str(out / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "straight" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resuming gives the uninterrupted run's weights


def test_decoder_only_leaves_the_encoder_bit_identical(runner: CliRunner, tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=4)
    base = tmp_path / "base.safetensors"
    torch.manual_seed(1)
    safetensors.torch.save_file(instantiate_from_config(TINY_MODEL).state_dict(), str(base))
    missing = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "x"), "--decoder-only"])
    assert missing.exit_code == 2 and "--init" in missing.stderr  # a usage error (issue 12.5)
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "ft"), "--decoder-only", "--init", str(base), "--quiet"])
    assert result.exit_code == 0, result.output
    before, after = safetensors.torch.load_file(str(base)), safetensors.torch.load_file(str(tmp_path / "ft" / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])


def test_empty_data_folder(runner: CliRunner, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    for p in (tmp_path / "train").iterdir():
        p.unlink()
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert str(tmp_path / "train") in result.stderr and "no images" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_corrupt_image_is_skipped_and_named(runner: CliRunner, tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=2)
    bad = tmp_path / "train" / "broken.png"
    data = (tmp_path / "train" / "img0.png").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and str(bad) in result.stderr


@pytest.mark.parametrize(("key", "where"), [({"stpes": 3}, "'stpes'"), ({"data": {"train": ["x"], "crops": 8}}, "'data.crops'")])
def test_typo_in_a_key_is_named(runner: CliRunner, tmp_path: Path, key: dict, where: str) -> None:
    cfg = _config(tmp_path)
    doc = yaml.safe_load(cfg.read_text()) | key
    cfg.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2  # a config error is a usage error
    assert where in result.stderr and str(cfg) in result.stderr and "did you mean" in result.stderr


def test_channel_shuffle_permutes_a_crop_colours(tmp_path: Path) -> None:
    from dataclasses import replace

    from vaetool.train.data import load_folder_images

    settings = load_train_settings(_config(tmp_path))
    data = replace(settings.data, batch_size=1, color_jitter=0.0)
    images = load_folder_images(settings.data.train, 32, print)
    changed = 0
    for step in range(8):
        plain = random_batch(images, data, step, 0)[0]  # [3, 32, 32]
        shuffled = random_batch(images, replace(data, channel_shuffle=1.0), step, 0)[0]
        # the same crop with its channels in some order (a permutation may be the identity)
        assert sorted(c.sum().item() for c in plain) == pytest.approx(sorted(c.sum().item() for c in shuffled))
        assert any(torch.equal(shuffled[0], c) for c in plain)
        changed += not torch.equal(plain, shuffled)
    assert changed > 0


def test_grayscale_makes_some_crops_gray_and_leaves_the_others(tmp_path: Path) -> None:
    from dataclasses import replace

    from vaetool.train.data import load_folder_images

    settings = load_train_settings(_config(tmp_path, data={**yaml.safe_load(_config(tmp_path).read_text())["data"],
                                                           "grayscale": 0.5}))
    assert settings.data.grayscale == 0.5
    data = replace(settings.data, batch_size=1, color_jitter=0.0)
    images = load_folder_images(settings.data.train, 32, print)
    gray = 0
    for step in range(12):
        plain = random_batch(images, replace(data, grayscale=0.0), step, 0)[0]  # [3, 32, 32]
        maybe = random_batch(images, data, step, 0)[0]
        if torch.equal(maybe, plain):
            continue
        gray += 1  # the same crop, as luma in every channel
        assert torch.equal(maybe[0], maybe[1]) and torch.equal(maybe[1], maybe[2])
        luma = 0.299 * plain[0] + 0.587 * plain[1] + 0.114 * plain[2]
        torch.testing.assert_close(maybe[0], luma)
    assert 0 < gray < 12


def test_norm_groups_are_recorded_and_a_checkpoint_alone_loads_them(runner: CliRunner, tmp_path: Path) -> None:
    model = copy.deepcopy(TINY_MODEL)
    model["params"]["ddconfig"]["norm_groups"] = 8
    cfg = _config(tmp_path, model=model, steps=2, val_every=1000)
    assert runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--quiet"]).exit_code == 0
    weights = tmp_path / "run" / "model.safetensors"
    from vaetool.api import load_vae

    vae = load_vae(checkpoint=weights)  # no config: the groups come from the file's metadata
    assert {m.num_groups for m in vae.model.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    built = instantiate_from_config(model).eval()
    built.load_state_dict(safetensors.torch.load_file(str(weights)))
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z, clamp=False), built.decode(z), atol=1e-5, rtol=0)


def test_init_logvar_starts_a_fresh_model_nearly_noiseless(tmp_path: Path) -> None:
    from vaetool.train.loop import build_model

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for value, (lo, hi) in ((None, (-1.0, 1.0)), (-8.0, (-9.0, -7.0))):
        settings = load_train_settings(_config(tmp_path, init_logvar=value) if value else _config(tmp_path))
        with torch.no_grad():
            logvar = build_model(settings, None, False).encode_moments(x).chunk(2, dim=1)[1]
        assert lo < float(logvar.mean()) < hi, (value, float(logvar.mean()))


def test_gradient_checkpointing_trains_the_same_weights(tmp_path: Path) -> None:
    from vaetool.train.loop import train

    weights = {}
    for flag in (False, True):
        settings = load_train_settings(_config(tmp_path, steps=2, val_every=1000, gradient_checkpointing=flag))
        assert settings.gradient_checkpointing is flag
        result = train(settings, tmp_path / f"run-{flag}", warn=lambda msg: None)
        weights[flag] = safetensors.torch.load_file(str(result.weights))
    assert weights[True].keys() == weights[False].keys()
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_channels_last_gives_the_same_gradients_in_nhwc_and_resumes_bit_identically(tmp_path: Path) -> None:
    from vaetool.train.data import load_folder_images
    from vaetool.train.loop import build_model, train

    grads = {}
    for flag in (False, True):
        settings = load_train_settings(_config(tmp_path, channels_last=flag))
        model = build_model(settings, None, False).train()
        x = random_batch(load_folder_images(settings.data.train, 32, print), settings.data, 0, 0)  # [2, 3, 32, 32]
        x = x.contiguous(memory_format=torch.channels_last) if flag else x
        torch.manual_seed(0)  # the posterior sample
        (model.encode_moments(x).chunk(2, dim=1)[0].sum() + model(x)[1].square().mean()).backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        kernels = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # 1x1 weights are both layouts
        assert all(p.is_contiguous(memory_format=torch.channels_last) == flag for p in kernels)
    scale = max(float(g.abs().max()) for g in grads[False].values())  # float noise is relative to the largest gradient
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5 * scale, rtol=1e-3, msg=name)
    settings = load_train_settings(_config(tmp_path, steps=4, checkpoint_every=2, val_every=1000, channels_last=True))
    whole = train(settings, tmp_path / "whole", warn=lambda msg: None)
    train(load_train_settings(_config(tmp_path, steps=2, checkpoint_every=2, val_every=1000, channels_last=True)),
          tmp_path / "parts", warn=lambda msg: None)
    resumed = train(settings, tmp_path / "parts", warn=lambda msg: None)
    assert resumed.resumed_from == 2
    a, b = safetensors.torch.load_file(str(whole.weights)), safetensors.torch.load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_checkpointing_value_is_checked(tmp_path: Path) -> None:
    from vaetool.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_checkpointing must be true or false, got 'yes'"):
        load_train_settings(_config(tmp_path, gradient_checkpointing="yes"))
    with pytest.raises(ConfigError, match="channels_last must be true or false, got 1"):
        load_train_settings(_config(tmp_path, channels_last=1))
    with pytest.raises(ConfigError, match="did you mean 'gradient_checkpointing'"):
        load_train_settings(_config(tmp_path, gradient_checkpoint=True))


def test_bf16_precision_runs_the_forward_in_bf16_and_keeps_fp32_weights(tmp_path: Path) -> None:
    from vaetool.train.data import load_folder_images
    from vaetool.train.loop import build_model, training_step

    settings = load_train_settings(_config(tmp_path, precision="bf16"))
    x = random_batch(load_folder_images(settings.data.train, 32, print), settings.data, 0, 0)  # [2, 3, 32, 32]
    runs = []
    for _ in range(2):  # the same step twice from the same state: bit-identical (what resume relies on)
        model = build_model(settings, None, False).train()
        seen: set[torch.dtype] = set()
        model.decoder.conv_out.register_forward_hook(lambda _m, _i, out, seen=seen: seen.add(out.dtype))
        opt = model.instantiate_optimizer_from_config(list(model.get_autoencoder_params()), settings.lr, settings.optimizer)
        terms = training_step(model, opt, settings, x, 0)
        assert seen == {torch.bfloat16} and math.isfinite(terms["loss"])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs.append(model.decoder.conv_out.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    fp32 = build_model(settings, None, False).train()
    opt = fp32.instantiate_optimizer_from_config(list(fp32.get_autoencoder_params()), settings.lr, settings.optimizer)
    training_step(fp32, opt, load_train_settings(_config(tmp_path)), x, 0)
    assert not torch.equal(fp32.decoder.conv_out.weight, runs[0])  # bf16 did change the arithmetic


def test_unknown_precision_is_named(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(_config(tmp_path, precision="fp8")), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "precision" in result.stderr and "fp8" in result.stderr


def test_block_mean_mse_sees_only_the_low_frequencies() -> None:
    from vaetool.train.loop import block_mean_mse

    a = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    checker = (torch.arange(16)[:, None] + torch.arange(24)[None]) % 2 * 0.4 - 0.2  # zero mean in every 8x8 block
    assert float(block_mean_mse(a + checker, a, 8)) < 1e-12
    assert float(block_mean_mse(a + 0.1, a, 8)) == pytest.approx(0.01)
    full = float(((a + checker + 0.1 - a) ** 2).mean())  # the squared error splits: block means + inside the blocks
    assert full == pytest.approx(float(block_mean_mse(a + checker + 0.1, a, 8)) + float((checker**2).mean()))


def test_lowpass_loss_trains_and_is_logged(runner: CliRunner, tmp_path: Path) -> None:
    cfg = _config(tmp_path, steps=40, lr=5e-3, val_every=1000, loss={"l1": 0.0, "mse": 0.0, "lowpass": 1.0, "lowpass_size": 8})
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[5] == "lowpass"
    last = rows[-1].split(",")
    assert float(last[1]) == pytest.approx(float(last[5]), rel=1e-5)  # the loss is the lowpass term alone
    from vaetool.train.data import load_folder_images
    from vaetool.train.loop import block_mean_mse

    settings = load_train_settings(cfg)
    x = random_batch(load_folder_images(settings.data.train, 32, print), settings.data, 10_000, 123)  # [2, 3, 32, 32]
    errors = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the trainer's initial weights
        init = instantiate_from_config(TINY_MODEL).state_dict()
    for weights in (init, safetensors.torch.load_file(str(tmp_path / "run" / "model.safetensors"))):
        model = instantiate_from_config(TINY_MODEL).eval()
        model.load_state_dict(weights, strict=True)
        with torch.no_grad():
            errors.append(float(block_mean_mse(model.decode(model.encode_moments(x).chunk(2, dim=1)[0]), x, 8)))
    assert errors[1] < 0.8 * errors[0], errors
    bad = _config(tmp_path, loss={"lowpass": 1.0, "lowpass_size": 5})
    result = runner.invoke(app, ["train", str(bad), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "lowpass_size" in result.stderr  # a config error is a usage error


def test_ssim_loss_is_one_minus_the_reports_ssim_and_trains(runner: CliRunner, tmp_path: Path) -> None:
    from vaetool.metrics import ssim
    from vaetool.train.loop import ssim_loss

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 40, 48, generator=gen) * 2 - 1  # [1, 3, 40, 48] in [-1, 1]
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    as_uint8 = [((t[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy() for t in (a, b)]
    qa, qb = ((torch.from_numpy(u).permute(2, 0, 1)[None].float() / 127.5) - 1 for u in as_uint8)  # the same 8-bit pixels
    assert 1 - float(ssim_loss(qa, qb)) == pytest.approx(ssim(*as_uint8), abs=2e-3)  # skimage's: the same formula
    assert float(ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    cfg = _config(tmp_path, steps=4, val_every=1000, loss={"l1": 0.0, "mse": 0.0, "ssim": 1.0})
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["ssim"]) for r in rows], rel=1e-5)
    assert float(rows[-1]["ssim"]) < float(rows[0]["ssim"])


def test_cli_trains_in_nhwc_with_gray_crops(runner: CliRunner, tmp_path: Path) -> None:
    data = {**yaml.safe_load(_config(tmp_path).read_text())["data"], "grayscale": 0.5}
    cfg = _config(tmp_path, steps=2, val_every=1000, channels_last=True, data=data)
    result = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    weights = safetensors.torch.load_file(str(tmp_path / "run" / "model.safetensors"))
    assert set(weights) == set(instantiate_from_config(TINY_MODEL).state_dict())  # every key written, layout aside
    assert all(torch.isfinite(v).all() for v in weights.values())
