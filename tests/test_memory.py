"""The compiled memory plan and its advisor."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsft import memory
from jaxsft.models import ModelConfig, load_model_config
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
ASSETS_DIR = pathlib.Path(REPO) / "configs" / "assets"
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
    # The loop's programs: the accumulator is made once, then accumulated into, used by the update
    # and cleared in place for the next step.
    assert set(p.programs) == {"zero_accumulator", "accumulate", "update", "clear_accumulator"}
    assert p.programs["clear_accumulator"]["alias"] >= n * 4 and p.programs["clear_accumulator"]["temp"] == 0
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
    assert set(host.programs) == {"zero_accumulator", "accumulate", "update_layers", "update_rest", "clear_accumulator"}
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


def test_a_lora_step_reads_its_bf16_base_without_a_float32_copy():
    # XLA:CPU slices a bf16 stack in a loop by converting all of it to float32 first: the layer
    # scan over a bf16 base made a float32 copy of every stacked base weight in each accumulate.
    from jaxsft.train.build import abstract_batch, abstract_model, build

    config = run_config(**{"lora.r": 4, "lora.alpha": 8.0, "model.param_dtype": "bfloat16"})
    model_config = TINY.replace(num_layers=3)  # no activation here is shaped like a stacked weight
    run = build(config, abstract_model(config, model_config, memory.lora_spec(config, model_config)), one_device(),
                total_steps=10, group_layers=1, abstract=True)
    acc = jax.eval_shape(run.fns.zero_accumulator, run.params, jax.ShapeDtypeStruct((), np.int32))
    batch = abstract_batch(config, one_device(), run.batch_sharding)
    compiled = memory._lower(run.fns.accumulate, acc, run.params, batch).compile().as_text()
    stacked = jax.tree.leaves(run.frozen["layers"])
    assert len(stacked) == 9 and all(w.dtype == np.dtype("bfloat16") for w in stacked)
    for w in stacked:
        assert f"bf16[{','.join(map(str, w.shape))}]" in compiled  # the check sees the base's shapes
        assert f"f32[{','.join(map(str, w.shape))}]" not in compiled, w.shape


# Activations make the peak at this shape (bf16 compute, the run_config default).
AUTO_RUN = {"data.max_seq_len": 128, "data.micro_batch_rows": 4}


def auto_plan(mesh, device_bytes):
    return memory.plan(run_config(**AUTO_RUN, **{"model.remat": "auto"}), TINY, mesh, device_bytes=device_bytes,
                       host_bytes=64 * GiB)


def test_bf16_dot_policies_save_the_matmuls_and_auto_remat_picks_the_least_recomputation_that_fits():
    peaks = {remat: memory.plan(run_config(**AUTO_RUN, **{"model.remat": remat}), TINY, one_device(),
                                advise=False).device_peak for remat in ("none", "dots", "dots_no_batch", "full")}
    # bf16 matmuls run behind a custom VJP, which hid them from the dot policies ('dots' saved what
    # 'full' saves); their named results are saved. Measured: 11.6, 7.6, 7.5, 5.5 MB ('none' was
    # 33.1 before the attention kept only its log-sum-exp instead of every score and probability).
    assert peaks["none"] > peaks["dots"] > peaks["dots_no_batch"] > peaks["full"], peaks
    rooms = {"none": 1.01 * peaks["none"], "dots": (peaks["none"] + peaks["dots"]) / 2,
             "full": (peaks["dots"] + peaks["full"]) / 2}
    for expected, room in rooms.items():
        p = auto_plan(one_device(), room / memory.HEADROOM)
        assert p.fits and p.remat == expected and p.device_peak == peaks[expected], (expected, p.report)
    assert re.search(r"model.remat='auto': 'dots', the least recomputation that fits \('none' needs 0.01 GiB\)",
                     auto_plan(one_device(), rooms["dots"] / memory.HEADROOM).report)
    p = auto_plan(one_device(), peaks["full"] / 2)
    assert not p.fits and p.remat == "full" and "'full', nothing fits ('none' needs" in p.report and p.advice


def test_auto_remat_on_a_tpu_chip_compiled_by_xla_tpu():
    mesh = make_mesh(fsdp=1, devices=memory.tpu_devices("v5e:1x1"))
    run = {"data.max_seq_len": 512, "data.micro_batch_rows": 32}
    with jax.set_mesh(mesh):
        peaks = {remat: memory.plan(run_config(**run, **{"model.remat": remat}), TINY, mesh, device_bytes=16 * GiB,
                                    advise=False) for remat in memory.REMAT_AUTO}
        # XLA:TPU's figures (the accumulation's peak): 'none' 637 MB, 'dots' 421 MB, 'full' 287 MB.
        assert peaks["none"].device_peak > peaks["dots"].device_peak > peaks["full"].device_peak, \
            {k: (p.device_peak, p.peak_program) for k, p in peaks.items()}
        for expected, room in (("none", 16 * GiB), ("dots", 0.55e9), ("full", 0.4e9)):
            p = memory.plan(run_config(**run, **{"model.remat": "auto"}), TINY, mesh, device_bytes=room)
            assert p.fits and p.remat == expected and p.device_peak == peaks[expected].device_peak, p.report


def auto_remat_run(directory: str):
    """Child process of the setup test (one CPU device: the run's arrays are on every simulated
    device): the demo model with model.remat='auto' on a device sized between the plans of 'none'
    and 'dots', through `setup` and 2 steps of `train`; prints what was chosen, logged and run."""
    import logging

    from jaxsft.train.loop import train
    from jaxsft.train.setup import setup
    from tests.test_checkpoint import small_run_config

    c = small_run_config(pathlib.Path(directory), **{"model.remat": "auto", "model.compute_dtype": "bfloat16",
                                                     "data.max_seq_len": 64})
    peaks = {remat: memory.plan(memory.changed_config(c, {"model.remat": remat}), load_model_config(c.model.path),
                                advise=False).device_peak for remat in ("none", "dots")}
    memory.device_memory_bytes = lambda: (peaks["none"] + peaks["dots"]) / 2 / memory.HEADROOM
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("jaxsft.train").addHandler(handler)
    logging.getLogger("jaxsft.train").setLevel(logging.INFO)
    run = setup(c)
    train(run)
    run.checkpointer.close()
    run.data.close()
    losses = [json.loads(line)["loss"] for line in (pathlib.Path(c.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"peaks": peaks, "plan": run.plan.remat, "config": run.config.model.remat,
                      "model": run.model_config.remat, "logged": [m for m in logged if "model.remat" in m],
                      "losses": losses}))


@pytest.mark.slow
def test_setup_runs_with_the_remat_auto_chose_and_logs_it(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run([sys.executable, "-c", f"from tests.test_memory import auto_remat_run; auto_remat_run({str(tmp_path)!r})"],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["peaks"]["none"] > m["peaks"]["dots"], m
    assert m["plan"] == m["config"] == m["model"] == "dots", m
    assert len(m["logged"]) == 1 and m["logged"][0].startswith(
        "model.remat='auto': 'dots', the least recomputation that fits ('none' needs"), m
    assert len(m["losses"]) == 2 and all(np.isfinite(m["losses"])), m


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


# Four runs whose peaks have different causes, at a size where the run's arrays dwarf the process
# (~58 M parameters, most in the tied 152k embedding): full fine-tuning without remat (fp32 state and
# activations), LoRA on a bf16 base (activations), the host tier (the whole state in host memory
# beside the device's) and the disk tier (the state on disk, two groups in host memory).
PEAK_MODEL = {**json.loads((ASSETS_DIR / "tiny-qwen2" / "config.json").read_text()),
              "hidden_size": 320, "intermediate_size": 960, "num_hidden_layers": 8, "num_attention_heads": 5,
              "num_key_value_heads": 1}
PEAK_RUNS = {
    "none": {"model.remat": "none", "model.compute_dtype": "float32", "data.micro_batch_rows": 1},
    "lora": {"model.remat": "none", "model.param_dtype": "bfloat16", "lora.r": 16, "lora.alpha": 32.0},
    "host": {"optim.offload": "host", "data.micro_batch_rows": 1},
    "disk": {"optim.offload": "disk", "data.micro_batch_rows": 1},
}


def peak_run(name: str, directory: str):
    """Child process of the loop's memory test: run `name` through `setup` and `train` for 4 steps;
    print as JSON the plan `setup` made, the peak it measured, and the live arrays' bytes at the
    entry and exit of every call of the step's functions.

    Measured = the process's peak resident memory during steps 2-4 (VmHWM, reset when step 1 has
    finished) minus its baseline: the resident memory then less the bytes of the arrays alive. The
    baseline is what is not the run's arrays (Python, jax, the compiled executables, the data
    pipeline); step 1 compiles, so no compiler memory is in the measured steps. The parent sets
    MALLOC_MMAP_THRESHOLD_ so that every freed buffer goes back to the system and the resident
    memory follows the live arrays.

    Live bytes: beyond those alive after `setup` (params, state) and the call's micro-batch."""
    import ctypes
    import dataclasses
    import functools
    import gc
    import shutil

    from jaxsft.train.loop import train
    from jaxsft.train.setup import setup
    from tests.test_checkpoint import small_run_config

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def live_bytes():
        return sum(x.nbytes for x in jax.live_arrays())

    tmp = pathlib.Path(directory)
    shutil.copytree(ASSETS_DIR / "tiny-qwen2", tmp / "model")
    (tmp / "model" / "config.json").write_text(json.dumps(PEAK_MODEL))
    c = small_run_config(tmp, **{"train.num_steps": 4, "model.path": str(tmp / "model"), **PEAK_RUNS[name]})
    run = setup(c)
    gc.collect()
    after_setup = live_bytes()
    seen, step, baseline = [], [0], []  # seen: [function, step, bytes]

    def watch(name, fn):
        @functools.wraps(fn)
        def watched(*args):
            batch = sum(x.nbytes for x in jax.tree.leaves(args[-1])) if name == "accumulate" else 0
            seen.append((name, step[0], live_bytes() - after_setup - batch))
            out = fn(*args)
            seen.append((name, step[0], live_bytes() - after_setup - batch))
            if name == "clear_accumulator":
                step[0] += 1
                if step[0] == 1:  # step 1 is done: the baseline, and VmHWM from here on
                    jax.block_until_ready(out)
                    ctypes.CDLL("libc.so.6").malloc_trim(0)
                    baseline.append(status("VmRSS") - live_bytes())
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")  # resets VmHWM to the current resident memory
            return out
        return watched
    run.fns = dataclasses.replace(run.fns, **{
        name: watch(name, getattr(run.fns, name)) for name in ("zero_accumulator", "accumulate", "clear_accumulator")})
    run.state.update = watch("update", run.state.update)  # the optimizer state's, whatever its tier
    train(run)
    jax.block_until_ready(run.params)
    measured = status("VmHWM") - baseline[0]
    run.checkpointer.close()
    run.data.close()
    # On CPU the devices' memory is host memory: the plan's peak there adds the host tier's state,
    # or the arrays a disk update is copying between its store and the devices.
    predicted = run.plan.one_memory
    tree = sum(4 * x.size for x in jax.tree.leaves(run.params))  # the float32 gradients of what trains
    print(json.dumps({"predicted": predicted, "device": run.plan.device_peak, "host": run.plan.host, "measured": measured,
                      "peak_program": run.plan.peak_program,
                      "group_layers": run.plan.group_layers, "tree": tree, "seen": seen}))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEAK_RUNS))
def test_the_loop_holds_one_gradient_tree_and_its_plan_predicts_its_peak(name, tmp_path):
    """#24, through `setup` and `train` themselves (4 steps of several micro-batches):
    - the live arrays at the entry and exit of every call of the step's functions are the run's
      params and state (as after `setup`), one accumulator and the call's micro-batch: a step's
      accumulator is the previous one's, zeroed in place, never a second tree;
    - the plan `setup` checked the run against predicts its peak memory within 10%."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", f"from tests.test_memory import peak_run; peak_run({name!r}, {str(tmp_path)!r})"],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    tree, seen = m.pop("tree"), m.pop("seen")
    print(name, m, "gradient tree", tree)
    assert {s for _, s, _ in seen} == {0, 1, 2, 3} and sum(n == "accumulate" for n, _, _ in seen) >= 4 * 2
    # One accumulator (and its loss sum, dropout key and a step's metrics: < 1 KiB) beyond the run's
    # own arrays at every boundary, and no step holds more than the first did.
    assert tree > 2**16 and max(b for _, _, b in seen) <= tree + 1024, seen
    first = max(b for _, s, b in seen if s == 0)
    assert all(b <= first + 1024 for _, _, b in seen), seen
    assert m["predicted"] > 500 * 2**20  # the run's arrays, not the process, make the peak
    assert abs(m["measured"] - m["predicted"]) <= 0.1 * m["predicted"], m


def test_loss_chunks_keep_logits_under_256mib_per_device():
    from jaxsft.train.loss import loss_chunk

    assert loss_chunk(1, 4096, 128256, devices=1) == 512  # 512 x 128256 x 4 B = 251 MiB
    assert loss_chunk(16, 512, 151936, devices=8) == 128  # 8 simulated CPU devices, demo shapes
    assert loss_chunk(2, 64, 160, devices=1) == 64  # small logits: one chunk
    assert loss_chunk(64, 37, 128256, devices=1) == 5  # odd lengths: 37 -> 19 -> 10 -> 5, padded to 40
