"""The on-policy loop: task pool, rollouts into training rows, PPO updates."""
