# `setup` is not re-exported here: its name would hide the module `jaxsft.train.setup`.
from jaxsft.train.config import default_config, validate
from jaxsft.train.hooks import Eval, register_eval
from jaxsft.train.loop import finish, run, train
from jaxsft.train.setup import Run
