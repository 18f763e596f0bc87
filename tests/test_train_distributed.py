"""Two processes (torchrun, gloo, CPU) train to the same weights as one process with the same global batch."""
from __future__ import annotations

import json

import pytest
import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.core.io import read_state_dict
from alphaclip_plugins.train.checkpointing import Checkpointer
from alphaclip_plugins.train.synthetic import SyntheticConfig, write_jsonl
from train_utils import TINY_SHAPES_DATA, run_train, tiny_config, write_config

# Without clipping and with a large epsilon, AdamW's update follows the gradient's size, so a gradient
# that is off by the world size (a gather that drops the scaling, a loss over the local batch) shows.
SENSITIVE = {"optim.grad_clip": None, "optim.eps": 1.0, "optim.lr": 0.05, "accum_steps": 2, "save_every": 2}


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in lines if m["group"] == "train"]


@pytest.mark.distributed
@pytest.mark.parametrize("variant", [
    pytest.param({}, id="paper-recipe-ddp-vision-only"),
    pytest.param({"model.train_text": True}, id="both-towers-ddp", marks=pytest.mark.slow),
    pytest.param({"distributed.strategy": "fsdp"}, id="fsdp", marks=pytest.mark.slow),
])
def test_two_processes_match_one(tmp_path, variant):
    manifest = str(write_jsonl(tmp_path / "data", SyntheticConfig(num_images=12, **TINY_SHAPES_DATA)))
    results = {}
    for nproc in (1, 2):
        cfg = tiny_config(tmp_path / f"p{nproc}", manifest, steps=4, batch_size=16, **SENSITIVE, **variant)
        proc = run_train(write_config(tmp_path / f"p{nproc}.yaml", cfg), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = tmp_path / f"p{nproc}" / "run"
    one, two = (read_state_dict(results[n] / "final") for n in (1, 2))
    start = create_model("tiny", seed=0).state_dict()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-2  # it trained
    assert all(torch.allclose(one[k], two[k], atol=2e-6, rtol=1e-5) for k in one)
    assert _losses(results[1]) == pytest.approx(_losses(results[2]), rel=1e-5)
    folder, _, _, state = Checkpointer(results[2] / "checkpoints").read_latest()
    assert state["world_size"] == 2 and [r["data"]["batches"] for r in state["ranks"]] == [8, 8]
