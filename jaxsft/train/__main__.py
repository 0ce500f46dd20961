"""python -m jaxsft.train --config configs/NAME.py [--config.section.key=value ...]

Exit status: 0 done, 2 a config or usage mistake, 3 a checkpoint problem, 4 the run diverged,
75 preempted (the step it stopped at is saved: run the same command again), 1 anything else
(with its traceback). See `jaxsft.cli.exit_statuses`.
"""

import ctypes
import glob
import logging
import os
import sys

from jaxsft.cli import exit_statuses, parse_args
from jaxsft.train import run


def keep_freed_memory():
    """Have glibc keep freed memory for reuse instead of returning it to the system. XLA:CPU
    allocates every program's temporaries afresh and frees them after (the demo's logits chunks:
    hundreds of MB per micro-batch); glibc serves blocks over 32 MB with mmap and unmaps them on
    free, so each micro-batch faulted its pages in anew: 2.85M minor page faults and 5.2 s of system
    time per demo step beside 5.2 s of user time (loaded 2-core machine). With one arena, no mmap
    and trimming only of a free top over 2 GiB: 44k faults, 0.11 s; a step took 3.2 s instead of
    10.4. The process keeps its peak memory until it exits, which a training run reaches every step
    anyway. The threshold is glibc's largest positive one (2 GiB), not -1 (never trim): the
    quickstart's heap still returns a free top over 2 GiB at times (18M faults, 36 s of system time
    in 2:58 on a quiet 2-core machine), but with -1 its peak grew from 12.1 to 17.0 GB for 13 s less
    (3:48 instead of 4:01, before the attention and the layers' residuals took less memory).
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl)
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    libc.mallopt(m_arena_max, 1)
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


# Flags of a CPU's bf16 dot-product instructions in /proc/cpuinfo: x86 AVX512-BF16 and AMX, Arm BF16.
BF16_DOT_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}
EIGEN_DOTS = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
# The jaxlib lines known to have that flag (XLA aborts on a flag it does not know).
EIGEN_DOTS_JAXLIB = ((0, 10), (0, 11))


def eigen_dots_without_bf16_instructions(cpuinfo: str = "/proc/cpuinfo"):
    """On a CPU without bf16 dot instructions, have XLA:CPU run matmuls with its Eigen kernels
    instead of YNNPACK's: there YNNPACK's bf16 x bf16 -> float32 matmuls are the slow part of a
    step (81% of its kernel time); a quickstart-shaped bf16 step (benchmarks/cpu_vs_torch.py's)
    took 39.9 and 41.3 s with them and 32.2 and 32.5 s with Eigen's, on a 2-core Zen 3 EPYC (AVX2).
    With AVX512-BF16 YNNPACK's are the fast ones (~9 s), so they stay. Only on a machine with no
    TPU or GPU device (an accelerator's host keeps XLA's defaults) and where the flag is not set
    already; before JAX starts its CPU backend. XLA aborts on a flag it does not know and
    experimental flags come and go: only on the jaxlib lines known to have it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if ("xla_cpu_experimental_ynn_fusion_type" in flags or not os.path.exists(cpuinfo)
            or jaxlib_version()[:2] not in EIGEN_DOTS_JAXLIB):
        return
    with open(cpuinfo) as f:
        features = next((line.split(":", 1)[1].split() for line in f
                         if line.split(":")[0].strip() in ("flags", "Features")), [])
    if BF16_DOT_FLAGS & set(features) or accelerator_present():
        return
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_DOTS}".strip()


def jaxlib_version() -> tuple[int, ...]:
    from jaxlib.version import __version_info__
    return tuple(__version_info__)


def accelerator_present() -> bool:
    """A TPU (/dev/accel*, or /dev/vfio on v5 and newer), NVIDIA or AMD GPU device file."""
    return any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd"))


def main(argv=None):
    keep_freed_memory()
    eigen_dots_without_bf16_instructions()
    # force: importing orbax already configured the root logger (absl), which made this a no-op
    # and hid every INFO line (the data summary, "resumed from step N").
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    logging.getLogger("jaxsft").setLevel(logging.INFO)
    with exit_statuses():
        config, _ = parse_args(argv)
        result = run(config)
    print(summary_line(result))


def summary_line(result: dict) -> str:
    """The run's end in one line: training loss, and held-out loss, GSM8K accuracy and the share of
    GSM8K answers in `#### N` form at their first and last evaluation."""
    parts = [f"{result['steps']} steps", f"training loss {result['loss']:.4g}" if "loss" in result else ""]
    for name, history in (("held-out loss", result["eval_losses"]),
                          ("GSM8K accuracy (flexible-extract)", result["gsm8k_accuracy"]),
                          ("strict-match", result.get("gsm8k_strict_match", [])),
                          ("answers in `#### N` form", result.get("gsm8k_answer_form", []))):
        if history:
            ends = [history[0], history[-1]] if len(history) > 1 else history
            parts.append(f"{name} " + " -> ".join(f"{value:.4g} (step {step})" for step, value in ends))
    if "goodput" in result:
        parts.append(f"goodput {result['goodput']:.0%} ({result['train_time_s']:.0f} s training of "
                     f"{result['wall_time_s']:.0f} s)")
    return "done: " + "; ".join(p for p in parts if p)


if __name__ == "__main__":
    main()
