"""Section ``train``: a training step of our ``base`` against diffusers' UNet3DConditionModel at matched
parameters; section ``exp``: speed changes to t2v.train, measured as variants of our own step: the adopted
fused AdamW (before -> after) and the remaining candidate train.channels_last=true (shipped vs channels_last)."""
from __future__ import annotations

import torch

from bench.common import Row, SectionResult, alternate, fmt_rate, fmt_s, log, median, per_round_ratios
from bench.harness import (PEER_TOKENS, PEERS, Inputs, TrainStep, build_ours, build_peer, diffusers_available,
                           forward_ours, forward_peer, peer_kwargs)
from bench.previous import ADAMW_KWARGS

TARGET_SPEEDUP = 3.0
PARAM_TOLERANCE = 0.15


def device_and_precision() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), "bf16"
    return torch.device("cpu"), "fp32"  # what t2v.train picks on CPU


def bench_train(args) -> SectionResult:
    res = SectionResult("train")
    if args.quick:
        size, peer_spec, inp = "tiny", "tiny", Inputs(batch=1, frames=4, size=16, text_dim=64)
    else:
        size, peer_spec, inp = args.model_size, args.model_size, Inputs(batch=2, frames=8, size=64, text_dim=512)
    device, precision = device_and_precision()
    why = diffusers_available()
    ours = TrainStep(build_ours(size, inp.text_dim), forward_ours, inp.clip(device), inp.pooled(device), precision)
    res.data["config"] = {"ours": {"size": size, "text": f"pooled (B, {inp.text_dim})"},
                          "input": {"batch": inp.batch, "frames": inp.frames, "size": inp.size},
                          "device": str(device), "precision": precision, "repeats": args.repeats, "warmup": 1}
    if why:
        res.skipped = why
        return res
    peer = TrainStep(build_peer(peer_spec, inp.text_dim, inp.size), forward_peer, inp.clip(device),
                     inp.token_states(device), precision)
    p_ours, p_peer = ours.params, peer.params
    kw = peer_kwargs(peer_spec, inp.text_dim, inp.size)
    res.data["config"]["peer"] = {"class": "diffusers.UNet3DConditionModel", **{k: v for k, v in kw.items()},
                                  "text": f"encoder_hidden_states (B, {PEER_TOKENS}, {inp.text_dim})"}
    res.data["params"] = {"ours": p_ours, "peer": p_peer, "peer_over_ours": p_peer / p_ours}
    log(f"train: ours {size} {p_ours / 1e6:.2f} M params vs diffusers {PEERS[peer_spec]['block_out_channels']} "
        f"{p_peer / 1e6:.2f} M ({p_peer / p_ours - 1:+.1%}); {inp.batch}x{inp.frames}x{inp.size}x{inp.size} on {device}")

    times = alternate({"ours": ours, "diffusers": peer}, args.repeats, warmup=1, label="train")
    t_ours, t_peer = median(times["ours"]), median(times["diffusers"])
    cps_ours, cps_peer = inp.batch / t_ours, inp.batch / t_peer
    ratio = t_peer / t_ours
    rounds = per_round_ratios(times["diffusers"], times["ours"])
    matched = abs(p_peer / p_ours - 1) <= PARAM_TOLERANCE
    res.data.update({"seconds_per_step": times, "median_s": {"ours": t_ours, "diffusers": t_peer},
                     "clips_per_s": {"ours": cps_ours, "diffusers": cps_peer}, "ratio": ratio,
                     "per_round_ratio": rounds, "params_matched": matched,
                     "last_loss": {"ours": ours.last_loss, "diffusers": peer.last_loss}})
    ok = None if args.quick else (ratio >= TARGET_SPEEDUP and matched)
    res.rows.append(Row(
        f"Training step, {size} vs diffusers UNet3DConditionModel ({p_ours / 1e6:.1f} M vs {p_peer / 1e6:.1f} M params)",
        f"{ratio:.2f}x ({fmt_rate(cps_ours)} vs {fmt_rate(cps_peer)} clips/s; {fmt_s(t_ours)} vs {fmt_s(t_peer)} per step)",
        f">= {TARGET_SPEEDUP:g}x at params within ±{PARAM_TOLERANCE:.0%}", ok,
        f"per-round ratios {', '.join(f'{r:.2f}' for r in rounds)}; params {'' if matched else 'NOT '}matched "
        f"({p_peer / p_ours - 1:+.1%})"))
    return res


def bench_exp(args) -> SectionResult:
    """Variants of OUR training step. Adopted: AdamW(fused=True), measured before (the previous default AdamW,
    bench/previous.py) -> after (t2v.train as shipped). Candidate: train.channels_last=true, measured against
    the shipped step (t2v.train's default is false)."""
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
    return res
