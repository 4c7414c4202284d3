"""Scoring while sampling goes on: a Flow-GRPO iteration on the toy digits model with a remote reward that takes
0.2 s per request (a local stub server), scored after sampling (serial) and part by part while sampling goes on
(``reward.overlap_prompts``). Run: ``python -m benchmarks.overlap``.

The server runs in its own process (a remote server does not share the trainer's interpreter), and the model gets
one CPU thread (``--threads``), leaving the other core to the reward's client and the server, as on a GPU machine
where sampling does not occupy the CPU. Both modes
send the same requests (one per part of ``--part`` prompts: ``batch_size`` = a part's samples) and are
timed side by side, alternating, after a warm-up. The figure is each mode's sampling-and-scoring time over
max(sampling, scoring), the two measured on their own in the paired serial iteration (target for overlapped:
<= 1.15x); medians of the paired repeats with their range. The update that follows is the same in both modes and
is left out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from flowalign.config import load_config
from flowalign.training import make_trainer

RESULTS = Path(__file__).resolve().parent / "results"


def serve(delay: float, port: multiprocessing.Queue) -> None:
    """A scoring endpoint on localhost that answers each request after ``delay`` seconds (a score per image
    derived from its encoded size, so groups still differ). Runs in its own process, as a remote server would."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(delay)
            body = json.dumps({"scores": [len(image) % 997 / 997 for image in payload["images"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port.put(server.server_address[1])
    server.serve_forever()


def stub_server(delay: float) -> tuple[multiprocessing.Process, str]:
    """Start ``serve`` in a child process; returns it and its URL."""
    port: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=serve, args=(delay, port), daemon=True)
    process.start()
    return process, f"http://127.0.0.1:{port.get(timeout=30)}/score"


def trainer(url: str, part: int, overlap: bool, concurrency: int, args, out: str):
    group = 8
    reward = (f"reward.options={{http: {{url: '{url}', timeout: 30, retries: 0, "
              f"batch_size: {part * group}}}}}")
    return make_trainer(load_config("configs/toy/digits_flow_grpo.yaml", [
        "reward.weights={http: 1.0}", reward, f"reward.overlap_prompts={part if overlap else 0}",
        f"reward.concurrency={concurrency}", f"train.prompts_per_iteration={args.prompts}",
        f"flow_grpo.group_size={group}", f"train.steps={args.steps}", "train.eval_prompts=0",
        "train.checkpoint_every=0", f"output_dir={out}"]))


def phase(metrics: dict) -> float:
    """Sampling and scoring: what overlapping changes (the update after it is the same)."""
    return metrics["time/sampling"] + metrics["time/reward"]


def measure(args) -> dict:
    server, url = stub_server(args.delay)
    serial = trainer(url, args.part, False, 1, args, "/tmp/flowalign_overlap/serial")
    modes = {f"overlapped, {c} request(s) at a time": trainer(url, args.part, True, c, args,
                                                              f"/tmp/flowalign_overlap/c{c}")
             for c in args.concurrency}
    rows: dict[str, list[float]] = {"serial": [], **{name: [] for name in modes}}
    sampling, scoring = [], []
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        metrics, _ = serial.run_iteration(repeat)
        bound = max(metrics["time/sampling"], metrics["time/reward"])
        timed = {name: phase(tr.run_iteration(repeat)[0]) for name, tr in modes.items()}
        if repeat == 0:
            continue
        sampling.append(metrics["time/sampling"])
        scoring.append(metrics["time/reward"])
        rows["serial"].append(phase(metrics) / bound)
        for name, seconds in timed.items():
            rows[name].append(seconds / bound)
    server.terminate()
    parts = -(-args.prompts // args.part)
    return {"delay_s": args.delay, "prompts": args.prompts, "samples": args.prompts * 8, "part_prompts": args.part,
            "requests": parts, "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "sampling_s": statistics.median(sampling), "scoring_s": statistics.median(scoring),
            "modes": {name: {"ratio": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)}
                      for name, r in rows.items()},
            "command": "python -m benchmarks.overlap"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the stub server adds per request")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--part", type=int, default=1, help="prompts per part (one request each)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the model")
    parser.add_argument("--out", default=str(RESULTS / "overlap.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args)
    print(f"{result['samples']} samples in {result['requests']} requests of {args.delay:g} s; sampling "
          f"{result['sampling_s']:.2f} s, scoring {result['scoring_s']:.2f} s (each alone, serial run)")
    print(f"{'mode':<36}{'x max(sampling, scoring)':>26}{'range':>18}")
    for name, row in result["modes"].items():
        spread = f"[{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]"
        print(f"{name:<36}{row['ratio']:>26.3f}{spread:>18}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
