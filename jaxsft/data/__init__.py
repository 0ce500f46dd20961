"""SFT data: sources and formats, chat-template tokenization with assistant-only loss masks,
an on-disk token cache, padding-free packing, and a resumable, multi-host step iterator."""

from jaxsft.data.config import default_data_config, validate_data_config
from jaxsft.data.formats import DataError
from jaxsft.data.pipeline import DataPipeline, Step
from jaxsft.data.chat import prompt_tokens, set_chat_template

__all__ = ["DataError", "DataPipeline", "Step", "default_data_config", "prompt_tokens", "set_chat_template",
           "validate_data_config"]
