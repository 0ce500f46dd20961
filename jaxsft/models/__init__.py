from jaxsft.models.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from jaxsft.models.decoder import Decoder
from jaxsft.models.hf_io import CheckpointError, save_hf
from jaxsft.models.loading import load_model, load_model_config, load_tokenizer
