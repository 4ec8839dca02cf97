"""Metrics on features and embeddings: the Fréchet distance (for FVD) and CLIPSIM.

Everything here is a pure function of arrays/tensors, so it is tested on inputs with known answers; the
models that produce the features (I3D, CLIP) are loaded in ``t2v.eval``.

Fréchet distance between two Gaussians N(mu1, S1) and N(mu2, S2)::

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )

``tr((S1^1/2 S2 S1^1/2)^1/2)`` equals the usual ``tr((S1 S2)^1/2)`` (the matrices are similar). The
product ``S1^1/2 S2 S1^1/2`` is symmetric positive semi-definite and equals ``A^T A`` with
``A = S2^1/2 S1^1/2``, so its trace square root is the sum of the singular values of ``A`` (the nuclear norm).
That is how it is computed, in float64 with no scipy: symmetric square roots of S1 and S2 from
``numpy.linalg.eigh`` (eigenvalues below d * machine-eps * largest, i.e. zero up to round-off, set to
zero), then an SVD of A. Taking singular values of A instead of square roots of the eigenvalues of A^T A
avoids square-rooting round-off: for a singular covariance the latter is off by ~1e-7 relative (e.g. 3e-4
on a trace of 3600), the former by ~1e-15.

Near-singular covariances are the normal case for FVD: with N clips and 400-d I3D features the sample
covariance has rank <= N - 1, so for N <= 400 it is singular. The eigen route handles a singular PSD matrix
exactly (its square root exists), so no regularisation is applied in that case. Only when the inputs are
not symmetric positive semi-definite up to round-off (an eigenvalue below ``-tol * largest``, e.g.
covariances accumulated in float16/32 elsewhere) or the result is not finite, ``eps`` is added to the
diagonal of BOTH covariances and the distance recomputed, with a warning (the fallback pytorch-fid uses);
this biases the result by O(eps * d).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

# Relative size of a negative eigenvalue that is still round-off (float64 eigh on a d x d matrix).
_NEG_TOL = 1e-10


def _as_float64(x, ndim: int, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64 (as StyleGAN-V/np.cov)."""
    f = _as_float64(features, 2, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, (sigma + sigma.T) / 2


def _psd_eig(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Eigenvalues (clipped at 0) and eigenvectors of a symmetric matrix; ok=False when it is clearly not PSD."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    scale = max(float(np.abs(w).max(initial=0.0)), np.finfo(np.float64).tiny)
    ok = bool(np.all(np.isfinite(w))) and float(w.min(initial=0.0)) >= -_NEG_TOL * scale
    # Eigenvalues below d * machine-eps * largest cannot be told from zero: set them to zero, else their
    # square roots (~1e-8 * sqrt(largest) each) add up to a visible error for rank-deficient covariances.
    w = np.where(w > len(w) * np.finfo(np.float64).eps * scale, w, 0.0)
    return w, v, ok


def sqrtm_psd(a) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    a = _as_float64(a, 2, "matrix")
    w, v, _ = _psd_eig(a)
    return (v * np.sqrt(w)) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> tuple[float, bool]:
    """tr((s1^1/2 s2 s1^1/2)^1/2) = nuclear norm of s2^1/2 s1^1/2, and whether s1 and s2 were PSD up to
    round-off."""
    w1, v1, ok1 = _psd_eig(s1)
    w2, v2, ok2 = _psd_eig(s2)
    root1 = (v1 * np.sqrt(w1)) @ v1.T
    root2 = (v2 * np.sqrt(w2)) @ v2.T
    singular = np.linalg.svd(root2 @ root1, compute_uv=False)
    return float(singular.sum()), ok1 and ok2


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64. See the module docstring for
    the method and for when ``eps`` is added to the covariance diagonals."""
    mu1, mu2 = _as_float64(mu1, 1, "mu1"), _as_float64(mu2, 1, "mu2")
    s1, s2 = _as_float64(sigma1, 2, "sigma1"), _as_float64(sigma2, 2, "sigma2")
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    diff = mu1 - mu2
    tr_sqrt, ok = _trace_sqrt_product(s1, s2)
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    if not ok or not np.isfinite(fd):
        warnings.warn(f"frechet_distance: covariances are not positive semi-definite up to round-off; adding "
                      f"{eps:g} to their diagonals", RuntimeWarning, stacklevel=2)
        off = eps * np.eye(d)
        tr_sqrt, _ = _trace_sqrt_product(s1 + off, s2 + off)
        fd = float(diff @ diff + np.trace(s1 + off) + np.trace(s2 + off) - 2.0 * tr_sqrt)
    # The exact value is >= 0; round-off can leave a tiny negative number for identical inputs.
    return max(fd, 0.0)


def fvd_from_features(real, fake) -> float:
    """FVD: the Fréchet distance between Gaussians fitted to real (N, D) and generated (M, D) I3D features."""
    mu_r, s_r = feature_stats(real)
    mu_f, s_f = feature_stats(fake)
    if mu_r.shape != mu_f.shape:
        raise ValueError(f"real features are {mu_r.shape[0]}-d but generated ones {mu_f.shape[0]}-d")
    return frechet_distance(mu_r, s_r, mu_f, s_f)


# --------------------------------------------------------------------------------------------- CLIPSIM


def clip_scores(image_encoder: Callable[[torch.Tensor], torch.Tensor],
                text_encoder: Callable[[Sequence[str]], torch.Tensor],
                videos: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """Per-video CLIPSIM (B,): the mean over a video's frames of cos(image embedding of the frame, text
    embedding of the video's caption).

    videos: (B, T, 3, H, W) float in [-1, 1]; captions: B strings.
    image_encoder: (N, 3, H, W) float in [-1, 1] -> (N, D) embeddings (it does its own resizing/normalising);
    text_encoder: list of N captions -> (N, D) embeddings. Embeddings need not be normalised.
    """
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos: expected (B, T, 3, H, W), got {tuple(videos.shape)}")
    b, t = videos.shape[:2]
    captions = list(captions)
    if len(captions) != b:
        raise ValueError(f"{b} videos but {len(captions)} captions")
    with torch.no_grad():
        img = image_encoder(videos.reshape(b * t, *videos.shape[2:])).float()  # (b t) d
        txt = text_encoder(captions).float()  # b d
    if img.shape[0] != b * t or txt.shape[0] != b or img.shape[1] != txt.shape[1]:
        raise ValueError(f"encoders gave image embeddings {tuple(img.shape)} for {b * t} frames and text "
                         f"embeddings {tuple(txt.shape)} for {b} captions")
    img = torch.nn.functional.normalize(img, dim=-1).reshape(b, t, -1)
    txt = torch.nn.functional.normalize(txt.to(img.device), dim=-1)
    return torch.einsum("btd,bd->bt", img, txt).mean(1).cpu()


def clipsim(image_encoder, text_encoder, videos: torch.Tensor, captions: Sequence[str]) -> float:
    """CLIPSIM as a raw cosine in [-1, 1] (papers report e.g. 0.2631; some multiply by 100): the mean over
    all generated frames of cos(CLIP image embedding of the frame, CLIP text embedding of its caption)."""
    return float(clip_scores(image_encoder, text_encoder, videos, captions).double().mean())
