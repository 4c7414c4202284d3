"""The training loop on accelerate: LoRA, checkpoints (atomic, resumable), logs and reports."""
