"""Exit statuses of `python -m jaxsft.train` and `python -m jaxsft.sweep`: one line and status 2 for
config and usage mistakes, 3 for checkpoint problems, 4 for a diverged run; anything else is a bug
or a failing environment and keeps its traceback (status 1)."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxsft.checkpoint import CheckpointCorrupt, CheckpointMismatch, Checkpointer
from jaxsft.cli import CHECKPOINT, DIVERGED, USAGE, UsageError, exit_statuses
from jaxsft.data import DataError
from jaxsft.metrics.health import TrainingDiverged
from jaxsft.models import CheckpointError, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "XLA_FLAGS": ""}


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, env=ENV)


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("error, status, line", [
    (UsageError("give exactly one --config"), USAGE, "error: give exactly one --config"),
    (ConfigError("optim.schedule='linear': choose one of constant"), USAGE, "error: optim.schedule='linear'"),
    (DataError("d.jsonl", None, "bad JSON", "bad_json"), USAGE, "error: d.jsonl"),
    (CheckpointCorrupt("no usable checkpoint in /c"), CHECKPOINT, "checkpoint error: no usable checkpoint in /c"),
    (CheckpointMismatch("embed: checkpoint (1, 2), run (1, 3)"), CHECKPOINT, "checkpoint error: embed"),
    (CheckpointError("/m: missing tensors"), CHECKPOINT, "checkpoint error: /m: missing tensors"),
    (TrainingDiverged("step 7: loss is nan"), DIVERGED, "training diverged: step 7: loss is nan"),
])
def test_errors_a_user_acts_on_are_one_line_with_their_status(error, status, line, capsys):
    with pytest.raises(SystemExit) as e, exit_statuses():
        raise error
    assert e.value.code == status
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1


def test_other_errors_keep_their_traceback():
    # A JAX shape error, and a ValueError that is no config mistake, raise on unchanged (status 1).
    with pytest.raises(TypeError, match="dot_general"), exit_statuses():
        jnp.dot(jnp.ones((2, 3)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="internal"), exit_statuses():
        raise ValueError("internal")


def test_config_mistakes_exit_2():
    r = cli("jaxsft.train", "--config", "configs/demo.py", "--config.optim.learning_rat=1e-4")
    assert r.returncode == USAGE and "Traceback" not in r.stderr
    assert last_line(r.stderr).startswith("error: unknown config key --config.optim.learning_rat; "
                                          "did you mean --config.optim.learning_rate")
    r = cli("jaxsft.train", "--config", "configs/demo.py", "--config.train.num_steps=-1")
    assert r.returncode == USAGE and last_line(r.stderr) == "error: set train.num_steps > 0 or train.num_epochs > 0"
    # A model that cannot be found, as a GGUF path or a Hub id (offline here): one line, what to run.
    r = cli("jaxsft.train", "--config", "configs/demo.py", "--config.model.path=/no/such.gguf")
    assert r.returncode == USAGE and last_line(r.stderr).startswith("error: /no/such.gguf: no such GGUF file")
    r = cli("jaxsft.train", "--config", "configs/demo.py", "--config.model.path=nobody/no-model",
            "--config.model.init=pretrained")
    assert r.returncode == USAGE and "Traceback" not in r.stderr and "run `hf download nobody/no-model" in r.stderr
    r = cli("jaxsft.sweep", "--config", "configs/sweep_gsm8k.py", "--config.action=prune")
    assert r.returncode == USAGE and last_line(r.stderr) == "error: action='prune': choose one of stop, flag"
    assert "Traceback" not in r.stderr


def test_a_list_of_lora_targets_on_the_command_line_is_a_list():
    from jaxsft.cli import parse_args
    from jaxsft.train.config import validate

    config, _ = parse_args(["--config", "configs/demo.py", "--config.lora.r=4",
                            "--config.lora.target_modules=['q_proj', 'v_proj']"])
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    validate(config)
    config, _ = parse_args(["--config", "configs/demo.py", "--config.lora.target_modules=[qv]_proj"])
    assert config.lora.target_modules == "[qv]_proj"  # a regex stays a string
    with pytest.raises(UsageError, match="--config.data.tokenizer=\\['a'\\]"):
        parse_args(["--config", "configs/demo.py", "--config.data.tokenizer=['a']"])  # takes one path


@pytest.mark.slow
def test_corrupt_checkpoint_exits_3(tmp_path):
    # A checkpoint directory whose only step has an unreadable metadata file.
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, {"w": jnp.ones((2,))}, {"m": jnp.zeros((2,))}, {"step": 1, "data": {}})
    ckpt.close()
    (tmp_path / "ckpt" / "1" / "params" / "_METADATA").write_text("{not json")
    train = tmp_path / "train.jsonl"
    with open(os.path.join(REPO, "configs", "assets", "gsm8k", "train.jsonl")) as f:
        train.write_text("".join(f.readlines()[:8]))
    r = cli("jaxsft.train", "--config", "configs/demo.py", f"--config.checkpoint.dir={tmp_path / 'ckpt'}",
            f"--config.data.sources=[{{'path': '{train}', 'format': 'gsm8k'}}]", "--config.data.eval_sources=[]",
            "--config.data.max_seq_len=64", "--config.data.global_batch_size=2", "--config.train.num_steps=1",
            f"--config.data.cache_dir={tmp_path / 'cache'}", f"--config.train.output_dir={tmp_path / 'run'}",
            "--config.train.progress=False")
    assert r.returncode == CHECKPOINT, r.stderr[-3000:]
    assert last_line(r.stderr).startswith(f"checkpoint error: no usable checkpoint in {tmp_path / 'ckpt'}")
    assert "Traceback" not in r.stderr


def test_a_missing_gsm8k_file_is_a_config_mistake_found_before_the_model_loads(tmp_path):
    from jaxsft.cli import parse_args
    from jaxsft.train import validate

    config, _ = parse_args(["--config", "configs/demo.py", f"--config.gsm8k.file={tmp_path / 'test.jsonl'}"])
    with pytest.raises(ConfigError, match=r"gsm8k.file='.*test.jsonl': no such file"):
        validate(config)
    (tmp_path / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    validate(config)


@pytest.mark.parametrize("override, message", [
    ("lm_eval.limit=-1", "lm_eval.limit=-1 must be >= 0 (0 = all)"),
    ("lm_eval.num_fewshot=-2", "lm_eval.num_fewshot=-2 must be >= 0, or -1 (each task's default)"),
    ("lm_eval.batch_size=0", "lm_eval.batch_size=0 must be >= 1"),
    ("lm_eval.include_path=/no/such/folder", "lm_eval.include_path='/no/such/folder': no such folder"),
])
def test_lm_eval_settings_are_validated(override, message):
    from jaxsft.cli import parse_args
    from jaxsft.train import validate

    config, _ = parse_args(["--config", "configs/demo.py", f"--config.{override}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(config)


KEEP_FREED = """
import json, resource, sys
import numpy as np
from jaxsft.train.__main__ import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
system_s = []
for size, repeats in ((2**26, 8), (2**27 + 2**25, 4)):  # 512 MB; 1.3 GB, under the trim threshold
    np.ones(size)  # freed at once: the next ones reuse it, or map and zero it afresh
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for _ in range(repeats):
        np.ones(size)
    system_s.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - before)
print(json.dumps(system_s))
"""


def test_the_train_cli_keeps_freed_memory_for_reuse():
    # The train step's temporaries are freed and allocated again every micro-batch; glibc's
    # default unmaps large blocks on free, so the kernel mapped and zeroed them again each time.
    system_s = {mode: json.loads(subprocess.run([sys.executable, "-c", KEEP_FREED, mode], capture_output=True,
                                                text=True, check=True, cwd=REPO).stdout)
                for mode in ("default", "keep")}
    for default, keep in zip(system_s["default"], system_s["keep"]):
        assert default > 0.1 and keep < default / 5, system_s


EIGEN_DOTS_CHECK = """
import os, sys
from jaxsft.train import __main__ as cli
cli.accelerator_present = lambda: sys.argv[2] == "accelerator"
if sys.argv[3] != "this":
    cli.jaxlib_version = lambda: tuple(map(int, sys.argv[3].split(".")))
cli.eigen_dots_without_bf16_instructions(sys.argv[1])
import jax, jax.numpy as jnp
dot = jax.jit(lambda a, b: jnp.einsum("ij,jk->ik", a, b, preferred_element_type=jnp.float32))
a = jnp.ones((64, 128), jnp.bfloat16)
print(os.environ.get("XLA_FLAGS", ""), "|", "ynn" in dot.lower(a, a.T).compile().as_text())
"""


@pytest.mark.parametrize("flags, accelerator, jaxlib, eigen", [
    ("fpu sse avx2 fma", "none", "this", True),  # Zen 3: YNNPACK's emulated bf16 dots are the slow part
    ("fpu sse avx2 avx512f avx512_bf16", "none", "this", False),  # Zen 4: YNNPACK's are the fast ones
    ("fpu sse avx2 fma", "accelerator", "this", False),  # a TPU or GPU host keeps XLA's defaults
    ("fpu sse avx2 fma", "none", "0.12.0", False),  # XLA aborts on flags it does not know: not set
])
def test_the_train_cli_runs_cpu_matmuls_with_eigen_without_bf16_instructions(tmp_path, flags, accelerator, jaxlib,
                                                                              eigen):
    # Set in the CLI's main after jax is imported, before its CPU backend starts: it takes effect.
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    out = subprocess.run([sys.executable, "-c", EIGEN_DOTS_CHECK, str(cpuinfo), accelerator, jaxlib],
                         capture_output=True, text=True, check=True, cwd=REPO, env=ENV).stdout
    xla_flags, ynn = (part.strip() for part in out.split("|"))
    from jaxsft.train.__main__ import EIGEN_DOTS_JAXLIB, jaxlib_version
    eigen = eigen and (jaxlib != "this" or jaxlib_version()[:2] in EIGEN_DOTS_JAXLIB)
    assert (xla_flags == "--xla_cpu_experimental_ynn_fusion_type=-individual_dot") == eigen, out
    if eigen:
        assert ynn == "False", out  # the compiled bf16 matmul is Eigen's, not YNNPACK's
