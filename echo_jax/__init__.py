"""echo-jax: ECHO (a world-model cross-entropy on environment tokens) for agent RL in JAX."""
