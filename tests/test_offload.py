"""The optimizer's memory tiers: `host` and `disk` train bitwise like `none`, and resume each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxsft.checkpoint import flatten
from jaxsft.models import Decoder
from jaxsft.sharding import make_mesh
from jaxsft.train import default_config
from jaxsft.train.build import build as build_run
from tests.test_train import CONFIG, optim_config, packed_rows, split_rows

MODEL = CONFIG.replace(num_layers=4)


def build(tier, mesh, directory, compute_dtype=jnp.float32, group_layers=2, total_steps=10, model_config=MODEL):
    """A run's step functions, params and optimizer state from the product's builder
    (`jaxsft.train.build`), as `setup` makes them, the state started from the model's weights."""
    config = default_config()
    config.optim = optim_config(offload=tier, offload_dir=str(directory) if directory else "")
    config.model.compute_dtype = jnp.dtype(compute_dtype).name
    model = Decoder(model_config, param_dtype=jnp.float32, compute_dtype=compute_dtype, rngs=nnx.Rngs(0))
    built = build_run(config, model, mesh, total_steps, group_layers)
    params, _ = built.state.start(None, jax.device_put(built.params, built.param_sharding), resume=False)
    return built.fns, params, built.state, built.batch_sharding


def steps(fns, params, state, sharding, batches, first=0):
    """The loop's steps (`jaxsft.train.loop.train`), the same calls for every tier."""
    losses = []
    acc = fns.zero_accumulator(params)
    for step, batch in enumerate(batches, first):
        for mb in split_rows(batch, 2):
            acc = fns.accumulate(acc, params, jax.device_put(mb, sharding))
        params, metrics = state.update(params, acc, jnp.int32(batch["loss_mask"].sum()), jnp.int32(step))
        acc = fns.clear_accumulator(acc, jnp.int32(step))
        losses.append(float(metrics["loss"]))
    return params, state, losses


def final_state(tier, params, state):
    """(master params, optimizer moments and counters) as flat numpy dicts with `none`'s names."""
    if tier == "none":
        return ({k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()},
                {k: np.asarray(v) for k, v in flatten(jax.device_get(state.tree)).items()})
    arrays = state.state_arrays()
    masters = {k.removeprefix("master."): v for k, v in arrays.items() if k.startswith("master.")}
    # `none` chains clipping (item 0, no state) before adamw (item 1).
    state = {"1." + k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")}
    return masters, state


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


BATCHES = [packed_rows(8, np.random.RandomState(s)) for s in range(4)]


@pytest.mark.parametrize("compute_dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_host_and_disk_train_bitwise_like_none(tmp_path, compute_dtype):
    mesh = make_mesh(devices=jax.devices()[:1])
    results = {}
    for tier in ("none", "host", "disk"):
        fns, params, state, sharding = build(tier, mesh, tmp_path / tier, compute_dtype)
        params, state, losses = steps(fns, params, state, sharding, BATCHES)
        results[tier] = (losses, *final_state(tier, params, state))
        if tier != "none":
            device = {k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()}
            assert {v.dtype for v in device.values()} == {np.dtype(compute_dtype)}
            # The device copy is the master weights cast to the compute dtype.
            assert_bitwise(device, {k: v.astype(compute_dtype) for k, v in results[tier][1].items()})
    assert results["none"][0][-1] < results["none"][0][0]
    for tier in ("host", "disk"):
        assert results[tier][0] == results["none"][0]
        assert_bitwise(results[tier][1], results["none"][1])
        assert_bitwise(results[tier][2], results["none"][2])


@pytest.mark.slow
def test_8_devices_fsdp_host_and_disk_train_bitwise_like_none(tmp_path):
    mesh = make_mesh(data=2, fsdp=4, tensor=1)
    batches = [packed_rows(16, np.random.RandomState(s)) for s in range(3)]
    results = {}
    for tier in ("none", "host", "disk"):
        fns, params, state, sharding = build(tier, mesh, tmp_path / tier, group_layers=1)
        with jax.set_mesh(mesh):
            params, state, losses = steps(fns, params, state, sharding, batches)
        if tier != "none":
            assert params["layers"]["q"][...].sharding.spec == P(None, "fsdp", None, None)
        results[tier] = (losses, *final_state(tier, params, state))
    for tier in ("host", "disk"):
        assert results[tier][0] == results["none"][0]
        assert_bitwise(results[tier][1], results["none"][1])
        assert_bitwise(results[tier][2], results["none"][2])


@pytest.mark.slow
def test_a_host_checkpoint_resumes_in_disk_mode_and_back(tmp_path):
    """Two steps, a checkpoint, two more steps in the other tier (with another group size) =
    four steps without a break, bit for bit."""
    from jaxsft.checkpoint import Checkpointer

    mesh = make_mesh(devices=jax.devices()[:1])
    fns, params, state, sharding = build("none", mesh, None)
    params, state, straight = steps(fns, params, state, sharding, BATCHES)
    expected = final_state("none", params, state)
    for first, second in (("host", "disk"), ("disk", "host")):
        fns, params, offload, sharding = build(first, mesh, tmp_path / first, group_layers=2)
        params, offload, losses = steps(fns, params, offload, sharding, BATCHES[:2])
        checkpointer = Checkpointer(str(tmp_path / f"ck-{first}"))
        offload.save(checkpointer, 2, params, {"step": 2})
        checkpointer.close()

        fns, params, offload, sharding = build(second, mesh, tmp_path / second, group_layers=1)
        checkpointer = Checkpointer(str(tmp_path / f"ck-{first}"))
        _, counters, record = checkpointer.restore_latest(offload.abstract_params(), offload.abstract_counters())
        params = offload.restore(checkpointer.directory, record["step"], counters)
        params, offload, more = steps(fns, params, offload, sharding, BATCHES[2:], first=2)
        assert losses + more == straight
        for a, b in zip(final_state(second, params, offload), expected):
            assert_bitwise(a, b)



@pytest.mark.slow
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_none_checkpoint_resumes_offloaded_and_back(tmp_path, tier):
    """optim.offload='none' -> `tier` and `tier` -> 'none' across a checkpoint at step 2: the
    losses and the final master weights and moments equal four steps without a break, bit for bit."""
    from jaxsft.checkpoint import Checkpointer

    mesh = make_mesh(devices=jax.devices()[:1])
    fns, params, state, sharding = build("none", mesh, None)
    params, state, straight = steps(fns, params, state, sharding, BATCHES)
    expected = final_state("none", params, state)

    # none -> tier: the none run's Orbax step (masters and optax state) is streamed into the store.
    fns, params, state, sharding = build("none", mesh, None)
    params, state, losses = steps(fns, params, state, sharding, BATCHES[:2])
    checkpointer = Checkpointer(str(tmp_path / "ck-none"))
    state.save(checkpointer, 2, params, {"step": 2})
    checkpointer.close()
    fns, params, offload, sharding = build(tier, mesh, tmp_path / tier, group_layers=1)
    checkpointer = Checkpointer(str(tmp_path / "ck-none"))
    params, record = offload.start(checkpointer, offload.masters(), resume=True)
    assert record["step"] == 2
    params, offload, more = steps(fns, params, offload, sharding, BATCHES[2:], first=2)
    assert losses + more == straight
    for a, b in zip(final_state(tier, params, offload), expected):
        assert_bitwise(a, b)

    # tier -> none: the offloaded run's snapshot (masters, moments) and Orbax step (counters).
    fns, params, offload, sharding = build(tier, mesh, tmp_path / f"{tier}-2", group_layers=2)
    params, offload, losses = steps(fns, params, offload, sharding, BATCHES[:2])
    checkpointer = Checkpointer(str(tmp_path / f"ck-{tier}"))
    offload.save(checkpointer, 2, params, {"step": 2})
    checkpointer.close()
    fns, params, state, sharding = build("none", mesh, None)
    checkpointer = Checkpointer(str(tmp_path / f"ck-{tier}"))
    params, record = state.start(checkpointer, params, resume=True)
    assert record["step"] == 2
    params, state, more = steps(fns, params, state, sharding, BATCHES[2:], first=2)
    assert losses + more == straight
    for a, b in zip(final_state("none", params, state), expected):
        assert_bitwise(a, b)

@pytest.mark.slow
def test_train_cli_resumes_across_tiers(tmp_path):
    """`jaxsft.train` itself: 'host' for two steps then 'none' to four, and 'none' then 'disk',
    log the losses of four unbroken steps."""
    import subprocess

    from tests.test_checkpoint import ENV, REPO, cli, metrics

    def run(out, *extra):
        # float32 compute: in bf16 the tiers are not bitwise equal (see the test above).
        r = subprocess.run(cli(tmp_path, tmp_path / out, "--config.model.compute_dtype=float32", *extra), cwd=REPO,
                           env=ENV, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return metrics(tmp_path / out)
    straight = [m["loss"] for m in run("straight")]
    assert len(straight) == 4
    for out, first, second in (("host-none", "host", "none"), ("none-disk", "none", "disk")):
        before = run(out, f"--config.optim.offload={first}", "--config.train.stop_after_steps=2")
        after = run(out, f"--config.optim.offload={second}")
        assert after[:2] == before  # resumed, not restarted: steps 1-2 are the first run's lines (timings too)
        assert [m["loss"] for m in after] == straight

def crash_run(directory: str, kill_in: str):
    """Child process of the SIGKILL test: resume from `directory`'s newest checkpoint (if any) and
    train to step 4 in the disk tier (one layer per group), checkpointing at steps 2 and 4; SIGKILL
    itself once a second group is written in step 3's streamed update ('update': the live store
    then mixes steps 2 and 3) or in step 4's snapshot ('save'); '' = never."""
    import os
    import signal

    from jaxsft.checkpoint import Checkpointer
    from jaxsft.train import offload_store

    mesh = make_mesh(devices=jax.devices()[:1])
    fns, params, offload, sharding = build("disk", mesh, os.path.join(directory, "live"), group_layers=1)
    checkpointer = Checkpointer(os.path.join(directory, "checkpoints"))
    params, record = offload.start(checkpointer, offload.masters(), resume=True)
    write, writes = offload_store.DiskStore.write, []

    def write_then_die(self, i, arrays, group):
        done = write(self, i, arrays, group)
        writes.append(i)
        if len(writes) == 2:
            done.result()
            os.kill(os.getpid(), signal.SIGKILL)
        return done
    for step in range(record["step"] if record else 0, 4):
        if (kill_in, step) == ("update", 2):
            offload_store.DiskStore.write = write_then_die
        params, offload, _ = steps(fns, params, offload, sharding, BATCHES[step:step + 1], first=step)
        if step + 1 in (2, 4):
            if (kill_in, step + 1) == ("save", 4):
                offload_store.DiskStore.write = write_then_die
            offload.save(checkpointer, step + 1, params, {"step": step + 1})
            checkpointer.wait()
    checkpointer.close()
    masters, state = final_state("disk", params, offload)
    np.savez(os.path.join(directory, "final.npz"), **masters, **{"state." + k: v for k, v in state.items()})


@pytest.mark.slow
@pytest.mark.parametrize("kill_in", ["update", "save"])
def test_sigkill_in_the_streamed_update_or_save_resumes_exactly(tmp_path, kill_in):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def child(directory, kill):
        return subprocess.run([sys.executable, "-c", f"from tests.test_offload import crash_run; "
                               f"crash_run({str(directory)!r}, {kill!r})"], cwd=repo, capture_output=True, text=True)
    killed = child(tmp_path / "run", kill_in)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # The killed process left step 2's checkpoint (and, killed in the save, part of step 4's snapshot).
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints-offload")) == (["2"] if kill_in == "update" else ["2", "4"])
    resumed = child(tmp_path / "run", "")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = child(tmp_path / "straight", "")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = np.load(tmp_path / "run" / "final.npz"), np.load(tmp_path / "straight" / "final.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 20
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def rss_run(directory: str):
    """Child process of the RSS test: one disk-tier update of a 16-layer model (48 MiB of state
    per layer, one layer per group); prints the process's peak resident memory during the update
    over the resident memory just before it (VmHWM, reset then), with the figures as JSON."""
    import ctypes
    import json

    from jaxsft.models import ModelConfig

    c = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=512, intermediate_size=2048,
                    num_layers=16, num_heads=8, num_kv_heads=8, head_dim=64, remat="full", attention="xla")
    fns, params, offload, _ = build("disk", make_mesh(devices=jax.devices()[:1]), directory, jnp.bfloat16,
                                    group_layers=1, model_config=c)

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    def gradients():
        acc = fns.zero_accumulator(params)
        return jax.block_until_ready({"grads": jax.tree.map(lambda x: x + 1e-3, acc["grads"]),
                                      "loss_sum": acc["loss_sum"] + 1})
    params = jax.block_until_ready(offload.update(params, gradients(), jnp.int32(10), jnp.int32(0))[0])
    acc = gradients()  # compiled, and the compute params and the accumulator in place: the baseline
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident memory
    jax.block_until_ready(offload.update(params, acc, jnp.int32(10), jnp.int32(1)))
    peak = status("VmHWM")
    sizes = {k: v.nbytes for k, v in offload.state_arrays().items()}
    layer = sum(v for k, v in sizes.items() if ".layers." in k) / c.num_layers
    print(json.dumps({"layer_group": layer, "state": sum(sizes.values()), "peak_over_baseline": peak - base}))


RSS_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           # Every freed buffer goes back to the system (as arrays over 32 MiB always do), so the
           # resident memory follows the live buffers, not this small model's allocator leftovers.
           "MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.mark.slow
def test_disk_tier_host_memory_holds_two_groups_in_flight_not_the_state(tmp_path):
    """The disk tier's update holds the state of two layer groups on the host (the one read
    ahead, the one being written back). On CPU the devices' memory is the process's too, so the
    peak over the pre-update baseline (compute params and accumulator in place) adds the device's
    group being updated and its update's XLA temporaries (memory_analysis: 0.44 group at this
    shape). Bound: 2 + 1 + 0.5 groups + 16 MiB (TensorStore's read and decode buffers, the
    allocator) = 3.5 groups + 16 MiB, 23% of the whole state; measured 2.8-3.1 groups (was
    5.4-5.8 before the read copies stopped pinning TensorStore's buffers and the written
    arrays were released once TensorStore had copied them)."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", f"from tests.test_offload import rss_run; rss_run({str(tmp_path)!r})"],
                       cwd=repo, capture_output=True, text=True, check=False, env={**os.environ, **RSS_ENV})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(m, m["peak_over_baseline"] / m["layer_group"], "groups")
    assert m["state"] > 15 * m["layer_group"]  # 16 layers of 48 MiB: 774 MiB
    assert 0 < m["peak_over_baseline"] <= 3.5 * m["layer_group"] + 16 * 2**20, m


@pytest.mark.slow
def test_float32_exports_of_an_offloaded_run_are_its_master_weights(tmp_path):
    """#24: the run's own export and `jaxsft.export` of its checkpoint, in float32, write the
    float32 master weights (from the store / the checkpoint's snapshot), not the bf16 compute copy."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    from tests.test_checkpoint import ENV, REPO, cli

    out = tmp_path / "run"
    r = subprocess.run(cli(tmp_path, out, "--config.optim.offload=host", "--config.train.num_steps=2",
                           "--config.train.export_hf=True", "--config.train.export_dtype=float32"),
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "jaxsft.export", "--checkpoint", str(out), "--out", str(tmp_path / "hf"),
                        "--dtype", "float32"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    own, exported = (load_file(str(d / "model.safetensors")) for d in (out / "hf", tmp_path / "hf"))
    assert_bitwise(own, exported)
    masters = {k: snapshot_array(str(out / "checkpoints"), 2, "master." + k) for k in ("embed", "final_norm")}
    np.testing.assert_array_equal(own["model.embed_tokens.weight"], masters["embed"])
    np.testing.assert_array_equal(own["model.norm.weight"], masters["final_norm"])
    # Trained float32 weights, not bf16 values in float32 containers.
    embed = own["model.embed_tokens.weight"]
    assert np.mean(embed != embed.astype(jnp.bfloat16).astype(np.float32)) > 0.5


def snapshot_array(checkpoint_dir: str, step: int, key: str) -> np.ndarray:
    import tensorstore as ts

    from jaxsft.train.snapshot import snapshot_dir

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{snapshot_dir(checkpoint_dir, step)}/{key}"}}
    return ts.open(spec, open=True).result().read().result()
