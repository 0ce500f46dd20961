"""jaxsft: supervised fine-tuning of small decoder LLMs in JAX."""

from jaxsft.models import CheckpointError, ConfigError, Decoder, ModelConfig, load_model, save_hf

__all__ = ["CheckpointError", "ConfigError", "Decoder", "ModelConfig", "load_model", "save_hf"]
