"""The peak estimate covers the attention blocks a decoder can be built with: a SpatialTransformer as attn_op
(heads, depth, feed-forward; against a measurement) and the video decoder's AttnVideoBlock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vaetool import memory
from vaetool.config import instantiate_from_config

ROOT = Path(__file__).resolve().parent.parent
DD = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
      "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
XATTN = {"attn_op": {"target": "vaetool.SpatialTransformer", "params": {"n_heads": 4, "d_head": 32, "depth": 2}}}


def engine(decoder: str = "vaetool.Decoder", **extra: object) -> dict:
    return {"target": "vaetool.AutoencodingEngine", "params": {
        "encoder_config": {"target": "vaetool.Encoder", "params": DD},
        "decoder_config": {"target": decoder, "params": {**DD, **extra}},
        "use_quant_conv": True, "use_post_quant_conv": True}}


def test_attention_blocks_are_told_apart() -> None:
    kinds = {name: [st for st in memory.architecture(cfg).decode if st.kind not in ("conv", "res", "vres", "up", "head", "copy")]
             for name, cfg in {"plain": engine(), "xattn": engine(**XATTN),
                               "video": engine("vaetool.VideoDecoder", time_mode="all"),
                               "none": engine(attn_type="none")}.items()}
    assert [st.kind for st in kinds["plain"]] == ["attn"] and kinds["none"] == []
    assert [st.kind for st in kinds["video"]] == ["vattn"]
    (st,) = kinds["xattn"]
    assert (st.kind, st.cin, st.heads, st.inner, st.depth) == ("xattn", 64, 4, 128, 2)


def test_transformer_attention_costs_more_than_the_vanilla_block() -> None:
    plain, xattn = memory.architecture(engine()), memory.architecture(engine(**XATTN))
    for backend in ("basic", "sdpa"):  # 4 heads: four score matrices; the feed-forward is 8x the inner width
        assert memory.estimate_peak(xattn, "decode", 1024, 1024, attention=backend) > memory.estimate_peak(
            plain, "decode", 1024, 1024, attention=backend)


MEASURE = """
import json, sys, torch
from vaetool import memory
from vaetool.config import instantiate_from_config
from vaetool.nn.attention import use_attention
torch.set_num_threads(2)
cfg, size = json.loads(sys.argv[1]), int(sys.argv[2])
model = instantiate_from_config(cfg).eval()
with torch.inference_mode(), use_attention("basic"):
    model.decode(torch.randn(1, 4, 8, 8))
    z = torch.randn(1, 4, size // 8, size // 8)
    grown = memory.measure_peak(lambda: model.decode(z))
print(grown + memory.architecture(model).weights["decode"] * 4 + z.numel() * 4)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS measurement needs Linux")
def test_transformer_decoder_estimate_is_within_tolerance_of_a_measurement() -> None:
    cfg = engine(**XATTN)
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cfg), "384"], capture_output=True, text=True,
                          timeout=300, check=True, cwd=ROOT)
    measured = int(done.stdout.strip().splitlines()[-1])
    estimate = memory.estimate_peak(instantiate_from_config(cfg), "decode", 384, 384, attention="basic")
    assert measured <= estimate <= 1.3 * measured, (measured, estimate)
