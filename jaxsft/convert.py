"""python -m jaxsft.convert --from-hf HF_DIR --to PATH [--dtype float32]

Converts a Hugging Face model folder (local or gs://) once into a jaxsft checkpoint (local or
gs://): the params as an Orbax checkpoint, plus config.json and the tokenizer files. A run whose
`model.path` is PATH then reads each parameter shard straight onto its device, with no
safetensors parsing or re-layout, however many runs start from it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import jax.numpy as jnp

from jaxsft.checkpoint import save_converted
from jaxsft.models import load_model
from jaxsft.models.hf_io import local_dir
from jaxsft.sharding import make_mesh

# Files of an HF folder that the conversion replaces (weights) or rewrites (config).
_REPLACED = ("config.json", "generation_config.json", "model.safetensors.index.json")


def convert(hf_dir: str, out: str, dtype: str = "float32") -> None:
    folder = local_dir(hf_dir)
    # Sharded over every device, so no device (and, with several hosts, no host) holds it whole.
    model = load_model(folder, dtype=jnp.dtype(dtype), mesh=make_mesh())
    extra = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
             if os.path.isfile(os.path.join(folder, f)) and f not in _REPLACED
             and not f.endswith((".safetensors", ".partial", ".bin", ".gguf"))]
    save_converted(model, folder, out, extra_files=extra)


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jaxsft.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("--from-hf", required=True, help="Hugging Face model folder, local or gs://")
    p.add_argument("--to", required=True, help="output folder, local or gs://")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="stored parameter dtype (a run casts to its model.param_dtype when loading)")
    a = p.parse_args(argv)
    t = time.perf_counter()
    try:
        convert(a.from_hf, a.to, a.dtype)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"converted {a.from_hf} -> {a.to} in {time.perf_counter() - t:.1f}s; use model.path={a.to}")


if __name__ == "__main__":
    main()
