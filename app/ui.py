"""The Gradio page: three tabs (Compare, Optimise, Train) over the pure functions of this package.

Only this module and ``page_errors`` import gradio. Every handler turns an error into one sentence in the page
(``gr.Error``, see ``page_errors``), never a traceback.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .access import Access
from .compare import CompareResult, run_compare
from .config import AppConfig
from .guard import RequestGuard, endpoint_inputs
from .media import display_image, media_settings, write_media
from .models import ModelCache
from .optimise import OptimiseStep, parse_weights, run_optimise
from .page_errors import in_page_errors
from .runs import find_checkpoints, find_runs, read_run

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

GALLERY_MAX = 48  # newest per-iteration images kept in the Optimise gallery
KEEP_REQUESTS = 200  # request folders of result files kept in the work folder


class App:
    """The app's state shared by all sessions: config, loaded models, the folder for result files."""

    def __init__(self, cfg: AppConfig, cache: ModelCache | None = None):
        self.cfg = cfg
        self.cache = cache or ModelCache(cfg.dtype, cfg.device, cfg.local_files_only, cfg.max_loaded_models)
        self.access = Access(cfg)
        work = cfg.server.work_dir
        self.work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="flowalign-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ what the page offers

    def checkpoint_choices(self) -> list[str]:
        return list(dict.fromkeys(self.cfg.checkpoints + find_checkpoints(self.cfg.runs_root)))

    def run_choices(self) -> list[str]:
        return find_runs(self.cfg.runs_root)

    def check_offered(self, kind: str, value: str, offered: list[str]) -> None:
        """What a visitor may name (``access.Access``): the listed models, checkpoints and runs, and with
        ``allow_custom_paths`` those under the configured roots."""
        if kind == "model":
            self.access.check_model(value)
        else:
            self.access.check_folder(kind, value, offered)

    def request_dir(self) -> Path:
        """A new folder for one request's files; the oldest beyond ``KEEP_REQUESTS`` are removed."""
        old = sorted((p for p in self.work_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for stale in old[:max(0, len(old) - KEEP_REQUESTS + 1)]:
            shutil.rmtree(stale, ignore_errors=True)
        path = self.work_dir / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------------ Compare

    def compare(self, model, checkpoints, lora_scale, prompts, seed, samples, steps, guidance, selected, extra):
        """Handler of the Compare button."""
        checkpoints = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints or [])
        self.check_offered("model", model, self.cfg.models)
        for c in checkpoints:
            self.check_offered("checkpoint", c, self.checkpoint_choices())
        names = list(parse_weights(selected, {}, extra))
        self.access.check_rewards(names)
        result = run_compare(self.cache, self.cfg.limits, model, checkpoints, prompts, seed, samples, steps,
                             guidance, lora_scale, names)
        gen = self.cache.model(model).generator
        files = self.media_files(result, gen)
        pairs = self.pair_choices(result)
        headers, rows = result.table()
        outputs = [self.compare_summary(result), self.compare_gallery(result, files),
                   pd.DataFrame(rows, columns=headers)]
        state = {"result": result, "files": files, "pairs": pairs}
        first = next(iter(pairs), None)
        outputs.append(gr.update(choices=list(pairs), value=first, visible=bool(pairs)))
        outputs += self.pair_outputs(state, first)
        return (*outputs, state)

    def media_files(self, result: CompareResult, gen) -> list[object]:
        """Per sample: a display array (image) or a file path (video, audio)."""
        if result.modality == "image":
            return [display_image(s.media, self.cfg.display_size) for s in result.samples]
        folder, settings = self.request_dir(), media_settings(gen)
        return [str(write_media(s.media, result.modality, folder / f"sample_{i:03d}", min_side=self.cfg.display_size,
                                **settings)) for i, s in enumerate(result.samples)]

    @staticmethod
    def compare_summary(result: CompareResult) -> str:
        means = result.means()
        head = "| model | " + " | ".join(result.rewards) + " |"
        rule = "|---|" + "---|" * len(result.rewards)
        rows = [f"| {v} | " + " | ".join(f"{means[v][r]:.4f}" for r in result.rewards) + " |" for v in result.variants]
        s = result.settings
        note = (f"{len(result.prompts)} prompt(s) x seeds {result.seeds[0]}..{result.seeds[-1]}, {s['steps']} steps, "
                f"CFG {s['guidance']:g}, LoRA scale {s['lora_scale']:g}. Mean reward per model:")
        return "\n".join([note, "", head, rule, *rows])

    def compare_gallery(self, result: CompareResult, files: list[object]):
        items = [(f, s.caption()) for f, s in zip(files, result.samples)]
        return gr.update(value=items if result.modality != "audio" else [], columns=len(result.variants),
                         visible=result.modality != "audio")

    @staticmethod
    def pair_choices(result: CompareResult) -> dict[str, tuple[int, str]]:
        """'N. prompt · seed s: base vs CKPT' -> (sample index, variant), for every aligned variant."""
        out = {}
        pairs = [(p, s) for p in result.prompts for s in result.seeds]
        for k, (p, s) in enumerate(pairs):
            for v in result.variants[1:]:
                out[f"{k + 1}. {p} · seed {s}: base vs {v}"] = (k, v)
        return out

    def pair_outputs(self, state: dict | None, choice: str | None) -> list[object]:
        """The before/after slider (image) or the two players (video, audio) of one pair."""
        hidden = gr.update(value=None, visible=False)
        if not state or not choice or choice not in state["pairs"]:
            return [hidden] * 5
        result, files = state["result"], state["files"]
        index, variant = state["pairs"][choice]
        width = len(result.variants)
        a = files[index * width]
        b = files[index * width + result.variants.index(variant)]
        if result.modality == "image":
            return [gr.update(value=(a, b), visible=True), hidden, hidden, hidden, hidden]
        if result.modality == "video":
            return [hidden, gr.update(value=a, visible=True), gr.update(value=b, visible=True), hidden, hidden]
        return [hidden, hidden, hidden, gr.update(value=a, visible=True), gr.update(value=b, visible=True)]

    # ------------------------------------------------------------------ Optimise

    def optimise(self, model, checkpoint, lora_scale, method, prompt, seed, selected, extra, lr, iterations,
                 steps, k, *weights):
        """Handler of the Run button: streams the gallery, the reward plot and the best result."""
        self.check_offered("model", model, self.cfg.models)
        self.check_offered("checkpoint", checkpoint, self.checkpoint_choices())
        chosen = parse_weights(selected, dict(zip(self.cfg.rewards, weights)), extra)
        self.access.check_rewards(list(chosen))
        gallery: list[tuple[object, str]] = []
        best_media, best_value, folder = None, float("-inf"), None
        settings = media_settings(self.cache.model(model).generator) if model else {}
        for step in run_optimise(self.cache, self.cfg.limits, model, method, prompt, chosen, seed, iterations, lr,
                                 steps, k, checkpoint or None, lora_scale):
            if step.result is None and step.media is not None:
                for row, (label, value) in enumerate(zip(step.row_labels, step.rewards)):
                    if row < len(step.media):
                        folder = folder or self.request_dir()
                        gallery.append((self.display(step, step.media[row], folder, settings),
                                        f"{step.stage} {step.iteration} · {label} · {value:.4f}"))
                        if value > best_value:
                            best_media, best_value = step.media[row], value
                gallery = gallery[-GALLERY_MAX:]
            download = None
            if step.result is not None:
                best_media = step.result.images[0]
                stem = (folder or self.request_dir()) / f"best_{step.method}_seed{step.result.best_seed[0]}"
                download = str(write_media(best_media, step.modality, stem, min_side=self.cfg.display_size,
                                           **settings))
            yield (step.status(), gr.update(value=gallery or None, visible=step.modality != "audio"),
                   self.trajectory_frame(step), *self.best_outputs(step, best_media, download), download)

    def display(self, step: OptimiseStep, media, folder: Path, settings: dict):
        """An iterate for the gallery: an array (image) or a file (video)."""
        if step.modality == "image":
            return display_image(media, self.cfg.display_size)
        stem = folder / f"{step.stage}_{step.iteration:03d}_{uuid.uuid4().hex[:6]}"
        return str(write_media(media, step.modality, stem, min_side=self.cfg.display_size, **settings))

    def best_outputs(self, step: OptimiseStep, media, download: str | None) -> list[object]:
        """The best so far in the player of the generator's modality (image / video / audio)."""
        hidden = gr.update(visible=False)
        if media is None:
            return [gr.update(), gr.update(), gr.update()]
        if step.modality == "image":
            return [gr.update(value=display_image(media, self.cfg.display_size), visible=True), hidden, hidden]
        if download is None:  # video / audio: shown once the final file is written
            return [hidden, gr.update(), gr.update()]
        if step.modality == "video":
            return [hidden, gr.update(value=download, visible=True), hidden]
        return [hidden, hidden, gr.update(value=download, visible=True)]

    @staticmethod
    def trajectory_frame(step: OptimiseStep) -> pd.DataFrame:
        return pd.DataFrame(step.trajectory, columns=["step", "reward", "series"])

    # ------------------------------------------------------------------ Train (view)

    def open_run(self, folder):
        """Handler of the Open button: reward curves, last values and sample grids of a run."""
        self.check_offered("run", folder, self.run_choices())
        view = read_run(folder)
        lines = [f"**{view.folder}**", ""] + [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
                                              for k, v in view.summary.items()]
        curves = pd.DataFrame(view.reward_rows(), columns=["iteration", "value", "metric"])
        table = pd.DataFrame(view.last_values(), columns=["metric", "iteration", "last value"])
        return "\n".join(lines), curves, table, [(image, caption) for image, caption in view.images]

    def refresh(self):
        """The checkpoint and run lists as they are now (on page load and when a list is opened)."""
        checkpoints = self.checkpoint_choices()
        return gr.update(choices=checkpoints), gr.update(choices=["", *checkpoints]), \
            gr.update(choices=self.run_choices())

    def train_intro(self) -> str:
        """What the Train tab says before a run is opened: how to get one when there is none."""
        if self.run_choices():
            return "Choose a run and press **Open**."
        return (f"No training runs under `{self.cfg.runs_root}` yet. `flowalign train "
                f"configs/toy/digits_flow_grpo.yaml output_dir={self.cfg.runs_root}/digits` writes one; it is listed "
                "here once it has a checkpoint.")


def build_app(cfg: AppConfig, cache: ModelCache | None = None) -> "gr.Blocks":
    """The Blocks of the app (queued with the config's concurrency limit and queue size)."""
    app = App(cfg, cache)
    lim = cfg.limits
    custom = cfg.allow_custom_paths
    steps_default = min(cfg.steps or 20, lim.max_steps)
    checkpoints = app.checkpoint_choices()
    with gr.Blocks(title="flowalign", analytics_enabled=False) as demo:
        gr.Markdown("## flowalign: compare aligned checkpoints, optimise noise live, view training runs")
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("The base model and each aligned LoRA on the same prompts and seeds, scored by the rewards "
                        "you tick." + ("" if checkpoints else " No LoRA found yet: train one (Train tab) or list it "
                                       "under `checkpoints:` in the app config."), elem_id="compare-intro")
            with gr.Row():
                c_model = gr.Dropdown(cfg.models, value=cfg.models[0], label="Base model", allow_custom_value=custom,
                                      elem_id="compare-model")
                c_ckpts = gr.Dropdown(checkpoints, value=checkpoints[:1], multiselect=True, allow_custom_value=custom,
                                      label="Aligned checkpoints (LoRA folders)", elem_id="compare-checkpoints")
                c_scale = gr.Slider(0.0, lim.max_lora_scale, value=1.0, step=0.05, label="LoRA scale")
            with gr.Row():
                c_prompts = gr.Textbox(value=cfg.prompts[0] if cfg.prompts else "", lines=3, max_lines=lim.max_prompts,
                                       label=f"Prompts (one per line, at most {lim.max_prompts})",
                                       elem_id="compare-prompts")
                with gr.Column():
                    c_seed = gr.Number(0, precision=0, minimum=0, label="First seed")
                    c_samples = gr.Slider(1, lim.max_samples, value=min(2, lim.max_samples), step=1,
                                          label="Seeds per prompt")
            with gr.Row():
                c_steps = gr.Slider(1, lim.max_steps, value=steps_default, step=1, label="Steps")
                c_guidance = gr.Textbox("" if cfg.guidance is None else f"{cfg.guidance:g}",
                                        label=f"CFG scale (empty: the model's default; at most {lim.max_guidance:g})")
            with gr.Row():
                c_rewards = gr.CheckboxGroup(cfg.rewards, value=cfg.default_rewards, label="Score with")
                c_extra = gr.Textbox(label="More rewards (comma-separated registry names)", placeholder="pickscore")
            c_run = gr.Button("Compare", variant="primary", elem_id="compare-run")
            gr.Examples([["\n".join(cfg.prompts[i:i + 2]), min(2, lim.max_samples)]
                         for i in range(0, min(len(cfg.prompts), 6), 2)],
                        [c_prompts, c_samples], label="Example prompts")
            c_summary = gr.Markdown(elem_id="compare-summary")
            with gr.Row():
                c_gallery = gr.Gallery(label="Samples: a row per prompt and seed (base, then each checkpoint); "
                                       "captions: model · seed · the scores in the table's order", columns=2,
                                       height="auto", object_fit="contain", elem_id="compare-gallery", scale=3)
                with gr.Column(scale=2):
                    c_pair = gr.Dropdown([], label="Before / after", visible=False, elem_id="compare-pair")
                    c_slider = gr.ImageSlider(label="base | aligned", visible=False, elem_id="compare-slider")
                    c_video_a = gr.Video(label="base", visible=False)
                    c_video_b = gr.Video(label="aligned", visible=False)
                    c_audio_a = gr.Audio(label="base", visible=False)
                    c_audio_b = gr.Audio(label="aligned", visible=False)
            c_table = gr.Dataframe(label="Reward scores", interactive=False, elem_id="compare-table")
            c_state = gr.State()
        with gr.Tab("Optimise", id="optimise"):
            gr.Markdown("Optimise one prompt's initial noise against the ticked rewards, live: ReNO follows their "
                        "gradients, CARINOX also explores seeds, best-of-N only samples.", elem_id="optimise-intro")
            with gr.Row():
                o_model = gr.Dropdown(cfg.models, value=cfg.models[0], label="Model", allow_custom_value=custom)
                o_ckpt = gr.Dropdown(["", *checkpoints], value="", label="Checkpoint (optional LoRA)",
                                     allow_custom_value=custom, elem_id="optimise-checkpoint")
                o_scale = gr.Slider(0.0, lim.max_lora_scale, value=1.0, step=0.05, label="LoRA scale")
                o_method = gr.Radio(["reno", "carinox", "best-of-n"], value="reno", label="Method")
            o_prompt = gr.Textbox(value=cfg.prompts[0] if cfg.prompts else "", label="Prompt",
                                  elem_id="optimise-prompt")
            with gr.Row():
                o_rewards = gr.CheckboxGroup(cfg.rewards, value=cfg.default_rewards, label="Rewards")
                o_extra = gr.Textbox(label="More rewards (NAME[:WEIGHT], comma-separated)")
            with gr.Accordion("Reward weights", open=False):
                o_weights = [gr.Slider(0.0, 10.0, value=1.0, step=0.05, label=name) for name in cfg.rewards]
            with gr.Row():
                o_seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                o_lr = gr.Slider(0.1, lim.max_lr, value=min(cfg.lr, lim.max_lr), step=0.1, label="Learning rate")
                o_iterations = gr.Slider(1, lim.max_iterations, value=min(cfg.iterations, lim.max_iterations), step=1,
                                         label="Iterations (best-of-N: candidates)", elem_id="optimise-iterations")
                o_steps = gr.Slider(1, lim.max_steps, value=steps_default, step=1, label="Steps")
                o_k = gr.Slider(1, lim.max_carinox_seeds, value=min(2, lim.max_carinox_seeds), step=1,
                                label="CARINOX seeds (k)")
            gr.Examples([[prompt, method] for prompt, method in zip(cfg.prompts, ("reno", "carinox", "best-of-n"))],
                        [o_prompt, o_method], label="Examples")
            with gr.Row():
                o_run = gr.Button("Run", variant="primary", elem_id="optimise-run")
                o_stop = gr.Button("Stop", variant="stop", elem_id="optimise-stop")
            o_status = gr.Markdown(elem_id="optimise-status")
            with gr.Row():
                o_gallery = gr.Gallery(label="Iterates (newest last)", columns=5, height=420, object_fit="contain",
                                       elem_id="optimise-gallery")
                o_plot = gr.LinePlot(x="step", y="reward", color="series", elem_id="optimise-plot",
                                     label="Reward per iteration: each reward × its weight (of the leading seed), "
                                           "their weighted total per seed, the best total so far")
            with gr.Row():
                o_best = gr.Image(label="Best so far", elem_id="optimise-best")
                o_best_video = gr.Video(label="Best", visible=False)
                o_best_audio = gr.Audio(label="Best", visible=False)
                o_file = gr.File(label="Download the best result", elem_id="optimise-file")
        with gr.Tab("Train", id="train"):
            gr.Markdown("A training run's reward curves, last logged values and sample grids (iteration 0: the base "
                        "model's), read from its output folder.", elem_id="train-intro")
            with gr.Row():
                t_run = gr.Dropdown(app.run_choices(), value=next(iter(app.run_choices()), None),
                                    allow_custom_value=custom, label="Training run (output folder)",
                                    elem_id="train-run")
                t_open = gr.Button("Open", variant="primary", elem_id="train-open")
            if app.run_choices():  # examples need something to show; with no run the summary says how to get one
                gr.Examples([[run] for run in app.run_choices()[:4]], [t_run], label="Example runs")
            t_summary = gr.Markdown(app.train_intro(), elem_id="train-summary")
            t_plot = gr.LinePlot(x="iteration", y="value", color="metric", label="Reward curves", elem_id="train-plot")
            t_table = gr.Dataframe(label="Last logged values", interactive=False, elem_id="train-table")
            t_gallery = gr.Gallery(label="Sample grids", columns=3, height=420, object_fit="contain",
                                   elem_id="train-gallery")

        c_run.click(in_page_errors(app.compare),
                    [c_model, c_ckpts, c_scale, c_prompts, c_seed, c_samples, c_steps, c_guidance, c_rewards, c_extra],
                    [c_summary, c_gallery, c_table, c_pair, c_slider, c_video_a, c_video_b, c_audio_a, c_audio_b,
                     c_state], api_name="compare")
        c_pair.change(in_page_errors(app.pair_outputs), [c_state, c_pair],
                      [c_slider, c_video_a, c_video_b, c_audio_a, c_audio_b], api_name=False)
        run_event = o_run.click(in_page_errors(app.optimise),
                                [o_model, o_ckpt, o_scale, o_method, o_prompt, o_seed, o_rewards, o_extra, o_lr,
                                 o_iterations, o_steps, o_k, *o_weights],
                                [o_status, o_gallery, o_plot, o_best, o_best_video, o_best_audio, o_file],
                                api_name="optimise")
        o_stop.click(None, None, None, cancels=[run_event], api_name=False)
        t_open.click(in_page_errors(app.open_run), [t_run], [t_summary, t_plot, t_table, t_gallery],
                     api_name="open_run")
        lists = [c_ckpts, o_ckpt, t_run]  # runs and LoRAs written after the page opened appear without a reload
        demo.load(in_page_errors(app.refresh), None, lists, api_name=False, show_progress="hidden")
        for listing in lists:
            listing.focus(in_page_errors(app.refresh), None, lists, api_name=False, show_progress="hidden")
    demo.queue(default_concurrency_limit=cfg.server.concurrency, max_size=cfg.server.max_queue)
    demo.flowalign_app = app  # the shared state, for tests and embedding
    return demo


def launch(cfg: AppConfig, block: bool = True, quiet: bool = False, cache: ModelCache | None = None) -> "gr.Blocks":
    """Build and serve the app on ``cfg.server.host:port`` (127.0.0.1 unless the config says otherwise);
    ``block=False`` returns once it listens (``demo.local_url``; ``demo.close()`` stops it)."""
    demo = build_app(cfg, cache)
    from starlette.middleware import Middleware

    guard = Middleware(RequestGuard, max_bytes=cfg.server.max_request_bytes, inputs=endpoint_inputs(demo))
    demo.launch(server_name=cfg.server.host, server_port=cfg.server.port or None, prevent_thread_lock=not block,
                show_error=False, quiet=quiet, allowed_paths=[str(demo.flowalign_app.work_dir)], ssr_mode=False,
                max_file_size=cfg.server.max_request_bytes, app_kwargs={"middleware": [guard]})
    return demo
