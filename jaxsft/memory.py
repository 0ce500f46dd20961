"""Peak memory estimate of a run, per device and per host, before anything is compiled.

`python -m jaxsft.memory --config configs/NAME.py [--device-gib 80] [--host-gib 128]` prints the breakdown and
whether it fits; `jaxsft.train` runs the same check and refuses a run that cannot fit, with the
same message, instead of failing deep inside XLA.

The arithmetic (per device; N = parameters, S = devices that shard them, fsdp x tensor):
  params       N * bytes(param_dtype) / S
  grads        N * 4 / S                          (the float32 accumulator)
  optimizer    N * (bytes(state_dtype) + bytes(param_dtype)) / S   (Adam mu + nu; on the host
               instead when optim.offload_state is set, plus one moment set streamed through)
  layer copy   2 * layer_params * bytes(compute) / tensor   (one layer gathered, double-buffered)
  activations  tokens per device x bytes(compute) x per-token-per-layer widths of the remat policy
  logits       rows x loss chunk x vocab x 4 bytes x 3 (chunked loss: forward, softmax, gradient)
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax

from jaxsft.models import ModelConfig
from jaxsft.models.hf_io import local_dir
from jaxsft.train.loss import loss_chunk

GiB = 2**30
# What XLA needs beyond the estimate (fragmentation, workspace, collectives' buffers).
HEADROOM = 0.9


def parameter_count(c: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters of one layer)."""
    e, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    layer = e * (n + 2 * k) * h + n * h * e + 3 * e * f + 2 * e
    layer += (n + 2 * k) * h * c.qkv_bias + e * c.o_bias + 2 * h * c.qk_norm
    head = 0 if c.tie_word_embeddings else e * c.vocab_size
    return c.num_layers * layer + c.vocab_size * e + e + head, layer


def activation_width(c: ModelConfig, remat: str) -> int:
    """Values kept per token per layer for the backward pass, in compute-dtype elements."""
    e, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    if remat == "full":
        return e  # the layer input only
    dots = (n + 2 * k) * h + e + 2 * f + e  # q, k, v, attention out, gate, up, down
    if remat in ("dots", "dots_no_batch"):
        return e + dots
    return e + dots + 2 * e + 3 * f + n * h  # plus norms, activations, attention output


@dataclasses.dataclass
class Estimate:
    device: dict[str, float]  # bytes per device by part
    host: dict[str, float]  # bytes per host by part

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def estimate(config, model_config: ModelConfig, num_devices: int, devices_per_host: int) -> Estimate:
    size = {"float32": 4, "bfloat16": 2}
    fsdp, tensor, data = config.mesh.fsdp, config.mesh.tensor, config.mesh.data
    if fsdp == -1:
        fsdp = num_devices // (tensor * data)
    shards = fsdp * tensor
    n, layer = parameter_count(model_config)
    p, s, cmp = size[config.model.param_dtype], size[config.optim.state_dtype], size[config.model.compute_dtype]
    rows, t = config.data.micro_batch_rows, config.data.max_seq_len
    tokens = rows * t
    optimizer = n * (s + p) / shards
    offload = config.optim.offload_state
    device = {
        "params": n * p / shards,
        "grads": n * 4 / shards,
        "optimizer": optimizer if not offload else optimizer / 2,
        "layer_copy": 2 * layer * cmp / tensor,
        "activations": model_config.num_layers * tokens * activation_width(model_config, config.model.remat) * cmp,
        "logits": rows * loss_chunk(rows, t, model_config.vocab_size, 1) * model_config.vocab_size * 4 * 3 / tensor,
    }
    host = {"optimizer": optimizer * devices_per_host} if offload else {}
    return Estimate(device, host)


def report(est: Estimate, device_bytes: float | None, host_bytes: float | None) -> tuple[bool, str]:
    lines = ["per device:"]
    lines += [f"  {k:12s} {v / GiB:8.2f} GiB" for k, v in est.device.items()]
    lines.append(f"  {'total':12s} {est.device_total / GiB:8.2f} GiB")
    if est.host:
        lines.append(f"per host: optimizer state {est.host_total / GiB:.2f} GiB (offloaded)")
    device_fits = host_fits = True
    if device_bytes:
        budget = HEADROOM * device_bytes
        device_fits = est.device_total <= budget
        lines.append(f"device memory {device_bytes / GiB:.1f} GiB: " + (
            "fits" if device_fits else
            f"does NOT fit ({est.device_total / GiB:.1f} > {budget / GiB:.1f} GiB usable)"))
    if host_bytes and est.host_total > 0.8 * host_bytes:
        host_fits = False
        lines.append(f"host memory {host_bytes / GiB:.1f} GiB: offloaded state does NOT fit; "
                     "to fit, use more hosts (mesh.fsdp) or optim.state_dtype='bfloat16'")
    if not device_fits:
        biggest = max(est.device, key=est.device.get)
        advice = {
            "activations": "set model.remat='full' or lower data.micro_batch_rows",
            "optimizer": "set optim.offload_state=True, or use more devices (mesh.fsdp)",
            "params": "use more devices (mesh.fsdp) or model.param_dtype='bfloat16'",
            "grads": "use more devices (mesh.fsdp)",
            "logits": "lower data.micro_batch_rows or use mesh.tensor > 1",
            "layer_copy": "use mesh.tensor > 1",
        }[biggest]
        lines.append(f"largest part: {biggest}; to fit, {advice}")
    return device_fits and host_fits, "\n".join(lines)


def device_memory_bytes() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def host_memory_bytes() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def check(config, model_config: ModelConfig, device_bytes=None, host_bytes=None) -> tuple[bool, str]:
    est = estimate(config, model_config, jax.device_count(), jax.local_device_count())
    return report(est, device_bytes or device_memory_bytes(), host_bytes or host_memory_bytes())


def main(argv=None):
    from jaxsft.cli import parse_args
    config, extra = parse_args(argv, extra_flags=("device-gib", "host-gib"))
    model_config = ModelConfig.from_json_file(os.path.join(local_dir(config.model.path), "config.json"))
    device_bytes = float(extra["device-gib"]) * GiB if "device-gib" in extra else None
    host_bytes = float(extra["host-gib"]) * GiB if "host-gib" in extra else None
    fits, text = check(config, model_config, device_bytes, host_bytes)
    print(text)
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    main()
