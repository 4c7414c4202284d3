"""Distributional rewards on embeddings (DRAGON's kinds): Fréchet distance to a reference set, Vendi
diversity, and similarity to an exemplar set (media or text).

An encoder is a reward name or object with ``embed_images`` (image) or ``embed_audio`` (audio), e.g.
"toy/clipscore" or "clap", or any callable ``media -> [B,D]``. Set statistics are computed in float64.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import LAYOUTS, InputSpec, SetReward, check_finite

EIG_FLOOR = 1e-12  # eigenvalues below this count as 0 (numerical noise; keeps sqrt/log gradients finite)


# ---- closed forms ------------------------------------------------------------------------------------

def gaussian_stats(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D,D]`` (float64) of embeddings ``[N,D]``, as FID/FAD take them."""
    x = embeddings.double()
    mu = x.mean(0)
    d = x - mu
    return mu, d.T @ d / max(x.shape[0] - 1, 1)


def _floored(values: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(values)`` where values exceed EIG_FLOOR, else 0, with a finite gradient everywhere."""
    return torch.where(values > EIG_FLOOR, fn(values.clamp_min(EIG_FLOOR)), torch.zeros_like(values))


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a PSD matrix (eigendecomposition, negative noise clamped to 0)."""
    values, vectors = torch.linalg.eigh((cov + cov.mT) / 2)
    return (vectors * _floored(values, torch.sqrt)[..., None, :]) @ vectors.mT


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> torch.Tensor:
    """Fréchet distance of two Gaussians, ``|mu1-mu2|² + tr C1 + tr C2 - 2 tr (sqrt(C1) C2 sqrt(C1))^½``.

    The symmetric product keeps the matrix square root an eigendecomposition (no ``sqrtm``); ``mu2``/``cov2``
    may carry leading batch dims. Put the fixed set first: the gradient through ``cov2`` uses eigenvalues only,
    so it stays finite even for rank-deficient covariances."""
    mu1, cov1, mu2, cov2 = mu1.double(), cov1.double(), mu2.double(), cov2.double()
    root1 = psd_sqrt(cov1)
    inner = root1 @ cov2 @ root1
    cross = _floored(torch.linalg.eigvalsh((inner + inner.mT) / 2), torch.sqrt).sum(-1)
    trace = torch.diagonal(cov1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(cov2, dim1=-2, dim2=-1).sum(-1)
    return ((mu1 - mu2) ** 2).sum(-1) + trace - 2 * cross


def vendi_score(embeddings: torch.Tensor, q: float = 1.0) -> torch.Tensor:
    """Vendi score of ``[...,N,D]`` embeddings: exp of the (Rényi-q; q=1 Shannon) entropy of the eigenvalues
    of K/N, K the cosine-similarity kernel. 1 for N identical items, N for N orthogonal ones, 0 for none."""
    n = embeddings.shape[-2]
    if n == 0:
        return embeddings.new_zeros(embeddings.shape[:-2], dtype=torch.float64)
    x = F.normalize(embeddings.double(), dim=-1)
    lam = torch.linalg.eigvalsh(x @ x.mT / n)
    if q == 1:
        return torch.exp(-_floored(lam, lambda v: v * torch.log(v)).sum(-1))
    if q == float("inf"):
        return 1 / lam.max(-1).values
    return torch.exp(torch.log(_floored(lam, lambda v: v ** q).sum(-1)) / (1 - q))


# ---- the encoder plumbing ----------------------------------------------------------------------------

class EmbeddingSetReward(SetReward):
    """Shared by the rewards below: resolves the encoder, sets modality, range and differentiability, and
    embeds a whole (checked, chunked) batch for set-level scores."""

    def __init__(self, encoder: str | Callable | nn.Module = "toy/clipscore",
                 modality: Literal["image", "video", "audio"] = "image", **encoder_kwargs):
        super().__init__()
        if isinstance(encoder, str):
            from .registry import load

            encoder = load(encoder, **encoder_kwargs)
        if hasattr(encoder, "embed_images"):
            self._embed, modality = encoder.embed_images, "image"
        elif hasattr(encoder, "embed_audio"):
            self._embed, modality = encoder.embed_audio, "audio"
        elif callable(encoder):
            self._embed = encoder
        else:
            raise ValueError(f"{self.name}: encoder {type(encoder).__name__} has no embed_images/embed_audio")
        self.encoder = encoder if isinstance(encoder, nn.Module) else None
        self.text_encoder = getattr(encoder, "embed_texts", None)
        self.modality = modality
        self.differentiable = bool(getattr(encoder, "differentiable", False))
        lo = -1.0 if modality == "audio" else 0.0
        self.input_spec = InputSpec(range=(lo, 1.0), layout=LAYOUTS[modality])

    def embed(self, media: torch.Tensor, prompts: list[str] | None = None,
              metadata: list[dict] | None = None) -> torch.Tensor:
        """Embeddings ``[B,D]`` of a chunk already on the encoder's device."""
        return self._embed(media)

    def embed_all(self, media: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B,D]`` of a whole batch: checked, chunked, with gradients when differentiable."""
        media = self.media_for(media)
        self.check_media(media)
        device, dtype = self.device_dtype
        device, dtype = device or media.device, dtype or media.dtype
        grad = torch.enable_grad() if self.differentiable and media.requires_grad else torch.no_grad()
        with grad:
            return torch.cat([self.embed(media[i:i + self.batch_size].to(device, dtype))
                              for i in range(0, media.shape[0], self.batch_size)])

    def _reference_embeddings(self, items: torch.Tensor | str) -> torch.Tensor:
        """A reference given as embeddings ``[N,D]`` is kept; one given as media is embedded (no gradient);
        a path names a safetensors file holding either under the key ``reference`` (configs use this)."""
        if isinstance(items, (str, Path)):
            items = _load_reference(items, self.name)
        if items.ndim == 2:
            return items.detach()
        with torch.no_grad():
            return self.embed_all(items).detach()


def _load_reference(path: str | Path, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ValueError(f"{name}: reference file '{path}' not found (expected a .safetensors with 'reference')")
    tensors = load_file(str(path))
    if "reference" not in tensors:
        raise ValueError(f"{name}: '{path}' has no tensor named 'reference' (found: {', '.join(tensors) or 'none'})")
    return tensors["reference"]


# ---- the rewards -------------------------------------------------------------------------------------

class FrechetReward(EmbeddingSetReward):
    """Negative Fréchet distance to a reference set's Gaussian (FID/FAD on the encoder's embeddings).

    ``score_set``: the batch's Gaussian against the reference's (distribution-to-distribution).
    ``score`` (instance-to-distribution), per sample x: ``-FD(N_ref, N_ref+x)``, the reference statistics
    against those of the reference set with x added. One image has one embedding and so no covariance of
    its own (DRAGON's per-song FAD uses a song's many frame embeddings), so the sample is scored by how much
    it moves the reference Gaussian: 0 at best, lower for samples far from the mean or off the reference's
    principal directions. The scale shrinks as 1/N² with the reference size N; normalise before mixing."""

    name = "fd"

    def __init__(self, encoder: str | Callable | nn.Module = "toy/clipscore", reference: torch.Tensor | None = None,
                 **kwargs):
        super().__init__(encoder, **kwargs)
        if reference is None:
            raise ValueError("fd: needs a reference (media or embeddings [N,D])")
        ref = self._reference_embeddings(reference)
        if ref.shape[0] < 2:
            raise ValueError(f"fd: a reference needs at least 2 items, got {ref.shape[0]}")
        mu, cov = gaussian_stats(ref)
        self.register_buffer("ref_mu", mu)
        self.register_buffer("ref_cov", cov)
        self.n_ref = ref.shape[0]

    def _score(self, media, prompts, metadata):
        e = self.embed(media).double()
        n, mu, cov = self.n_ref, self.ref_mu, self.ref_cov
        d = e - mu
        mu_x = mu + d / (n + 1)
        # Unbiased covariance of the n+1 items: scatter (n-1)C plus the rank-one term n/(n+1) d dᵀ, over n.
        cov_x = ((n - 1) * cov + n / (n + 1) * d[:, :, None] * d[:, None, :]) / n
        return -frechet_distance(mu, cov, mu_x, cov_x)

    def score_set(self, media, prompts=None, metadata=None) -> torch.Tensor:
        mu, cov = gaussian_stats(self.embed_all(media))
        return check_finite(-frechet_distance(self.ref_mu, self.ref_cov, mu, cov).float()[None], self.name)[0]


class VendiReward(EmbeddingSetReward):
    """Diversity: ``score_set`` is the batch's Vendi score; ``score`` each sample's leave-one-out
    contribution, Vendi(batch) - Vendi(batch without it) (a near-duplicate adds little)."""

    name = "vendi"

    def __init__(self, encoder: str | Callable | nn.Module = "toy/clipscore", q: float = 1.0, **kwargs):
        super().__init__(encoder, **kwargs)
        self.q = q

    def score(self, media, prompts=None, metadata=None) -> torch.Tensor:
        e = self.embed_all(media)
        n = e.shape[0]
        keep = torch.tensor([[j for j in range(n) if j != i] for i in range(n)], device=e.device, dtype=torch.long)
        without = vendi_score(e[keep], self.q) if n > 1 else e.new_zeros(n, dtype=torch.float64)
        return check_finite((vendi_score(e, self.q) - without).float().to(media.device), self.name)

    def score_set(self, media, prompts=None, metadata=None) -> torch.Tensor:
        return check_finite(vendi_score(self.embed_all(media), self.q).float()[None], self.name)[0]


class ExemplarReward(EmbeddingSetReward):
    """Cosine similarity to an exemplar set, averaged (``reduce="mean"``) or best match (``"max"``).

    Exemplars are media (through the encoder's image/audio tower), embeddings ``[N,D]``, or text strings
    (through its text tower, ``embed_texts``: cross-modal exemplars, no reference media needed)."""

    name = "exemplar"

    def __init__(self, encoder: str | Callable | nn.Module = "toy/clipscore",
                 exemplars: torch.Tensor | list[str] | None = None, reduce: Literal["mean", "max"] = "mean",
                 **kwargs):
        super().__init__(encoder, **kwargs)
        if exemplars is None or len(exemplars) == 0:
            raise ValueError("exemplar: needs exemplars (media, embeddings [N,D] or a list of texts)")
        if reduce not in ("mean", "max"):
            raise ValueError(f"exemplar: reduce must be 'mean' or 'max', got {reduce!r}")
        if isinstance(exemplars, (list, tuple)):
            if self.text_encoder is None:
                raise ValueError("exemplar: text exemplars need an encoder with embed_texts")
            with torch.no_grad():
                ex = self.text_encoder(list(exemplars)).detach()
        else:
            ex = self._reference_embeddings(exemplars)
        self.register_buffer("exemplars", F.normalize(ex.float(), dim=-1))
        self.reduce = reduce

    def _score(self, media, prompts, metadata):
        e = F.normalize(self.embed(media), dim=-1)
        sims = e @ self.exemplars.to(e).T
        return sims.mean(-1) if self.reduce == "mean" else sims.max(-1).values

    def score_set(self, media, prompts=None, metadata=None) -> torch.Tensor:
        """The batch's mean similarity."""
        return self.score(media, prompts, metadata).mean()
