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
from test_checkpoint import make_hf_qwen2, small_run_config


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
