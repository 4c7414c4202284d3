"""CLAP score for audio: cosine of a transformers ``ClapModel``'s audio embedding to the prompt's text
embedding, or to a reference audio's embedding.

The checkpoint's ``ClapFeatureExtractor`` is numpy, so gradients stop there; this file computes the same
log-mel spectrogram in torch (same STFT, window, mel filter bank and dB scale), so the score is
differentiable with respect to the waveform. Where it differs from the extractor:

* audio longer than the model's window (``max_length_s``) is centre-cropped (deterministic), where the
  extractor crops at random (``rand_trunc``) or fuses random crops (``fusion``);
* the features are computed in float32 (the extractor: float64, rounded to float32), a difference far
  below the dB scale's resolution except on near-silent bins clipped at -100 dB;
* a fusion model (``enable_fusion``) gets the spectrogram four times with ``is_longer=False``, as the
  extractor does for clips that fit the window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import InputSpec, Reward

MEL_FLOOR = 1e-10  # the extractor's mel floor and dB clip (-100 dB)


class ClapLogMel(nn.Module):
    """Waveform ``[B,L]`` at the extractor's rate -> log-mel ``[B,T,n_mels]`` in dB, as ClapFeatureExtractor."""

    def __init__(self, feature_extractor):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fe = feature_extractor
        self.n_fft, self.hop_length = fe.fft_window_size, fe.hop_length
        # The extractor's "fusion" path uses HTK mels without normalisation, the others Slaney's (librosa).
        slaney = fe.truncation != "fusion"
        filters = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1,
                                  num_mel_filters=fe.feature_size, min_frequency=fe.frequency_min,
                                  max_frequency=fe.frequency_max, sampling_rate=fe.sampling_rate,
                                  norm="slaney" if slaney else None, mel_scale="slaney" if slaney else "htk")
        self.register_buffer("filters", torch.tensor(filters, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), self.n_fft, self.hop_length, window=self.window.float(), center=True,
                          pad_mode="reflect", onesided=True, return_complex=True)
        power = torch.view_as_real(spec).pow(2).sum(-1)  # [B, freq, T]; no |z| (its gradient is NaN at 0)
        mel = torch.einsum("bft,fm->btm", power, self.filters.float()).clamp_min(MEL_FLOOR)
        return 10.0 * torch.log10(mel)


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Resample ``[B,L]`` from ``rate`` to ``target`` Hz (linear, antialiased when downsampling; tensor-only)."""
    if rate == target:
        return wave
    length = max(1, round(wave.shape[-1] * target / rate))
    return F.interpolate(wave[:, None, None, :], size=(1, length), mode="bilinear", align_corners=False,
                         antialias=target < rate)[:, 0, 0]


def fit_length(wave: torch.Tensor, length: int, padding: str = "repeatpad") -> torch.Tensor:
    """Crop (centre) or pad ``[B,L]`` to ``length`` samples, padding as the extractor's ``padding`` says."""
    n = wave.shape[-1]
    if n > length:
        start = (n - length) // 2
        return wave[:, start:start + length]
    if n < length:
        if padding == "repeat":
            wave = wave.repeat(1, length // n + 1)[:, :length]
        elif padding == "repeatpad":
            wave = wave.repeat(1, length // n)
        wave = F.pad(wave, (0, length - wave.shape[-1]))
    return wave


class CLAPScore(Reward):
    """Cosine between CLAP's audio embedding and the prompt's text embedding (or a reference audio's)."""

    name = "clap"
    modality = "audio"
    differentiable = True
    input_spec = InputSpec(range=(-1.0, 1.0), layout="BCL")

    def __init__(self, path: str = "laion/clap-htsat-unfused", local_files_only: bool = False,
                 reference_audio: torch.Tensor | None = None, sample_rate: int | None = None):
        super().__init__()
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        self.model = ClapModel.from_pretrained(path, local_files_only=local_files_only).eval().requires_grad_(False)
        self.feature_extractor = ClapFeatureExtractor.from_pretrained(path, local_files_only=local_files_only)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        self.log_mel = ClapLogMel(self.feature_extractor)
        self.sample_rate = sample_rate or self.feature_extractor.sampling_rate
        self.register_buffer("reference", None, persistent=False)
        if reference_audio is not None:  # [C,L] or [N,C,L]: the unit mean of the clips' embeddings
            ref = reference_audio if reference_audio.ndim == 3 else reference_audio[None]
            with torch.no_grad():
                self.reference = F.normalize(self.embed_audio(ref.float()).mean(0), dim=-1)

    def input_features(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio ``[B,C,L]`` in [-1,1] at ``sample_rate`` -> the model's ``input_features`` ``[B,1|4,T,n_mels]``."""
        fe = self.feature_extractor
        wave = resample(audio.mean(1), self.sample_rate, fe.sampling_rate)
        mel = self.log_mel(fit_length(wave, fe.nb_max_samples, fe.padding))[:, None]
        copies = 4 if self.model.config.audio_config.enable_fusion else 1
        return mel.expand(-1, copies, -1, -1).to(next(self.model.parameters()).dtype)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLAP audio embeddings ``[B,D]`` (differentiable in the waveform)."""
        feats = self.input_features(audio)
        is_longer = torch.zeros(feats.shape[0], 1, dtype=torch.bool, device=feats.device)
        out = self.model.get_audio_features(input_features=feats, is_longer=is_longer)
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm CLAP text embeddings ``[B,D]``."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(next(self.model.parameters()).device) for k, v in tokens.items()}
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)

    def _score(self, media, prompts, metadata):
        audio = self.embed_audio(media)
        target = self.reference[None] if self.reference is not None else self.embed_texts(prompts)
        return (audio * target.to(audio)).sum(-1)
