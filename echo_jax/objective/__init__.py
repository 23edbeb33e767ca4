"""The ECHO objective: the GRPO policy term plus λ times the env-token cross-entropy."""
