"""``alphaclip train-mllm`` under ``accelerate launch``: 2 CPU processes equal 1 process, and launcher settings the
run would not follow (another mixed precision, ``--cpu`` with several processes) are refused in one line."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

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


def test_accelerate_two_cpu_processes_equal_one(llava_dir):
    over = {"steps": 2, "batch_size": 8, **SCALE_SENSITIVE}
    _train(llava_dir, "acc_one", **over)
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
             "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = _accelerate(llava_dir, "acc_two", *flags, **over)
    assert two.returncode == 0, two.stderr[-3000:]
    checkpoints = Checkpointer(llava_dir / "acc_two" / "checkpoints")
    assert checkpoints.read(checkpoints.checkpoints()[-1])[1]["world_size"] == 2  # not one process doing it all
    one, acc = _trained(llava_dir, "acc_one"), _trained(llava_dir, "acc_two")
    start = read_state_dict(llava_dir / "model" / "model.safetensors")
    assert set(one) == set(acc)
    for k in one:
        assert not torch.equal(one[k], start[k])
        assert (one[k] - acc[k]).abs().max() < TOL, k


def test_launcher_settings_the_run_would_not_follow_are_refused(llava_dir, monkeypatch, capsys):
    args = [str(llava_dir / "x.yaml")]
    (llava_dir / "x.yaml").write_text(yaml.safe_dump(_config(llava_dir, "refused_acc")))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'bf16'" in err and "precision=fp32" in err and "--mixed_precision no" in err
    check_launcher("bf16")  # the same precision on both sides is accepted
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # accelerate launch --cpu --num_processes 2: one process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--cpu" in err and "--multi_gpu" in err
    assert not (llava_dir / "refused_acc").exists()  # refused before any work
