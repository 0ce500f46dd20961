from jaxsft.models.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from jaxsft.models.decoder import Decoder
from jaxsft.models.hf_io import CheckpointError, load_model, save_hf
