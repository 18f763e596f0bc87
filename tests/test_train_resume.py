"""Killed runs (SIGKILL mid-training and mid-checkpoint-write) resume to the uninterrupted run's weights."""
from __future__ import annotations

import signal

import pytest
import torch

from alphaclip_plugins import create_model
from alphaclip_plugins.core.io import read_state_dict
from alphaclip_plugins.train.checkpointing import Checkpointer
from alphaclip_plugins.train.synthetic import SyntheticConfig, write_shards
from train_utils import TINY_SHAPES_DATA, run_train, tiny_config, write_config

STEPS = 10


def _all_checkpoints_readable(run_dir) -> list:
    """Every checkpoint folder on disk reads completely and loads strictly into the model."""
    ckpt = Checkpointer(run_dir / "checkpoints")
    steps = []
    for folder in ckpt.checkpoints():
        model_sd, optim_sd, state = ckpt.read(folder)
        create_model("tiny").load_state_dict(model_sd, strict=True)
        assert optim_sd["state"] and state["step"] == int(folder.name.split("_")[1])
        steps.append(state["step"])
    return steps


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_weights(tmp_path):
    # Tar shards read by two loader workers with a shuffle buffer: the hardest data position to restore.
    write_shards(tmp_path / "shards", SyntheticConfig(num_images=16, **TINY_SHAPES_DATA), samples_per_shard=8)
    # Saves at 3, 6, 9 and 10: resuming at an odd batch count puts the other loader worker first.
    over = {"steps": STEPS, "save_every": 3, "keep_last": 2, "data.num_workers": 2, "data.shuffle_buffer": 5,
            "data.whole_image_ratio": 0.3}
    full_cfg = write_config(tmp_path / "full.yaml", tiny_config(tmp_path / "full", str(tmp_path / "shards"), **over))
    cut_cfg = write_config(tmp_path / "cut.yaml", tiny_config(tmp_path / "cut", str(tmp_path / "shards"), **over))
    cut = tmp_path / "cut" / "run"

    proc = run_train(full_cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = run_train(cut_cfg, fault="step:5")  # killed after step 5
    assert proc.returncode == -signal.SIGKILL
    assert _all_checkpoints_readable(cut) == [3]

    proc = run_train(cut_cfg, fault="save:2")  # resumes at 3; killed inside the write of step 9
    assert proc.returncode == -signal.SIGKILL
    assert _all_checkpoints_readable(cut) == [3, 6]
    assert any(p.name.startswith(".tmp-step_00000009") for p in (cut / "checkpoints").iterdir())

    proc = run_train(cut_cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _all_checkpoints_readable(cut) == [9, 10]
    assert not [p for p in (cut / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned

    full, resumed = read_state_dict(tmp_path / "full" / "run" / "final"), read_state_dict(cut / "final")
    start = create_model("tiny").state_dict()
    assert not torch.equal(full["visual.conv1_alpha.weight"], start["visual.conv1_alpha.weight"])
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed weights differ from the uninterrupted run"
