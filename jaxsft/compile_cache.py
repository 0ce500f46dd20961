"""JAX's persistent compilation cache: a resumed run, each sweep rung and a repeated eval load
their compiled steps from disk instead of compiling them again (`train.compile_cache_dir`)."""

from __future__ import annotations

import os

import jax


def default_compile_cache_dir() -> str:
    """`$XDG_CACHE_HOME/jaxsft/jax_compile`, or `~/.cache/jaxsft/jax_compile`."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "jaxsft", "jax_compile")


def enable_compile_cache(path: str) -> None:
    """Read and write compiled executables under `path` ('' = leave the cache off).

    Call it before the first compilation of the process: JAX opens the cache once."""
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    # JAX's defaults skip executables that compiled in under a second: on CPU that is most of
    # them, and a run is many such executables (init, steps, eval, export casts).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
