"""Rewards served elsewhere: a JSON scoring endpoint (``HTTPReward``) and a VLM judge behind an
OpenAI-compatible chat API (``VLMJudge``, pairwise as in Pref-GRPO).

Heavy or conflicting reward stacks (GenEval, OCR, UnifiedReward on vLLM) run as servers, as flow_grpo and
Pref-GRPO do. Standard-library HTTP only; media travel as base64 PNG/JPEG (WAV for
audio). Timeouts and connection errors are retried with exponential backoff; anything else is one line.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
import urllib.error
import urllib.request
import warnings
import wave
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from .base import InputSpec, PairwiseReward, Reward
from .errors import RewardError

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG"}


class _TransportError(Exception):
    """A request that could not be completed (after its retries, where retrying made sense)."""


class _MalformedReply(Exception):
    """The server answered, but not with what the protocol expects."""


def _one_line(err: object) -> str:
    """An exception (or text) squeezed onto one line, for RewardError messages."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _jsonable(value):
    """JSON fallback for metadata values: tensors and arrays as lists, anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def post_json(url: str, payload: dict, timeout: float, retries: int, backoff: float,
              headers: dict[str, str] | None = None) -> object:
    """POST ``payload`` as JSON and return the decoded JSON reply.

    Timeouts, connection errors and HTTP 429/5xx are retried ``retries`` times, sleeping ``backoff``,
    ``2*backoff``, ``4*backoff``... in between (then ``_TransportError``); other HTTP errors and a body that
    is not JSON raise at once (``_TransportError`` / ``_MalformedReply``)."""
    data = json.dumps(payload, default=_jsonable).encode("utf-8")
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    cause = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=all_headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            cause = f"HTTP {err.code} {_one_line(err.reason)}"
            if err.code == 429 or err.code >= 500:
                continue
            raise _TransportError(cause) from None
        except TimeoutError:
            cause = f"timed out after {timeout:g}s"
            continue
        except urllib.error.URLError as err:
            reason = err.reason
            cause = f"timed out after {timeout:g}s" if isinstance(reason, TimeoutError) else _one_line(reason)
            continue
        except (OSError, http.client.HTTPException) as err:
            cause = _one_line(f"{type(err).__name__}: {err}")
            continue
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _MalformedReply(f"reply is not JSON: {_one_line(body[:80].decode('utf-8', 'replace'))!r}") from None
    raise _TransportError(f"failed after {retries + 1} attempts: {cause}")


def encode_image(image: torch.Tensor, image_format: str = "png") -> str:
    """One image ``[3,H,W]`` in [0,1] as base64 PNG/JPEG."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=_FORMATS[image_format])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_audio(audio: torch.Tensor, sample_rate: int) -> str:
    """One clip ``[C,L]`` in [-1,1] as base64 16-bit PCM WAV."""
    pcm = (audio.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16).T.contiguous().cpu().numpy()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(audio.shape[0])
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.astype("<i2").tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_common(timeout: float, retries: int, backoff: float, image_format: str, name: str) -> None:
    """One line for a bad client setting, before any request is made."""
    if timeout <= 0 or retries < 0 or backoff < 0:
        raise RewardError(f"reward {name}: need timeout > 0, retries >= 0, backoff >= 0 "
                          f"(got {timeout}, {retries}, {backoff})")
    if image_format not in _FORMATS:
        raise RewardError(f"reward {name}: image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")


class HTTPReward(Reward):
    """A pointwise reward computed by a server: POST JSON, get ``{"scores": [float, ...]}`` back.

    The request is ``{"prompts": [...], "metadata": [...], KEY: [...]}`` with KEY ``images`` (base64
    PNG/JPEG per sample), ``videos`` (a list of base64 frames per sample) or ``audio`` (base64 16-bit WAV
    per sample, at ``sample_rate``). A long batch is sent in requests of at most ``batch_size`` samples."""

    name = "http"
    differentiable = False

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 2, backoff: float = 0.5,
                 modality: str = "image", name: str | None = None, image_format: str = "png",
                 sample_rate: int = 16000, batch_size: int = 64):
        super().__init__()
        if name is not None:
            self.name = name
        if batch_size < 1:
            raise RewardError(f"reward {self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if modality not in ("image", "video", "audio"):
            raise RewardError(f"reward {self.name}: modality must be image, video or audio, got {modality!r}")
        _check_common(timeout, retries, backoff, image_format, self.name)
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.modality, self.image_format, self.sample_rate = modality, image_format, sample_rate
        self.input_spec = {"image": InputSpec((0.0, 1.0), "BCHW"), "video": InputSpec((0.0, 1.0), "BFCHW"),
                           "audio": InputSpec((-1.0, 1.0), "BCL")}[modality]

    def encode(self, media: torch.Tensor) -> tuple[str, list]:
        """The payload key and one encoded entry per sample."""
        if self.modality == "video":
            return "videos", [[encode_image(frame, self.image_format) for frame in clip] for clip in media]
        if self.modality == "audio":
            return "audio", [encode_audio(clip, self.sample_rate) for clip in media]
        return "images", [encode_image(image, self.image_format) for image in media]

    def _score(self, media, prompts, metadata):
        key, encoded = self.encode(media)
        payload = {"prompts": prompts, "metadata": metadata, key: encoded}
        try:
            reply = post_json(self.url, payload, self.timeout, self.retries, self.backoff)
        except (_TransportError, _MalformedReply) as err:
            raise RewardError(f"reward {self.name}: {self.url}: {err}") from None
        return torch.tensor(self._parse(reply, len(prompts)), dtype=torch.float32, device=media.device)

    def _parse(self, reply: object, n: int) -> list[float]:
        """The scores of a reply, or one line saying what is wrong with it."""
        scores = reply.get("scores") if isinstance(reply, dict) else None
        problem = None
        if not isinstance(scores, list):
            problem = 'no "scores" list in the reply'
        elif len(scores) != n:
            problem = f"{len(scores)} scores for {n} samples"
        elif not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            bad = next(s for s in scores if not isinstance(s, (int, float)) or isinstance(s, bool))
            problem = f"non-numeric score {_one_line(repr(bad))[:40]}"
        if problem:
            raise RewardError(f"reward {self.name}: {self.url}: malformed reply ({problem})")
        return [float(s) for s in scores]


DEFAULT_JUDGE_PROMPT = (
    "You are given a text prompt and two images generated from it. Judge which image follows the prompt "
    "more faithfully and has the higher visual quality.\n"
    "Prompt: {prompt}\n"
    "You may reason step by step first. Then give your final answer inside <answer></answer>, exactly "
    "\"Image 1 is better\" or \"Image 2 is better\"."
)
_VERDICT = re.compile(r"image\s*([12])\s*is\s*better", re.IGNORECASE)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def parse_verdict(text: object) -> float:
    """P(image 1 ≻ image 2) from a judge's reply: 1.0, 0.0, or 0.5 for a tie or anything unparseable.

    The last ``<answer>...</answer>`` is read if there is one, else the whole text; it must name exactly
    one winner ("Image 1 is better" / "Image 2 is better", any case)."""
    if not isinstance(text, str):
        return 0.5
    answers = _ANSWER.findall(text)
    span = answers[-1] if answers else text
    winners = {m.group(1) for m in _VERDICT.finditer(span)}
    if winners == {"1"}:
        return 1.0
    if winners == {"2"}:
        return 0.0
    return 0.5


def _reply_text(reply: object) -> object:
    """The assistant text of a chat completion (None where the reply has none)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content


def _chat_url(url: str) -> str:
    """The chat-completions endpoint for a server root, a ``/v1`` base, or the full endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class VLMJudge(PairwiseReward):
    """A VLM judge on an OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang), as Pref-GRPO
    uses UnifiedReward-Think: one chat request per pair, answer "Image 1 is better" / "Image 2 is better".

    ``prompt_template`` is the user text, ``{prompt}`` replaced by the sample's prompt. A tie or an
    unparseable answer counts 0.5; so does a request that fails after its retries (counted in
    ``self.failures``, one warning per call), unless every request of the call fails (RewardError)."""

    name = "vlm-judge"
    differentiable = False
    #: One chunk per call, so "all requests failed" and the warning are per call.
    batch_size = 1 << 16

    def __init__(self, url: str, model: str, timeout: float = 60.0, retries: int = 2, backoff: float = 0.5,
                 api_key: str | None = None, prompt_template: str = DEFAULT_JUDGE_PROMPT,
                 max_concurrency: int = 8, image_format: str = "png", max_tokens: int = 1024,
                 temperature: float = 0.0):
        super().__init__()
        _check_common(timeout, retries, backoff, image_format, self.name)
        if max_concurrency < 1:
            raise RewardError(f"reward {self.name}: max_concurrency must be >= 1, got {max_concurrency}")
        self.url, self.model = _chat_url(url), model
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.api_key, self.prompt_template, self.max_concurrency = api_key, prompt_template, max_concurrency
        self.image_format, self.max_tokens, self.temperature = image_format, max_tokens, temperature
        self.input_spec = InputSpec((0.0, 1.0), "BCHW")
        #: Requests that failed after their retries (counted as ties), over the judge's lifetime.
        self.failures = 0

    def request(self, a: torch.Tensor, b: torch.Tensor, prompt: str) -> dict:
        """The chat request for one pair: the two images (as image 1 and image 2), then the text."""
        mime = "jpeg" if self.image_format in ("jpeg", "jpg") else "png"
        images = [{"type": "image_url",
                   "image_url": {"url": f"data:image/{mime};base64,{encode_image(x, self.image_format)}"}}
                  for x in (a, b)]
        text = {"type": "text", "text": self.prompt_template.replace("{prompt}", prompt)}
        return {"model": self.model, "messages": [{"role": "user", "content": images + [text]}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}

    def judge(self, a: torch.Tensor, b: torch.Tensor, prompt: str) -> float | str:
        """P(a ≻ b) for one pair, or the cause (a string) when the request failed."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            reply = post_json(self.url, self.request(a, b, prompt), self.timeout, self.retries, self.backoff, headers)
        except (_TransportError, _MalformedReply) as err:
            return str(err)
        return parse_verdict(_reply_text(reply))

    def _prefer(self, a, b, prompts):
        n = a.shape[0]
        if n == 0:
            return torch.zeros(0, device=a.device)
        a, b = a.detach().cpu(), b.detach().cpu()
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, n)) as pool:
            results = list(pool.map(self.judge, a, b, prompts))
        failed = [r for r in results if isinstance(r, str)]
        if len(failed) == n:
            raise RewardError(f"reward {self.name}: all {n} judge requests to {self.url} failed ({failed[0]})")
        if failed:
            self.failures += len(failed)
            warnings.warn(f"reward {self.name}: {len(failed)} of {n} judge requests to {self.url} failed, "
                          f"counted as ties ({failed[0]})", RuntimeWarning, stacklevel=2)
        return torch.tensor([0.5 if isinstance(r, str) else r for r in results], dtype=torch.float32)
