"""Every measured figure the README and docs quote, rendered from the JSON a benchmark wrote.

    python -m benchmarks.figures            # rewrite every figure block from benchmarks/results/*.json
    python -m benchmarks.figures --check    # exit 1 if a block differs from what its JSON gives

A page holds a block as ``<!-- figures: NAME -->`` ... ``<!-- /figures -->``; ``NAME`` is one of ``RENDERERS``, each
reading one JSON and naming the command that wrote it. ``tests/test_figures.py`` runs the check, so a figure
that no longer matches its JSON (or a JSON that was regenerated without updating the pages) fails CI.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _source(data: dict, default: str) -> str:
    return f"Written by `{data.get('command', default)}` to `benchmarks/results/`."


def learning_seeds() -> str:
    data = _load("learning_seeds.json")
    rows = ["| recipe | config | held-out gain, mean ± std over training seeds | seeds "
            "| judge: before → after (worst seed) |", "|---|---|---|---|---|"]
    for name, r in data["recipes"].items():
        rows.append(f"| {name} | `{r['config']}` | {r['gain_mean']:+.3f} ± {r['gain_std']:.3f} | {len(r['runs'])} | "
                    f"`{r.get('judge', 'toy/judge_digit')}` {r['judge_before']:.3f} → {r['judge_after_min']:.3f} |")
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.learning_seeds") + "\n"


def grpo_overhead() -> str:
    data = _load("grpo.json")
    rows = ["| family | sampling s | reward s | training s | iteration / pure model passes (median, range) |",
            "|---|---|---|---|---|"]
    for name, o in data["overhead"].items():
        s = o["split"]
        rows.append(f"| {name} | {s['time/sampling']:.2f} | {s['time/reward']:.2f} | {s['time/training']:.2f} | "
                    f"{o['overhead']:.3f}× [{o['min']:.3f}, {o['max']:.3f}] |")
    a = data["args"]
    note = (f"Toy digits, {a['prompts']} groups × {a['group']}, {a['steps']} steps, {a['repeats']} paired repeats, "
            f"CPU {data.get('threads', '?')} threads.")
    return "\n".join(rows) + "\n\n" + note + " " + _source(data, "python -m benchmarks.grpo") + "\n"


def grpo_gains() -> str:
    data = _load("grpo.json")
    rows = ["| method | before | after | judge after | rollout NFE | gain per 1k NFE | × Flow-GRPO per NFE | "
            "gain per minute | × Flow-GRPO per second | s / iteration |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = data["variants"]["Flow-GRPO"]
    per_minute = {name: (g["after"] - g["before"]) / g["seconds"] * 60 for name, g in data["variants"].items()}
    for name, g in data["variants"].items():
        rows.append(f"| {name} | {g['before']:.4f} | {g['after']:.4f} | {g['judge_after']:.3f} | {g['nfe']:.0f} | "
                    f"{g['gain_per_1k_nfe']:.5f} | {g['gain_per_1k_nfe'] / base['gain_per_1k_nfe']:.2f}× | "
                    f"{per_minute[name]:.3f} | {per_minute[name] / per_minute['Flow-GRPO']:.2f}× | "
                    f"{g['seconds_per_iteration']:.2f} |")
    a = data["args"]
    note = (f"{a['iterations']} iterations each, judged on {a['eval_prompts']} held-out prompts and seeds by the "
            "bold-digit reward and by `toy/judge_digit` (the share of samples a second digit judge reads as the "
            "prompted digit). Gain per minute: of sampling, scoring and training time on this machine.")
    return "\n".join(rows) + "\n\n" + note + " " + _source(data, "python -m benchmarks.grpo") + "\n"


def samplers() -> str:
    data = _load("samplers.json")
    rows = ["| structure | NFE | leaves | NFE / leaf | vs independent | rollout / model passes (median, range) |",
            "|---|---|---|---|---|---|"]
    for name, f in data["structures"].items():
        rows.append(f"| {name} | {f['nfe']} | {f['leaves']} | {f['nfe_per_leaf']:.2f} | "
                    f"{f['nfe_per_leaf_vs_independent']:.2f}× | {f['direct_ratio']:.3f}× [{f['direct_min']:.3f}, "
                    f"{f['direct_max']:.3f}] |")
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.samplers") + "\n"


def reno() -> str:
    data = _load("reno.json")
    t, m = data["toy_timing"], data["sd3_memory"]
    rows = ["| measure | value |", "|---|---|",
            f"| toy digits: ReNO time per iteration / the passes it makes (median, range) | {t['ratio']:.3f}× "
            f"[{t['ratio_min']:.3f}, {t['ratio_max']:.3f}] |",
            f"| toy digits: ReNO ms per iteration | {t['reno_s_per_iter'] * 1e3:.2f} |",
            f"| tiny SD3: peak memory growth, plain / gradient checkpointing (MiB) | "
            f"{m['plain']['peak_growth_mib']:.1f} / {m['checkpointing']['peak_growth_mib']:.1f} |"]
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.reno") + "\n"


def rewards() -> str:
    data = _load("rewards.json")
    batches = [str(b) for b in data["args"]["batches"]]
    rows = ["| reward | kind | " + " | ".join(f"samples/s, B={b}" for b in batches) + " |",
            "|---|---|" + "---|" * len(batches)]
    for name, f in data["rewards"].items():
        if "batch" not in f:
            rows.append(f"| {name} | {f['kind']} | " + " | ".join("skipped" for _ in batches) + " |")
            continue
        rows.append(f"| {name} | {f['kind']} | " + " | ".join(f"{f['batch'][b]['samples_per_s']:.0f}" for b in batches)
                    + " |")
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.rewards") + "\n"


def demo() -> str:
    data = _load("demo.json")
    monitor = f"\n{data['monitor_line']}" if "monitor_line" in data else ""
    return (f"```\nreward on {data['eval_prompts']} held-out prompts and seeds: {data['reward_before']:.4f} -> "
            f"{data['reward_after']:.4f}{monitor}\n```\n\n{_source(data, 'python -m benchmarks.demo')}\n")


def toy_models() -> str:
    data = _load("toy_models.json")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = ["| model | setting | figures |", "|---|---|---|"]
    for label, f in data["digits"].items():
        rows.append(f"| digits generator (500 prompts, 20 steps) | {label} | read as the prompted digit: classifier "
                    f"{pct(f['classifier'])}, second judge {pct(f['judge'])} |")
    j = data["judges"]
    rows.append(f"| digit readers ({j['held_out_digits']} held-out real digits) | | classifier {pct(j['classifier'])}, "
                f"second judge {pct(j['judge'])}, tiny CLIP (own caption first of ten) {pct(j['clip_retrieval'])} |")
    for label, f in data["video"].items():
        rows.append(f"| video generator (200 prompts) | {label} | frames read right {pct(f['frame_digit_accuracy'])}, "
                    f"moving the prompted way {pct(f['motion_direction_accuracy'])}, `toy/motion` {f['motion']:.2f} |")
    for label, f in data["music"].items():
        rows.append(f"| music generator (200 prompts) | {label} | pitch accuracy {pct(f['pitch_accuracy'])}, key "
                    f"{f['key']:.3f}, exact tempo {pct(f['tempo_exact'])} |")
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.toy_models") + "\n"


def overlap() -> str:
    data = _load("overlap.json")
    rows = [f"{data['samples']} samples in {data['requests']} requests of {data['delay_s']:g} s each; sampling "
            f"{data['sampling_s']:.2f} s and scoring {data['scoring_s']:.2f} s, each alone (medians, serial run).", "",
            "| mode | sampling and scoring / max(sampling, scoring) (median, range) |", "|---|---|"]
    for name, f in data["modes"].items():
        rows.append(f"| {name} | {f['ratio']:.3f}× [{f['ratio_min']:.3f}, {f['ratio_max']:.3f}] |")
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.overlap") + "\n"


def processes() -> str:
    data = _load("processes.json")
    rows = ["| method | samples / iteration | samples/s, 1 process | samples/s, 2 processes | speed-up |",
            "|---|---|---|---|---|"]
    for name, f in data["methods"].items():
        rows.append(f"| {name} | {f['samples_per_iteration']} | {f['samples_per_s_1']:.1f} | "
                    f"{f['samples_per_s_2']:.1f} | {f['speedup']:.2f}× |")
    return "\n".join(rows) + "\n\n" + _source(data, "python -m benchmarks.processes") + "\n"


def hacking() -> str:
    from .hacking import DEFENCES

    data = _load("hacking.json")
    order = list(DEFENCES)  # rows in the script's order, however --only runs added them
    defences = dict(sorted(data["defences"].items(), key=lambda item: order.index(item[0])))
    plain = defences["Flow-GRPO, no defence"]
    plain_gain = plain["ink"] - plain["base_ink"]
    rows = ["| defence | bold digit, uncapped | ink gain (share of Flow-GRPO's) | held-out digit accuracy (share of "
            "the base's) | toy CLIP score (share) | diversity | distance to the base | goals: judge / CLIP |",
            "|---|---|---|---|---|---|---|---|"]
    for name, d in defences.items():
        gain = d["ink"] - d["base_ink"]
        judge, clip = d["judge"] / d["base_judge"], d["clipscore"] / d["base_clipscore"]
        half = gain >= 0.5 * plain_gain
        goals = " / ".join("yes" if kept >= 0.95 and half else "no" for kept in (judge, clip))
        rows.append(f"| {name} | {d['base_bold_uncapped']:.3f} → {d['bold_uncapped']:.3f} | {gain:+.3f} ± "
                    f"{d['ink_std']:.3f} ({gain / plain_gain:.0%}) | {d['judge']:.3f} ± {d['judge_std']:.3f} "
                    f"({judge:.0%}) | {d['clipscore']:.1f} ± {d['clipscore_std']:.1f} ({clip:.0%}) | "
                    f"{d['base_diversity']:.3f} → {d['diversity']:.3f} | {d['distance_to_base']:.3f} | {goals} |")
    note = (f"Toy digits, each defence's config for 40 iterations, mean ± std over training seeds "
            f"{', '.join(map(str, data['seeds']))}; measured on {data['prompts']} held-out prompts × 2 seeds (base "
            f"model: held-out accuracy {plain['base_judge']:.3f}, CLIP score {plain['base_clipscore']:.1f}). Goals: "
            "the held-out measure ≥ 95% of the base model's with ≥ half of Flow-GRPO's ink gain.")
    return "\n".join(rows) + "\n\n" + note + " " + _source(data, "python -m benchmarks.hacking") + "\n"


def efficiency() -> str:
    data = _load("efficiency.json")
    a, methods = data["args"], data["methods"]
    rows = [f"| method | start | after {a['iterations']} iterations | NFE to reach {a['target']} | NFE to gain "
            f"+{a['gain']} | × Flow-GRPO (NFE to gain) | seconds to gain +{a['gain']} |",
            "|---|---|---|---|---|---|---|"]
    base = methods["Flow-GRPO"]["nfe_to_gain"]
    reached = lambda v: "not reached" if v is None else f"{v:.0f}"  # noqa: E731
    for name, r in methods.items():
        ratio = f"{base / r['nfe_to_gain']:.2f}×" if base and r["nfe_to_gain"] else "-"
        rows.append(f"| {name} | {r['start']:.4f} | {r['end']:.4f} | {reached(r['nfe_to_target'])} | "
                    f"{reached(r['nfe_to_gain'])} | {ratio} | {reached(r['seconds_to_gain'])} |")
    note = (f"{a['prompts']} groups × {a['group']}, {a['steps']} steps, held-out bold-digit reward on "
            f"{a['eval_prompts']} prompts and seeds every {a['every']} iterations, NFEs interpolated between "
            "evaluations.")
    return "\n".join(rows) + "\n\n" + note + " " + _source(data, "python -m benchmarks.efficiency") + "\n"


RENDERERS = {"learning-seeds": learning_seeds, "grpo-overhead": grpo_overhead, "grpo-gains": grpo_gains,
             "samplers": samplers, "reno": reno, "rewards": rewards, "demo": demo, "toy-models": toy_models,
             "overlap": overlap, "processes": processes, "hacking": hacking, "efficiency": efficiency}


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render_page(text: str) -> str:
    """The page with every figure block rendered from its JSON."""
    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise KeyError(f"unknown figure block '{name}' (known: {', '.join(RENDERERS)})")
        return match.group(1) + RENDERERS[name]() + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale blocks instead of rewriting them")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        rendered = render_page(text)
        if rendered != text:
            stale.append(str(page.relative_to(ROOT)))
            if not args.check:
                page.write_text(rendered)
    if stale:
        print(("stale figures in: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
