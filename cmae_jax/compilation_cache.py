"""JAX's persistent compilation cache: compiled programs reused by later runs on this machine.

A rerun, a resumed run or the next stage of a run with the same program then loads the
compiled step (and the init) from disk instead of compiling it again. The cache key covers
the program, the devices and the jax/XLA versions, so a changed config, model or machine
compiles afresh and stores a new entry beside the old ones.
"""

import os

import jax
from absl import logging

# config.compilation_cache_dir's default; '~' expands to the user's home.
DEFAULT_DIR = "~/.cache/cmae_jax/jax_compilation_cache"


def enable(cache_dir: str) -> str | None:
    """Turns the cache on in `cache_dir` (local or gs://), or off for ''; returns the folder.

    Call it before the first compilation. Programs that compile in under a second are not
    stored (JAX's threshold, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS): reading them back
    would save nothing. With the default folder, JAX's own JAX_COMPILATION_CACHE_DIR, when
    set, chooses the folder instead (the test suite shares one folder among its runs so).
    """
    if cache_dir == DEFAULT_DIR and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("Persistent compilation cache: off (config.compilation_cache_dir='').")
        return None
    folder = cache_dir if "://" in cache_dir else os.path.expanduser(cache_dir)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    logging.info("Persistent compilation cache: %s", folder)
    return folder
