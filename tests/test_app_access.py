"""The app closed by default and hard to abuse: what a visitor may name, path escapes, a bounded model cache,
request bodies capped before parsing, calls with missing inputs answered in one sentence, and memory that stays
flat over 120 requests."""
from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flowalign.app.access import Access
from flowalign.app.config import load_app_config
from flowalign.app.models import ModelCache
from flowalign.errors import FlowalignError

PROMPT = "a handwritten seven"


def access(tmp_path, *overrides) -> Access:
    return Access(load_app_config(None, [f"runs_root={tmp_path / 'runs'}", *overrides]))


def refused(check, *args) -> str:
    with pytest.raises(FlowalignError) as info:
        check(*args)
    return str(info.value)


def test_closed_by_default_only_what_the_config_lists(tmp_path):
    assert load_app_config().allow_custom_paths is False
    a = access(tmp_path, "models=[toy/digits]", "rewards=[toy/ink, toy/bold_digit]", "default_rewards=[toy/ink]")
    a.check_model("toy/digits")
    a.check_rewards(["toy/ink"])
    a.check_folder("run", "listed/run", ["listed/run"])
    (tmp_path / "exists").mkdir()
    for kind, value in [("model", "stabilityai/sd-turbo"), ("model", str(tmp_path / "exists")),
                        ("model", str(tmp_path / "missing")), ("model", "toy/music")]:
        assert refused(a.check_model, value) == f"{kind} '{value}': not offered by this app"
    for value in [str(tmp_path / "exists"), str(tmp_path / "missing"), str(tmp_path / "runs" / "x")]:
        assert refused(a.check_folder, "run", value, []) == f"run '{value}': not offered by this app"
    assert refused(a.check_rewards, ["pickscore"]) == "reward 'pickscore': not offered by this app"


def test_custom_paths_stay_under_their_roots(tmp_path):
    runs, models, outside = tmp_path / "runs", tmp_path / "models", tmp_path / "outside"
    for folder in (runs / "a", models / "m", outside):
        folder.mkdir(parents=True)
    (runs / "link").symlink_to(outside)
    a = access(tmp_path, "allow_custom_paths=true", f"model_roots=[{models}]")
    a.check_folder("run", str(runs / "a"), [])
    a.check_model(str(models / "m"))
    a.check_model("stabilityai/stable-diffusion-3.5-medium")  # a hub id
    a.check_rewards(["pickscore"])
    escapes = [str(runs / ".." / "outside"), str(runs / "link"), str(outside), "/", "/etc", "~/.ssh",
               str(runs / "a" / ".." / ".." / "outside")]
    for value in escapes:
        assert refused(a.check_folder, "checkpoint", value, []) == f"checkpoint '{value}': not offered by this app"
        assert refused(a.check_model, value) == f"model '{value}': not offered by this app"
    for value in ["toy/other", "a/b/c", "..", "x" * 300, "org/name\x00"]:
        assert "not offered by this app" in refused(a.check_model, value)


def test_the_model_cache_is_bounded_and_keeps_a_model_in_use():
    cache = ModelCache(device="cpu", max_models=1)
    digits = cache.model("toy/digits")
    assert cache.loaded() == ["toy/digits"]
    cache.model("toy/music")
    assert cache.loaded() == ["toy/music"]  # the least recently used was freed
    busy = cache.model("toy/music")
    with busy.lock:  # a request computing with it: not evicted, the cache runs one over its bound
        cache.model("toy/digits")
        assert cache.loaded() == ["toy/music", "toy/digits"]
    cache.model("toy/music")
    assert cache.loaded() == ["toy/music"] and digits is not cache.model("toy/digits")


# ---------------------------------------------------------------------------------------------- over HTTP

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The toy app, closed (the default), with one trained run under runs_root; yields (url, runs_root)."""
    from flowalign.app import ui
    from flowalign.training.run import train

    root = tmp_path_factory.mktemp("runs")
    train("configs/toy/digits_flow_grpo.yaml",
          ["train.iterations=1", "train.prompts_per_iteration=2", "flow_grpo.group_size=2", "train.steps=3",
           "train.checkpoint_every=0", "train.eval_prompts=0", f"output_dir={root / 'tiny'}"],
          progress=False, print_fn=lambda *_: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_app_config(None, [f"runs_root={root}", f"server.port={port}", "steps=2",
                                 f"server.work_dir={tmp_path_factory.mktemp('work')}"])
    demo = ui.launch(cfg, block=False, quiet=True, cache=ModelCache(device="cpu"))
    yield demo.local_url, root
    demo.close()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def raw(url: str, header: str, body: bytes, repeat: int = 1, last: bytes = b"") -> bytes:
    """Send a POST with ``header``, ``body`` (``repeat`` times) and, once the server has read that, ``last``, on
    a plain socket; return the response (the server answers without reading further, so nothing is unread)."""
    import time
    from urllib.parse import urlparse

    parts = urlparse(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
                     f"{header}\r\nConnection: close\r\n\r\n".encode())
        for _ in range(repeat):
            sock.sendall(body)
        if last:
            time.sleep(1.0)
            sock.sendall(last)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.slow
def test_bodies_are_capped_before_parsing_and_missing_inputs_are_one_sentence(served):
    url = served[0] + "gradio_api/call/compare"
    # 50 MB announced, none of it sent: the answer comes anyway, so nothing waited for (or parsed) the body
    head = raw(url, f"Content-Length: {50 << 20}", b"")
    assert head.startswith(b"HTTP/1.1 413") and head.endswith(json.dumps({
        "error": f"request body of {50 << 20} bytes is over this app's limit of {1 << 20} bytes "
                 "(server.max_request_bytes)"}).encode())
    chunk = b"x" * 65536  # chunked, no length: counted as it comes; 16 x 64 KiB is the cap, one byte more is over
    assert raw(url, "Transfer-Encoding: chunked", b"%x\r\n%s\r\n" % (len(chunk), chunk), repeat=16,
               last=b"1\r\nx\r\n").startswith(b"HTTP/1.1 413")
    cases = [(b'{"data": []}', "compare: expected 10 inputs in 'data', got 0"),
             (b'{"nothing": 1}', "request body: expected a JSON object with a 'data' list of the inputs"),
             (b"not json", "request body: expected JSON"),
             (b'{"data": [1]}', "compare: expected 10 inputs in 'data', got 1")]
    for body, sentence in cases:
        assert post(url, body) == (422, {"error": sentence})
    assert post(served[0] + "gradio_api/call/nope", b'{"data": []}') == (422, {"error": "no such endpoint: 'nope'"})
    assert post(served[0] + "gradio_api/queue/join", b'{"data": [], "fn_index": 999}') == (
        422, {"error": "request body: 'fn_index' names no endpoint"})


@pytest.mark.slow
def test_path_escapes_are_refused_the_same_way_whether_or_not_they_exist(served, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, root = served
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    compare = ["toy/digits", [], 1.0, PROMPT, 0, 1, 2, "", ["toy/bold_digit"], ""]
    attempts = [(0, "/etc"), (0, str(tmp_path / "missing")), (0, "stabilityai/sd-turbo"), (1, ["/"]),
                (1, [str(root / "..")]), (1, [str(tmp_path / "missing")]), (9, "pickscore")]
    answers = {}
    for index, value in attempts:
        args = list(compare)
        args[index] = value
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name="/compare")
        shown = value[0] if isinstance(value, list) else value
        message = str(info.value)  # a closed dropdown refuses before the handler does, with gradio's sentence
        assert message.endswith(f"'{shown}': not offered by this app") or "is not in the list of choices" in message
        answers.setdefault(index, set()).add(message.replace(shown, "<value>") if len(shown) > 1 else message)
    assert len(answers[0]) == 1, answers  # /etc exists, the other does not: the same sentence
    for folder in ["/", "/etc", str(root / ".." / ".."), str(tmp_path)]:
        with pytest.raises(AppError, match="not offered by this app|is not in the list of choices"):
            client.predict(folder, api_name="/open_run")
    listed = str(root / "tiny" / "final")
    assert client.predict(*compare[:1], [listed], *compare[2:], api_name="/compare")[0].startswith("1 prompt(s)")


def _rss_mb() -> float:
    """Resident memory after a garbage collection, with freed heap pages handed back to the system (so what is
    measured is what the process holds, not what the allocator keeps for reuse)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_memory_stays_flat_over_a_hundred_and_twenty_requests(served, tmp_path):
    """120 Compare requests through gradio_client (the server in this process): resident memory after the
    first 20 grows by less than 25 MB over the other 100, i.e. under 0.25 MB a request, less than one kept
    256-pixel result (measured: +2.1 MB over 180 requests)."""
    from gradio_client import Client

    url, root = served
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    listed = str(root / "tiny" / "final")
    rss = {}  # requests served -> MB; measured every 20 requests (a full garbage collection costs more than one)
    for i in range(120):
        out = client.predict("toy/digits", [listed], 1.0, PROMPT, i, 1, 2, "", ["toy/bold_digit"], "",
                             api_name="/compare")
        assert out[2]["data"][0][1] == i
        if i == 0 or (i + 1) % 20 == 0:
            rss[i + 1] = _rss_mb()
    growth = rss[120] - rss[20]
    print(f"resident memory: {rss[1]:.0f} MB after 1 request, {rss[20]:.0f} after 20, {rss[120]:.0f} after 120 "
          f"(+{growth:.1f} MB over the last 100)")
    assert growth < 25, rss
