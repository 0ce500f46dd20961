"""python -m jaxsft.convert --from SOURCE --to PATH [--dtype float32] [--hf]

Converts a model once: SOURCE is a Hugging Face folder (local or gs://) or a .gguf file (or a
folder holding one). By default PATH becomes a jaxsft checkpoint (local or gs://): the params as an
Orbax checkpoint, plus config.json and the tokenizer files; a run whose `model.path` is PATH then
reads each parameter shard straight onto its device, with no safetensors parsing or re-layout,
however many runs start from it. With --hf, PATH becomes a Hugging Face folder (safetensors,
config.json, tokenizer) that `transformers` loads: the way from a GGUF file to an HF folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import jax.numpy as jnp

from jaxsft.models import load_model, load_tokenizer
from jaxsft.models.converted import save_converted
from jaxsft.models.gguf import find_gguf
from jaxsft.models.hf_io import local_dir, save_hf, save_tokenizer
from jaxsft.sharding import make_mesh

# Files of an HF folder that the conversion replaces (weights) or rewrites (config).
_REPLACED = ("config.json", "generation_config.json", "model.safetensors.index.json")


def convert(source: str, out: str, dtype: str = "float32", hf: bool = False) -> None:
    gguf = find_gguf(source)
    folder = gguf or local_dir(source)
    # Sharded over every device, so no device (and, with several hosts, no host) holds it whole.
    model = load_model(folder, dtype=jnp.dtype(dtype), mesh=make_mesh())
    if hf:
        save_hf(model, out, tokenizer=load_tokenizer(folder), dtype=jnp.dtype(dtype))
    elif gguf:
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            save_tokenizer(load_tokenizer(gguf), tokenizer_dir)
            save_converted(model, tokenizer_dir, out, extra_files=_files(tokenizer_dir))
    else:
        save_converted(model, folder, out, extra_files=_files(folder))


def _files(folder: str) -> list[str]:
    """The folder's files other than the weights and the files the conversion rewrites."""
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f)) and f not in _REPLACED
            and ".partial" not in f and not f.endswith((".safetensors", ".bin", ".gguf"))]


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jaxsft.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("--from", dest="source", required=True,
                   help="Hugging Face model folder (local or gs://), or a .gguf file or a folder holding one")
    p.add_argument("--to", required=True, help="output folder, local or gs://")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face folder instead of a jaxsft checkpoint")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="stored parameter dtype (a run casts to its model.param_dtype when loading)")
    a = p.parse_args(argv)
    t = time.perf_counter()
    try:
        convert(a.source, a.to, a.dtype, a.hf)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"converted {a.source} -> {a.to} in {time.perf_counter() - t:.1f}s; use model.path={a.to}")


if __name__ == "__main__":
    main()
