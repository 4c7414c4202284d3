"""The GRPO family's shared maths: group advantages and the clipped-ratio loss."""
