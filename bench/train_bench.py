"""Section ``train``: a training step of our ``base`` against peer UNets at matched parameters (±15 %), each
ratio from contenders timed in the same alternating rounds: ours (pooled-caption FiLM, as shipped) vs diffusers'
UNet3DConditionModel (cross-attention to caption tokens); ours with cross-attention on the same tokens vs that
UNet3DConditionModel; ours vs video-diffusion-pytorch's Unet3D (pooled caption too). Section ``exp``: speed
changes to t2v.train, measured as variants of our own step: the adopted fused AdamW (before -> after), the demo's
model in 2x2 patches, then with halved frames, the (2+1)D block's temporal conv as a Conv2d (each before -> after)
and the remaining candidate train.channels_last=true (shipped vs channels_last)."""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from bench.common import REPO, Row, SectionResult, alternate, fmt_rate, fmt_s, log, median, per_round_ratios
from bench.harness import (PEER_TOKENS, Inputs, TrainStep, build_ours, build_peer, build_vdp, diffusers_available,
                           forward_ours, forward_ours_tokens, forward_peer, forward_vdp, import_vdp, peer_kwargs,
                           vdp_available, vdp_kwargs)
from bench.previous import ADAMW_KWARGS, conv2plus1d_forward_previous

TARGET_SPEEDUP = 3.0
PARAM_TOLERANCE = 0.15


def device_and_precision() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), "bf16"
    return torch.device("cpu"), "fp32"  # what t2v.train picks on CPU


@dataclass
class Pair:
    """One ratio row of the train section: contender ``ours`` against ``peer`` (names in the alternate rounds)."""

    key: str  # res.data["comparisons"][key]
    ours: str
    peer: str
    title: str  # the row's name, before the parameter counts
    note: str = ""  # appended to the row's detail


def compare(pair: Pair, times: dict[str, list[float]], params: dict[str, int], batch: int) -> dict:
    t_ours, t_peer = median(times[pair.ours]), median(times[pair.peer])
    p_ours, p_peer = params[pair.ours], params[pair.peer]
    return {"ours": pair.ours, "peer": pair.peer,
            "params": {"ours": p_ours, "peer": p_peer, "peer_over_ours": p_peer / p_ours},
            "params_matched": abs(p_peer / p_ours - 1) <= PARAM_TOLERANCE,
            "median_s": {"ours": t_ours, "peer": t_peer},
            "clips_per_s": {"ours": batch / t_ours, "peer": batch / t_peer},
            "ratio": t_peer / t_ours, "per_round_ratio": per_round_ratios(times[pair.peer], times[pair.ours])}


def ratio_row(pair: Pair, c: dict, target: str, passed: bool | None) -> Row:
    p, cps, t = c["params"], c["clips_per_s"], c["median_s"]
    return Row(
        f"Training step, {pair.title} ({p['ours'] / 1e6:.1f} M vs {p['peer'] / 1e6:.1f} M params)",
        f"{c['ratio']:.2f}x ({fmt_rate(cps['ours'])} vs {fmt_rate(cps['peer'])} clips/s; "
        f"{fmt_s(t['ours'])} vs {fmt_s(t['peer'])} per step)",
        target, passed,
        f"per-round ratios {', '.join(f'{r:.2f}' for r in c['per_round_ratio'])}; params "
        f"{'' if c['params_matched'] else 'NOT '}matched ({p['peer_over_ours'] - 1:+.1%}){pair.note}")


def bench_train(args) -> SectionResult:
    res = SectionResult("train")
    if args.quick:
        size, peer_spec, inp = "tiny", "tiny", Inputs(batch=1, frames=4, size=16, text_dim=64)
    else:
        size, peer_spec, inp = args.model_size, args.model_size, Inputs(batch=2, frames=8, size=64, text_dim=512)
    device, precision = device_and_precision()
    no_diffusers, no_vdp = diffusers_available(), vdp_available()
    d, L = inp.text_dim, inp.tokens
    config = {"ours": {"size": size, "text": f"pooled (B, {d})"},
              "input": {"batch": inp.batch, "frames": inp.frames, "size": inp.size},
              "device": str(device), "precision": precision, "repeats": args.repeats, "warmup": 1}
    res.data["config"] = config
    pairs = {
        "diffusers": Pair("diffusers", "ours", "diffusers", f"{size} vs diffusers UNet3DConditionModel"),
        "cross_attention": Pair(
            "cross_attention", "ours_xattn", "diffusers",
            f"{size} with cross-attention on {L} caption tokens vs diffusers UNet3DConditionModel",
            # said so that "like for like" is not over-read: same tokens, but attention in different places
            "; both attend to the same tokens: ours in its lowest-resolution blocks only, diffusers in every "
            "block but those of its last level"),
        "vdp": Pair("vdp", "ours", "vdp", f"{size} vs video-diffusion-pytorch Unet3D",
                    f"; both get the pooled caption (B, {d})"),
    }
    why = {"diffusers": no_diffusers, "cross_attention": no_diffusers, "vdp": no_vdp}
    if no_diffusers and no_vdp:
        res.skipped = f"{no_diffusers}; {no_vdp}"
        return res

    # every contender in one alternate(...): each ratio's two sides share the same rounds, and the slow
    # diffusers step is timed once for both rows that compare against it
    steps = {"ours": TrainStep(build_ours(size, d), forward_ours, inp.clip(device), inp.pooled(device), precision)}
    if not no_diffusers:
        steps["ours_xattn"] = TrainStep(build_ours(size, d, cross_attention=True), forward_ours_tokens,
                                        inp.clip(device), inp.caption(device), precision)
        steps["diffusers"] = TrainStep(build_peer(peer_spec, d, inp.size), forward_peer, inp.clip(device),
                                       inp.token_states(device), precision)
        config["ours_xattn"] = {"size": size, "cross_attention": True,
                                "text": f"pooled (B, {d}) + tokens (B, {L}, {d}) with token_mask (B, {L})"}
        config["peer"] = {"class": "diffusers.UNet3DConditionModel", **peer_kwargs(peer_spec, d, inp.size),
                          "text": f"encoder_hidden_states (B, {PEER_TOKENS}, {d})"}
    if not no_vdp:
        steps["vdp"] = TrainStep(build_vdp(peer_spec, d), forward_vdp, inp.clip(device), inp.pooled(device),
                                 precision)
        config["vdp"] = {"class": "video_diffusion_pytorch.Unet3D", **vdp_kwargs(peer_spec, d),
                         "text": f"cond (B, {d})", "torchvision": import_vdp()[1]}
    params = {n: s.params for n, s in steps.items()}
    for pair in pairs.values():
        if not why[pair.key]:
            p_ours, p_peer = params[pair.ours], params[pair.peer]
            log(f"train: {pair.ours} {p_ours / 1e6:.2f} M params vs {pair.peer} {p_peer / 1e6:.2f} M "
                f"({p_peer / p_ours - 1:+.1%})")
    log(f"train: {inp.batch}x{inp.frames}x{inp.size}x{inp.size} on {device}; contenders {', '.join(steps)}")

    times = alternate(steps, args.repeats, warmup=1, label="train")
    comparisons = {k: compare(pair, times, params, inp.batch) for k, pair in pairs.items() if not why[k]}
    res.data.update({"seconds_per_step": times, "median_s": {n: median(v) for n, v in times.items()},
                     "clips_per_s": {n: inp.batch / median(v) for n, v in times.items()}, "params_all": params,
                     "last_loss": {n: s.last_loss for n, s in steps.items()},
                     "comparisons": {**comparisons, **{k: {"skipped": w} for k, w in why.items() if w}}})
    if "diffusers" in comparisons:  # the original row's keys, as earlier result files have them
        c = comparisons["diffusers"]
        res.data.update({"params": c["params"], "ratio": c["ratio"], "per_round_ratio": c["per_round_ratio"],
                         "params_matched": c["params_matched"]})

    for k, pair in pairs.items():
        # the original row has the target; the others have none of ours: they say how it holds up like for like
        target = (f">= {TARGET_SPEEDUP:g}x at params within ±{PARAM_TOLERANCE:.0%}" if k == "diffusers"
                  else f"- (info; params within ±{PARAM_TOLERANCE:.0%})")
        if why[k]:
            res.rows.append(Row(f"Training step, {pair.title}", f"not measured: {why[k]}", target, None, skipped=True))
            continue
        c = comparisons[k]
        ok = None if args.quick or k != "diffusers" else (c["ratio"] >= TARGET_SPEEDUP and c["params_matched"])
        res.rows.append(ratio_row(pair, c, target, ok))
    return res


def bench_exp(args) -> SectionResult:
    """Variants of OUR training step. Adopted: AdamW(fused=True), measured before (the previous default AdamW,
    bench/previous.py) -> after (t2v.train as shipped); configs/demo.yaml's model before and after model.patch=2,
    then model.downsample_time, and with the previous temporal conv (bench/previous.py) -> as shipped.
    Candidate: train.channels_last=true, measured against the shipped step (t2v.train's default is false)."""
    res = SectionResult("exp")
    device, precision = device_and_precision()
    if args.quick:
        size, inp = "tiny", Inputs(batch=1, frames=4, size=16, text_dim=64)
    else:
        size, inp = args.model_size, Inputs(batch=2, frames=8, size=64, text_dim=512)
    variants = {
        "before": {"fused_adamw": False},  # t2v.train before: AdamW() defaults (bench/previous.py)
        "after": {"fused_adamw": True},  # t2v.train as shipped: AdamW(fused=True), train.channels_last=false
        "channels_last": {"fused_adamw": True, "channels_last": True},  # shipped + train.channels_last=true
    }
    steps = {name: TrainStep(build_ours(size, inp.text_dim), forward_ours, inp.clip(device), inp.pooled(device),
                             precision, **kw) for name, kw in variants.items()}
    res.data["config"] = {"size": size, "input": vars(inp), "device": str(device), "precision": precision,
                          "variants": variants}
    times = alternate(steps, args.repeats, warmup=1, label="exp")
    t = {n: median(v) for n, v in times.items()}
    fused = {"speedup": t["before"] / t["after"], "per_round": per_round_ratios(times["before"], times["after"])}
    cl = {"speedup": t["after"] / t["channels_last"],
          "per_round": per_round_ratios(times["after"], times["channels_last"])}
    res.data.update({"seconds_per_step": times, "median_s": t, "fused_adamw_before_after": fused,
                     "channels_last_vs_shipped": cl})

    # the optimizer step alone: the previous default AdamW vs the shipped fused one, same parameters and grads
    model = build_ours(size, inp.text_dim).to(device)
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    opts = {"before": torch.optim.AdamW(model.parameters(), lr=1e-4, **ADAMW_KWARGS),
            "after": torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)}

    def opt_step(opt):
        def run():
            for _ in range(5):
                for p, g in zip(model.parameters(), grads):
                    p.grad = g
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    ot = alternate({n: opt_step(o) for n, o in opts.items()}, max(3, args.repeats), warmup=1, label="exp optimizer")
    ot = {n: [x / 5 for x in v] for n, v in ot.items()}
    opt_ratio = median(ot["before"]) / median(ot["after"])
    res.data["optimizer_step_s"] = ot
    res.data["optimizer_speedup"] = opt_ratio
    res.data["optimizer_per_round"] = per_round_ratios(ot["before"], ot["after"])

    res.rows.append(Row(f"Adopted change: t2v.train AdamW(fused=True), training step ({size}, {device.type}): "
                        "before -> after",
                        f"{fused['speedup']:.2f}x per step ({fmt_s(t['before'])} -> {fmt_s(t['after'])})",
                        "> 1x", None, f"per-round {', '.join(f'{r:.2f}' for r in fused['per_round'])}",
                        group="adopted"))
    res.rows.append(Row(f"  same, optimizer step alone ({size}): before -> after",
                        f"{opt_ratio:.2f}x ({fmt_s(median(ot['before']))} -> {fmt_s(median(ot['after']))})",
                        "> 1x", None, f"per-round {', '.join(f'{r:.2f}' for r in res.data['optimizer_per_round'])}",
                        group="adopted"))
    res.rows.append(Row(f"train.channels_last=true (default false), training step ({size}, {device.type}): "
                        "shipped vs channels_last",
                        f"{cl['speedup']:.2f}x per step ({fmt_s(t['after'])} vs {fmt_s(t['channels_last'])})",
                        "> 1x", None, f"per-round {', '.join(f'{r:.2f}' for r in cl['per_round'])}",
                        group="candidate"))
    res.rows.extend(demo_model_rows(args, device, precision, res.data))
    return res


def demo_model_rows(args, device, precision: str, data: dict) -> list[Row]:
    """The demo's training step at its own batch and clip size, one adopted change per row: its model before
    patches (UNPATCHED_MODEL) -> in 2x2 patches; -> with halved frames too (as shipped); and the shipped model
    with the previous temporal convolution (bench/previous.py) -> as shipped."""
    from bench.demo_recipes import UNPATCHED_MODEL
    from t2v.config import load_config
    from t2v.models import build_model
    from t2v.models.unet import Conv2Plus1D

    # the demo's batch 16 of 8x16x16 clips (--quick: 2 clips); a row of its own, not the base model's
    inp = Inputs(batch=2 if args.quick else 16, frames=8, size=16, text_dim=512)
    variants = {"before": UNPATCHED_MODEL, "patched": ["model.downsample_time=false"], "after": [],
                "conv3d_temporal": []}
    steps = {}
    for name, overrides in variants.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(load_config(REPO / "configs" / "demo.yaml", overrides, env={}))
        if name == "conv3d_temporal":  # the temporal conv called as the Conv3d it is stored as
            for m in model.modules():
                if isinstance(m, Conv2Plus1D):
                    m.forward = types.MethodType(conv2plus1d_forward_previous, m)
        steps[name] = TrainStep(model, forward_ours, inp.clip(device), inp.pooled(device), precision)
    times = alternate(steps, args.repeats, warmup=1, label="exp demo model")
    t = {n: median(v) for n, v in times.items()}

    def ratio(slow: str, fast: str) -> dict:
        return {"speedup": t[slow] / t[fast], "per_round": per_round_ratios(times[slow], times[fast]),
                "before_after_s": (t[slow], t[fast])}

    pairs = {"patches": ratio("before", "patched"), "downsample_time": ratio("patched", "after"),
             "temporal_conv2d": ratio("conv3d_temporal", "after")}
    data["demo_model"] = {"variants": variants, "seconds_per_step": times,
                          "params": {n: s.params for n, s in steps.items()}, **pairs}
    shape = f"demo, batch {inp.batch}, {device.type}"
    rows = []
    for key, what, target in (
            ("patches", "configs/demo.yaml's model in 2x2 patches (model.patch=2)", 1.5),
            ("downsample_time", "configs/demo.yaml's patched model with halved frames (model.downsample_time)", 1.0),
            ("temporal_conv2d", "the (2+1)D block's temporal conv as a (3, 1) Conv2d instead of a (3, 1, 1) Conv3d",
             1.0)):
        r = pairs[key]
        slow, fast = r["before_after_s"]
        rows.append(Row(f"Adopted change: {what}, training step ({shape}): before -> after",
                        f"{r['speedup']:.2f}x per step ({fmt_s(slow)} -> {fmt_s(fast)})", f"> {target:g}x",
                        None if args.quick else r["speedup"] > target,
                        f"per-round {', '.join(f'{x:.2f}' for x in r['per_round'])}", group="adopted"))
    return rows
