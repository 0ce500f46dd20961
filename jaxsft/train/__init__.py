from jaxsft.train.config import default_config, validate
from jaxsft.train.loop import run
