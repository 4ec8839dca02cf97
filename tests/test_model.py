"""The UNet: shapes, sizes, conditioning, a short overfit, memory format and compile-friendliness."""
import pytest
import torch

from t2v import diffusion as D
from t2v.config import Config
from t2v.models import build_model, count_params
from t2v.models.unet import SIZES, Conv2Plus1D, UNet3DCond, from_patches, num_groups, to_patches

TEXT_DIM = 32  # tests use a small conditioning dim; the parameter-count test uses the real 512


def tiny(**kw):
    torch.manual_seed(0)
    base, mults = SIZES["tiny"]
    return UNet3DCond(base, mults, text_dim=TEXT_DIM, **kw)


def perturb_output(model):
    """Open up every zero-initialised layer (output conv, residual branches' last convs, attention
    projections): at init each block is the identity and the model outputs 0, so neither text nor
    tokens could change the output yet. Norm biases are zero too and get perturbed as well; harmless."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(b=2, t=8, hw=32, seed=0, tokens=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, t, 3, hw, hw, generator=g) * 2 - 1
    ts = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, TEXT_DIM, generator=g)
    tok = torch.randn(b, tokens, TEXT_DIM, generator=g)
    return x, ts, text, tok


def test_sizes_registry():
    assert SIZES["base"] == (64, (1, 2, 4))  # the baseline's contract: 64 -> 128 -> 256 channels
    widths = [base * max(mults) for base, mults in SIZES.values()]
    assert list(SIZES)[:4] == ["tiny", "small", "base", "large"] and widths == sorted(widths)  # each size wider
    for base, mults in SIZES.values():  # every level's width is a valid GroupNorm size
        assert all(base * m % num_groups(base * m) == 0 for m in mults)
    assert all(c % num_groups(c) == 0 for c in (3, 16, 32, 48, 64, 96, 128, 256, 512))


def test_tiny_output_shape_and_zero_init():
    m = tiny()
    x, t, text, _ = inputs()
    out = m(x, t, text)
    assert out.shape == x.shape == (2, 8, 3, 32, 32)
    assert torch.all(out == 0)  # zero-initialised output conv


@torch.no_grad()
def test_base_forward_shape():
    cfg = Config()
    cfg.model.size = "base"
    m = build_model(cfg).eval()
    x = torch.zeros(1, 8, 3, 64, 64)
    assert m(x, torch.tensor([10]), torch.zeros(1, cfg.text.dim)).shape == x.shape


def test_param_counts_grow_with_the_square_of_the_width():
    """With the default 512-d caption embedding (CLIP ViT-B/32), built on the meta device (nothing allocated):
    doubling the width multiplies the parameters by about 4 (convolutions are C_in x C_out), and base is the
    ~10M-parameter model the bench compares with its peers at ±15%."""
    counts = {}
    for size in SIZES:
        cfg = Config()
        cfg.model.size = size
        with torch.device("meta"):
            counts[size] = count_params(build_model(cfg))
    assert 3.5 < counts["large"] / counts["base"] < 4.5 and 3.5 < counts["base"] / counts["small"] < 4.5
    # (2+1)D convs have 12·C² weights instead of 27·C², so base is small for its FLOPs
    assert 8e6 < counts["base"] < 12e6
    assert counts["tiny"] < counts["small"]


def test_build_model_overrides():
    cfg = Config()
    cfg.model.size, cfg.model.base_channels, cfg.model.channel_mults, cfg.text.dim = "tiny", 8, (1, 2, 2), TEXT_DIM
    m = build_model(cfg)
    assert m.stem.out_channels == 8 and len(m.down) == 3
    assert m(*inputs(b=1, t=2, hw=16)[:3]).shape == (1, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        m(*inputs(b=1, t=2, hw=18)[:3])
    cfg.model.size = "huge"
    with pytest.raises(ValueError, match="tiny"):
        build_model(cfg)


@pytest.mark.parametrize("cross", [False, True])
def test_null_condition_ignores_text(cross):
    m = perturb_output(tiny(cross_attention=cross, temporal_attention=cross)).eval()
    x, t, text, tok = inputs(b=2, t=4, hw=16)
    _, _, text2, tok2 = inputs(b=2, t=4, hw=16, seed=1)
    mask = torch.tensor([False, True])
    tm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    kw = dict(cond_mask=mask, token_mask=tm) if cross else dict(cond_mask=mask)
    with torch.no_grad():
        a = m(x, t, text, tokens=tok if cross else None, **kw)
        b = m(x, t, text2, tokens=tok2 if cross else None, **kw)
    assert a.abs().max() > 1e-3  # the check below is not vacuous
    assert torch.allclose(a[0], b[0], atol=1e-6)  # unconditional row: text ignored
    assert not torch.allclose(a[1], b[1], atol=1e-4)  # conditional row: text used
    # an all-False mask equals passing the null embedding for everyone, whatever the text
    with torch.no_grad():
        c = m(x, t, torch.zeros_like(text), tokens=torch.zeros_like(tok) if cross else None,
              cond_mask=torch.tensor([False, False]))
    assert torch.allclose(a[0], c[0], atol=1e-6)


def test_text_changes_output():
    m = perturb_output(tiny()).eval()
    x, t, text, _ = inputs(b=1, t=4, hw=16)
    with torch.no_grad():
        a, b = m(x, t, text), m(x, t, text + 1.0)
    assert (a - b).abs().mean() > 1e-4


def test_cross_attention_uses_tokens_and_mask():
    m = perturb_output(tiny(cross_attention=True)).eval()
    x, t, text, tok = inputs(b=1, t=4, hw=16)
    tok2 = tok.clone()
    tok2[:, -1] += 5.0  # change only the last token
    tm = torch.tensor([[True, True, True, True, False]])
    with torch.no_grad():
        assert not torch.allclose(m(x, t, text, tokens=tok), m(x, t, text, tokens=tok2), atol=1e-5)
        # ...but a masked-out token is ignored
        assert torch.allclose(m(x, t, text, tokens=tok, token_mask=tm), m(x, t, text, tokens=tok2, token_mask=tm), atol=1e-6)
    with pytest.raises(ValueError, match="tokens"):
        m(x, t, text)


def test_attention_switches_run_and_add_params():
    x, t, text, tok = inputs(b=1, t=4, hw=16)
    n0 = count_params(tiny())
    for kw in (dict(temporal_attention=True), dict(cross_attention=True), dict(temporal_attention=True, cross_attention=True)):
        m = tiny(**kw)
        assert count_params(m) > n0
        out = m(x, t, text, tokens=tok)
        out.sum().backward()
        assert out.shape == x.shape
    assert count_params(tiny(temporal_attention=True, cross_attention=True)) > count_params(tiny(cross_attention=True))


@pytest.mark.parametrize("patch, downsample_time", [(1, False), (2, False), (2, True)])
def test_few_steps_lower_the_loss(patch, downsample_time):
    """30 AdamW steps on one fixed batch (fixed t and noise) must clearly lower the diffusion loss."""
    m = tiny(patch=patch, downsample_time=downsample_time)
    s = D.make_schedule(1000)
    g = torch.Generator().manual_seed(0)
    b, frames, hw = 2, 4, 16
    # a structured clip (a bright square sliding right) so there is something to learn
    x0 = -torch.ones(b, frames, 3, hw, hw)
    for f in range(frames):
        x0[:, f, :, 4:10, 2 + 2 * f:8 + 2 * f] = 1.0
    t = torch.tensor([200, 600])
    noise = torch.randn(x0.shape, generator=g)
    text = torch.randn(b, TEXT_DIM, generator=g)
    xt, target = D.q_sample(s, x0, t, noise), D.training_target(s, x0, noise, t, "eps")
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = D.training_loss(m(xt, t, text), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], min(losses[-3:])
    assert first == pytest.approx(1.0, abs=0.15)  # zero output: loss = mean(noise²)
    # measured: 1.00 -> 0.21 (patch 1); 0.43 with patch 2, whose tiny UNet sees this 16x16 clip as 8x8 positions;
    # 0.45 with the frames halved too
    assert last < {1: 0.4, 2: 0.6}[patch] * first, losses


def test_channels_last_3d_matches_default():
    m = perturb_output(tiny(temporal_attention=True, cross_attention=True)).eval()
    x, t, text, tok = inputs(b=2, t=4, hw=16)
    with torch.no_grad():
        ref = m(x, t, text, tokens=tok)
        m = m.to(memory_format=torch.channels_last_3d)
        assert m.stem.weight.is_contiguous(memory_format=torch.channels_last_3d)
        out = m(x, t, text, tokens=tok)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_temporal_conv_is_the_conv3d_it_replaces(channels_last):
    """Conv2Plus1D runs its (3, 1, 1) Conv3d weights as a (3, 1) Conv2d over t and h·w: the same output and the
    same gradients as calling the Conv3d, so checkpoints from before load and train on unchanged."""
    torch.manual_seed(0)
    block = Conv2Plus1D(5, 6)
    x = torch.randn(2, 5, 7, 4, 3, requires_grad=True)  # b c t h w: odd sizes, so no axis is mistaken for another
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    out = block(x)
    ref = block.temporal(block.spatial(x))
    assert out.shape == ref.shape == (2, 6, 7, 4, 3) and (out - ref).abs().max() < 1e-5
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, block.temporal.weight, block.temporal.bias], g)
    want = torch.autograd.grad(ref, [x, block.temporal.weight, block.temporal.bias], g)
    for a, b in zip(got, want):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4


def test_forward_has_no_graph_breaks():
    """torch.compile sees one graph: no data-dependent Python control flow in forward."""
    import torch._dynamo

    m = tiny(temporal_attention=True, cross_attention=True)
    x, t, text, tok = inputs(b=2, t=4, hw=16)
    torch._dynamo.reset()
    try:
        e = torch._dynamo.explain(m)(x, t, text, tokens=tok, token_mask=torch.ones(2, 5, dtype=torch.bool),
                                     cond_mask=torch.tensor([True, False]))
    finally:
        torch._dynamo.reset()
    assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons



def test_two_res_blocks_per_level():
    m = tiny(num_res_blocks=2, temporal_attention=True)
    assert len(m.down) == len(m.up) == 4 and count_params(m) > count_params(tiny(temporal_attention=True))
    x, t, text, _ = inputs(b=1, t=4, hw=16)
    assert m(x, t, text).shape == x.shape


def test_coords_give_the_network_where_and_when():
    from t2v.models.unet import space_time_grid

    grid = space_time_grid(torch.zeros(2, 5, 4, 8, 6))  # b c t h w
    assert grid.shape == (2, 3, 4, 8, 6)
    assert torch.allclose(grid[0, 0, :, 0, 0], torch.linspace(-1, 1, 4))  # frame
    assert torch.allclose(grid[0, 1, 0, :, 0], torch.linspace(-1, 1, 8))  # row
    assert torch.allclose(grid[0, 2, 0, 0, :], torch.linspace(-1, 1, 6))  # column
    assert space_time_grid(torch.zeros(1, 1, 1, 2, 2))[0, 0].eq(0).all()  # one frame: its coordinate is 0
    torch.manual_seed(0)
    plain, coords = UNet3DCond(8, (1, 2), text_dim=16), UNet3DCond(8, (1, 2), text_dim=16, coords=True)
    assert coords.stem.in_channels == plain.stem.in_channels + 3
    # out_conv starts at zero; perturb it so the output reflects the inputs
    torch.nn.init.normal_(coords.out_conv.weight, std=0.1)
    x, t, text = torch.zeros(1, 4, 3, 8, 8), torch.tensor([500]), torch.randn(1, 16)
    out = coords(x, t, text)  # b t c h w
    assert out.shape == x.shape
    # the same zero input at every voxel, yet frames and positions differ: the network knows where and when
    assert not torch.allclose(out[0, 0], out[0, -1]) and not torch.allclose(out[0, :, :, 2, 2], out[0, :, :, 5, 5])


@pytest.mark.parametrize("size, frames_below", [("tiny", [4]), ("small", [4, 2])])
def test_downsample_time_halves_the_frames_with_the_frame_size(size, frames_below):
    """model.downsample_time: each level below the first sees half the frames of the one above (and half the
    rows and columns); the output has every frame back, and each frame of it still depends on its own input."""
    torch.manual_seed(0)
    base, mults = SIZES[size]
    m = perturb_output(UNet3DCond(base, mults, text_dim=TEXT_DIM, downsample_time=True, temporal_attention=True))
    seen = []
    for blk in list(m.down)[1:]:
        blk.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[2:])))  # b c t h w
    x, t, text, _ = inputs(b=1, t=8, hw=32)
    x.requires_grad_(True)
    out = m(x, t, text)
    assert out.shape == x.shape
    assert seen == [(f, 32 // 2 ** (i + 1), 32 // 2 ** (i + 1)) for i, f in enumerate(frames_below)]
    out[:, 7].sum().backward()  # the last frame's output reaches back to the last input frame
    assert x.grad[:, 7].abs().sum() > 0
    bad = {"tiny": 5, "small": 6}[size]
    with pytest.raises(ValueError, match=rf"{bad} frames must be divisible by {2 ** len(frames_below)}: "
                                         "model.downsample_time"):
        m(x[:, :bad].detach(), t, text)


def test_patches_put_every_pixel_back_where_it_was():
    """model.patch=p: each p x p block of pixels is one position with c·p² channels, and the output is unpacked by
    the same rule, so the network's output pixel (row, column) answers for input pixel (row, column)."""
    x = torch.randn(2, 3, 3, 8, 12)  # b t c h w
    h = to_patches(x, 2)
    assert h.shape == (2, 12, 3, 4, 6)  # b (c p p) t h/p w/p
    for c, p1, p2, i, j in [(0, 0, 0, 0, 0), (2, 1, 0, 3, 5), (1, 0, 1, 2, 1)]:
        assert h[1, c * 4 + p1 * 2 + p2, 2, i, j] == x[1, 2, c, 2 * i + p1, 2 * j + p2]
    assert torch.equal(from_patches(h, 2), x)

    m = tiny(patch=2, coords=True, temporal_attention=True)
    assert m.stem.in_channels == 3 * 4 + 3 and m.out_conv.out_channels == 3 * 4
    x, t, text, _ = inputs(b=2, t=4, hw=16)
    out = perturb_output(m)(x, t, text)
    assert out.shape == x.shape
    out.sum().backward()
    with pytest.raises(ValueError, match="must be divisible by 4 \\(patches of 2 pixels"):
        m(x[..., :6, :6], t, text)  # 6 = 3 patches, which the tiny UNet cannot halve
    cfg = Config()
    cfg.model.size, cfg.model.patch = "tiny", 2
    assert build_model(cfg).patch == 2 and build_model(Config()).patch == 1  # 0 (the default) is no patches
