"""Every ``alphaclip`` failure is one line on stderr with a non-zero exit status (2 for usage), no traceback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alphaclip_plugins import create_model
from alphaclip_plugins.cli import main
from alphaclip_plugins.core.checkpoint import save_weights


@pytest.fixture
def files(tmp_path):
    save_weights(create_model("tiny", seed=3), tmp_path / "clip.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    return tmp_path


def _fails(argv, capsys, code: int = 1) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alphaclip: error: ") and "Traceback" not in err, err
    return lines[0]


def _classify(d: Path, image: str, *extra: str) -> list:
    return ["classify", image, "--pretrained", str(d / "clip.safetensors"), "--labels", "cat", "dog", *extra]


def test_usage_errors_exit_2(files, capsys):
    assert "bogus" in _fails(_classify(files, str(files / "img.png"), "--templates", "bogus"), capsys, 2)
    assert "positive" in _fails(_classify(files, str(files / "img.png"), "--top", "-1"), capsys, 2)
    assert "x0,y0,x1,y1" in _fails(_classify(files, str(files / "img.png"), "--box", "1,2,3"), capsys, 2)
    _fails(["info"], capsys, 2)


def test_bad_image_files_are_one_line(files, capsys):
    data = (files / "img.png").read_bytes()
    (files / "cut.png").write_bytes(data[: len(data) // 3])
    assert "cannot read image" in _fails(_classify(files, str(files / "cut.png")), capsys)
    assert "is a directory" in _fails(_classify(files, str(files)), capsys)
    assert "does not exist" in _fails(_classify(files, str(files / "missing.png")), capsys)
    empty = np.zeros((30, 40), np.uint8)
    Image.fromarray(empty).save(files / "empty.png")
    assert "empty" in _fails(_classify(files, str(files / "img.png"), "--mask", str(files / "empty.png")), capsys)


def test_convert_refuses_to_overwrite_without_force(files, capsys):
    src, out = str(files / "clip.safetensors"), files / "out.safetensors"
    out.write_bytes(b"keep me")
    assert "--force" in _fails(["convert", src, str(out), "--to", "timm"], capsys, 2)
    assert out.read_bytes() == b"keep me"
    main(["convert", src, str(out), "--to", "timm", "--force"])
    assert out.read_bytes() != b"keep me"
    (files / "dir").mkdir()
    assert "directory" in _fails(["convert", src, str(files / "dir"), "--to", "timm", "--force"], capsys, 2)
    assert "--force" in _fails(["convert", src, str(files / "dir"), "--to", "timm"], capsys, 2)


def test_unexpected_exception_is_one_line_and_debug_shows_the_traceback(files, capsys, monkeypatch):
    import alphaclip_plugins.core.weights as weights

    def boom(path):
        raise KeyError("surprise")

    monkeypatch.setattr(weights, "read_state_dict", boom)  # what every load reads files with
    assert "KeyError" in _fails(["info", str(files / "clip.safetensors")], capsys)
    with pytest.raises(KeyError):
        main(["--debug", "info", str(files / "clip.safetensors")])


def test_unreadable_checkpoint_is_not_reported_as_missing(files):
    path = files / "clip.safetensors"
    os.chmod(path, 0)
    os.chmod(files, 0o755)
    cmd = [sys.executable, "-m", "alphaclip_plugins.cli", "info", str(path)]
    if os.geteuid() == 0:  # root reads anything: run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + cmd
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for parent in Path(files).parents:  # nobody must reach the file to be refused by its own permissions
        if str(parent).startswith("/tmp/") or str(parent) == "/tmp":
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "permission denied" in proc.stderr.lower() and "No such file" not in proc.stderr
