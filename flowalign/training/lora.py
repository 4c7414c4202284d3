"""LoRA through peft on a diffusers model: add, read out, save in the diffusers format, switch off."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_diffusers writes and load_lora_weights reads


def add_lora(module: nn.Module, rank: int, alpha: float, targets: list[str]) -> None:
    """Attach a LoRA adapter (gaussian A, zero B: the policy starts exactly at the base) and freeze the rest."""
    from peft import LoraConfig

    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable parameters in fp32 (mixed precision keeps master weights)


def trainable_state(module: nn.Module, lora: bool,
                    full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """What a checkpoint needs of the model: the LoRA weights, or every parameter. ``full_state``: the
    module's state dict gathered across processes (``accelerator.get_state_dict``, needed under FSDP)."""
    if lora:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(module, state_dict=full_state).items()}
    return {k: v.detach().clone() for k, v in (full_state or module.state_dict()).items()}


def trainable_shapes(module: nn.Module, lora: bool) -> dict[str, tuple[int, ...]]:
    """The names and shapes ``trainable_state`` would save, without copying or gathering anything."""
    if lora:
        from peft import get_peft_model_state_dict

        return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(module).items()}
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA state: unexpected keys {result.unexpected_keys[:3]}")
    else:
        module.load_state_dict(state)


def save_lora_diffusers(module: nn.Module, directory: str | Path,
                        full_state: dict[str, torch.Tensor] | None = None,
                        pipeline_class: str = "StableDiffusion3Pipeline", component: str = "transformer") -> Path:
    """The diffusers LoRA format (``pytorch_lora_weights.safetensors``): ``pipe.load_lora_weights(dir)`` loads it.

    ``pipeline_class.save_lora_weights`` writes it with ``{component}_lora_layers`` (``transformer`` or ``unet``).
    LoRAs are saved with peft's ``lora_A`` / ``lora_B`` names as they are (the old
    ``convert_state_dict_to_diffusers`` renames only some of them to ``lora.down`` / ``lora.up``, and the
    loader then drops those), plus the adapter config as metadata, so the loader keeps ``lora_alpha / r``.
    A pipeline without ``save_lora_weights`` (StableAudioPipeline) gets the same file, which the component's
    own ``load_lora_adapter(directory, use_safetensors=True)`` (diffusers' PeftAdapterMixin, prefix = component) loads.
    Identical weights give a byte-identical file: the metadata's sets (``target_modules``) are written sorted.
    """
    import diffusers
    from diffusers.loaders.lora_base import LoraBaseMixin
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(module, state_dict=full_state)
    metadata = {k: sorted(v) if isinstance(v, set) else v  # a set's order changes between processes
                for k, v in module.peft_config["default"].to_dict().items()}
    pipeline = getattr(diffusers, pipeline_class)
    if hasattr(pipeline, "save_lora_weights"):
        pipeline.save_lora_weights(str(directory), **{f"{component}_lora_layers": layers,
                                                      f"{component}_lora_adapter_metadata": metadata})
    else:  # what every pipeline's save_lora_weights calls
        LoraBaseMixin._save_lora_weights(str(directory), {component: layers}, {component: metadata})
    canonical_header(Path(directory) / "pytorch_lora_weights.safetensors")
    return Path(directory)


def canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys. Written by hand because safetensors serialises its
    ``__metadata__`` map in hash order, so identical weights would otherwise give different bytes."""
    import struct

    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data section stays 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + size:])
    os.replace(tmp, path)


@contextmanager
def adapters_disabled(module: nn.Module, lora: bool):
    """The reference policy: the same weights with the LoRA switched off (no second copy of the model)."""
    if not lora:
        raise ValueError("KL to the reference needs LoRA training (train.lora_rank > 0)")
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()
