"""Shared maths of the GRPO family (grpo/: advantages, the clipped loss) and the inference-time noise optimisers
(ReNO, CARINOX, best-of-N). Training methods are files in flowalign/methods/."""
