#!/usr/bin/env python3
"""Reference trajectories of the diffusers schedulers for tests/schedulers.rs.

Run with the torch/diffusers venv (diffusers 0.42.1, scipy for LMS):

    OMP_NUM_THREADS=1 python scripts/scheduler_fixtures.py [out_dir]

Writes tests/fixtures/schedulers/cases.json (the cases: scheduler kind, the model's
scheduler_config.json, step count, timesteps, sigmas, init_noise_sigma) and
tests/fixtures/schedulers/trajectories.safetensors (float32 tensors):

* ``base_x`` [120]: torch.randn((2,4,3,5), generator=Generator().manual_seed(0)); the sample
  starts as ``base_x * init_noise_sigma``.
* ``base_noise`` [120]: torch.randn((2,4,3,5), manual_seed(1)); the fake model's output at step
  i is ``0.8 * scaled + base_noise[(j + 17 * i) % 120]`` (exact in f32 on both sides).
* ``rng_seed3`` [40, 120]: consecutive torch.randn(120) draws of manual_seed(3), the generator
  every case passes to ``step`` (a check of crate::rng).
* ``<case>/x`` [T - start, 120]: the sample after each step (img2img cases start at ``start``
  from ``add_noise(base_x, base_noise, timesteps[start])``).
* ``<case>/scaled`` [T - start, 120]: ``scale_model_input`` at each step (only where it is not the
  identity; cases.json says ``scaled_identity``).
* ``<case>/add_noise`` [120]: ``add_noise(base_x, base_noise, timesteps[T // 2])``.
* ``ac/<key>`` [1000]: ``alphas_cumprod`` (shared by the cases with the same betas).

The loop is the diffusers pipeline loop, driven the way pipelines drive it: the model's config
goes through its own class first and the chosen class is built with
``Class.from_config(orig.config, **overrides)``; every ``step`` gets the same
``torch.Generator("cpu").manual_seed(3)``.
"""

import hashlib
import inspect
import json
import os
import sys

import numpy as np
import torch

import diffusers
from safetensors.torch import save_file

torch.set_num_threads(1)
diffusers.utils.logging.set_verbosity_error()

SHAPE = (2, 4, 3, 5)
N = 120

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2V = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

KINDS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp-2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
SIGMA_CLASSES = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
}
LEADING_DEFAULT = {"ddim", "pndm", "ddpm", "lcm"}
RESCALE_OK = {"ddim", "ddpm", "euler", "euler-a", "dpmpp-2m", "unipc", "lcm"}


def cases():
    """(name, kind, config, steps, eta, start); kind "default" = the config's own class, no
    overrides; start > 0 = img2img: the loop starts at timesteps[start] (diffusers'
    set_begin_index) from add_noise(base_x, base_noise, timesteps[start])."""
    out = []

    def add(kind, tag, config, steps, eta=0.0, start=0):
        for n in steps:
            out.append((f"{kind}_{tag}_{n}", kind, config, n, eta, start))

    for kind in KINDS:
        add(kind, "sd15", SD15, [1, 4, 7, 25])
        add(kind, "sd2v", SD2V, [4, 7])
        add(kind, "default", {"_class_name": KINDS[kind][0]}, [7])
        if kind != "lcm":
            add(kind, "trailing", {**SD15, "timestep_spacing": "trailing"}, [4, 7])
            other = "linspace" if kind in LEADING_DEFAULT else "leading"
            add(kind, other, {**SD15, "timestep_spacing": other}, [7])
        if kind in RESCALE_OK:
            add(kind, "zsnr", {**SD2V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, [4, 7])
    for kind in ["euler", "heun", "lms", "unipc"]:
        add(kind, "karras", {**SD15, "use_karras_sigmas": True}, [4, 25])
    for kind in ["euler", "dpmpp-2m", "dpmpp-2m-karras", "unipc"]:
        add(kind, "sigmamin", {**SD15, "final_sigmas_type": "sigma_min"}, [7])
    for kind in ["ddim", "euler", "dpmpp-2m", "unipc"]:
        add(kind, "cosine", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, [7])
    add("ddim", "eta1", SD15, [4, 25], eta=1.0)
    add("ddim", "eta05v", SD2V, [7], eta=0.5)
    add("ddim", "trailing", {**SD15, "timestep_spacing": "trailing"}, [61])  # numpy arange gives 62
    add("euler", "trailing", {**SD15, "timestep_spacing": "trailing"}, [61])
    add("ddpm", "fixedlarge", {**SD15, "variance_type": "fixed_large"}, [7])
    add("ddpm", "smalllog", {**SD15, "variance_type": "fixed_small_log"}, [7])
    add("ddpm", "clip", {**SD15, "clip_sample": True}, [7])
    add("pndm", "prk", {**SD15, "skip_prk_steps": False}, [4, 7])
    add("heun", "v", {**SD2V, "timestep_spacing": "trailing"}, [7])
    add("lms", "v", SD2V, [25])
    add("euler", "exponential", {**SD15, "use_exponential_sigmas": True}, [7])
    add("unipc", "order3", {**SD15, "solver_order": 3}, [7, 25])
    add("unipc", "bh1", {**SD15, "solver_type": "bh1"}, [7])
    add("unipc", "noise", {**SD15, "predict_x0": False}, [7])
    add("unipc", "karras_sigmamin", {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, [7])
    dpm = {**SD15, "_class_name": "DPMSolverMultistepScheduler"}
    add("default", "dpm3", {**dpm, "solver_order": 3}, [7, 25])
    add("default", "dpm3sde", {**dpm, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, [7])
    add("default", "dpmheun", {**dpm, "solver_type": "heun"}, [7])
    add("default", "dpmsdeheun", {**dpm, "solver_type": "heun", "algorithm_type": "sde-dpmsolver++"}, [7])
    add("default", "dpmsolver", {**dpm, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, [7])
    add("default", "sdedpmsolver", {**dpm, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, [7])
    add("default", "dpmlu", {**dpm, "use_lu_lambdas": True}, [7])
    add("default", "dpmeuler", {**dpm, "euler_at_final": True, "lower_order_final": False}, [25])
    add("default", "dpmexp", {**dpm, "use_exponential_sigmas": True}, [7])
    add("dpmpp-2m-karras", "bounds", {**SD15, "sigma_min": 0.1, "sigma_max": 10.0}, [7])
    add("euler", "karras_bounds", {**SD15, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, [7])
    add("euler", "continuous", {**SD2V, "timestep_type": "continuous"}, [7])
    add("unipc", "nocorr", {**SD15, "disable_corrector": [0, 2]}, [7])
    for kind in KINDS:
        order = 2 if kind == "heun" else 1
        add(kind, "img2img", SD15, [10], start=3 * order)
    add("default", "lcm_orig", {**SD15, "_class_name": "LCMScheduler", "original_inference_steps": 25}, [6])
    return out


def build(kind, config):
    orig_cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"))
    orig = orig_cls.from_config(config)
    if kind == "default":
        return orig
    cls_name, overrides = KINDS[kind]
    return getattr(diffusers, cls_name).from_config(orig.config, **overrides)


def f32_list(t):
    return [float(v) for v in torch.as_tensor(t).to(torch.float32).flatten().tolist()]


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "schedulers"
    )
    os.makedirs(out_dir, exist_ok=True)
    base_x = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0), dtype=torch.float32)
    base_noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1), dtype=torch.float32)
    g3 = torch.Generator("cpu").manual_seed(3)
    rng3 = torch.stack([torch.randn(SHAPE, generator=g3, dtype=torch.float32).flatten() for _ in range(40)])
    tensors = {"base_x": base_x.flatten(), "base_noise": base_noise.flatten(), "rng_seed3": rng3}
    flat_noise = base_noise.flatten()
    idx = torch.arange(N)
    ac_keys = {}
    meta = []
    for name, kind, config, n, eta, start in cases():
        sched = build(kind, config)
        sched.set_timesteps(n)
        ac = sched.alphas_cumprod.to(torch.float32).contiguous()
        h = hashlib.sha1(ac.numpy().tobytes()).hexdigest()[:12]
        if h not in ac_keys:
            ac_keys[h] = f"ac/{h}"
            tensors[ac_keys[h]] = ac
        timesteps = sched.timesteps
        T = len(timesteps)
        # add_noise on a fresh copy (pipelines call it before the loop)
        mid = start if start else T // 2
        fresh = build(kind, config)
        fresh.set_timesteps(n)
        noisy = fresh.add_noise(base_x, base_noise, timesteps[mid : mid + 1]) if T else base_x
        ins = sched.init_noise_sigma
        if start:
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(start)
            x = sched.add_noise(base_x, base_noise, timesteps[start : start + 1])
        else:
            x = base_x * ins
        g = torch.Generator("cpu").manual_seed(3)
        step_params = inspect.signature(sched.step).parameters
        xs, scaled_all = [], []
        identity = True
        for i, t in enumerate(timesteps):
            if i < start:
                continue
            scaled = sched.scale_model_input(x, t)
            if not torch.equal(scaled, x):
                identity = False
            noise_i = flat_noise[(idx + 17 * i) % N].reshape(SHAPE)
            eps = 0.8 * scaled + noise_i
            kw = {}
            if "generator" in step_params:
                kw["generator"] = g
            if eta:
                kw["eta"] = eta
            try:
                x = sched.step(eps, t, x, **kw).prev_sample
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"{name}: diffusers failed at step {i}: {e}") from e
            xs.append(x.flatten().clone())
            scaled_all.append(scaled.flatten().clone())
        if T:
            tensors[f"{name}/x"] = torch.stack(xs).to(torch.float32).contiguous()
            if not identity:
                tensors[f"{name}/scaled"] = torch.stack(scaled_all).to(torch.float32).contiguous()
        tensors[f"{name}/add_noise"] = noisy.flatten().to(torch.float32).contiguous()
        sigma_based = type(sched).__name__ in SIGMA_CLASSES
        sig = f32_list(sched.sigmas) if sigma_based else []
        meta.append(
            {
                "name": name,
                "kind": kind,
                "class": type(sched).__name__,
                "config": config,
                "steps": n,
                "eta": eta,
                "timesteps": [float(t) for t in timesteps.to(torch.float64).tolist()],
                "sigmas": sig,
                "init_noise_sigma": float(torch.as_tensor(ins, dtype=torch.float32)),
                "order": int(sched.order),
                "scaled_identity": identity,
                "alphas_cumprod": ac_keys[h],
                "add_noise_index": mid,
                "start": start,
            }
        )
    save_file(tensors, os.path.join(out_dir, "trajectories.safetensors"))
    doc = {
        "generator": "scripts/scheduler_fixtures.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "shape": list(SHAPE),
        "model_output": "0.8 * scaled + base_noise[(j + 17 * i) % 120]",
        "step_generator_seed": 3,
        "cases": meta,
    }
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"{len(meta)} cases, {len(tensors)} tensors -> {out_dir}")


if __name__ == "__main__":
    main()
