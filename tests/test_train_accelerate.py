"""``alphaclip train-mllm`` under ``accelerate launch``: 2 CPU processes equal 1 process, and launcher settings the
run would not follow (another mixed precision, ``--cpu`` with several processes, ``--use_fsdp`` without the fsdp
strategy, ``--use_deepspeed``) are refused in one line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import import_or_skip  # noqa: E402
import_or_skip("transformers")
import_or_skip("accelerate")

from alphaclip_plugins.core.io import read_state_dict  # noqa: E402
from alphaclip_plugins.train.checkpointing import Checkpointer  # noqa: E402
from alphaclip_plugins.train.distributed import check_launcher  # noqa: E402
from alphaclip_plugins.train.mllm_cli import main  # noqa: E402
from test_mllm_train import ROOT, SCALE_SENSITIVE, TOL, _config, _train, _trained, llava_dir  # noqa: E402,F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(folder, run: str, *flags: str, **over) -> subprocess.CompletedProcess:
    path = folder / f"{run}.yaml"
    path.write_text(yaml.safe_dump(_config(folder, run, **over)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "HF_HOME": str(folder / "hf_home")}  # no user accelerate config file is read
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "-m", "alphaclip_plugins.train.mllm_cli",
           str(path)]
    return subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
def test_accelerate_two_cpu_processes_equal_one(llava_dir):
    over = {"steps": 2, "batch_size": 8, **SCALE_SENSITIVE}
    _train(llava_dir, "acc_one", **over)
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
             "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = _accelerate(llava_dir, "acc_two", *flags, **over)
    assert two.returncode == 0, two.stderr[-3000:]
    state = Checkpointer(llava_dir / "acc_two" / "checkpoints").read_latest()[3]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # not one process doing it all
    one, acc = _trained(llava_dir, "acc_one"), _trained(llava_dir, "acc_two")
    start = read_state_dict(llava_dir / "model" / "model.safetensors")
    assert set(one) == set(acc)
    for k in one:
        assert not torch.equal(one[k], start[k])
        assert (one[k] - acc[k]).abs().max() < TOL, k


# what accelerate launch puts in the environment for a flag, and what the refusal must name
REFUSED = {
    "mixed-precision": ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["'bf16'", "precision=fp32", "--mixed_precision no",
                                                                  "set precision=bf16"]),
    "fp8": ({"ACCELERATE_MIXED_PRECISION": "fp8"}, ["'fp8'", "--mixed_precision no", "fp32 (no), bf16 or fp16"]),
    "cpu-several-processes": ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, ["--cpu", "--multi_gpu"]),
    "fsdp": ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "1"}, ["--use_fsdp", "distributed.strategy=ddp"]),
    "deepspeed": ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["--use_deepspeed", "no DeepSpeed"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_launcher_settings_the_run_would_not_follow_are_refused(llava_dir, monkeypatch, capsys, case):
    env, fragments = REFUSED[case]
    (llava_dir / "x.yaml").write_text(yaml.safe_dump(_config(llava_dir, "refused_acc")))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in {"ACCELERATE_MIXED_PRECISION": "no", **env}.items():
        monkeypatch.setenv(key, value)
    assert main([str(llava_dir / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(f in err for f in fragments), err
    assert not (llava_dir / "refused_acc").exists()  # refused before any work


def test_launcher_settings_the_run_follows_are_accepted(monkeypatch):
    for key, value in {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2",
                       "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    check_launcher("bf16", "fsdp")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launcher("fp32", "fsdp")
