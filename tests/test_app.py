"""The Gradio app: its pure functions, the page in headless Chromium, the same flows over gradio_client,
20 concurrent requests, and out-of-range inputs reaching the page as one sentence.

The app runs on the toy world with a LoRA from a one-iteration GRPO run written here; the server listens
on a free port of 127.0.0.1 in a background thread. Screenshots go to pytest's tmp dir (paths printed).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flowalign.app.compare import run_compare
from flowalign.app.config import load_app_config
from flowalign.app.limits import Limits, check_prompts
from flowalign.app.media import display_image, write_video, write_wav
from flowalign.app.models import ModelCache
from flowalign.app.optimise import run_optimise
from flowalign.app.runs import find_checkpoints, find_runs, read_run
from flowalign.config import ConfigError
from flowalign.errors import FlowalignError
from flowalign.inference import generate
from flowalign.rewards import RewardError

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPT = "a handwritten seven"
# The app's limits in these tests: small, so that "too many" is cheap to ask for.
LIMITS = ["limits.max_iterations=10", "limits.max_prompt_chars=60", "limits.max_steps=12", "iterations=5", "steps=4"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """A folder holding one finished toy training run (2 GRPO iterations: final/ LoRA, events, report/)."""
    from flowalign.training.run import train

    root = tmp_path_factory.mktemp("runs")
    train("configs/toy/digits_flow_grpo.yaml",
          ["train.iterations=2", "train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4",
           "train.rollout_batch=8", "train.train_batch=8", "train.checkpoint_every=1", "train.eval_prompts=2",
           "train.eval_steps=4", "train.lr=1e-2", f"output_dir={root / 'tiny'}"], progress=False,
          print_fn=lambda *_: None)
    return root


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    return ModelCache(device="cpu")


@pytest.fixture(scope="module")
def server(runs_root, cache, tmp_path_factory):
    """The app on a free port of 127.0.0.1 (background thread); yields (url, demo)."""
    from flowalign.app import ui

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_app_config(None, [*LIMITS, f"runs_root={runs_root}", f"server.port={port}",
                                 f"server.work_dir={tmp_path_factory.mktemp('app_work')}"])
    demo = ui.launch(cfg, block=False, quiet=True, cache=cache)
    assert demo.local_url == f"http://127.0.0.1:{port}/"  # bound to the loopback address by default
    yield demo.local_url, demo
    demo.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server[0], verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("client_files")))


def final_lora(runs_root: Path) -> str:
    return str(runs_root / "tiny" / "final")


# ---------------------------------------------------------------------------------------------- pure functions


def test_config_defaults_and_one_line_errors(tmp_path):
    cfg = load_app_config()
    assert cfg.models == ["toy/digits"] and cfg.server.host == "127.0.0.1" and "toy/bold_digit" in cfg.rewards
    bad = tmp_path / "app.yaml"
    bad.write_text("limits:\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match=r"limits.max_steps: 0 is out of range \(allowed: >= 1\)"):
        load_app_config(bad)
    with pytest.raises(ConfigError, match="default_rewards: 'toy/ink' is not in rewards"):
        load_app_config(None, ["rewards=toy/bold_digit", "default_rewards=toy/ink"])
    with pytest.raises(ConfigError, match="unknown key 'limits.max_stepz'"):
        load_app_config(None, ["limits.max_stepz=3"])
    limits = Limits(max_prompt_chars=10, max_prompts=2)
    assert check_prompts(" a one \n\n the 2 ", limits) == ["a one", "the 2"]
    with pytest.raises(FlowalignError,
                       match=r"^prompt: 11 characters, this app takes at most 10 \(limits.max_prompt_chars\)$"):
        check_prompts("x" * 11, limits)
    with pytest.raises(FlowalignError, match="at most 2"):
        check_prompts("a\nb\nc", limits)


@pytest.mark.slow
def test_compare_same_seeds_lora_and_scores(runs_root, cache):
    """Base samples are exactly ``generate`` on the same seeds; the LoRA changes them, scale 0 does not;
    each score is the reward's own score of that sample."""
    from flowalign import rewards
    limits = Limits()
    prompts = [PROMPT, "the digit 3"]
    result = run_compare(cache, limits, "toy/digits", [final_lora(runs_root)], "\n".join(prompts), seed=3,
                         samples=2, steps=4, reward_names=["toy/bold_digit", "toy/ink"])
    assert result.variants == ["base", "tiny/final"] and result.seeds == [3, 4]
    assert len(result.samples) == 2 * 2 * 2
    gen = cache.model("toy/digits").generator
    expected = generate(gen, prompts, steps=4, seed=4)  # seed 4 = the second seed of each prompt
    base = [s for s in result.samples if s.variant == "base" and s.seed == 4]
    aligned = [s for s in result.samples if s.variant == "tiny/final" and s.seed == 4]
    assert all(torch.equal(s.media, expected[i]) for i, s in enumerate(base))
    assert all((a.media - b.media).abs().max() > 1e-3 for a, b in zip(aligned, base))
    ink = rewards.load("toy/ink").score(torch.stack([s.media for s in aligned]), prompts).tolist()
    assert [s.scores["toy/ink"] for s in aligned] == pytest.approx(ink, abs=1e-6)
    off = run_compare(cache, limits, "toy/digits", [final_lora(runs_root)], prompts[0], seed=3, samples=1, steps=4,
                      lora_scale=0.0, reward_names=["toy/ink"])
    assert torch.equal(off.samples[0].media, off.samples[1].media)  # LoRA at scale 0 = the base
    headers, rows = result.table()
    assert headers == ["prompt", "seed", "model", "toy/bold_digit", "toy/ink"] and len(rows) == 8
    base_pair, aligned_pair = result.pair(1, "tiny/final")
    assert (base_pair.seed, aligned_pair.variant) == (4, "tiny/final")


@pytest.mark.slow
def test_compare_rejects_bad_input_in_one_sentence(runs_root, cache, tmp_path):
    limits = Limits(max_batch=4, max_checkpoints=1)
    run = lambda **kw: run_compare(cache, limits, **{"model": "toy/digits", "checkpoints": [], "prompts": PROMPT,  # noqa: E731
                                                     "steps": 2, "reward_names": ["toy/ink"], **kw})
    (tmp_path / "empty").mkdir()
    cases = [({"checkpoints": [str(tmp_path / "empty")]}, "no pytorch_lora_weights.safetensors there"),
             ({"checkpoints": [str(tmp_path / "nowhere")]}, "no such folder"),
             ({"checkpoints": [final_lora(runs_root), str(tmp_path)]}, "no pytorch_lora_weights"),
             ({"reward_names": ["no/such"]}, "reward 'no/such': unknown"),
             ({"samples": 3, "prompts": "a one\nthe 2"}, "6 samples per model, this app takes at most 4"),
             ({"steps": 51}, r"steps: 51 is above this app's limit of 50 \(limits.max_steps\)"),
             ({"model": "toy/nothing"}, "unknown toy model")]
    for kwargs, message in cases:
        with pytest.raises((FlowalignError, RewardError), match=message) as info:
            run(**kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_optimise_streams_and_cancels_cleanly(cache):
    """ReNO streams one step per iteration (growing trajectory, best never falls), the last carries the
    result; a run abandoned mid-way (Stop) leaves the model unlocked and usable."""
    steps = list(run_optimise(cache, Limits(), "toy/digits", "reno", PROMPT, {"toy/bold_digit": 1.0}, seed=0,
                              iterations=3, lr=5.0, steps=4))
    assert [s.iteration for s in steps[:3]] == [1, 2, 3] and steps[-1].result is not None
    assert [len(s.trajectory) for s in steps[:3]] == [2, 4, 6]  # the row's total and the best total per iteration
    assert {series for _, _, series in steps[2].trajectory} == {"total · seed 0", "best total so far"}
    bests = [s.best for s in steps]
    assert bests == sorted(bests) and steps[-1].best == pytest.approx(float(steps[-1].result.rewards[0]))
    assert steps[0].media.shape == (1, 3, 16, 16) and "done" in steps[-1].status()
    carinox = list(run_optimise(cache, Limits(), "toy/digits", "carinox", PROMPT, {"toy/bold_digit": 1.0},
                                iterations=2, steps=4, k=2))
    assert carinox[0].row_labels == ["seed 0", "seed 94"] and len(carinox[0].rewards) == 2
    two = list(run_optimise(cache, Limits(), "toy/digits", "reno", PROMPT, {"toy/bold_digit": 2.0, "toy/ink": 0.5},
                            iterations=2, steps=4))
    points = {series: value for step, value, series in two[1].trajectory if step == 2}
    assert set(points) == {"total · seed 0", "toy/bold_digit × 2", "toy/ink × 0.5", "best total so far"}
    assert points["toy/bold_digit × 2"] + points["toy/ink × 0.5"] == pytest.approx(points["total · seed 0"], rel=1e-4)
    stream = run_optimise(cache, Limits(), "toy/digits", "best-of-n", PROMPT, {"toy/ink": 1.0}, iterations=10, steps=4)
    next(stream)
    stream.close()
    model = cache.model("toy/digits")
    assert model.lock.acquire(blocking=False)
    model.lock.release()
    with pytest.raises(FlowalignError, match="reward 'toy/digit_match' is not differentiable"):
        list(run_optimise(cache, Limits(), "toy/digits", "reno", PROMPT, {"toy/digit_match": 1.0}, iterations=2))
    with pytest.raises(FlowalignError, match=r"iterations: 11 is above this app's limit of 10"):
        next(run_optimise(cache, Limits(max_iterations=10), "toy/digits", "reno", PROMPT, {"toy/ink": 1.0},
                          iterations=11))


@pytest.mark.slow
def test_runs_view_reads_what_the_trainer_writes(runs_root, tmp_path):
    assert find_runs(runs_root) == [str(runs_root / "tiny")]
    assert find_checkpoints(runs_root) == [final_lora(runs_root)]
    view = read_run(runs_root / "tiny")
    assert [step for step, _ in view.scalars["reward/mean"]] == [0, 1]
    assert {"reward/mean", "reward/std", "policy_loss"} <= set(view.scalars)
    captions = [c for _, c in view.images]
    assert captions == ["samples · iteration 0", "samples · iteration 1", "report/before.png", "report/after.png",
                        "report/reward_curve.png"]  # iteration 0: the base model's rollouts
    assert view.summary["final LoRA"].endswith("final") and 0 <= view.summary["reward_after"] <= 1
    with pytest.raises(FlowalignError, match="no tensorboard event files or report/ there"):
        read_run(tmp_path)


def test_media_files_play(tmp_path):
    """Video -> an H.264 MP4 of the right frame count; audio -> a 16-bit WAV; tiny images upscaled crisply."""
    import av

    frames = torch.rand(5, 3, 16, 16)
    path = write_video(frames, tmp_path / "clip.mp4", fps=4, min_side=64)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
    assert len(decoded) == 5 and (decoded[0].width, decoded[0].height) == (64, 64)
    audio = torch.sin(torch.linspace(0, 200, 8000)).repeat(2, 1)
    with wave.open(str(write_wav(audio, tmp_path / "a.wav", 8000))) as fh:
        assert (fh.getnchannels(), fh.getframerate(), fh.getnframes()) == (2, 8000, 8000)
    image = display_image(torch.rand(3, 16, 16), 64)
    assert image.shape == (64, 64, 3) and (image[:4, :4] == image[0, 0]).all()


class _StubGenerator:
    """A generator of video or audio (the app's generic path, until those toy models ship)."""

    def __new__(cls, modality: str):
        from flowalign.generators.base import Conditioning, Generator

        shape = (3, 3, 8, 8) if modality == "video" else (2, 400)

        class Stub(Generator):
            default_steps, default_guidance, sample_rate, fps = 2, 1.0, 8000, 4

            device = property(lambda self: torch.device("cpu"))
            dtype = property(lambda self: torch.float32)
            latent_shape = property(lambda self: shape)
            trainable_module = property(lambda self: torch.nn.Identity())

            def encode(self, prompts, negative_prompt=""):
                return Conditioning(list(prompts), {"e": torch.zeros(len(prompts), 1)})

            def predict(self, x, sigma, embeds):
                return 0.5 * x

            def sigmas(self, num_steps):
                return torch.linspace(1, 0, num_steps + 1)

            def decode(self, x):
                return torch.sigmoid(x) if modality == "video" else torch.tanh(x)

        stub = Stub()
        stub.modality = modality
        return stub


@pytest.mark.parametrize("modality", ["video", "audio"])
def test_video_and_audio_reach_players(modality, monkeypatch, tmp_path):
    """The Compare handler shows video in gr.Video (MP4) and audio in gr.Audio (WAV), with scores."""
    import flowalign.rewards.registry as registry
    from flowalign import rewards
    from flowalign.app import ui
    from flowalign.app.models import LoadedModel
    from flowalign.rewards.base import InputSpec

    class Mean(rewards.Reward):
        differentiable = True
        input_spec = InputSpec(range=(-1.0, 1.0) if modality == "audio" else (0.0, 1.0))

        def _score(self, media, prompts, metadata):
            return media.flatten(1).mean(1)

    Mean.modality = modality
    monkeypatch.setitem(registry.BUILTIN, "test/mean", Mean)
    cache = ModelCache(device="cpu")
    cache._models["test/stub"] = LoadedModel(_StubGenerator(modality))
    cfg = load_app_config(None, ["models=test/stub", "rewards=test/mean", "default_rewards=test/mean",
                                 f"server.work_dir={tmp_path}"])
    app = ui.App(cfg, cache)
    out = app.compare("test/stub", [], 1.0, "a tune", 0, 2, 2, None, ["test/mean"], "")
    summary, gallery, table, pair, slider, video_a, video_b, audio_a, audio_b, state = out
    assert "test/mean" in summary and len(table) == 2
    files = state["files"]
    suffix = ".mp4" if modality == "video" else ".wav"
    assert len(files) == 2 and all(Path(f).suffix == suffix and Path(f).stat().st_size > 0 for f in files)
    assert gallery["visible"] == (modality == "video")
    steps = list(app.optimise("test/stub", "", 1.0, "reno", "a tune", 0, ["test/mean"], "", 1.0, 2, 2, 1, 1.0))
    last = steps[-1]
    best_video, best_audio, download = last[4], last[5], last[6]
    player = best_video if modality == "video" else best_audio
    assert player["visible"] and player["value"] == download and download.endswith(suffix)


def test_gradio_is_imported_lazily():
    code = ("import sys, flowalign, flowalign.cli, flowalign.app; flowalign.cli.build_parser(); "
            "print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-500:]


def test_cli_app_bad_config_is_one_line(capsys):
    from flowalign.cli import main

    assert main(["app", "--config", "no/such/app.yaml"]) == 2
    assert main(["app", "--port", "70000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowalign: error: config file 'no/such/app.yaml' not found",
                   "flowalign: error: config: server.port: 70000 is out of range (allowed: in [0, 65535])"]


# ---------------------------------------------------------------------------------------------- over HTTP


def _value(output):
    """An output's value whether the handler returned it plain or as ``gr.update(value=..., visible=...)``."""
    return output["value"] if isinstance(output, dict) and "value" in output and "visible" in output else output


@pytest.mark.slow
def test_client_compare_optimise_and_run_view(client, runs_root):
    outputs = client.predict("toy/digits", [final_lora(runs_root)], 1.0, PROMPT, 0, 2, 4, "",
                             ["toy/bold_digit", "toy/ink"], "", api_name="/compare")
    summary, gallery, table, pair, slider, video_a, *_ = map(_value, outputs)
    assert "4 steps, CFG 3, LoRA scale 1. Mean reward per model" in summary and "tiny/final" in summary
    assert len(gallery) == 4 and all(Path(item["image"]).is_file() for item in gallery)
    assert re.fullmatch(r"tiny/final · seed 0 · 0\.\d{3} / 0\.\d{3}", gallery[1]["caption"])
    assert gallery[0]["caption"].startswith("base · seed 0 · ")
    assert table["headers"] == ["prompt", "seed", "model", "toy/bold_digit", "toy/ink"] and len(table["data"]) == 4
    assert ([row[2] for row in table["data"]] == ["base", "tiny/final"] * 2
            and all(0 <= r[3] <= 1 for r in table["data"]))
    assert pair.startswith("1. a handwritten seven · seed 0: base vs tiny/final")
    assert len(slider) == 2 and all(Path(p).is_file() for p in slider) and video_a is None
    status, gallery, plot, best, _, _, download = map(_value, client.predict(
        "toy/digits", "", 1.0, "reno", PROMPT, 0, ["toy/bold_digit"], "", 5.0, 3, 4, 1, *[1.0] * 6,
        api_name="/optimise"))
    assert re.fullmatch(r"reno: done · best reward 0\.\d{4} · 20 NFE", status)
    assert [g["caption"][:10] for g in gallery] == ["optimize 1", "optimize 2", "optimize 3"]
    assert [row[2] for row in plot["data"]] == ["total · seed 0", "best total so far"] * 3
    assert Path(download).name == "best_reno_seed0.png" and Path(best).is_file()
    summary, curves, table, grids = client.predict(str(runs_root / "tiny"), api_name="/open_run")
    assert "iterations logged: 2" in summary and len(grids) == 5
    assert {row[2] for row in curves["data"]} == {"reward/mean", "reward/std"}
    assert {row[0] for row in table["data"]} >= {"reward/mean", "policy_loss"}


@pytest.mark.slow
def test_client_errors_are_one_sentence(client, runs_root, tmp_path):
    from gradio_client.exceptions import AppError

    compare = ["toy/digits", [], 1.0, PROMPT, 0, 1, 4, "", ["toy/ink"], ""]
    optimise = ["toy/digits", "", 1.0, "reno", PROMPT, 0, ["toy/bold_digit"], "", 5.0, 3, 4, 1, *[1.0] * 6]
    cases = [("/compare", {3: "x" * 61},
              r"^prompt: 61 characters, this app takes at most 60 \(limits.max_prompt_chars\)$"),
             ("/compare", {9: "toy/bold_digit, no/such"}, r"^reward 'no/such': not offered by this app$"),
             ("/compare", {1: [str(tmp_path)]}, r"is not in the list of choices"),  # closed: the dropdown refuses
             ("/compare", {7: "lots"}, r"^CFG scale: expected a number, got 'lots'$"),
             ("/optimise", {9: 11}, r"^Value 11 is greater than maximum value 10\.$"),  # the slider's own bound
             ("/optimise", {6: ["toy/digit_match"]}, r"^reno: reward 'toy/digit_match' is not differentiable"),
             ("/optimise", {4: ""}, r"^prompt: enter a prompt$")]
    for api, changes, message in cases:
        args = list(compare if api == "/compare" else optimise)
        for index, value in changes.items():
            args[index] = value
        with pytest.raises(AppError) as info:
            client.predict(*args, api_name=api)
        assert re.search(message, str(info.value)), str(info.value)
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert client.predict(*compare, api_name="/compare")[0].startswith("1 prompt(s)")  # still serving


@pytest.mark.slow
def test_twenty_concurrent_requests_all_complete(client, server):
    """20 requests at once (concurrency limit 1): all are queued and answered, each with its own seed."""
    def one(seed: int):
        outputs = client.predict("toy/digits", [], 1.0, PROMPT, seed, 1, 2, "", ["toy/ink"], "", api_name="/compare")
        return outputs[2]["data"][0][1]

    start = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        seeds = list(pool.map(one, range(20)))
    assert seeds == list(range(20))
    with urllib.request.urlopen(server[0], timeout=30) as response:
        assert response.status == 200
    assert client.predict("toy/digits", [], 1.0, PROMPT, 99, 1, 2, "", ["toy/ink"], "",
                          api_name="/compare")[2]["data"][0][1] == 99
    print(f"20 concurrent compare requests: {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run scripts/test_setup.sh (make test does)", pytrace=False)
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2200"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 120.0, what: str = ""):
    """Poll ``condition(driver)`` until truthy; fail with ``what`` and the page's text otherwise."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = condition(driver)
            if value:
                return value
        except Exception:  # noqa: BLE001 - elements come and go while Svelte re-renders
            pass
        time.sleep(0.3)
    text = driver.find_element("tag name", "body").text[-1500:]
    raise AssertionError(f"timed out waiting for {what}; page text ends with: {text}")


def _type(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("css selector", selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)


def _text(driver, selector: str) -> str:
    return driver.find_element("css selector", selector).text


def _tab(driver, name: str) -> None:
    driver.find_element("xpath", f"//button[@role='tab'][contains(., '{name}')]").click()


@pytest.mark.slow
def test_browser_compare_optimise_train(browser, server, runs_root, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, root = server[0], runs_root
    shots = Path(os.environ.get("FLOWALIGN_SCREENSHOTS") or tmp_path / "screenshots")  # docs/images: the README's
    shots.mkdir(exist_ok=True)
    browser.get(url)
    _wait(browser, lambda d: d.find_element("css selector", "#compare-run"), what="the page")
    for tab in ("Optimise", "Train", "Compare"):  # each tab opens with its description and examples, no error badge
        _tab(browser, tab)
        intro = _wait(browser, lambda d: _text(d, f"#{tab.lower()}-intro"), what=f"the {tab} tab's description")
        assert len(intro) > 40 and "Error" not in browser.find_element("tag name", "body").text, tab
        assert "Example" in browser.find_element("tag name", "body").text, tab
    # Compare: a prompt typed in, base vs the discovered checkpoint, two seeds
    _type(browser, "#compare-prompts textarea", "the digit 3")
    browser.execute_script("document.querySelector('#compare-run').click()")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#compare-gallery img")) >= 4, what="4 images")
    table = _wait(browser, lambda d: _text(d, "#compare-table") if "toy/classifier" in _text(d, "#compare-table")
                  else None, what="the score table")
    assert "the digit 3" in table and "tiny/final" in table and re.search(r"\b0\.\d{2,4}\b", table)
    assert "Mean reward per model" in _text(browser, "#compare-summary")
    assert browser.find_elements("css selector", "#compare-slider img"), "the before/after slider shows images"
    assert "Error" not in browser.find_element("tag name", "body").text  # the README shows it
    browser.save_screenshot(str(shots / "app_compare.png"))
    # Optimise: 3 iterations typed into the slider's box (the default is 5), streamed, best downloadable
    _tab(browser, "Optimise")
    _type(browser, "#optimise-prompt textarea", PROMPT)
    _type(browser, "#optimise-iterations input[type=number]", "3")
    browser.execute_script("document.querySelector('#optimise-run').click()")
    status = _wait(browser, lambda d: _text(d, "#optimise-status") if "done" in _text(d, "#optimise-status") else None,
                   what="the optimisation to finish")
    assert re.search(r"reno: done · best reward \d\.\d{4} · 20 NFE", status)  # 3 iterations x 4 steps + 2 backward
    assert len(browser.find_elements("css selector", "#optimise-gallery img")) == 3
    assert "best_reno" in _text(browser, "#optimise-file")
    assert browser.find_elements("css selector", "#optimise-plot canvas, #optimise-plot svg")
    assert "Error" not in browser.find_element("tag name", "body").text  # the README shows it
    browser.save_screenshot(str(shots / "app_optimise.png"))
    # Train: a run written after the page opened is listed when the list is opened; the run's curves and grids
    _tab(browser, "Train")
    shutil.copytree(root / "tiny", root / "tiny_later")
    browser.find_element("css selector", "#train-run input").click()
    _wait(browser, lambda d: "tiny_later" in d.find_element("tag name", "body").text, what="the new run listed")
    browser.find_element("css selector", "#train-run input").send_keys(Keys.ESCAPE)
    shutil.rmtree(root / "tiny_later")
    browser.execute_script("document.querySelector('#train-open').click()")
    _wait(browser, lambda d: "iterations logged" in _text(d, "#train-summary"), what="the run summary")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#train-gallery img")) >= 2, what="sample grids")
    assert "reward/mean" in _text(browser, "#train-table")
    assert "Error" not in browser.find_element("tag name", "body").text  # the README shows it
    browser.save_screenshot(str(shots / "app_train.png"))
    # An error: a prompt over the app's 60-character limit -> one sentence in a toast, no traceback
    _tab(browser, "Optimise")
    _type(browser, "#optimise-prompt textarea", "x" * 70)
    browser.execute_script("document.querySelector('#optimise-run').click()")
    message = "prompt: 70 characters, this app takes at most 60 (limits.max_prompt_chars)"
    _wait(browser, lambda d: message in d.find_element("tag name", "body").text, what="the error toast")
    assert "Traceback" not in browser.find_element("tag name", "body").text
    browser.save_screenshot(str(shots / "app_error.png"))
    for name in ("compare", "optimise", "error", "train"):
        assert (shots / f"app_{name}.png").stat().st_size > 10_000
    (shots / "app_error.png").unlink() if "FLOWALIGN_SCREENSHOTS" in os.environ else None  # the README shows the tabs
    print(f"screenshots: {shots}")
