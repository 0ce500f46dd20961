"""jaxsft: supervised fine-tuning of small decoder LLMs in JAX."""

from jaxsft.models import CheckpointError, ConfigError, Decoder, ModelConfig, load_model, save_hf
from jaxsft.models.gguf import load_gguf_tokenizer

# Bound after the import of the submodule of the same name: `jaxsft.generate` is the function.
from jaxsft.generate import generate  # noqa: E402  isort: skip

__all__ = ["CheckpointError", "ConfigError", "Decoder", "ModelConfig", "generate", "load_gguf_tokenizer",
           "load_model", "save_hf"]
