"""jaxsft: supervised fine-tuning of small decoder LLMs in JAX."""

import importlib.util
import os

# transformers warns "PyTorch was not found. Models won't be available" where torch is absent:
# jaxsft uses its tokenizers and configs only, so there is nothing for a user to act on.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _skip_absent_tpu():
    """libtpu (jax[tpu], in the test extra) is probed by every jax process, which on a machine
    without a TPU prints libtpu's initialisation warnings and waits seconds for a metadata server.
    Where no platform was chosen and no accelerator is attached, jax is told to use the CPU.
    (`jaxsft.memory --tpu` still compiles for a TPU: libtpu's compile-only client is separate.)"""
    import jax

    if jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
        return
    try:  # jax's own device probes (private: a jax without them keeps its default)
        from jax._src import hardware_utils as hw
        no_accelerator = (hw.num_available_tpu_chips_and_device_id()[0] == 0 and not hw.has_visible_nvidia_gpu()
                          and hw.num_available_amd_gpus(1) == 0)
    except (ImportError, AttributeError, TypeError):
        return
    if no_accelerator:
        jax.config.update("jax_platforms", "cpu")


_skip_absent_tpu()

from jaxsft.generation import generate  # noqa: E402
from jaxsft.models import CheckpointError, ConfigError, Decoder, ModelConfig, load_model, save_hf  # noqa: E402
from jaxsft.models.gguf import load_gguf_tokenizer  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "Decoder", "ModelConfig", "generate", "load_gguf_tokenizer",
           "load_model", "save_hf"]
