"""Alignment algorithms: the GRPO family (grpo/), and later AC-Flow, DRAGON, ReNO, CARINOX."""
