"""A GenEval reward server for flowalign's ``geneval`` reward (and any ``http`` reward): GenEval's detector-based
check of each image against its prompt's object list, served over the JSON protocol of ``HTTPReward``.

Run it in GenEval's own environment (github.com/djghosh13/geneval: mmdet 2.x with mmcv-full, the Mask2Former
Swin-S COCO checkpoint of its ``evaluation/download_models.sh``, open_clip); it needs neither flowalign nor its torch::

    python scripts/geneval_server.py --port 18085 \\
        --detector-config mmdetection/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py \\
        --detector-checkpoint models/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth \\
        --object-names geneval/evaluation/object_names.txt

Request (POST, any path): ``{"prompts": [...], "metadata": [...], "images": [base64 PNG/JPEG, ...]}``, each metadata
a line of GenEval's ``evaluation_metadata.jsonl`` (``tag``, ``include``, optionally ``exclude``). Reply: ``{"scores":
[...], "partial": [...], "strict": [...], "correct": [...], "reasons": [...]}``; ``scores`` is the list ``--score``
names. ``partial`` and ``strict`` are Flow-GRPO's reward (its reward-server's ``evaluate_reward``): per include clause
``1 - |count - found| / count`` (all detections kept, so it is negative when far more are found), a colour term
``1 - |count - right colour| / count`` (0 when the count is off), a position term (0 when off: then a 1 follows too,
as there), averaged; ``strict`` is 1 when every count is exact and every colour and position is right. ``correct`` is
GenEval's own check (``evaluate_images.py``: at least ``count``, exclude clauses). Detections are kept as GenEval
keeps them: score above 0.3 (0.9 for ``counting``), at most 16 per class, greedy NMS at ``--max-overlap`` (GenEval's
1.0: off); colours by CLIP zero-shot on the masked crop; positions from box centres with a 0.1 margin. A bad request
is HTTP 400, a failed evaluation 500 (the client retries, then follows ``reward.on_error``). GET answers ``{"ok":
true}``. The evaluation sits behind ``Evaluator`` (``detect`` and ``colours``), which tests replace with a stub.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Protocol

from PIL import Image

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
SCORES = ("partial", "strict", "correct")
#: One detection: ([x1, y1, x2, y2, confidence], mask or None); per class, most confident first once kept.
Detection = tuple[list, object]


@dataclass(frozen=True)
class Rules:
    """GenEval's thresholds (``evaluate_images.py`` defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1


class Evaluator(Protocol):
    """The models: detections per class name for each image, and the colour of each kept object."""

    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]: ...

    def colours(self, image: Image.Image, objects: list[Detection], classname: str) -> list[str]: ...


def iou(a: list, b: list) -> float:
    """Intersection over union of two boxes, GenEval's pixel convention (+1 on each side)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0


def keep(raw: dict[str, list[Detection]], tag: str, rules: Rules) -> dict[str, list[Detection]]:
    """Per class: above the threshold (the counting one for ``counting``), most confident first, at most
    ``max_objects``, then greedy NMS (a box overlapping a kept one by ``max_overlap`` or more is dropped)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    kept = {}
    for classname, found in raw.items():
        order = sorted((d for d in found if d[0][4] > threshold), key=lambda d: -d[0][4])[:rules.max_objects]
        chosen = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            order = [d for d in order if rules.max_overlap == 1 or iou(best[0], d[0]) < rules.max_overlap]
        if chosen:
            kept[classname] = chosen
    return kept


def relative_position(a: Detection, b: Detection, margin: float) -> set[str]:
    """Where A lies relative to B: the centres' offset less ``margin`` x (the sizes summed) per axis, normalised;
    a direction counts past 0.5."""
    ca, cb = [((d[0][0] + d[0][2]) / 2, (d[0][1] + d[0][3]) / 2) for d in (a, b)]
    dims = [(abs(d[0][2] - d[0][0]), abs(d[0][3] - d[0][1])) for d in (a, b)]
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [max(abs(o) - margin * (dims[0][i] + dims[1][i]), 0) * math.copysign(1, o) * (o != 0)
               for i, o in enumerate(offset)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    pairs = [(dx < -0.5, "left of"), (dx > 0.5, "right of"), (dy < -0.5, "above"), (dy > 0.5, "below")]
    return {name for hit, name in pairs if hit}


def position_ok(found: list[Detection], targets: list[Detection], relation: str, margin: float) -> bool:
    return all(relation in relative_position(obj, target, margin) for obj in found for target in targets)


def geneval_correct(objects, metadata: dict, colours: Callable, rules: Rules) -> tuple[bool, list[str]]:
    """GenEval's ``evaluate``: each include clause needs ``count`` objects (the most confident ``count`` then checked
    for colour and position); an exclude clause fails at ``count`` or more."""
    correct, reasons, groups = True, [], []
    for req in metadata.get("include", []):
        found = objects.get(req["class"], [])[:req["count"]]
        ok = len(found) >= req["count"]
        if not ok:
            reasons.append(f"expected {req['class']}>={req['count']}, found {len(found)}")
        elif "color" in req and colours(found, req["class"]).count(req["color"]) < req["count"]:
            ok = False
            reasons.append(f"expected {req['color']} {req['class']}>={req['count']}")
        if ok and "position" in req:
            relation, target = req["position"]
            ok = groups[target] is not None and position_ok(found, groups[target], relation, rules.position_threshold)
            if not ok:
                reasons.append(f"expected {req['class']} {relation} target")
        correct = correct and ok
        groups.append(found if ok else None)
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, reasons


def clause_terms(req: dict, found: list, colours: Callable, groups: list, margin: float) -> tuple[bool, list[float]]:
    """One include clause of Flow-GRPO's reward: whether it is met exactly, and its terms of the partial score."""
    count = req["count"]
    terms = [1 - abs(count - len(found)) / count]
    if len(found) != count:
        return False, terms + ([0.0] if "color" in req or "position" in req else [])
    ok = True
    if "color" in req:
        right = colours(found, req["class"]).count(req["color"])
        terms.append(1 - abs(count - right) / count)
        ok = right == count
    if "position" in req and ok:
        relation, target = req["position"]
        if groups[target] is None:
            return False, terms + [0.0]
        ok = position_ok(found, groups[target], relation, margin)
        terms += ([] if ok else [0.0]) + [1.0]  # as Flow-GRPO's server: a 1 follows a failed position too
    return ok, terms


def flow_grpo_reward(objects, metadata: dict, colours: Callable, rules: Rules) -> tuple[bool, float]:
    """Flow-GRPO's ``evaluate_reward``: (strict correctness, partial score); exclude clauses are not read."""
    strict, terms, groups = True, [], []
    for req in metadata.get("include", []):
        found = objects.get(req["class"], [])
        ok, clause = clause_terms(req, found, colours, groups, rules.position_threshold)
        strict, terms = strict and ok, terms + clause
        groups.append(found if ok else None)
    return strict, (sum(terms) / len(terms) if terms else 0.0)


def evaluate(image: Image.Image, raw: dict[str, list[Detection]], metadata: dict, evaluator: Evaluator,
             rules: Rules) -> dict:
    """Every score of one image, from its raw detections (each object's colour classified at most once)."""
    objects = keep(raw, metadata["tag"], rules)
    memo: dict = {}

    def colours(found, classname):
        key = (classname, len(found))
        if key not in memo:
            memo[key] = evaluator.colours(image, found, classname)
        return memo[key]
    strict, partial = flow_grpo_reward(objects, metadata, colours, rules)
    correct, reasons = geneval_correct(objects, metadata, colours, rules)
    return {"partial": float(partial), "strict": float(strict), "correct": float(correct), "reason": "; ".join(reasons)}


def decode(data: object, index: int) -> Image.Image:
    """One base64 image; ValueError (HTTP 400) when it is not one."""
    try:
        return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"image {index} is not a base64 PNG or JPEG ({type(err).__name__})") from None


def parse_request(body: bytes) -> tuple[list[Image.Image], list[dict]]:
    """The images and metadata of a request; ValueError (HTTP 400) with what is wrong."""
    payload = json.loads(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise ValueError('expected a JSON object with an "images" list (this server scores images)')
    metadata = payload.get("metadata")
    if not isinstance(metadata, list) or len(metadata) != len(payload["images"]):
        raise ValueError('expected one "metadata" object per image')
    for i, meta in enumerate(metadata):
        if not isinstance(meta, dict) or not isinstance(meta.get("tag"), str) or not isinstance(meta.get("include"),
                                                                                                 list):
            raise ValueError(f'metadata {i} has no GenEval "tag" and "include"')
    return [decode(x, i) for i, x in enumerate(payload["images"])], metadata


class GenEvalServer(ThreadingHTTPServer):
    """The HTTP server; one evaluation at a time (the models share one device)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], evaluator: Evaluator, rules: Rules = Rules(), score: str = "partial"):
        super().__init__(address, Handler)
        self.evaluator, self.rules, self.score = evaluator, rules, score
        self.lock = threading.Lock()

    def answer(self, body: bytes) -> dict:
        images, metadata = parse_request(body)
        with self.lock:
            detections = self.evaluator.detect(images)
            results = [evaluate(im, raw, meta, self.evaluator, self.rules)
                       for im, raw, meta in zip(images, detections, metadata)]
        reply = {key: [r[key] for r in results] for key in SCORES}
        return {"scores": reply[self.score], **reply, "reasons": [r["reason"] for r in results]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(200, {"ok": True})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            payload = self.server.answer(body)
        except ValueError as err:  # JSONDecodeError, a missing field, an image that does not decode
            return self.reply(400, {"error": " ".join(str(err).split())})
        except Exception as err:  # noqa: BLE001 - the evaluation failed: the client retries, then reports it
            return self.reply(500, {"error": f"{type(err).__name__}: {' '.join(str(err).split())}"})
        self.reply(200, payload)


class Mask2FormerCLIP:
    """GenEval's models: an mmdet detector (Mask2Former) and open_clip ViT-L-14 colour classification.
    ``channel_order``: ``bgr`` feeds the detector as GenEval's ``evaluate_images.py`` does (mmdet reads image files
    as BGR); ``rgb`` as Flow-GRPO's reward-server does (PIL arrays as they are)."""

    def __init__(self, config: str, checkpoint: str, object_names: str, clip_model: str = "ViT-L-14",
                 clip_pretrained: str = "openai", device: str = "cuda", channel_order: str = "bgr"):
        import open_clip
        import torch
        from mmdet.apis import init_detector

        self.torch, self.device, self.channel_order = torch, device, channel_order
        self.detector = init_detector(config, checkpoint, device=device)
        self.clip, _, self.transform = open_clip.create_model_and_transforms(clip_model, pretrained=clip_pretrained,
                                                                             device=device)
        self.clip.eval()
        self.tokenizer = open_clip.get_tokenizer(clip_model)
        with open(object_names) as names:
            self.classnames = [line.strip() for line in names if line.strip()]
        self.classifiers: dict = {}

    def detect(self, images):
        import numpy as np
        from mmdet.apis import inference_detector

        arrays = [np.asarray(im)[:, :, ::-1] if self.channel_order == "bgr" else np.asarray(im) for im in images]
        results = inference_detector(self.detector, [np.ascontiguousarray(a) for a in arrays])
        return [self._per_class(result) for result in results]

    def _per_class(self, result) -> dict[str, list[Detection]]:
        boxes = result[0] if isinstance(result, tuple) else result
        masks = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        return {name: [(row.tolist(), None if masks is None else masks[c][j]) for j, row in enumerate(boxes[c])]
                for c, name in enumerate(self.classnames)}

    def classifier(self, classname: str):
        """The colour classifier of a class: GenEval's three templates, clip_benchmark's zero-shot recipe."""
        if classname not in self.classifiers:
            templates = [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}",
                         "a photo of a {c} object"]
            weights = []
            with self.torch.no_grad():
                for colour in COLORS:
                    tokens = self.tokenizer([t.format(c=colour) for t in templates]).to(self.device)
                    embedding = self.torch.nn.functional.normalize(self.clip.encode_text(tokens), dim=-1).mean(0)
                    weights.append(embedding / embedding.norm())
            self.classifiers[classname] = self.torch.stack(weights, dim=1)
        return self.classifiers[classname]

    def colours(self, image, objects, classname):
        blank = Image.new("RGB", image.size, color="#999")
        crops = [(image if mask is None else Image.composite(image, blank, Image.fromarray(mask))).crop(box[:4])
                 for box, mask in objects]
        pixels = self.torch.stack([self.transform(crop) for crop in crops]).to(self.device)
        with self.torch.no_grad():
            features = self.torch.nn.functional.normalize(self.clip.encode_image(pixels), dim=-1)
            logits = 100.0 * features @ self.classifier(classname)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18085)
    parser.add_argument("--detector-config", required=True, help="mmdet config of the Mask2Former checkpoint")
    parser.add_argument("--detector-checkpoint", required=True)
    parser.add_argument("--object-names", required=True, help="GenEval's evaluation/object_names.txt")
    parser.add_argument("--clip-model", default="ViT-L-14")
    parser.add_argument("--clip-pretrained", default="openai")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--channel-order", choices=["bgr", "rgb"], default="bgr")
    parser.add_argument("--score", choices=SCORES, default="partial", help='what "scores" holds')
    for field, default in vars(Rules()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    evaluator = Mask2FormerCLIP(args.detector_config, args.detector_checkpoint, args.object_names, args.clip_model,
                                args.clip_pretrained, args.device, args.channel_order)
    rules = Rules(**{field: getattr(args, field) for field in vars(Rules())})
    server = GenEvalServer((args.host, args.port), evaluator, rules, args.score)
    print(f"geneval server on http://{args.host}:{server.server_address[1]} (scores: {args.score})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
