#!/usr/bin/env python3
"""Export one UNet step to ONNX, with seeded inputs and torch's output, for tests/browser/ort-compare.mjs.

Usage (from the repo root; torch + diffusers on CPU, see ../shared/notes/environment.md):

  OMP_NUM_THREADS=1 /work/venv/bin/python scripts/ort_compare.py --model tests/fixtures/sd1 --out target/ort/fixture
  OMP_NUM_THREADS=1 /work/venv/bin/python scripts/ort_compare.py --sd15-shaped --width-div 5 --latent 32 32 \
      --out target/ort/sd15-div5
  node tests/browser/ort-compare.mjs --dir target/ort/fixture [--runs 5] [--ours 'www/bench.html?mode=unet&...']

Options: --latent H W (default: the config's sample_size), --batch B (default 2, as classifier-free
guidance runs), --seq 77, --timestep 500, --opset 18.

--model DIR loads UNet2DConditionModel.from_pretrained(DIR, subfolder="unet").
--sd15-shaped builds a UNet with Stable Diffusion 1.5's config (block_out_channels 320/640/1280/1280,
attention_head_dim 8, layers_per_block 2, the standard block types) with the block channels divided by
--width-div N, norm_num_groups lowered to the largest value <= 32 that divides every width,
cross_attention_dim 768 (CLIP's width; --div-cross divides it too) and weights from torch.manual_seed(0).
That model is saved as a diffusers folder DIR/sd15-shaped/unet (config.json + safetensors), so another
engine can load exactly the same weights; inputs.json "model" names the folder.

Writes to --out DIR:
  unet.onnx                  static shapes, opset >= 17 (weights in unet.onnx.data only above 2 GB)
  sample.bin                 [B,4,H,W]   raw little-endian float32, torch.Generator().manual_seed(0) randn
  encoder_hidden_states.bin  [B,seq,D]   same generator, drawn after sample
  out_torch.bin              [B,4,H,W]   the UNet's output in torch (float32, CPU)
  inputs.json                shapes, timestep, how the timestep reaches the graph, file names

Needs the `onnx` and `onnxscript` packages (torch.onnx's exporter); install them without dependencies
so pip does not pull CUDA torch back in:
  /work/venv/bin/pip install --no-deps onnx onnxscript onnx-ir ml_dtypes protobuf
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DIFFUSERS_VERBOSITY"] = "error"

INSTALL_HINT = (
    "torch.onnx.export needs the packages onnx and onnxscript. Install them WITHOUT dependencies "
    "(anything that depends on torch would otherwise pull GBs of CUDA packages):\n"
    "  /work/venv/bin/pip install --no-deps onnx onnxscript onnx-ir ml_dtypes protobuf"
)


def check_exporter_deps():
    missing = []
    for name in ("onnx", "onnxscript", "onnx_ir", "ml_dtypes", "google.protobuf"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - any import failure means unusable
            missing.append(name)
    if missing:
        sys.exit(f"error: missing Python package(s): {', '.join(missing)}\n{INSTALL_HINT}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers folder with a unet/ subfolder (e.g. tests/fixtures/sd1)")
    src.add_argument("--sd15-shaped", action="store_true", help="SD 1.5's UNet config, random weights")
    p.add_argument("--width-div", type=int, default=1, help="divide SD 1.5's block channels by N (default 1)")
    p.add_argument("--div-cross", action="store_true", help="with --sd15-shaped: divide cross_attention_dim too")
    p.add_argument("--latent", type=int, nargs=2, metavar=("H", "W"), help="latent size (default: sample_size)")
    p.add_argument("--batch", type=int, default=2, help="batch (default 2: classifier-free guidance)")
    p.add_argument("--seq", type=int, default=77, help="text sequence length (default 77)")
    p.add_argument("--timestep", type=float, default=500.0)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args()
    if a.opset < 17:
        p.error("--opset must be >= 17")
    if a.width_div < 1:
        p.error("--width-div must be >= 1")
    return a


def sd15_config(div, div_cross):
    base = [320, 640, 1280, 1280]
    for c in base:
        if c % div:
            sys.exit(f"error: --width-div {div} does not divide SD 1.5's block channels {base}")
    widths = [c // div for c in base]
    heads = 8  # SD 1.5's attention_head_dim (diffusers uses it as the number of heads)
    for c in widths:
        if c % heads:
            sys.exit(f"error: width {c} (after --width-div {div}) is not divisible by {heads} attention heads")
    groups = max(g for g in range(1, 33) if all(c % g == 0 for c in widths))
    cross = 768 // div if div_cross else 768
    if div_cross and 768 % div:
        sys.exit(f"error: --width-div {div} does not divide cross_attention_dim 768")
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        only_cross_attention=False,
        block_out_channels=widths,
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=groups,
        norm_eps=1e-5,
        cross_attention_dim=cross,
        attention_head_dim=heads,
        use_linear_projection=False,
    )


def write_f32(path, t):
    import numpy as np

    arr = t.detach().to("cpu").contiguous().numpy().astype("<f4", copy=False)
    assert arr.dtype == np.dtype("<f4")
    path.write_bytes(arr.tobytes())


def main():
    a = parse_args()
    check_exporter_deps()

    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    if a.model:
        unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
        model_desc = a.model
    else:
        torch.manual_seed(0)
        cfg = sd15_config(a.width_div, a.div_cross)
        unet = UNet2DConditionModel(**cfg)
        folder = out / "sd15-shaped"
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        model_desc = str(folder)
    unet = unet.float().eval()
    cfg = unet.config
    h, w = a.latent if a.latent else (cfg.sample_size, cfg.sample_size)
    b = a.batch
    d = cfg.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((b, cfg.in_channels, h, w), generator=gen, dtype=torch.float32)
    ehs = torch.randn((b, a.seq, d), generator=gen, dtype=torch.float32)
    timestep = torch.tensor(a.timestep, dtype=torch.float32)

    with torch.no_grad():
        t0 = time.perf_counter()
        ref = unet(sample, timestep, encoder_hidden_states=ehs, return_dict=False)[0]
        torch_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"model {model_desc}: {n_params / 1e6:.2f} M parameters; torch CPU step {torch_s * 1000:.1f} ms; "
          f"output {list(ref.shape)}, max |out| {ref.abs().max().item():.4g}", flush=True)

    class WithScalarTimestep(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    class WithConstantTimestep(torch.nn.Module):
        def __init__(self, unet, t):
            super().__init__()
            self.unet = unet
            self.t = float(t)

        def forward(self, sample, encoder_hidden_states):
            t = torch.full((), self.t, dtype=torch.float32)
            return self.unet(sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    external = weight_bytes > 2_000_000_000 - 64 * 1024 * 1024  # protobuf's 2 GB limit, with headroom
    onnx_path = out / "unet.onnx"
    data_name = "unet.onnx.data"
    for stale in (onnx_path, out / data_name):
        if stale.exists():
            stale.unlink()

    def export(module, args, input_names):
        t0 = time.perf_counter()
        prog = torch.onnx.export(
            module, args, None, input_names=input_names, output_names=["out_sample"],
            opset_version=a.opset, dynamo=True, optimize=True, verbose=False,
        )
        prog.save(str(onnx_path), external_data=external)
        print(f"exported {onnx_path} in {time.perf_counter() - t0:.1f} s", flush=True)

    timestep_mode = "input"
    try:
        export(WithScalarTimestep(unet).eval(), (sample, timestep, ehs), ["sample", "timestep", "encoder_hidden_states"])
    except Exception as e:  # noqa: BLE001
        print(f"warning: export with a scalar timestep input failed ({type(e).__name__}: {e}); "
              f"folding timestep {a.timestep} into the graph", file=sys.stderr, flush=True)
        timestep_mode = "constant"
        export(WithConstantTimestep(unet, a.timestep).eval(), (sample, ehs), ["sample", "encoder_hidden_states"])

    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=None)
    graph_inputs = {}
    for i in m.graph.input:
        dims = [x.dim_value if x.HasField("dim_value") else (x.dim_param or "?") for x in i.type.tensor_type.shape.dim]
        graph_inputs[i.name] = dims
    for name, dims in graph_inputs.items():
        if any(not isinstance(x, int) or x <= 0 for x in dims) and dims:
            sys.exit(f"error: input {name} has non-static shape {dims}")
    op_counts = {}
    for node in m.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
    del m

    write_f32(out / "sample.bin", sample)
    write_f32(out / "encoder_hidden_states.bin", ehs)
    write_f32(out / "out_torch.bin", ref)

    files = {
        "onnx": "unet.onnx",
        "sample": "sample.bin",
        "encoder_hidden_states": "encoder_hidden_states.bin",
        "out_torch": "out_torch.bin",
    }
    if external:
        files["onnx_data"] = data_name
    info = {
        "model": model_desc,
        "model_config": {k: cfg[k] for k in ("block_out_channels", "cross_attention_dim", "attention_head_dim",
                                             "layers_per_block", "norm_num_groups", "in_channels", "sample_size")},
        "parameters": n_params,
        "sample": list(sample.shape),
        "encoder_hidden_states": list(ehs.shape),
        "timestep": a.timestep,
        "timestep_mode": timestep_mode,  # "input": a float32 scalar (shape []) named "timestep"; "constant": folded in
        "output": list(ref.shape),
        "dtype": "float32 little-endian",
        "seed": "torch.Generator().manual_seed(0): randn sample, then randn encoder_hidden_states",
        "onnx_opset": opset,
        "onnx_inputs": graph_inputs,
        "onnx_nodes": sum(op_counts.values()),
        "onnx_op_counts": dict(sorted(op_counts.items(), key=lambda kv: -kv[1])),
        "torch_cpu_ms": round(torch_s * 1000, 2),
        "torch": torch.__version__,
        "files": files,
    }
    if a.sd15_shaped:
        info["sd15_width_div"] = a.width_div
    (out / "inputs.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}/inputs.json: opset {opset}, {info['onnx_nodes']} nodes, timestep {timestep_mode}", flush=True)


if __name__ == "__main__":
    main()
