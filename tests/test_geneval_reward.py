"""The GenEval reward end to end: ``scripts/geneval_server.py`` served on 127.0.0.1 with a stub in place of
Mask2Former and CLIP, read through ``rewards.load("geneval")``. Each image is a flat grey whose level names its case;
the stub returns that case's fixed detections (box, confidence, colour). The expected scores are worked out by hand
from GenEval's rules (``evaluate_images.py``) and Flow-GRPO's reward (its reward-server's ``evaluate_reward``)."""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import ImageStat

from flowalign import rewards
from flowalign.errors import FlowalignError
from flowalign.rewards.remote import encode_image, post_json
from flowalign.training.scoring import guarded_scores

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "geneval_server.py"
LEFT, RIGHT = [0, 0, 10, 10], [30, 0, 40, 10]  # box centres 30 px apart on x, 10 px boxes: "right of" is (28/30)
BOWL = {"tag": "single_object", "include": [{"class": "bowl", "count": 1}]}
TWO_GLASSES = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
               "exclude": [{"class": "wine glass", "count": 3}]}
PINK_BAG = {"tag": "colors", "include": [{"class": "handbag", "count": 1, "color": "pink"}]}
BAG_AND_SCISSORS = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                                     {"class": "scissors", "count": 1, "color": "black"}]}
COW_RIGHT_OF_LAPTOP = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                                       {"class": "cow", "count": 1, "position": ["right of", 0]}]}


def dets(name: str, *objects) -> dict:
    """Raw detections of one class: (box, confidence, colour) -> ([x1, y1, x2, y2, conf], colour as the 'mask')."""
    return {name: [([*box, conf], colour) for box, conf, colour in objects]}


# (metadata, the stub's raw detections, expected (partial, strict, correct)), each worked out by hand:
CASES = [
    # one bowl at 0.95: every term 1
    (BOWL, dets("bowl", (LEFT, 0.95, "white")), (1.0, 1.0, 1.0)),
    # a bowl at 0.25 is under the 0.3 threshold: count term 1 - |1 - 0| / 1 = 0
    (BOWL, dets("bowl", (LEFT, 0.25, "white")), (0.0, 0.0, 0.0)),
    # three bowls: 1 - |1 - 3| / 1 = -1 (Flow-GRPO's count term); GenEval only needs at least one
    (BOWL, dets("bowl", (LEFT, 0.9, "white"), (RIGHT, 0.8, "white"), ([50, 0, 60, 10], 0.7, "white")),
     (-1.0, 0.0, 1.0)),
    # counting keeps confidences over 0.9: two of three wine glasses
    (TWO_GLASSES, dets("wine glass", (LEFT, 0.95, "white"), (RIGHT, 0.92, "white"), ([50, 0, 60, 10], 0.6, "white")),
     (1.0, 1.0, 1.0)),
    # three over 0.9: 1 - |2 - 3| / 2 = 0.5; GenEval's exclude clause (3 or more) fails
    (TWO_GLASSES, dets("wine glass", (LEFT, 0.95, "white"), (RIGHT, 0.93, "white"), ([50, 0, 60, 10], 0.91, "white")),
     (0.5, 0.0, 0.0)),
    # a pink handbag: count 1 and colour 1
    (PINK_BAG, dets("handbag", (LEFT, 0.8, "pink")), (1.0, 1.0, 1.0)),
    # a red handbag: count 1, colour 1 - |1 - 0| / 1 = 0: (1 + 0) / 2
    (PINK_BAG, dets("handbag", (LEFT, 0.8, "red")), (0.5, 0.0, 0.0)),
    # pink handbag right, scissors red: terms 1, 1, 1, 0
    (BAG_AND_SCISSORS, dets("handbag", (LEFT, 0.8, "pink")) | dets("scissors", (RIGHT, 0.7, "red")),
     (0.75, 0.0, 0.0)),
    # cow right of the laptop: laptop 1; cow 1 and position 1
    (COW_RIGHT_OF_LAPTOP, dets("laptop", (LEFT, 0.9, "black")) | dets("cow", (RIGHT, 0.9, "brown")), (1.0, 1.0, 1.0)),
    # cow left of it: laptop 1; cow 1, position 0 and (Flow-GRPO's server) a 1 after it: 3 / 4
    (COW_RIGHT_OF_LAPTOP, dets("laptop", (RIGHT, 0.9, "black")) | dets("cow", (LEFT, 0.9, "brown")),
     (0.75, 0.0, 0.0)),
    # no cow: laptop 1; cow count 0 and its position 0: 1 / 3
    (COW_RIGHT_OF_LAPTOP, dets("laptop", (LEFT, 0.9, "black")), (1 / 3, 0.0, 0.0)),
]
FAIL = len(CASES)  # the level of an image the stub fails on


def level_image(case: int) -> torch.Tensor:
    return torch.full((3, 16, 16), (10 + 20 * case) / 255)


class Stub:
    """Mask2Former and CLIP replaced: detections by the image's grey level, colours as the detections carry them."""

    def __init__(self):
        self.colour_calls = 0

    def detect(self, images):
        cases = [round((ImageStat.Stat(im.convert("L")).mean[0] - 10) / 20) for im in images]
        if FAIL in cases:
            raise RuntimeError("CUDA out of memory (stub)")
        return [CASES[case][1] for case in cases]

    def colours(self, image, objects, classname):
        self.colour_calls += 1
        return [colour for _, colour in objects]


@pytest.fixture(scope="module")
def server():
    spec = importlib.util.spec_from_file_location("geneval_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["geneval_server"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    stub = Stub()
    httpd = module.GenEvalServer(("127.0.0.1", 0), stub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", module=module, stub=stub)
    httpd.shutdown()
    httpd.server_close()
    sys.modules.pop("geneval_server", None)


def batch(cases: list[int]) -> tuple[torch.Tensor, list[str], list[dict]]:
    metadata = [dict(CASES[c][0] if c < FAIL else BOWL, group=c // 2) for c in cases]  # the trainer adds "group"
    return torch.stack([level_image(c) for c in cases]), [f"case {c}" for c in cases], metadata


@pytest.mark.parametrize("score", ["partial", "strict", "correct"])
def test_every_case_scores_as_worked_out_by_hand(server, score):
    reward = rewards.load("geneval", url=server.url, score=score, retries=0)
    images, prompts, metadata = batch(list(range(len(CASES))))
    server.stub.colour_calls = 0
    got = reward.score(images, prompts, metadata)
    assert server.stub.colour_calls == 4  # once per coloured clause of cases 5, 6, 7 (two): shared by both checks
    want = torch.tensor([expected[("partial", "strict", "correct").index(score)] for _, _, expected in CASES])
    torch.testing.assert_close(got, want)


def test_the_reply_is_httprewards_protocol_with_reasons(server):
    """A plain ``http`` reward reads the server's ``scores`` (partial by default); the reply also holds every score
    and GenEval's reasons; a request without GenEval metadata is HTTP 400 (not retried)."""
    images, prompts, metadata = batch([6, 9])
    torch.testing.assert_close(rewards.load("http", url=server.url).score(images, prompts, metadata),
                               torch.tensor([0.5, 0.75]))
    reply = post_json(server.url, {"prompts": prompts, "metadata": metadata,
                                   "images": [encode_image(x) for x in images]}, 5, 0, 0)
    assert set(reply) == {"scores", "partial", "strict", "correct", "reasons"}
    assert reply["reasons"] == ["expected pink handbag>=1", "expected cow right of target"]
    with pytest.raises(rewards.RewardError, match=r"HTTP 400 Bad Request$"):
        rewards.load("http", url=server.url, retries=3).score(images, prompts, [{}, {}])


def test_keep_applies_thresholds_and_nms(server):
    m = server.module
    raw = dets("dog", (LEFT, 0.95, None), ([1, 1, 11, 11], 0.9, None), (RIGHT, 0.5, None), ([50, 0, 60, 10], 0.2, None))
    assert [d[0][4] for d in m.keep(raw, "two_object", m.Rules())["dog"]] == [0.95, 0.9, 0.5]  # GenEval: no NMS
    nms = m.Rules(max_overlap=0.5)  # IoU of LEFT and the shifted box: 100 / 142 = 0.70 with GenEval's +1 areas
    assert abs(m.iou([*LEFT, 0], [1, 1, 11, 11, 0]) - 100 / 142) < 1e-9
    assert [d[0][4] for d in m.keep(raw, "two_object", nms)["dog"]] == [0.95, 0.5]
    assert m.keep(raw, "counting", m.Rules()) == {"dog": raw["dog"][:1]}
    assert m.relative_position(([*LEFT, 1], None), ([*RIGHT, 1], None), 0.1) == {"left of"}
    assert m.relative_position(([0, 30, 10, 40, 1], None), ([*LEFT, 1], None), 0.1) == {"below"}


def test_bad_metadata_is_one_line_before_any_request(server):
    reward = rewards.load("geneval", url=server.url, retries=0)
    images, prompts, _ = batch([0])
    with pytest.raises(rewards.RewardError, match=r"sample 0 .*needs GenEval metadata.*\"tag\" must be one of"):
        reward.score(images, prompts, [{"group": 0}])
    with pytest.raises(rewards.RewardError, match="score must be one of"):
        rewards.load("geneval", url=server.url, score="soft")


def test_a_server_error_follows_on_error(server):
    """The stub fails on one image: HTTP 500, a one-line RewardError; in training, ``stop`` ends the run in one
    line and ``skip`` scores the samples again one at a time, so only the failing one is NaN."""
    reward = rewards.load("geneval", url=server.url, retries=0)
    images, prompts, metadata = batch([0, FAIL, 5])
    with pytest.raises(rewards.RewardError, match=r"^reward geneval: http://127.0.0.1:\d+: failed after 1 attempts: "
                                                  r"HTTP 500") as err:
        reward.score(images, prompts, metadata)
    assert "\n" not in str(err.value)
    composite = rewards.CompositeReward({"geneval": reward}, {"geneval": 1.0})
    for policy in ("stop", "skip"):
        trainer = SimpleNamespace(reward=composite, cfg=SimpleNamespace(reward=SimpleNamespace(on_error=policy,
                                                                                                timeout_s=0)))
        if policy == "stop":
            with pytest.raises(FlowalignError, match=r"reward failed at iteration 0 .*HTTP 500"):
                guarded_scores(trainer, images, prompts, metadata, 0)
        else:
            scores = guarded_scores(trainer, images, prompts, metadata, 0)["geneval"]
            assert scores[0] == 1.0 and torch.isnan(scores[1]) and scores[2] == 1.0
