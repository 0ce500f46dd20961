"""jaxsft: supervised fine-tuning of small decoder LLMs in JAX."""

from jaxsft.generation import generate
from jaxsft.models import CheckpointError, ConfigError, Decoder, ModelConfig, load_model, save_hf
from jaxsft.models.gguf import load_gguf_tokenizer

__all__ = ["CheckpointError", "ConfigError", "Decoder", "ModelConfig", "generate", "load_gguf_tokenizer",
           "load_model", "save_hf"]
