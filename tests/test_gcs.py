"""gs:// everywhere (model folder, converted model, data, checkpoints, export), against a real
GCS API served on 127.0.0.1 by fake-gcs-server (tests/gcs_server.py); nothing leaves the machine."""

import json
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from gcs_server import gcs_bucket  # noqa: F401  (the session fixture)
from test_checkpoint import ASSETS, make_hf_qwen2, small_run_config


def upload(local_dir, url):
    for name in os.listdir(local_dir):
        with open(os.path.join(local_dir, name), "rb") as f:
            (epath.Path(url) / name).write_bytes(f.read())


@pytest.mark.slow
def test_model_data_and_checkpoints_on_gcs(tmp_path, gcs_bucket, monkeypatch):  # noqa: F811
    from jaxsft.checkpoint import Checkpointer
    from jaxsft.convert import main as convert_main
    from jaxsft.export import main as export_main
    from jaxsft.models import load_model
    from jaxsft.models.converted import is_converted
    from jaxsft.train import run

    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path / "cache"))  # where gs:// model files are copied
    root = f"gs://{gcs_bucket}/{tmp_path.name}"
    hf_local = make_hf_qwen2(str(tmp_path / "hf"))
    upload(hf_local, f"{root}/hf")

    # A Hugging Face folder on GCS loads like the local one.
    ids = jnp.asarray([[1, 5, 9, 151000, 3]])
    local_logits = np.asarray(load_model(hf_local, compute_dtype=jnp.float32)(ids))
    np.testing.assert_array_equal(np.asarray(load_model(f"{root}/hf", compute_dtype=jnp.float32)(ids)), local_logits)

    # Convert GCS -> GCS once; a run starts from it, reads its data from GCS, checkpoints to GCS.
    convert_main(["--from", f"{root}/hf", "--to", f"{root}/converted"])
    assert is_converted(f"{root}/converted")
    train = tmp_path / "train.jsonl"
    small_run_config(tmp_path)  # writes train.jsonl
    (epath.Path(root) / "data" / "train.jsonl").write_text(train.read_text())
    changes = {"model.path": f"{root}/converted", "model.init": "pretrained",
               "checkpoint.dir": f"{root}/run/checkpoints", "checkpoint.every_steps": 1}
    config = small_run_config(tmp_path, **changes)
    config.data.sources = [{"path": f"{root}/data/train.jsonl", "format": "gsm8k"}]
    # 8 simulated devices x 1 row x 128 tokens x 152k vocab: logits of 0.6 GB per copy.
    config.data.micro_batch_rows, config.data.max_seq_len, config.data.global_batch_size = 1, 128, 8
    config.train.num_steps = 1
    first = run(config)
    config.train.num_steps = 2
    second = run(config)  # resumes from gs://.../1
    assert first["steps"] == 1 and second["steps"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert Checkpointer(f"{root}/run/checkpoints").all_steps() == [1, 2]

    # Export straight from the GCS checkpoint; it loads and matches what the run trained.
    export_main(["--checkpoint", f"{root}/run/checkpoints", "--out", str(tmp_path / "exported"),
                 "--dtype", "float32"])
    exported = load_model(tmp_path / "exported", compute_dtype=jnp.float32)
    assert not np.allclose(np.asarray(exported(ids)), local_logits)  # trained: moved away from the start


def test_a_model_folder_re_uploaded_to_the_same_path_is_not_read_stale(tmp_path, gcs_bucket, monkeypatch):  # noqa: F811
    from jaxsft.models.hf_io import local_dir

    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path / "cache"))
    root = epath.Path(f"gs://{gcs_bucket}/{tmp_path.name}/model")
    (root / "config.json").write_text('{"version": 1}')
    (root / "tokenizer.json").write_text("{}")
    folder = local_dir(str(root))
    kept = os.stat(os.path.join(folder, "tokenizer.json")).st_mtime_ns
    assert open(os.path.join(folder, "config.json")).read() == '{"version": 1}'
    time.sleep(1.1)  # object times in the bucket have a resolution of 1 ms to 1 s
    (root / "config.json").write_text('{"version": 2}')  # the same size, a newer object
    assert local_dir(str(root)) == folder
    assert open(os.path.join(folder, "config.json")).read() == '{"version": 2}'
    assert os.stat(os.path.join(folder, "tokenizer.json")).st_mtime_ns == kept  # unchanged: not copied again
    assert sorted(os.listdir(folder)) == ["config.json", "tokenizer.json"]


def test_the_plan_reads_a_gcs_models_config_where_it_is(tmp_path, gcs_bucket, monkeypatch):  # noqa: F811
    """#24: `load_model_config` (what the memory plan needs) reads config.json and
    generation_config.json in the bucket; nothing is copied before the plan (the weights are read
    with the model)."""
    from jaxsft.models import load_model_config

    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path / "cache"))
    root = epath.Path(f"gs://{gcs_bucket}/{tmp_path.name}/model")
    for name in ("config.json", "generation_config.json"):
        (root / name).write_text((epath.Path(ASSETS) / "tiny-qwen2" / name).read_text())
    (root / "model.safetensors").write_bytes(b"weights the plan must not read")
    config = load_model_config(str(root))
    assert config.vocab_size == 151936 and config.hf_generation_config
    assert not (tmp_path / "cache").exists()


def _bucket_files(root: str) -> list[str]:
    """Every object under `root` (gs://BUCKET/PREFIX), relative to it."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket, _, prefix = root.removeprefix("gs://").partition("/")
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    return sorted(b.name[len(prefix) + 1:] for b in client.list_blobs(bucket, prefix=prefix + "/"))


@pytest.mark.slow
def test_a_gcs_run_directory_through_the_cli_killed_and_resumed(tmp_path, gcs_bucket):  # noqa: F811
    """The TPU-pod quickstart's path: every file of the run in the bucket, none on the local disk;
    a run SIGKILLed after a checkpoint and resumed with the same command ends as an uninterrupted one."""
    import subprocess
    import signal
    import sys

    from test_checkpoint import ASSETS, DETERMINISTIC, REPO, cli

    root = f"gs://{gcs_bucket}/{tmp_path.name}"
    test_file = tmp_path / "test.jsonl"
    with open(os.path.join(ASSETS, "gsm8k", "test.jsonl")) as f:
        test_file.write_text("".join(f.readlines()[:4]))
    workdir = tmp_path / "cwd"  # the processes' working directory: nothing may land here
    workdir.mkdir()
    env = {**os.environ, "XLA_FLAGS": "", "JAXSFT_CACHE": str(tmp_path / "cache")}

    def command(out):
        args = cli(tmp_path, out, f"--config.data.eval_sources=[{{'path': '{test_file}', 'format': 'gsm8k'}}]",
                   "--config.train.eval_every=2", "--config.train.export_hf=True",
                   "--config.train.export_dtype=float32",
                   f"--config.gsm8k.file={test_file}", "--config.gsm8k.subset=2",
                   "--config.gsm8k.max_new_tokens=4", "--config.gsm8k.show=0")
        args[args.index("configs/demo.py")] = os.path.join(REPO, "configs", "demo.py")
        return args

    r = subprocess.run(command(f"{root}/whole"), cwd=workdir, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(command(f"{root}/killed"), cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (epath.Path(f"{root}/killed/checkpoints/2") / "record").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before checkpoint 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (epath.Path(f"{root}/killed/checkpoints") / "4").exists(), "killed too late to test a resume"
    r = subprocess.run(command(f"{root}/killed"), cwd=workdir, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    def lines(run, name):
        return [json.loads(x) for x in (epath.Path(f"{root}/{run}") / name).read_text().splitlines()]

    whole, killed = lines("whole", "metrics.jsonl"), lines("killed", "metrics.jsonl")
    assert [x["step"] for x in killed] == [1, 2, 3, 4]
    for x, y in zip(whole, killed):
        assert {k: x[k] for k in DETERMINISTIC} == {k: y[k] for k in DETERMINISTIC}, (x, y)
    assert lines("whole", "eval.jsonl") == lines("killed", "eval.jsonl")
    evals = lines("killed", "eval.jsonl")
    assert [x["step"] for x in evals] == [2, 4] and {"eval_loss", "gsm8k_accuracy"} <= evals[1].keys()

    files = _bucket_files(f"{root}/killed")
    for expected in ("config.json", "data_summary.json", "metrics.jsonl", "eval.jsonl",
                     "eval/gsm8k_step4.json", "hf/model.safetensors", "hf/config.json", "hf/tokenizer_config.json",
                     "checkpoints/4/record/metadata", "tokenizer/tokenizer_config.json"):
        assert expected in files, (expected, files)
    events = [f for f in files if f.startswith("tensorboard/events.out.tfevents")]
    assert len(events) == 2, files  # the killed run's and the resumed run's
    assert list(workdir.rglob("*")) == [] and not os.path.exists(os.path.join(REPO, "gs:"))

    # Export and convert with gs:// on both sides, through their CLIs.
    for args in (["jaxsft.export", "--checkpoint", f"{root}/killed", "--out", f"{root}/exported", "--dtype", "float32"],
                 ["jaxsft.convert", "--from", f"{root}/killed/hf", "--to", f"{root}/converted"],
                 ["jaxsft.convert", "--from", f"{root}/killed/hf", "--to", f"{root}/converted_hf", "--hf"]):
        r = subprocess.run([sys.executable, "-m", *args], cwd=workdir, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    assert list(workdir.rglob("*")) == []
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(_bucket_files(f"{root}/exported"))
    assert "jaxsft_checkpoint.json" in _bucket_files(f"{root}/converted")

    # transformers reads the gs:// export and gives the logits of the trained checkpoint.
    import torch
    import transformers as tf

    from jaxsft.models import load_model

    local = tmp_path / "exported_copy"
    local.mkdir()
    for name in _bucket_files(f"{root}/exported"):
        (local / name).write_bytes((epath.Path(f"{root}/exported") / name).read_bytes())
    hf = tf.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    ids = np.array([[1, 5, 9, 151000, 3]])
    with torch.no_grad():
        reference = hf(torch.tensor(ids)).logits.numpy()
    for source in (f"{root}/converted", f"{root}/converted_hf"):
        ours = np.asarray(load_model(source, compute_dtype=jnp.float32)(jnp.asarray(ids)))
        assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max(), source
