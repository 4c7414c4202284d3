"""Sharing a trained LoRA: the run's config.yaml loads back, the model card in final/ (metadata the Hub reads,
the report's figures, code that loads the LoRA and runs), ``flowalign share`` rewriting it for a repo and pushing
(the Hub calls recorded, not made: no network here), and the one-line errors before anything loads."""
import re

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from flowalign.cli import main
from flowalign.config import ConfigError, load_config
from flowalign.sharing import read_facts
from flowalign.training.run import train

DEMO = "configs/toy/digits_flow_grpo.yaml"
TINY = ["train.iterations=2", "train.prompts_per_iteration=2", "flow_grpo.group_size=4", "train.steps=4",
        "train.eval_prompts=8", "train.eval_steps=4", "train.checkpoint_every=0", "train.report_to=none"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("share") / "digits_lora"
    lines = []
    metrics = train(DEMO, [*TINY, "modifiers={kl: {beta: 0.02}}", f"output_dir={out}"], progress=False,
                    print_fn=lines.append)
    return out, metrics, lines


def test_the_run_config_loads_back_as_the_same_config(run):
    out, _, _ = run
    again = load_config(out / "config.yaml")
    assert again == load_config(DEMO, [*TINY, "modifiers={kl: {beta: 0.02}}", f"output_dir={out}"])


def test_the_card_states_the_run_and_shows_its_figures(run):
    out, metrics, lines = run
    final = out / "final"
    assert lines[-1] == (f"model card in {final / 'README.md'} (share it: flowalign share {out} --push-to-hub "
                         "OWNER/NAME)")
    card = ModelCard.load(final / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and {"flowalign", "lora", "flow_grpo"} <= set(data["tags"])
    assert data["widget"] == [{"text": "flow_grpo samples after training", "output": {"url": "images/after.png"}}]
    facts = read_facts(final)
    assert (facts.base_model, facts.method, facts.rewards) == ("toy/digits", "flow_grpo", {"toy/bold_digit": 1.0})
    assert facts.options["group_size"] == 4 and facts.modifiers["kl"]["beta"] == 0.02
    assert facts.reward_after == metrics["reward_after"] and facts.train["lr"] == 1e-3
    assert f"**{metrics['reward_before']:.4f} → {metrics['reward_after']:.4f}**" in card.text
    linked = re.findall(r"!\[\w+\]\((images/\w+\.png)\)", card.text)
    assert linked == ["images/before.png", "images/after.png", "images/reward_curve.png"]
    for link in linked:  # each figure is the report's
        assert (final / link).read_bytes() == (out / "report" / link.removeprefix("images/")).read_bytes()
    assert "| `modifiers.kl.beta` | `0.02` |" in card.text and (final / "flowalign_config.yaml").is_file()


def test_the_cards_code_loads_the_trained_lora(run, tmp_path, monkeypatch):
    """The card's Python, run as written: the LoRA loads into the base model and changes its samples."""
    out, _, _ = run
    code = re.search(r"```python\n(.*?)```", (out / "final" / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "card", "exec"), scope)
    gen = scope["gen"]
    from flowalign.generators import load_generator
    from flowalign.inference import generate

    with torch.no_grad():
        with_lora = generate(gen, ["a handwritten seven"] * 2, steps=6)
        base = generate(load_generator("toy/digits"), ["a handwritten seven"] * 2, steps=6)
    assert (tmp_path / "sevens.png").is_file() and not torch.equal(with_lora, base)


def test_share_rewrites_the_card_for_the_repo_and_pushes_final(run, monkeypatch, capsys):
    out, _, _ = run
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(
        ("upload", kw["repo_id"], sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir()))))
    assert main(["share", str(out), "--push-to-hub", "someone/digits-lora", "--private"]) == 0
    assert capsys.readouterr().out.strip() == "pushed to https://huggingface.co/someone/digits-lora"
    assert calls[0] == ("create", "someone/digits-lora", {"private": True, "token": None, "exist_ok": True,
                                                          "repo_type": "model"})
    assert calls[1] == ("upload", "someone/digits-lora", ["README.md", "flowalign_config.yaml", "images",
                                                          "pytorch_lora_weights.safetensors"])
    text = (out / "final" / "README.md").read_text()
    assert "load_lora_adapter('someone/digits-lora'" in text and str(out / "final") not in text


def test_pushing_offline_or_to_a_bad_repo_id_is_one_line(run, monkeypatch, capsys, tmp_path):
    out, _, _ = run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["share", str(out), "--push-to-hub", "someone/digits-lora"]) == 2
    assert main(["share", str(out), "--push-to-hub", "not a repo!"]) == 2
    assert main(["share", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowalign: error: --push-to-hub: pushing needs the network and HF_HUB_OFFLINE is set (flowalign "
                   "share RUN_DIR writes the card offline; push it later)",
                   "flowalign: error: --push-to-hub: 'not a repo!' is not a Hub repo id (expected owner/name)",
                   f"flowalign: error: share: {tmp_path / 'final' / 'README.md'} not found (flowalign train writes the "
                   f"card with the final LoRA)"]
    with pytest.raises(ConfigError, match="^train.hub_model_id: pushing needs the network"):  # before anything loads
        train(DEMO, ["train.hub_model_id=someone/x", f"output_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()
