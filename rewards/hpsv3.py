"""HPSv3 (Ma et al., ICCV 2025): Qwen2-VL with a RankNet head read at a ``<|Reward|>`` token; the score is its μ.

The release (hub repo ``MizzenAI/HPSv3``, ``HPSv3.safetensors``) is Qwen2-VL-7B-Instruct fine-tuned whole, saved
from HPSv3's ``Qwen2VLRewardModelBT`` under transformers 4.45, whose key names this port reads:

- ``visual.*``: the vision tower (patch embedding, blocks, merger), the same names as transformers 5's;
- ``model.*``: the language model (``embed_tokens``, ``layers.N.*``, ``norm``), ``language_model.*`` in transformers 5;
  its vocabulary is the base's plus one row, ``<|Reward|>``;
- ``rm_head.{0,3,5}.*``: ``Linear(D, 1024) ReLU Dropout Linear(1024, 16) ReLU Linear(16, 2)`` (μ, σ), run in float32;
- ``lm_head.weight``: unused by the score, dropped.

The prompt is HPSv3's: the chat template of the base's processor around the image and HPSv3's instruction, which ends
in ``<|Reward|>``. The forward is HPSv3's own: the merged image features replace the ``<|image_pad|>`` embeddings and
the language model runs with 1-D positions (0..L-1 on all three M-RoPE axes: HPSv3 passes no position ids, so
transformers 4.45 made them so), not Qwen2-VL's multimodal rope index. The image is resized (bicubic, antialiased) to
HPSv3's pixel budget (``min_pixels = max_pixels = 256*28*28``, qwen-vl-utils' ``smart_resize``), normalised and cut
into patches as ``Qwen2VLImageProcessor`` does, all on tensors, so gradients reach the pixels. The ``hpsv3`` wheel
(which pins transformers 4.45) is not needed. Verified here only against tiny random models saved in that layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import InputSpec, Reward
from .errors import RewardError
from .loading import check_local, load_errors, load_state_dict_file, resolve_file

#: HPSv3's instruction (``hpsv3/dataset/data_collator_qwen.py``, ``INSTRUCTION`` then ``prompt_with_special_token``),
#: kept to the character: the checkpoint was trained on this text.
INSTRUCTION = "\n".join((
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being "
    "the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal "
    "body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult "
    "material. If such content is present, the image quality and satisfaction score should be the lowest possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {prompt}",
    "", "", "",
    "Please provide the overall ratings of this image: <|Reward|>",
    "",
    "END",
    "",
))
REWARD_TOKEN = "<|Reward|>"
#: HPSv3's pixel budget (``min_pixels = max_pixels``): square images become 448 x 448, 256 merged image tokens.
PIXELS = 256 * 28 * 28
MAX_RATIO = 200
PREFIXES = {"visual.": "visual.", "model.": "language_model."}
HEAD_LAYERS = ("0", "3", "5")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def user_text(prompt: str) -> str:
    """The text HPSv3 puts after the image for ``prompt``."""
    return INSTRUCTION.replace("{prompt}", prompt)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' size rule (HPSv3's ``fetch_image``): sides multiples of ``factor``, area in the budget,
    aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise RewardError(f"reward hpsv3: aspect ratio over {MAX_RATIO} ({height}x{width})")
    new_h, new_w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h, new_w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h, new_w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return new_h, new_w


def patchify(images: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """``[B,3,H,W]`` -> ``[B*(H/p)*(W/p), 3*temporal*p*p]`` in ``Qwen2VLImageProcessor``'s order: merge windows of
    ``merge x merge`` patches together, each patch channel-major with the image repeated ``temporal`` times."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    grid = images.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    grid = grid.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return grid.reshape(b * gh * gw, c * temporal * patch * patch)


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``HPSv3.safetensors`` -> (``Qwen2VLModel`` state dict, head state dict); a ValueError names what is off."""
    backbone, head, unknown = {}, {}, []
    for key, value in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        elif prefix is not None:
            backbone[PREFIXES[prefix] + key[len(prefix):]] = value
        elif key != "lm_head.weight":
            unknown.append(key)
    expected = {f"{layer}.{kind}" for layer in HEAD_LAYERS for kind in ("weight", "bias")}
    if unknown or set(head) != expected or "language_model.embed_tokens.weight" not in backbone:
        raise ValueError(f"not HPSv3's layout (visual.*, model.*, rm_head.{{0,3,5}}.*, lm_head.weight): "
                         f"unexpected keys {unknown[:3]}, head keys {sorted(head)[:6]}")
    return backbone, head


def ranknet_head(head: dict[str, torch.Tensor]) -> nn.Sequential:
    """HPSv3's ``ranknet`` head, widths read from the checkpoint (D -> 1024 -> 16 -> 2 in the release)."""
    first, second, out = (head[f"{layer}.weight"] for layer in HEAD_LAYERS)
    module = nn.Sequential(nn.Linear(first.shape[1], first.shape[0]), nn.ReLU(), nn.Dropout(0.05),
                           nn.Linear(second.shape[1], second.shape[0]), nn.ReLU(),
                           nn.Linear(out.shape[1], out.shape[0]))
    module.load_state_dict(head)
    return module.float()


def build_backbone(config, backbone: dict[str, torch.Tensor], dtype: torch.dtype):
    """A ``Qwen2VLModel`` of ``config`` holding the checkpoint's tensors (built on the meta device: no random init
    of 8B parameters)."""
    from accelerate import init_empty_weights
    from transformers import Qwen2VLModel

    config.text_config.vocab_size = backbone["language_model.embed_tokens.weight"].shape[0]
    with init_empty_weights():
        model = Qwen2VLModel(config)
    result = model.load_state_dict(backbone, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the checkpoint does not fit the base's Qwen2-VL config: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    return model.to(dtype)


class HPSv3(Reward):
    """HPSv3: Qwen2-VL-7B with a RankNet head; the score is the head's μ at the ``<|Reward|>`` token.

    ``path``: ``HPSv3.safetensors``, a folder holding it, or a hub repo (default ``MizzenAI/HPSv3``). ``base``: the
    Qwen2-VL config and processor (tokenizer, chat template, normalisation) the checkpoint was trained from.
    ``min_pixels`` / ``max_pixels``: the image budget (HPSv3's: both 256*28*28). ``dtype``: the backbone's (the
    release's bfloat16 by default; the head runs in float32)."""

    name = "hpsv3"
    differentiable = True

    def __init__(self, path: str = "MizzenAI/HPSv3", local_files_only: bool = False,
                 base: str = "Qwen/Qwen2-VL-7B-Instruct", dtype: str = "bfloat16", min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS):
        super().__init__()
        if dtype not in DTYPES:
            raise RewardError(f"reward {self.name}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not 0 < min_pixels <= max_pixels:
            raise RewardError(f"reward {self.name}: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        from transformers import AutoConfig, AutoProcessor

        with load_errors(self.name, path):
            backbone, head = split_checkpoint(load_state_dict_file(resolve_file(path, "HPSv3.safetensors",
                                                                               local_files_only)))
        with load_errors(self.name, base):
            check_local(base)
            config = AutoConfig.from_pretrained(base, local_files_only=local_files_only)
            self.processor = AutoProcessor.from_pretrained(base, local_files_only=local_files_only)
        with load_errors(self.name, path):
            self.model = build_backbone(config, backbone, DTYPES[dtype])
            self.head = ranknet_head(head)
            self._check_tokens(config)
        self.eval().requires_grad_(False)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.register_buffer("mean", torch.tensor(self.processor.image_processor.image_mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(self.processor.image_processor.image_std).view(1, 3, 1, 1), False)
        self.input_spec = InputSpec(range=(0.0, 1.0), layout="BCHW")

    def _check_tokens(self, config) -> None:
        """Add ``<|Reward|>`` to the tokenizer, as HPSv3 does; it and ``<|image_pad|>`` must fit the checkpoint."""
        tokenizer = self.processor.tokenizer
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        tokenizer.padding_side = "right"
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token = getattr(self.processor, "image_token", "<|image_pad|>")
        rows = self.model.language_model.embed_tokens.num_embeddings
        if self.reward_id >= rows or tokenizer.convert_tokens_to_ids(self.image_token) != config.image_token_id:
            raise ValueError(f"the base's tokenizer does not fit the checkpoint ({REWARD_TOKEN} id {self.reward_id}, "
                             f"{rows} embedding rows; {self.image_token} must be id {config.image_token_id})")

    def pixels(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B,3,H,W]`` in [0,1] -> (``pixel_values`` ``[B*h*w, 3*T*p*p]``, ``image_grid_thw`` ``[B,3]``)."""
        h, w = media.shape[-2:]
        size = smart_resize(h, w, self.patch * self.merge, self.min_pixels, self.max_pixels)
        if size != (h, w):
            media = F.interpolate(media, size=size, mode="bicubic", align_corners=False, antialias=True)
        normalised = (media - self.mean.to(media.dtype)) / self.std.to(media.dtype)
        grid = torch.tensor([[1, size[0] // self.patch, size[1] // self.patch]] * len(media), device=media.device)
        return patchify(normalised, self.patch, self.merge, self.temporal), grid

    def tokens(self, prompts: list[str], image_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The chat of each prompt, its image placeholder repeated once per merged image token, tokenised."""
        texts = []
        for prompt in prompts:
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(prompt)}]}]
            text = self.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(self.image_token, self.image_token * image_tokens, 1))
        batch = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        return {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}

    def reward_outputs(self, pixel_values: torch.Tensor, grid: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """The head's ``[B, 2]`` (μ, σ) at each sample's ``<|Reward|>`` token, as HPSv3's forward computes it."""
        text = self.model.language_model
        embeds = text.embed_tokens(input_ids)
        image = self.model.visual(pixel_values.to(embeds.dtype), grid_thw=grid).pooler_output
        placeholders = (input_ids == self.model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(placeholders, image.to(embeds.dtype))
        hidden = text(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
        at = input_ids == self.reward_id
        if not bool((at.sum(dim=1) == 1).all()):
            raise RewardError(f"reward {self.name}: each prompt must hold {REWARD_TOKEN} once (its template's), "
                              f"found {at.sum(dim=1).tolist()}")
        return self.head(hidden[at].float())

    def _score(self, media, prompts, metadata):
        pixel_values, grid = self.pixels(media)
        per_image = int(grid[0].prod()) // self.merge ** 2
        batch = self.tokens(prompts, per_image, media.device)
        return self.reward_outputs(pixel_values, grid, batch["input_ids"], batch["attention_mask"])[:, 0]
