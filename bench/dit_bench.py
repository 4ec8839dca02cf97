"""Section ``dit``: the video transformer (t2v.models.dit, model.arch=dit) timed against

  (a) diffusers' LatteTransformer3DModel at matched parameters (±15 %), on the same latent clips (4 channels) and the
      same caption tokens (b, 77, 512): ours with model.cross_attention=true, Latte with its PixArt-style caption
      projection, ada_norm_single and patch 2 (the shape the Latte paper trains);
  (b) our UNet at matched parameters, in pixel space (the shipped default);
  (c) each architecture at several frame counts and frame sizes: clips/s and peak memory, to show how cost grows.

A step here is forward + MSE against a fixed target + backward + AdamW: the model's cost alone (t2v.step's
schedule, EMA and clipping are the same for every model and timed by the ``train`` section). fp32 on CPU, bf16
autocast on CUDA. (a) and (b) are ratios of contenders timed in the same alternating rounds (bench.common).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from bench.common import REPO, Row, SectionResult, alternate, fmt_rate, fmt_s, log, median, per_round_ratios

TARGET_VS_LATTE = 1.5
PARAM_TOLERANCE = 0.15
TOKENS = 77  # CLIP's caption length


def device_and_precision() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), "bf16"
    return torch.device("cpu"), "fp32"


def our_model(arch: str, size: str, text_dim: int, in_channels: int, cross_attention: bool = False,
              patch: int = 0, seed: int = 0) -> torch.nn.Module:
    """Our model as t2v.train builds it from its config."""
    from t2v import config
    from t2v.models import build_model

    over = [f"model.arch={arch}", f"model.size={size}", f"text.dim={text_dim}", f"model.in_channels={in_channels}",
            f"model.patch={patch}"]
    if cross_attention:
        over += ["model.cross_attention=true", "text.tokens=true"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config.load_config(None, over, env={}), in_channels)


def latte_kwargs(heads: int, head_dim: int, layers: int, frames: int, side: int, text_dim: int) -> dict:
    return dict(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
                num_layers=layers, cross_attention_dim=heads * head_dim, sample_size=side, patch_size=2,
                norm_type="ada_norm_single", caption_channels=text_dim, video_length=frames,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000)


def matched_latte(ours: int, heads: int, head_dim: int, frames: int, side: int, text_dim: int):
    """Latte at our width, with the number of (spatial + temporal) layer pairs whose parameters come closest to
    ``ours``. Returns (model, kwargs)."""
    from diffusers import LatteTransformer3DModel
    from diffusers.utils import logging as dlogging

    from t2v.models import count_params

    dlogging.set_verbosity_error()
    best = None
    for layers in range(1, 33):
        kw = latte_kwargs(heads, head_dim, layers, frames, side, text_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LatteTransformer3DModel(**kw)
        gap = abs(count_params(model) / ours - 1)
        if best is None or gap < best[0]:
            best = (gap, model, kw)
        elif count_params(model) > ours:
            break
    return best[1], best[2]


class Step:
    """Callable: one forward + MSE + backward + AdamW step of ``model`` on fixed inputs."""

    def __init__(self, model, forward, x, cond, precision: str):
        self.device = x.device
        self.model = model.to(self.device).train()
        self.forward, self.x, self.cond = forward, x, cond
        self.target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(self.device)
        self.t = torch.full((x.shape[0],), 500.0, device=self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else nullcontext())
        self.params = sum(p.numel() for p in self.model.parameters())

    def __call__(self) -> float:
        with self.autocast:
            out = self.forward(self.model, self.x, self.t, self.cond)
        loss = torch.nn.functional.mse_loss(out.float(), self.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss.item()


def forward_ours(model, x, t, cond):  # x: b t c h w
    text, tokens, mask = cond
    return model(x, t, text, tokens=tokens, token_mask=mask)


def forward_latte(model, x, t, cond):  # Latte takes b c t h w
    _, tokens, _ = cond
    # no encoder_attention_mask: diffusers 0.42's Latte does not repeat it per frame and fails on one; every token
    # is valid here anyway (ours gets an all-True mask, the same attention)
    out = model(x.permute(0, 2, 1, 3, 4), timestep=t.long(), encoder_hidden_states=tokens, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)  # b t c h w


def train_flops(step: Step) -> int:
    """Forward + backward FLOPs of one step (torch.utils.flop_counter: matmuls and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with step.autocast:
            out = step.forward(step.model, step.x, step.t, step.cond)
        torch.nn.functional.mse_loss(out.float(), step.target).backward()
    step.model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def ratio_of(times, ours, peer, params, batch) -> dict:
    t_o, t_p = median(times[ours]), median(times[peer])
    return {"params": {"ours": params[ours], "peer": params[peer], "peer_over_ours": params[peer] / params[ours]},
            "params_matched": abs(params[peer] / params[ours] - 1) <= PARAM_TOLERANCE,
            "median_s": {"ours": t_o, "peer": t_p}, "clips_per_s": {"ours": batch / t_o, "peer": batch / t_p},
            "ratio": t_p / t_o, "per_round_ratio": per_round_ratios(times[peer], times[ours])}


def ratio_row(name: str, c: dict, target: str, passed, note: str = "") -> Row:
    p, cps, t = c["params"], c["clips_per_s"], c["median_s"]
    return Row(f"{name} ({p['ours'] / 1e6:.2f} M vs {p['peer'] / 1e6:.2f} M params)",
               f"{c['ratio']:.2f}x ({fmt_rate(cps['ours'])} vs {fmt_rate(cps['peer'])} clips/s; "
               f"{fmt_s(t['ours'])} vs {fmt_s(t['peer'])} per step)", target, passed,
               f"per-round ratios {', '.join(f'{r:.2f}' for r in c['per_round_ratio'])}; params "
               f"{'' if c['params_matched'] else 'NOT '}matched ({p['peer_over_ours'] - 1:+.1%}){note}")


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM. Not getrusage's ru_maxrss, which Linux carries across
    fork + exec: a child of the (large) benchmark process would start at its parent's mark and never exceed it."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS: a fallback


def probe(spec: dict) -> dict:
    """One (arch, size, frames, side) configuration: its training step's s/clip and peak memory. Run in a fresh
    process (``python -m bench.dit_bench '<json>'``) so every configuration starts from the same memory state."""
    torch.set_num_threads(spec["threads"])
    device, precision = device_and_precision()
    b, f, s, d = spec["batch"], spec["frames"], spec["side"], spec["text_dim"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, f, 3, s, s, generator=g).to(device)
    cond = (torch.randn(b, d, generator=g).to(device), None, None)
    step = Step(our_model(spec["arch"], spec["size"], d, 3), forward_ours, x, cond, precision)
    # the baseline: the model and its inputs built. On CPU the resident-set high-water mark (tracemalloc does not
    # see torch's allocations), so peak - baseline is what training adds on top of the weights: gradients, AdamW
    # state, activations. A fresh process per configuration keeps the marks apart.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = peak_rss()
    step()  # warmup: allocator pools, AdamW state, oneDNN primitives
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return {**spec, "params": step.params, "s_per_step": median(times), "clips_per_s": b / median(times),
            "peak_mib": (peak - base) / 2**20}


def run_probe(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.dit_bench", json.dumps(spec)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"probe {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_dit(args) -> SectionResult:
    res = SectionResult("dit")
    device, precision = device_and_precision()
    if args.quick:  # tiny: a smoke test
        size, text_dim, batch, frames, latent_side, pixel_side = "tiny", 64, 1, 4, 8, 16
        grid, probe_size, probe_steps = [(2, 16), (4, 16)], "tiny", 1
    else:
        size, text_dim, batch, frames, latent_side, pixel_side = "base", 512, 2, 8, 32, 64
        grid, probe_size, probe_steps = [(8, 32), (16, 32), (8, 64), (16, 64)], "small", 2
    res.data["config"] = {"size": size, "device": str(device), "precision": precision, "repeats": args.repeats,
                          "latent_input": [batch, frames, 4, latent_side, latent_side],
                          "pixel_input": [batch, frames, 3, pixel_side, pixel_side],
                          "caption_tokens": [batch, TOKENS, text_dim]}
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, frames, 4, latent_side, latent_side, generator=g).to(device)
    pixels = (torch.rand(batch, frames, 3, pixel_side, pixel_side, generator=g) * 2 - 1).to(device)
    pooled = torch.randn(batch, text_dim, generator=g).to(device)
    tokens = torch.randn(batch, TOKENS, text_dim, generator=g).to(device)
    caption = (pooled, tokens, torch.ones(batch, TOKENS, dtype=torch.bool, device=device))

    # (a) ours vs Latte, latent clips, both attending to the same caption tokens
    steps = {"dit": Step(our_model("dit", size, text_dim, 4, cross_attention=True, patch=2), forward_ours, z,
                         caption, precision)}
    from t2v.models.dit import resolve_size

    hidden, _, heads = resolve_size(size)
    try:
        latte, kw = matched_latte(steps["dit"].params, heads, hidden // heads, frames, latent_side, text_dim)
        steps["latte"] = Step(latte, forward_latte, z, caption, precision)
        res.data["config"]["latte"] = {"class": "diffusers.LatteTransformer3DModel", **kw}
    except ImportError as e:  # diffusers is an optional extra
        why = f"diffusers' LatteTransformer3DModel is not importable ({e}); `pip install -e .[bench]`"
    params = {n: s.params for n, s in steps.items()}
    log(f"dit: ours {params['dit'] / 1e6:.2f} M vs latte {params.get('latte', 0) / 1e6:.2f} M; {tuple(z.shape)} latents")
    if "latte" in steps:
        res.data["flops_per_step"] = {n: train_flops(s) for n, s in steps.items()}
        times = alternate(steps, args.repeats, warmup=1, label="dit vs latte")
        c = ratio_of(times, "dit", "latte", params, batch)
        res.data["latte"] = {**c, "seconds_per_step": times}
        fl = res.data["flops_per_step"]
        ok = None if args.quick else (c["ratio"] >= TARGET_VS_LATTE and c["params_matched"])
        res.rows.append(ratio_row(
            f"Training step, dit {size} (cross-attention) vs diffusers LatteTransformer3DModel, latents "
            f"{frames}x{latent_side}x{latent_side}", c, f">= {TARGET_VS_LATTE:g}x at params within ±15%", ok,
            f"; {TOKENS} caption tokens each; FLOPs/step {fl['dit'] / 1e9:.3g} G vs {fl['latte'] / 1e9:.3g} G; "
            f"Latte num_layers={kw['num_layers']} (x2 blocks)"))
    else:
        res.rows.append(Row(f"Training step, dit {size} vs diffusers LatteTransformer3DModel", f"not measured: {why}",
                            f">= {TARGET_VS_LATTE:g}x", None, skipped=True))
    del steps

    # (b) ours (dit) vs ours (unet), pixel clips, pooled caption
    steps = {"dit": Step(our_model("dit", size, text_dim, 3), forward_ours, pixels, (pooled, None, None), precision),
             "unet": Step(our_model("unet", size, text_dim, 3), forward_ours, pixels, (pooled, None, None), precision)}
    params = {n: s.params for n, s in steps.items()}
    times = alternate(steps, args.repeats, warmup=1, label="dit vs unet")
    c = ratio_of(times, "dit", "unet", params, batch)
    res.data["unet"] = {**c, "seconds_per_step": times}
    res.rows.append(ratio_row(f"Training step, dit {size} vs our unet {size}, pixels {frames}x{pixel_side}x"
                              f"{pixel_side} (>1: the dit is faster)", c, "- (info; params within ±15%)", None))
    del steps

    # (c) cost against frames x frame size, each configuration in a fresh process
    scaling = []
    for arch in ("dit", "unet"):
        for f, s in grid:
            spec = {"arch": arch, "size": probe_size, "frames": f, "side": s, "batch": 1, "text_dim": text_dim,
                    "steps": probe_steps, "threads": torch.get_num_threads()}
            r = run_probe(spec)
            log(f"dit scaling: {arch} {probe_size} {f}x{s}x{s}: {r['clips_per_s']:.3g} clips/s, "
                f"{r['peak_mib']:.0f} MiB")
            scaling.append(r)
    res.data["scaling"] = scaling
    mem = ("peak CUDA memory allocated" if device.type == "cuda" else "peak RSS") + \
        " during the steps minus after building the model (gradients, AdamW state, activations)"
    for arch in ("dit", "unet"):
        rs = [r for r in scaling if r["arch"] == arch]
        res.rows.append(Row(
            f"Scaling, {arch} {probe_size} ({rs[0]['params'] / 1e6:.2f} M params), batch 1, pixels: frames x side",
            "; ".join(f"{r['frames']}x{r['side']}: {fmt_rate(r['clips_per_s'])} clips/s, {r['peak_mib']:.0f} MiB"
                      for r in rs), "- (info)", None, f"memory: {mem}"))
    return res


def main() -> None:
    """Child process of run_probe: one configuration, its result as one JSON line on stdout."""
    print(json.dumps(probe(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
