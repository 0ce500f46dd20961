from jaxsft.train.config import default_config, validate
from jaxsft.train.hooks import Eval, register_eval
from jaxsft.train.loop import finish, run, train
from jaxsft.train.setup import Run, setup
