"""The compiled memory plan and its advisor."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft import memory
from jaxsft.models import ModelConfig
from jaxsft.sharding import make_mesh
from jaxsft.train import default_config
from tests.test_train import CONFIG

LLAMA_8B = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
LLAMA_1B = LLAMA_8B.replace(hidden_size=2048, intermediate_size=8192, num_layers=16, head_dim=64,
                            tie_word_embeddings=True)
TINY = CONFIG.replace(num_layers=8)
# A device this small makes the plan stream one layer per group (3 x 111 kB of state in flight).
SMALL_DEVICE = 1.5 * 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def test_parameter_counts_match_the_published_models():
    assert memory.parameter_count(LLAMA_8B)[0] == 8_030_261_248
    assert memory.parameter_count(LLAMA_1B)[0] == 1_235_814_400


def run_config(**changes):
    c = default_config()
    c.data.max_seq_len = 32
    c.data.micro_batch_rows = 2
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def one_device():
    return make_mesh(devices=jax.devices()[:1])


def test_the_plan_is_the_compiled_programs_own_analysis():
    n = memory.parameter_count(TINY)[0]
    p = memory.plan(run_config(), TINY, one_device())
    assert set(p.programs) == {"accumulate", "update"}
    acc = p.programs["accumulate"]
    # Resident during accumulate besides its arguments: Adam's two float32 moments and counters.
    assert n * 8 <= acc["resident"] <= n * 8 + 64
    # Its arguments: float32 params and accumulator, the micro-batch (5 arrays of 2 x 32).
    assert n * 8 <= acc["argument"] <= n * 8 + 5 * 2 * 32 * 4 + 64
    # The accumulator is donated: its new value reuses the old buffers.
    assert acc["alias"] >= n * 4
    for stats in p.programs.values():
        assert stats["peak"] == stats["argument"] + stats["temp"] + stats["resident"] + max(
            stats["output"] - stats["alias"], 0)
    assert p.device_peak == max(s["peak"] for s in p.programs.values()) and p.host == p.disk == 0


def test_offloaded_tiers_move_the_state_off_the_devices():
    n, layer = memory.parameter_count(TINY)
    none, host, disk = (memory.plan(run_config(**{"optim.offload": tier}), TINY, one_device(), SMALL_DEVICE,
                                    advise=False) for tier in ("none", "host", "disk"))
    assert host.group_layers == disk.group_layers == 1
    assert set(host.programs) == {"accumulate", "update_layers", "update_rest"}
    # Master weights and both moments, float32: 12 bytes per parameter (plus the step counters).
    assert n * 12 <= host.host <= n * 12 + 64 * (TINY.num_layers + 1)
    # Disk: the whole state on disk, in host memory only the two groups in flight (the one read
    # ahead, the one being written back; the other parameters' group is smaller than a layer here).
    assert disk.disk == host.host and 2 * layer * 12 <= disk.host <= 2 * layer * 12 + 64
    assert host.programs["accumulate"]["resident"] == 0
    assert host.device_peak < none.device_peak


def test_a_lora_plan_compiles_the_lora_step():
    """The adapters alone are differentiated and optimized: the base is an argument (no gradient,
    no moments), so the accumulator and Adam's moments are the adapters' size."""
    from jaxsft.models import lora

    n = memory.parameter_count(TINY)[0]
    changes = {"lora.r": 4, "lora.alpha": 8.0, "model.param_dtype": "bfloat16"}
    adapters = lora.lora_param_count(TINY, run_config(**changes).lora)
    full, adapted = (memory.plan(run_config(**c), TINY, one_device(), advise=False) for c in ({}, changes))
    acc = adapted.programs["accumulate"]
    assert adapters * 8 <= acc["resident"] <= adapters * 8 + 64  # Adam's moments of the adapters
    # Arguments: the bf16 base, the float32 adapters and their accumulator, the micro-batch.
    assert n * 2 + adapters * 8 <= acc["argument"] <= n * 2 + adapters * 8 + 5 * 2 * 32 * 4 + 64
    assert adapted.device_peak < full.device_peak  # at this tiny shape activations dominate both


@pytest.mark.slow
def test_mesh_minus_one_is_resolved_against_the_device_count():
    """#14: mesh.tensor=-1 once gave negative shard counts."""
    auto = memory.plan(run_config(**{"mesh.fsdp": 1, "mesh.tensor": -1}), TINY)
    explicit = memory.plan(run_config(**{"mesh.fsdp": 1, "mesh.tensor": 8}), TINY)
    assert auto.device_peak == explicit.device_peak > 0
    one = memory.plan(run_config(**{"mesh.fsdp": -1}), TINY, one_device())
    eight = memory.plan(run_config(**{"mesh.fsdp": -1}), TINY)
    assert eight.programs["update"]["argument"] < one.programs["update"]["argument"] / 4


@pytest.mark.slow
def test_the_advisor_names_a_change_that_fits_and_never_bf16_master_weights():
    c = run_config()
    none = memory.plan(c, TINY, one_device(), SMALL_DEVICE, advise=False)
    host = memory.plan(run_config(**{"optim.offload": "host"}), TINY, one_device(), SMALL_DEVICE, advise=False)
    # A device between the two: offloading the state is the cheapest change that fits.
    device = (none.device_peak + host.device_peak) / 2 / memory.HEADROOM
    p = memory.plan(c, TINY, one_device(), device_bytes=device, host_bytes=64 * GiB)
    assert not p.fits and "to fit, set optim.offload='host'" in p.report
    # Nothing fits a device this small: the advice is more devices or LoRA, never bf16 masters.
    p = memory.plan(c, TINY, one_device(), device_bytes=1024, host_bytes=64 * GiB)
    assert not p.fits and "mesh.fsdp" in p.advice and "lora.r" in p.advice
    for text, changes in memory.candidates(c):
        assert "param_dtype" not in changes and "bfloat16" not in text


@pytest.mark.slow
def test_memory_cli_refuses_and_advises(tmp_path):
    import transformers as tf

    tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2,
                   architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    cmd = [sys.executable, "-m", "jaxsft.memory", "--config", f"{REPO}/configs/demo.py",
           f"--config.model.path={tmp_path}", "--config.data.max_seq_len=32", "--devices", "1",
           "--host-gib", "64"]
    env = {**os.environ, "XLA_FLAGS": ""}
    r = subprocess.run(cmd + ["--device-gib", "0.000001"], capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "does NOT fit" in r.stdout and "bfloat16" not in r.stdout
    r = subprocess.run(cmd + ["--device-gib", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fits" in r.stdout and "compiled memory plan" in r.stdout


# Three runs whose peaks have different causes, at a size where the run's arrays dwarf the process
# (~60 M parameters): full fine-tuning without remat (fp32 state and activations), LoRA on a bf16
# base (activations), and the host tier (the whole state in host memory beside the device's).
PEAK_MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=512, intermediate_size=1536,
                         num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, attention="xla")
PEAK_RUNS = {
    "full-remat-none": {"model.remat": "none", "model.compute_dtype": "float32"},
    "lora-bf16-base": {"model.remat": "none", "model.param_dtype": "bfloat16", "lora.r": 16, "lora.alpha": 32.0,
                       "data.micro_batch_rows": 4},
    "host-offload": {"optim.offload": "host"},
}


def peak_run(name: str):
    """Child process of the plan-vs-measured test: the plan of run `name`, then the run itself,
    built as `jaxsft.train.setup` builds it, for two steps (accumulate + update). Prints the
    predicted and the measured peak as JSON.

    Measured = the process's peak resident memory during the second step (VmHWM, reset just
    before it) minus its baseline: the resident memory after the first step less the bytes of the
    arrays alive then. The baseline is what is not the run's arrays (Python, jax, the compiled
    executables); the first step compiles, so no compiler memory is in the measured step. The
    parent sets MALLOC_MMAP_THRESHOLD_ so that every freed buffer goes back to the system and the
    resident memory follows the live arrays."""
    import ctypes
    import json

    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxsft.models import lora, peft_io
    from jaxsft.models.loading import random_model
    from jaxsft.sharding import optimizer_shardings, param_shardings
    from jaxsft.train.offload import Offloaded
    from jaxsft.train.optimizer import make_optimizer
    from jaxsft.train.step import make_train_step

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    c = run_config(**{"data.max_seq_len": 128, **PEAK_RUNS[name]})
    m = c.model
    model_config = PEAK_MODEL.replace(remat=m.remat)
    mesh = one_device()
    with jax.set_mesh(mesh):
        # A 1 GiB device makes the host tier stream groups of 2 layers (not all 8 at once).
        plan = memory.plan(c, model_config, mesh, device_bytes=GiB, advise=False)
        model = random_model(model_config, jnp.dtype(m.param_dtype), jnp.dtype(m.compute_dtype), mesh)
        frozen = None
        if c.lora.r:
            graphdef, params, frozen = nnx.split(peft_io.add_adapters(model, c.lora, 0, mesh), lora.LoraParam, nnx.Param)
        else:
            graphdef, params = nnx.split(model, nnx.Param)
        del model
        tx, schedule = make_optimizer(c.optim, 10)
        shardings = param_shardings(params, mesh)
        opt_sharding = optimizer_shardings(tx, params, shardings, mesh)
        if c.optim.offload == "none":
            opt_state, offload = jax.jit(tx.init, out_shardings=opt_sharding)(params), None
        else:
            offload = opt_state = Offloaded(c.optim.offload, "", params, shardings, c.optim, schedule,
                                            m.compute_dtype, model_config.num_layers, plan.group_layers)
            params = offload.init(params)
        batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
        fns = make_train_step(graphdef, tx, schedule, shardings, opt_sharding, batch_sharding, offload=offload,
                              frozen=frozen, frozen_sharding=None if frozen is None else param_shardings(frozen, mesh))
        rows, seq = c.data.micro_batch_rows, c.data.max_seq_len
        rng = np.random.RandomState(0)
        batch = {"input_ids": rng.randint(0, PEAK_MODEL.vocab_size, (rows, seq), dtype=np.int32),
                 "targets": rng.randint(0, PEAK_MODEL.vocab_size, (rows, seq), dtype=np.int32),
                 "loss_mask": np.ones((rows, seq), np.float32), "segment_ids": np.ones((rows, seq), np.int32),
                 "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1))}

        def step(params, opt_state, i):
            acc = fns.zero_accumulator(params)
            acc = fns.accumulate(acc, params, jax.device_put(batch, batch_sharding))
            params, opt_state, _ = fns.update(params, opt_state, acc, jnp.int32(rows * seq), jnp.int32(i))
            return jax.block_until_ready((params, opt_state))
        params, opt_state = step(params, opt_state, 0)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        baseline = status("VmRSS") - sum(x.nbytes for x in jax.live_arrays())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident memory
        step(params, opt_state, 1)
        measured = status("VmHWM") - baseline
    # On CPU the devices' memory is host memory: the host tier's state adds to the device peak.
    predicted = plan.device_peak + (plan.host if c.optim.offload == "host" else 0)
    print(json.dumps({"predicted": predicted, "measured": measured, "peak_program": plan.peak_program,
                      "group_layers": plan.group_layers}))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEAK_RUNS))
def test_the_plan_predicts_the_measured_peak_within_10_percent(name):
    import json

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", f"from tests.test_memory import peak_run; peak_run({name!r})"],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(name, m)
    assert m["predicted"] > 500 * 2**20  # the run's arrays, not the process, make the peak
    assert abs(m["measured"] - m["predicted"]) <= 0.1 * m["predicted"], m


def test_loss_chunks_keep_logits_under_256mib_per_device():
    from jaxsft.train.loss import loss_chunk

    assert loss_chunk(1, 4096, 128256, devices=1) == 512  # 512 x 128256 x 4 B = 251 MiB
    assert loss_chunk(16, 512, 151936, devices=8) == 128  # 8 simulated CPU devices, demo shapes
    assert loss_chunk(2, 64, 160, devices=1) == 64  # small logits: one chunk
    assert loss_chunk(64, 37, 128256, devices=1) == 5  # odd lengths: 37 -> 19 -> 10 -> 5, padded to 40
