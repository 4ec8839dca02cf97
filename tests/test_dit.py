"""The video transformer (t2v.models.dit, model.arch=dit): the UNet's interface and conditioning semantics, DiT's init,
position embeddings, checkpointing, the size registry, config validation, and that it trains."""
from __future__ import annotations

import copy

import pytest
import torch

from t2v import config as C
from t2v.models.dit import SIZES, VideoDiT, build_dit, resolve_patch, resolve_size
from t2v.models import build_model, count_params

TEXT = 16


def tiny(**kw) -> VideoDiT:
    torch.manual_seed(0)
    args = dict(in_channels=3, hidden=32, depth=4, heads=2, patch=2, text_dim=TEXT)
    return VideoDiT(**{**args, **kw})


def perturb(model: VideoDiT, std: float = 0.05) -> VideoDiT:
    """Un-zero what DiT's init zeroes (modulations, output), as after some training, so outputs depend on inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(b=2, t=4, c=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, t, c, s, s, generator=g), torch.rand(b, generator=g) * 1000,
            torch.randn(b, TEXT, generator=g))


def cfg_of(*overrides) -> C.Config:
    return C.load_config(None, ["model.arch=dit", "model.size=tiny", f"text.dim={TEXT}", *overrides], env={})


@pytest.mark.parametrize("channels,patch,side", [(3, 1, 8), (3, 2, 16), (4, 1, 8), (4, 2, 16)])
def test_output_shape_pixel_and_latent(channels, patch, side):
    model = perturb(tiny(in_channels=channels, patch=patch))
    x, t, text = inputs(c=channels, s=side)
    out = model(x, t, text)
    assert out.shape == x.shape == (2, 4, channels, side, side)
    assert out.abs().sum() > 0


def test_starts_at_zero_and_modulation_learns():
    model = tiny(cross_attention=True)
    x, t, text = inputs()
    tokens = torch.randn(2, 5, TEXT)
    out = model(x, t, text, tokens=tokens)
    assert torch.count_nonzero(out) == 0  # DiT's init: zeroed output layer and modulations
    (out - x).pow(2).mean().backward()
    # the first gradient reaches only the output layer (everything behind a zero Linear gets 0) ...
    assert model.final.linear.weight.grad.abs().sum() > 0
    assert all(torch.count_nonzero(b.ada[-1].weight.grad) == 0 for b in model.blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    # ... after one step every block's adaLN modulation gets one (through the now non-zero output layer); the
    # attention and MLP weights follow a step later, once their gates have moved off 0
    (model(x, t, text, tokens=tokens) - x).pow(2).mean().backward()
    for i, blk in enumerate(model.blocks):
        assert blk.ada[-1].weight.grad.abs().sum() > 0, i


@pytest.mark.parametrize("cross_attention", [False, True])
def test_dropped_rows_see_the_null_caption_whatever_text_holds(cross_attention):
    model = perturb(tiny(cross_attention=cross_attention)).eval()
    x, t, text = inputs()
    tokens, other_tokens = torch.randn(2, 5, TEXT), torch.randn(2, 5, TEXT) * 3
    kw = dict(tokens=tokens, token_mask=torch.ones(2, 5, dtype=torch.bool)) if cross_attention else {}
    kw2 = dict(tokens=other_tokens, token_mask=torch.tensor([[1, 1, 0, 0, 0]] * 2).bool()) if cross_attention else {}
    keep = torch.tensor([True, False])
    with torch.no_grad():
        a = model(x, t, text, cond_mask=keep, **kw)
        b = model(x, t, torch.randn(2, TEXT) * 5, cond_mask=keep, **kw2)  # other captions, other tokens
        null = model(x, t, model.null_text.expand(2, -1), cond_mask=torch.zeros(2, dtype=torch.bool), **kw2)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)  # the dropped row ignores text and tokens
    torch.testing.assert_close(a[1], null[1], rtol=0, atol=1e-6)
    assert (a[0] - b[0]).abs().max() > 1e-3  # the kept row does not


def test_checkpointing_gives_the_same_loss_and_gradients():
    plain = perturb(tiny(cross_attention=True))
    ckpt = copy.deepcopy(plain)
    ckpt.checkpointing = True
    x, t, text = inputs()
    tokens = torch.randn(2, 5, TEXT)
    losses = []
    for m in (plain, ckpt):
        m.train()
        loss = (m(x, t, text, tokens=tokens) - x).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-6
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=n)


def test_position_embeddings_are_not_weights_and_other_shapes_run():
    model = perturb(tiny())
    sd = model.state_dict()
    assert set(sd) == {n for n, _ in model.named_parameters()}  # no buffers: nothing tied to a shape
    assert not any("pos" in k for k in sd)
    other = tiny()
    other.load_state_dict(sd)
    for frames, side in [(7, 16), (4, 8), (2, 24)]:
        x, t, text = inputs(t=frames, s=side)
        assert other(x, t, text).shape == (2, frames, 3, side, side)


def test_frames_are_not_permutation_invariant():
    """Swapping two input frames does not just swap the outputs: the frame position embedding works."""
    model = perturb(tiny(), std=0.2).eval()
    x, t, text = inputs()
    swap = [1, 0, 2, 3]
    with torch.no_grad():
        out, out_swapped = model(x, t, text), model(x[:, swap], t, text)
    diff = (out_swapped[:, swap] - out).abs().max().item()
    assert diff > 1e-3 * out.abs().max().item(), diff


def test_fps_cond_needs_fps_and_starts_as_a_no_op():
    model = tiny(fps_cond=True)
    x, t, text = inputs()
    with pytest.raises(ValueError, match="fps"):
        model(x, t, text)
    perturb(model)
    torch.nn.init.zeros_(model.fps_mlp[-1].weight)
    torch.nn.init.zeros_(model.fps_mlp[-1].bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, fps=torch.tensor([8.0, 4.0])),
                                   model(x, t, text, fps=torch.tensor([30.0, 2.0])))


def test_every_parameter_gets_a_gradient():
    """DDP (find_unused_parameters=False) needs every parameter in the graph of a normal step."""
    model = perturb(tiny(cross_attention=True, fps_cond=True))
    x, t, text = inputs()
    out = model(x, t, text, tokens=torch.randn(2, 5, TEXT), token_mask=torch.ones(2, 5, dtype=torch.bool),
                cond_mask=torch.tensor([True, False]), fps=torch.tensor([8.0, 4.0]))
    out.pow(2).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_bf16_autocast_runs():
    model = perturb(tiny(cross_attention=True))
    x, t, text = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, tokens=torch.randn(2, 5, TEXT))
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_size_registry_matches_the_unet(capsys):
    counts = {}
    for size, (hidden, depth, heads) in SIZES.items():
        assert depth % 2 == 0 and hidden % heads == 0, size
        unet = count_params(build_model(C.load_config(None, [f"model.size={size}"], env={})))
        pixel = count_params(build_model(C.load_config(None, ["model.arch=dit", f"model.size={size}"], env={}), 3))
        latent = count_params(build_model(C.load_config(None, ["model.arch=dit", f"model.size={size}",
                                                               "model.space=latent"], env={}), 4))
        counts[size] = (pixel, latent, unet)
    with capsys.disabled():
        print("\nsize: dit pixel / dit latent / unet pixel parameters")
        for size, (p, lat, u) in counts.items():
            print(f"  {size}: {p:,} / {lat:,} / {u:,} ({p / u - 1:+.1%})")
    assert counts["tiny"][0] < 150_000
    for size in ("small", "base", "large"):
        assert abs(counts[size][0] / counts[size][2] - 1) <= 0.15, (size, counts[size])


def test_build_model_returns_the_dit_with_config_sizes():
    cfg = cfg_of("model.hidden=48", "model.depth=6", "model.heads=3", "model.patch=4", "model.cross_attention=true")
    model = build_model(cfg, 4)
    assert isinstance(model, VideoDiT) and model.patch == 4 and model.in_channels == 4
    assert len(model.blocks) == 6 and model.hidden == 48 and model.blocks[0].attn.heads == 3
    assert model.blocks[0].xattn is not None and model.blocks[1].attn.axis == "time"
    assert isinstance(build_dit(cfg_of()), VideoDiT)
    assert resolve_size("base") == SIZES["base"] and resolve_size("base", hidden=64) == (64, *SIZES["base"][1:])


@pytest.mark.parametrize("size,space,patch", [(8, "pixel", 1), (16, "pixel", 1), (24, "pixel", 2), (64, "pixel", 2),
                                              (128, "latent", 1), (144, "latent", 2), (256, "latent", 2)])
def test_auto_patch_rule_and_validation_agree(size, space, patch):
    cfg = cfg_of(f"data.size={size}", f"model.space={space}")
    assert resolve_patch(cfg) == patch
    assert resolve_patch(cfg_of(f"data.size={size}", f"model.space={space}", "model.patch=1")) == 1


def test_validation_accepts_what_resolve_patch_can_cut():
    """validate() accepts exactly the sizes whose frames (pixels, or latent cells) divide by the patch
    resolve_patch picks."""
    for space, sizes in (("pixel", range(8, 81)), ("latent", range(64, 400, 8))):
        for size in sizes:
            raw = C.Config()
            raw.data.size, raw.model.space = size, space
            side = size // 8 if space == "latent" else size
            ok = side % resolve_patch(raw) == 0
            try:
                cfg_of(f"data.size={size}", f"model.space={space}")
                accepted = True
            except C.ConfigError:
                accepted = False
            assert accepted == ok, (space, size)


@pytest.mark.parametrize("overrides,message", [
    (["model.coords=true"], "model.coords applies to model.arch=unet only"),
    (["model.frame_cond=true"], "model.frame_cond applies to model.arch=unet only"),
    (["model.temporal_attention=true"], "model.temporal_attention applies to model.arch=unet only"),
    (["model.downsample_time=true"],
     "model.downsample_time applies to model.arch=unet only; a dit has no downsampling"),
    (["model.hidden=50", "model.heads=4"], "model.hidden (50) must be divisible by model.heads (4)"),
    (["model.depth=3"], "model.depth must be even for a dit"),
    (["data.size=20", "model.patch=3"], "divisible by the dit's patch 3 (model.patch)"),
    (["data.size=35"], "divisible by the dit's patch 2"),  # 35 > 16: auto patch 2
    (["model.space=latent", "data.size=132"], "a multiple of 8 for model.space=latent"),
])
def test_config_refuses_unet_options_and_bad_sizes(overrides, message):
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg_of(*overrides)


def test_config_accepts_sizes_the_unet_cannot_take():
    assert cfg_of("data.size=12").data.size == 12  # patch 1: any side; the UNet needs a multiple of 8
    assert cfg_of("data.size=36", "model.patch=3").model.patch == 3
    with pytest.raises(C.ConfigError, match="the UNet halves it twice"):
        C.load_config(None, ["data.size=12"], env={})


def test_a_tiny_dit_trains():
    """AdamW + MSE on a fixed batch: the loss falls by a clear factor in 30 steps."""
    model = tiny(cross_attention=True)
    x, t, text = inputs(s=8, seed=3)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) * 0.5 + x.mean(1, keepdim=True)
    tokens = torch.randn(2, 5, TEXT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (model(x, t, text, tokens=tokens) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
