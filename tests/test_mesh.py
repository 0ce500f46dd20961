"""Everything that traces the model runs under the run's mesh: on a multi-chip TPU a Pallas kernel
outside `jax.set_mesh` cannot be partitioned ("Mosaic kernels cannot be automatically partitioned").
On CPU the splash kernel runs in interpret mode, so the run is checked by where it was traced."""

import jax
import numpy as np
import pytest

from test_checkpoint import small_run_config


@pytest.mark.slow
def test_splash_attention_on_8_devices_evaluates_under_the_mesh_with_xla_losses(tmp_path, monkeypatch):
    from jaxsft.models import attention
    from jaxsft.train import run

    assert jax.device_count() == 8

    meshes = []
    splash = attention.splash_attention

    def traced_where(*args, **kwargs):
        meshes.append(jax.sharding.get_abstract_mesh())
        return splash(*args, **kwargs)

    monkeypatch.setattr(attention, "splash_attention", traced_where)
    results = {}
    for backend in ("xla", "splash"):
        config = small_run_config(tmp_path, **{"model.attention": backend, "train.eval_at_start": True,
                                               "train.eval_every": 1, "train.output_dir": str(tmp_path / backend)})
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
        config.data.max_seq_len, config.data.global_batch_size, config.data.micro_batch_rows = 128, 8, 1
        config.data.eval_fraction = 0.25  # held-out problems from the same file
        results[backend] = run(config)

    # Held-out loss before training, after step 1 and at the end; the step losses too.
    xla, spl = results["xla"], results["splash"]
    assert [s for s, _ in spl["eval_losses"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in spl["eval_losses"]], [v for _, v in xla["eval_losses"]], rtol=2e-5)
    np.testing.assert_allclose(spl["loss"], xla["loss"], rtol=2e-5)
    assert meshes and all(not m.empty and m.size == 8 for m in meshes), meshes
