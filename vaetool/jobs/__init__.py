"""The jobs behind the commands, callable from Python without Typer: encode, decode, roundtrip, video.

    from vaetool.jobs import ModelSpec, RunOptions, load_model, encode_files, EncodeSettings
    from vaetool.io.inputs import collect_inputs
    from vaetool.tiling import Tiling

    vae = load_model(ModelSpec(model="sdxl", checkpoint=Path("sdxl_vae.safetensors")))
    summary = encode_files(vae, collect_inputs(["photos/"]), EncodeSettings(Path("latents")),
                           RunOptions(tiling=Tiling(max_memory="4GiB")))
"""

from vaetool.jobs.common import DEFAULT_MODEL, ModelSpec, RunOptions, attention_scope, load_model, prepare_output
from vaetool.jobs.decode import DecodeSettings, decode_files
from vaetool.jobs.encode import EncodeSettings, encode_files
from vaetool.jobs.roundtrip import ImageResult, RoundtripSettings, build_report, roundtrip_files
from vaetool.jobs.video import VideoAction, VideoSettings, run_video

__all__ = [
    "DEFAULT_MODEL", "DecodeSettings", "EncodeSettings", "ImageResult", "ModelSpec", "RoundtripSettings", "RunOptions",
    "VideoAction", "VideoSettings", "attention_scope", "build_report", "decode_files", "encode_files", "load_model",
    "prepare_output", "roundtrip_files", "run_video",
]  # fmt: skip
