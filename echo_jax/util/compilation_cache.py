"""JAX's persistent compilation cache, for the entry points that start a fresh process per run.

A closed-loop run compiles a dozen decode and extend variants of the rollout engine, which on a
CPU takes longer than many runs' rollouts; a sweep compiles the same train step once per run.
With the cache on, a process loads what an earlier one compiled instead.
"""

from __future__ import annotations

import os

DEFAULT_DIR = "runs/.jax_cache"


def enable_compilation_cache(path: str) -> None:
    """Cache every compiled executable under `path`, however quickly it compiled or small it is
    (JAX's defaults skip executables that compile in under a second)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
