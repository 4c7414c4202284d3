"""ReNO cost: time per iteration over the pure forward+backward it needs (toy digits), and peak memory with
and without gradient checkpointing (a tiny SD3-architecture model at a larger latent).
Run: ``python -m benchmarks.reno``.

Time, measured side by side in one run, alternating, medians over repeats after a warm-up: a full ReNO run
(``flowalign.optimize``: sampler with gradients, decoder, reward, χ regulariser, clipping, optimiser step,
best-iterate bookkeeping, per-iteration images kept) divided by its iterations, against the bare work an
iteration needs (the same ODE sample with a graph, decode, reward and ``autograd.grad`` to the noise, in a
plain loop, with a backward on every iteration but the last, as ReNO). Headline: ReNO seconds per iteration /
pure forward+backward seconds (target <= 1.15x), the median of the paired repeats with their range.

Memory: CPU, so the figure is the process's resident set size (``/proc/self/statm``, sampled every
millisecond by a thread), each configuration in a fresh subprocess: the peak during ReNO iterations minus
the RSS after loading the model (the activation/graph memory the optimisation needs); a no-grad sample is
measured the same way for reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import flowalign
from benchmarks.timing import paired_ratio
from flowalign.algorithms.reno import sample_with_grad

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["a handwritten seven", "the digit 3", "a handwritten two", "a handwritten five"]




def toy_timing(steps: int, iterations: int, repeats: int) -> dict:
    from flowalign import rewards
    gen = flowalign.load_generator("toy/digits", device="cpu")
    reward = rewards.load_weighted({"toy/bold_digit": 1.0})
    cond = gen.encode(PROMPTS)
    sigmas = gen.sigmas(steps)
    noise = gen.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))

    def reno():
        flowalign.optimize(gen, PROMPTS, reward, iterations=iterations, steps=steps)

    def pure():  # the passes ReNO makes: a forward each iteration, a backward on all but the last
        eps = noise.clone().requires_grad_(True)
        with torch.enable_grad():
            for it in range(iterations):
                x = sample_with_grad(gen, eps, cond, sigmas, gen.default_guidance)
                score = reward.score(gen.decode(x), PROMPTS).sum()
                if it < iterations - 1:
                    torch.autograd.grad(score, eps)

    timing = paired_ratio(reno, pure, repeats)
    return {"steps": steps, "iterations": iterations, "prompts": len(PROMPTS),
            "reno_s_per_iter": timing["a_s"] / iterations, "pure_s_per_iter": timing["b_s"] / iterations,
            "ratio": timing["ratio"], "ratio_min": timing["ratio_min"], "ratio_max": timing["ratio_max"]}


def _rss() -> int:
    """The current resident set size in bytes (``/proc/self/statm``; falls back to ``ru_maxrss``)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """The peak RSS over a block, sampled every millisecond by a thread (torch ops release the GIL)."""

    def __enter__(self):
        import threading

        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def memory_child(path: str, size: int, steps: int, iterations: int, checkpointing: bool | None) -> None:
    """Run in a subprocess: print the peak-RSS growth (MiB) of ReNO iterations on the tiny SD3."""
    import gc

    from flowalign.generators.sd3 import SD3Generator
    from flowalign.rewards.toy.attributes import InkReward

    torch.manual_seed(0)
    gen = SD3Generator.from_pretrained(path, device="cpu", height=size, width=size)
    reward = InkReward()
    gc.collect()
    start = time.perf_counter()
    with PeakRSS() as mem:  # baseline: the model loaded
        if checkpointing is None:  # reference: one no-grad sample (what plain generation needs)
            flowalign.generate(gen, ["a photo of a cat"], steps=steps)
            nfe, iterations = steps, 1
        else:
            nfe = flowalign.optimize(gen, "a photo of a cat", reward, iterations=iterations, steps=steps,
                                     checkpointing=checkpointing, keep_images=False).nfe
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_growth_mib": (mem.peak - mem.base) / 2 ** 20, "baseline_mib": mem.base / 2 ** 20,
                      "s_per_iter": seconds / iterations, "nfe": nfe, "latent": list(gen.latent_shape)}))


def sd3_memory(size: int, steps: int, iterations: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sd3_tiny import build_tiny_sd3

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_sd3(Path(tmp) / "sd3")
        for ckpt in (None, False, True):
            code = (f"from benchmarks.reno import memory_child; memory_child({str(Path(tmp) / 'sd3')!r}, {size}, "
                    f"{steps}, {iterations}, {ckpt})")
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  cwd=Path(__file__).resolve().parents[1])
            out[{None: "no_grad_sample", False: "plain",
                 True: "checkpointing"}[ckpt]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sd3-size", type=int, default=64, help="latent height = width of the tiny SD3")
    parser.add_argument("--sd3-steps", type=int, default=4)
    parser.add_argument("--sd3-iterations", type=int, default=2)
    args = parser.parse_args(argv)
    timing = toy_timing(args.steps, args.iterations, args.repeats)
    memory = sd3_memory(args.sd3_size, args.sd3_steps, args.sd3_iterations)
    plain, ckpt = memory["plain"], memory["checkpointing"]
    saving = plain["peak_growth_mib"] / max(ckpt["peak_growth_mib"], 1e-9)
    print(f"CPU {torch.get_num_threads()} threads; toy digits: {len(PROMPTS)} prompts, "
          f"{args.steps} steps, CFG batched, "
          f"{args.iterations} iterations x {args.repeats} repeats (median)")
    print(f"{'measure':<58}{'value':>14}")
    print(f"{'toy: ReNO s/iteration (full loop)':<58}{timing['reno_s_per_iter'] * 1e3:>11.2f} ms")
    print(f"{'toy: pure forward+backward s/iteration':<58}{timing['pure_s_per_iter'] * 1e3:>11.2f} ms")
    lat = "x".join(map(str, plain["latent"]))
    print(f"{f'tiny SD3 {lat}, {args.sd3_steps} steps: peak RSS growth, plain':<58}"
          f"{plain['peak_growth_mib']:>10.1f} MiB")
    print(f"{f'tiny SD3 {lat}: peak RSS growth, gradient checkpointing':<58}{ckpt['peak_growth_mib']:>10.1f} MiB")
    print(f"{f'tiny SD3 {lat}: peak RSS growth, no-grad sample (ref.)':<58}"
          f"{memory['no_grad_sample']['peak_growth_mib']:>10.1f} MiB")
    print(f"{'tiny SD3: s/iteration plain / checkpointing':<58}{plain['s_per_iter']:>6.2f} / {ckpt['s_per_iter']:.2f}")
    print(f"{'tiny SD3: memory plain / checkpointing':<58}{saving:>13.2f}x")
    print(f"headline: ReNO time per iteration / pure forward+backward = {timing['ratio']:.3f}x "
          f"[{timing['ratio_min']:.3f}, {timing['ratio_max']:.3f}] (target <= 1.15x)")
    RESULTS.mkdir(exist_ok=True)
    out = {"command": "python -m benchmarks.reno", "args": vars(args), "toy_timing": timing, "sd3_memory": memory,
           "memory_ratio": saving,
           "memory_measure": ("peak RSS growth (/proc/self/statm sampled every 1 ms) over the post-load RSS, "
                              "fresh subprocess each"),
           "headline_ratio": timing["ratio"]}
    (RESULTS / "reno.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
