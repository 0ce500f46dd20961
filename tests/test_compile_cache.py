"""The persistent compilation cache: a second process loads what the first one compiled."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import logging, sys
from jaxsft.compile_cache import enable_compile_cache
enable_compile_cache(sys.argv[1])
import jax, jax.numpy as jnp
logging.basicConfig(level=logging.WARNING, format="%(message)s")
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)  # logs each cache hit and miss

@jax.jit
def attention_scores(x):
    return jax.nn.softmax(x @ x.T / 8.0) @ x

print(float(attention_scores(jnp.arange(64.0 * 32).reshape(64, 32) / 1000).sum()))
print(jax.config.jax_compilation_cache_dir)
"""


def compile_in_a_new_process(cache_dir):
    r = subprocess.run([sys.executable, "-c", PROGRAM, cache_dir], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    hits = [x for x in lines if "cache hit for 'jit_attention_scores'" in x]
    misses = [x for x in lines if "CACHE MISS for 'jit_attention_scores'" in x]
    value, cache_dir = r.stdout.split()
    return float(value), cache_dir, len(hits), len(misses)


def test_a_second_process_reads_the_compiled_function_from_the_cache(tmp_path):
    cache = tmp_path / "jax_compile"
    first = compile_in_a_new_process(str(cache))
    assert first[1:] == (str(cache), 0, 1)
    # JAX's default minimum compile time (1 s) would have kept this sub-second CPU compile out.
    entries = [p.name for p in cache.iterdir() if p.name.startswith("jit_attention_scores-")]
    assert len(entries) == 1, sorted(p.name for p in cache.iterdir())
    second = compile_in_a_new_process(str(cache))
    assert second[1:] == (str(cache), 1, 0) and second[0] == first[0]
    assert [p.name for p in cache.iterdir() if p.name.startswith("jit_attention_scores-")] == entries


def test_an_empty_path_leaves_the_cache_off():
    value, cache_dir, hits, _ = compile_in_a_new_process("")
    assert cache_dir == "None" and hits == 0 and value > 0


def test_the_default_directory_is_in_the_user_cache(monkeypatch):
    from jaxsft.compile_cache import default_compile_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert default_compile_cache_dir() == "/xdg/jaxsft/jax_compile"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_compile_cache_dir() == "/home/someone/.cache/jaxsft/jax_compile"
