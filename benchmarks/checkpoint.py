"""Checkpoint figures for a ~1B model on CPU (random weights, Llama-3.2-1B shapes):

- start-up: a Hugging Face folder (bf16 safetensors, as published) vs the same model converted
  once with `python -m jaxsft.convert` (stored float32, or `--dtype bfloat16`), each loaded
  sharded over 8 simulated devices into float32;
- save: seconds the train loop is blocked (`Checkpointer.save` returns) and until the files are
  complete, and the host memory the save adds on top of the model (RSS sampled every 5 ms);
- restore: seconds to restore that checkpoint onto another mesh (4 devices, fsdp 2 x tensor 2).

Each measurement runs in a fresh process. Usage:
    python benchmarks/checkpoint.py [--layers 16] [--out benchmarks/results/checkpoint_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                eos_token_id=128001, dtype="bfloat16")
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The highest RSS seen while the block runs (sampled in a thread)."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def write_hf(folder: str, layers: int) -> int:
    """A random bf16 model folder; returns the parameter count."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from jaxsft.models import ModelConfig
    from jaxsft.models.hf_io import hf_tensors

    os.makedirs(folder, exist_ok=True)
    config = {**LLAMA_1B, "num_hidden_layers": layers}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, (_, _, _, hf_shape) in hf_tensors(ModelConfig.from_hf(config)).items():
        tensors[name] = (rng.standard_normal(hf_shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return int(sum(t.size for t in tensors.values()))


def child(what: str, path: str, ckpt_dir: str) -> dict:
    """One measurement, in this (fresh) process."""
    import jax
    import jax.numpy as jnp

    from jaxsft.checkpoint import Checkpointer
    from jaxsft.models.converted import load_converted
    from jaxsft.models import load_model
    from jaxsft.sharding import make_mesh

    start = time.perf_counter()
    mesh = make_mesh()
    if what == "startup_hf":
        model = load_model(path, dtype=jnp.float32, mesh=mesh)
    else:
        model = load_converted(path, dtype=jnp.float32, mesh=mesh)
    from flax import nnx
    params = nnx.state(model, nnx.Param)
    jax.block_until_ready(params)
    result = {"seconds": time.perf_counter() - start}
    if what != "save_restore":
        return result

    opt_state = {"count": jnp.zeros((), jnp.int32)}
    ckpt = Checkpointer(ckpt_dir, keep=1)
    base = rss()
    with PeakRss() as peak:
        t = time.perf_counter()
        ckpt.save(1, params, opt_state, {"step": 1, "data": {}})
        blocked = time.perf_counter() - t
        ckpt.wait()
        total = time.perf_counter() - t
    ckpt.close()

    mesh4 = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    from jaxsft.sharding import param_shardings
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(params), nnx.to_pure_dict(param_shardings(params, mesh4)))
    del model, params
    t = time.perf_counter()
    restored = Checkpointer(ckpt_dir).restore(1, like, opt_state)
    jax.block_until_ready(restored[0])
    return {"save_blocking_s": blocked, "save_total_s": total, "restore_other_mesh_s": time.perf_counter() - t,
            "rss_before_save_gib": base / 2**30, "peak_rss_during_save_gib": peak.peak / 2**30,
            "save_added_host_memory_gib": (peak.peak - base) / 2**30}


def run_child(what, path, ckpt_dir):
    r = subprocess.run([sys.executable, __file__, "--child", what, path, ckpt_dir], env=ENV,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="start-up measurements per path (best is kept)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "checkpoint_cpu.json"))
    p.add_argument("--child", nargs=3)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return

    with tempfile.TemporaryDirectory(prefix="jaxsft-bench-") as tmp:
        hf, conv, conv16, ckpt = (os.path.join(tmp, d) for d in ("hf", "converted", "converted_bf16", "ckpt"))
        n = write_hf(hf, a.layers)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jaxsft.convert", "--from", hf, "--to", conv],
                       env=ENV, check=True, capture_output=True)
        convert_s = time.perf_counter() - t
        subprocess.run([sys.executable, "-m", "jaxsft.convert", "--from", hf, "--to", conv16,
                        "--dtype", "bfloat16"], env=ENV, check=True, capture_output=True)
        hf_s = min(run_child("startup_hf", hf, "")["seconds"] for _ in range(a.repeats))
        conv_s = min(run_child("startup_converted", conv, "")["seconds"] for _ in range(a.repeats))
        conv16_s = min(run_child("startup_converted", conv16, "")["seconds"] for _ in range(a.repeats))
        save = run_child("save_restore", conv, ckpt)

    import jax
    result = {
        "model": {**{k: v for k, v in LLAMA_1B.items() if k in ("hidden_size", "intermediate_size",
                                                                "num_attention_heads", "num_key_value_heads",
                                                                "vocab_size", "tie_word_embeddings")},
                  "num_hidden_layers": a.layers, "parameters": n,
                  "float32_gib": n * 4 / 2**30, "hf_bf16_gib": n * 2 / 2**30},
        "startup_s": {"hf_folder_bf16": hf_s, "converted_float32": conv_s, "converted_bf16": conv16_s,
                      "note": "process start excluded; load into float32 sharded over 8 simulated CPU devices"},
        "convert_once_s": convert_s,
        "save_restore": save,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "note": "2 cores shared with other jobs: timings are noisy"},
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
