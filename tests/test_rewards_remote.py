"""Remote rewards against a stub server on 127.0.0.1: the request format, retries after a slow first
attempt, one-line errors for timeouts, malformed replies and a server that is down, and a pairwise VLM
judge whose win rates rank images the way the judge prefers them."""
import base64
import hashlib
import io
import json
import socket
import threading
import time
import warnings
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign import rewards
from flowalign.rewards.remote import HTTPReward, VLMJudge, parse_verdict

SLOW = 0.6  # seconds a "slow" answer takes: longer than every client timeout below


def b64_png_mean(data: str) -> float:
    """Mean pixel value in [0,1] of a base64 image (PNG or JPEG)."""
    return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))).mean() / 255)


def b64_wav(data: str) -> tuple[wave._wave_params, np.ndarray]:
    """The parameters and samples in [-1,1] of a base64 16-bit WAV."""
    with wave.open(io.BytesIO(base64.b64decode(data))) as clip:
        params = clip.getparams()
        samples = np.frombuffer(clip.readframes(params.nframes), dtype="<i2") / 32767
    return params, samples


class Stub(ThreadingHTTPServer):
    """A scoring server (``/score``: mean brightness) and a chat judge (``/v1/chat/completions``: prefers
    the brighter image) whose behaviour a test switches through ``mode``."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.reset()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        self.mode, self.delay = "normal", 0.0
        self.requests, self.seen, self.inflight, self.max_inflight = [], set(), 0, 0

    def handle_error(self, request, client_address):  # a client that timed out hung up: nothing to report
        pass

    def answer(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Status and body for one request, by mode."""
        if self.mode == "slow":
            time.sleep(SLOW)
        if self.mode == "slow_once":
            key = hashlib.sha1(body).hexdigest()
            with self.lock:
                first = key not in self.seen
                self.seen.add(key)
            if first:
                time.sleep(SLOW)
        if self.mode.startswith("http"):
            return int(self.mode[4:]), b"stub error"
        if self.mode == "not_json":
            return 200, b"<html>oops</html>"
        time.sleep(self.delay)
        payload = json.loads(body)
        reply = self.score(payload) if path == "/score" else self.chat(payload)
        return (200, reply) if isinstance(reply, bytes) else (200, json.dumps(reply).encode())

    def score(self, payload: dict) -> dict:
        if "images" in payload:
            scores = [b64_png_mean(x) for x in payload["images"]]
        elif "videos" in payload:
            scores = [float(np.mean([b64_png_mean(f) for f in frames])) for frames in payload["videos"]]
        else:
            scores = [float(b64_wav(x)[1].mean()) for x in payload["audio"]]
        broken = {"no_scores": {"result": scores}, "wrong_length": {"scores": scores[:-1]},
                  "non_number": {"scores": ["high"] * len(scores)}}
        return broken.get(self.mode, {"scores": scores})

    def chat(self, payload: dict) -> dict | bytes:
        urls = [p["image_url"]["url"] for p in payload["messages"][0]["content"] if p["type"] == "image_url"]
        first, second = (b64_png_mean(u.split(",", 1)[1]) for u in urls)
        if self.mode == "half_broken" and first < 0.5:
            return b"not json at all"
        if first == second:
            text = "<think>Equally bright.</think><answer>Both are equally good.</answer>"
        else:
            winner = 1 if first > second else 2
            text = f"<think>Image 1 is better lit? Checking.</think><answer>Image {winner} is better</answer>"
        text = {"unparseable": "I cannot decide.", "empty": ""}.get(self.mode, text)
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        stub = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with stub.lock:
            stub.requests.append((self.path, dict(self.headers), body))
            stub.inflight += 1
            stub.max_inflight = max(stub.max_inflight, stub.inflight)
        try:
            status, reply = stub.answer(self.path, body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        finally:
            with stub.lock:
                stub.inflight -= 1


@pytest.fixture(scope="module")
def server():
    stub = Stub()
    thread = threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield stub
    stub.shutdown()
    stub.server_close()


@pytest.fixture
def stub(server):
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def dead_url():
    """A URL on a free port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/score"


def flat(values, size=(16, 16)) -> torch.Tensor:
    """Uniform grey images, one per brightness value."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, *size).clone()


# ---------------------------------------------------------------------------------------------- HTTPReward

def test_http_scores_in_chunks_and_sends_the_protocol(stub):
    reward = HTTPReward(f"{stub.url}/score", timeout=0.5, retries=0)
    reward.batch_size = 4
    images = torch.rand(10, 3, 16, 24)
    prompts = [f"prompt {i}" for i in range(10)]
    meta = [{"group": i // 5, "seed": torch.tensor(i)} for i in range(10)]
    scores = reward.score(images, prompts, meta)
    assert torch.allclose(scores, images.mean(dim=(1, 2, 3)), atol=1 / 255)
    assert len(stub.requests) == 3  # chunks of 4, 4, 2
    path, headers, body = stub.requests[0]
    payload = json.loads(body)
    assert path == "/score" and headers["Content-Type"] == "application/json"
    assert payload["prompts"] == prompts[:4] and payload["metadata"][1] == {"group": 0, "seed": 1}
    png = base64.b64decode(payload["images"][0])
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (24, 16)
    assert not reward.differentiable and reward.name == "http"


def test_http_jpeg_video_and_audio(stub):
    images = torch.rand(2, 3, 8, 8)
    jpeg = HTTPReward(f"{stub.url}/score", timeout=0.5, image_format="jpeg", name="remote-jpeg")
    assert torch.allclose(jpeg.score(images), images.mean(dim=(1, 2, 3)), atol=0.05)
    assert base64.b64decode(json.loads(stub.requests[-1][2])["images"][0]).startswith(b"\xff\xd8")

    video = torch.rand(2, 3, 3, 8, 8)
    scores = HTTPReward(f"{stub.url}/score", timeout=0.5, modality="video").score(video)
    assert len(json.loads(stub.requests[-1][2])["videos"][0]) == 3
    assert torch.allclose(scores, video.mean(dim=(1, 2, 3, 4)), atol=1 / 255)

    audio = torch.rand(2, 2, 800) * 2 - 1
    scores = HTTPReward(f"{stub.url}/score", timeout=0.5, modality="audio", sample_rate=8000).score(audio)
    params, samples = b64_wav(json.loads(stub.requests[-1][2])["audio"][1])
    assert (params.nchannels, params.sampwidth, params.framerate, params.nframes) == (2, 2, 8000, 800)
    assert np.allclose(samples.reshape(800, 2).T, audio[1].numpy(), atol=1e-4)
    assert torch.allclose(scores, audio.mean(dim=(1, 2)), atol=1e-4)


def test_http_retries_after_a_slow_first_attempt(stub):
    stub.mode = "slow_once"
    images = torch.rand(3, 3, 8, 8)
    scores = HTTPReward(f"{stub.url}/score", timeout=0.25, retries=1, backoff=0.01).score(images)
    assert torch.allclose(scores, images.mean(dim=(1, 2, 3)), atol=1 / 255)
    assert len(stub.requests) == 2


def test_http_always_slow_is_one_line_timeout_error(stub):
    stub.mode = "slow"
    url = f"{stub.url}/score"
    start = time.perf_counter()
    with pytest.raises(rewards.RewardError, match="timed out after 0.2s") as err:
        HTTPReward(url, timeout=0.2, retries=1, backoff=0.01, name="remote").score(torch.rand(2, 3, 8, 8))
    assert time.perf_counter() - start < SLOW * 2
    message = str(err.value)
    assert "\n" not in message and message.startswith("reward remote:") and url in message and "2 attempts" in message


@pytest.mark.parametrize("mode, match", [("not_json", "not JSON"), ("no_scores", 'no "scores"'),
                                         ("wrong_length", "1 scores for 2 samples"),
                                         ("non_number", "non-numeric score 'high'")])
def test_http_malformed_reply_is_one_line_error_without_retry(stub, mode, match):
    stub.mode = mode
    with pytest.raises(rewards.RewardError, match=match) as err:
        HTTPReward(f"{stub.url}/score", timeout=0.5, retries=2, backoff=0.01).score(torch.rand(2, 3, 8, 8))
    assert "\n" not in str(err.value) and len(stub.requests) == 1


@pytest.mark.parametrize("status, attempts", [(500, 3), (400, 1)])
def test_http_status_errors(stub, status, attempts):
    stub.mode = f"http{status}"
    with pytest.raises(rewards.RewardError, match=f"HTTP {status}"):
        HTTPReward(f"{stub.url}/score", timeout=0.5, retries=2, backoff=0.01).score(torch.rand(1, 3, 8, 8))
    assert len(stub.requests) == attempts


def test_http_server_down_fails_fast(dead_url):
    start = time.perf_counter()
    with pytest.raises(rewards.RewardError, match="failed after 3 attempts") as err:
        HTTPReward(dead_url, timeout=0.3, retries=2, backoff=0.01).score(torch.rand(2, 3, 8, 8))
    assert time.perf_counter() - start < 1.0
    assert dead_url in str(err.value) and "\n" not in str(err.value)


def test_registry_builds_remote_rewards(stub):
    http = rewards.load("http", url=f"{stub.url}/score", timeout=0.5)
    judge = rewards.load("vlm-judge", url=stub.url, model="judge-7b")
    assert isinstance(http, HTTPReward) and isinstance(judge, VLMJudge)
    assert judge.url == f"{stub.url}/v1/chat/completions" and not judge.differentiable
    assert VLMJudge(f"{stub.url}/v1/", "m").url == judge.url == VLMJudge(judge.url, "m").url
    with pytest.raises(rewards.RewardError, match="modality"):
        HTTPReward(stub.url, modality="text")


# ------------------------------------------------------------------------------------------------ VLMJudge

def test_parse_verdict():
    cases = {"<answer>Image 1 is better</answer>": 1.0, "image 2 is better.": 0.0,
             "<think>Image 2 is better lit, but</think><answer>Image 1 is better.</answer>": 1.0,
             "<answer>Tie</answer>": 0.5, "Image 1 is better; no, Image 2 is better": 0.5, "": 0.5, None: 0.5,
             "I cannot tell": 0.5}
    for text, expected in cases.items():
        assert parse_verdict(text) == expected, text


def test_judge_win_rates_rank_a_group_by_brightness(stub):
    stub.delay = 0.05  # long enough to see requests overlap
    brightness = [0.6, 0.2, 0.9, 0.4, 0.7] + [0.3, 0.3, 0.8]
    meta = [{"group": 0}] * 5 + [{"group": 1}] * 3
    judge = VLMJudge(stub.url, model="stub-judge", timeout=0.5, retries=0, max_concurrency=4)
    scores = judge.score(flat(brightness), [f"p{m['group']}" for m in meta], meta)
    expected = [0.5, 0.0, 1.0, 0.25, 0.75] + [0.25, 0.25, 1.0]  # rank / (n - 1); the tie counts 0.5
    assert torch.allclose(scores, torch.tensor(expected))
    assert len(stub.requests) == 10 + 3 and stub.max_inflight > 1 and judge.failures == 0


def test_judge_request_format(stub):
    judge = VLMJudge(stub.url, model="UnifiedReward-Think", timeout=0.5, api_key="secret")
    p = judge.prefer(flat([0.2], size=(20, 12)), flat([0.8], size=(20, 12)), ["a red apple"])
    assert p.tolist() == [0.0]
    path, headers, body = stub.requests[-1]
    payload = json.loads(body)
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
    assert payload["model"] == "UnifiedReward-Think"
    (message,) = payload["messages"]
    images = [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]
    text = "".join(p["text"] for p in message["content"] if p["type"] == "text")
    assert message["role"] == "user" and len(images) == 2
    assert all(u.startswith("data:image/png;base64,") for u in images)
    png = Image.open(io.BytesIO(base64.b64decode(images[0].split(",", 1)[1])))
    assert png.format == "PNG" and png.size == (12, 20)
    assert "a red apple" in text and "Image 1 is better" in text and "<answer>" in text


@pytest.mark.parametrize("mode", ["unparseable", "empty"])
def test_judge_unparseable_answer_counts_half(stub, mode):
    stub.mode = mode
    judge = VLMJudge(stub.url, model="m", timeout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert judge.prefer(flat([0.1, 0.9]), flat([0.9, 0.1])).tolist() == [0.5, 0.5]
    assert judge.failures == 0


def test_judge_failed_requests_count_half_and_warn_once(stub):
    stub.mode = "half_broken"  # a non-JSON reply whenever image 1 is dark
    judge = VLMJudge(stub.url, model="m", timeout=0.5, retries=1, backoff=0.01)
    with pytest.warns(RuntimeWarning, match="2 of 3 judge requests") as record:
        p = judge.prefer(flat([0.1, 0.9, 0.2]), flat([0.9, 0.1, 0.1]))
    assert p.tolist() == [0.5, 1.0, 0.5] and judge.failures == 2 and len(record) == 1


def test_judge_retries_after_a_slow_first_attempt(stub):
    stub.mode = "slow_once"
    judge = VLMJudge(stub.url, model="m", timeout=0.25, retries=1, backoff=0.01)
    assert judge.prefer(flat([0.9, 0.1]), flat([0.1, 0.9])).tolist() == [1.0, 0.0]
    assert judge.failures == 0 and len(stub.requests) == 4


def test_judge_always_slow_raises(stub):
    stub.mode = "slow"
    judge = VLMJudge(stub.url, model="m", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(rewards.RewardError, match=r"all 3 judge requests .* failed \(.*timed out") as err:
        judge.score(flat([0.1, 0.5, 0.9]))
    assert "\n" not in str(err.value)


def test_judge_server_down_raises(dead_url):
    judge = VLMJudge(dead_url.rsplit("/", 1)[0], model="m", timeout=0.3, retries=1, backoff=0.01)
    start = time.perf_counter()
    with pytest.raises(rewards.RewardError, match="all 1 judge requests"):
        judge.prefer(flat([0.1]), flat([0.9]))
    assert time.perf_counter() - start < 1.0
