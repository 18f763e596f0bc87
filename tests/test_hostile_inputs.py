"""Hostile and malformed checkpoint files: nothing in a file runs when it is read, bad weights are refused."""
from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch
from torch import nn

from alphaclip_plugins import create_model
from alphaclip_plugins.cli import main as cli_main
from alphaclip_plugins.core.io import CheckpointError, read_state_dict

# --- a genuine TorchScript archive laid out like OpenAI's CLIP releases (sizes of the "tiny" variant) ----------


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: Optional[torch.Tensor]):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)
        self.attn_mask = attn_mask  # a plain tensor attribute, as in OpenAI's code: not part of the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: Optional[torch.Tensor] = None):
        super().__init__()
        self.resblocks = nn.Sequential(*[_Block(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _Visual(nn.Module):
    def __init__(self, width: int = 64, patch: int = 8, grid: int = 4, embed: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, 2, 2)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.transformer(self.ln_pre(self.conv1(x).flatten(2).permute(2, 0, 1))))[0] @ self.proj


class _OpenAICLIP(nn.Module):
    def __init__(self, visual: nn.Module, width: int = 32, context: int = 77, vocab: int = 49408):
        super().__init__()
        self.visual = visual
        self.transformer = _Transformer(width, 2, 2, torch.full((context, context), float("-inf")).triu(1))
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, 32))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        for name, value in (("input_resolution", 32), ("context_length", context), ("vocab_size", vocab)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def _randomise(module: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def _script(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def test_torchscript_archive_read_without_jit_matches_jit_state_dict_bit_exactly(tmp_path):
    path = _script(_randomise(_OpenAICLIP(_Visual())), tmp_path / "ViT-tiny.pt")
    sd = read_state_dict(path)
    ref = torch.jit.load(str(path)).state_dict()  # the oracle, on a file this test made
    assert list(sd) == list(ref)
    assert "transformer.resblocks.0.attn_mask" not in sd  # tensor attributes are not state
    for key in ("visual.conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "input_resolution"):
        assert key in sd
    for key, value in ref.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key
    model = create_model("tiny", pretrained=path)
    for key, value in model.state_dict().items():
        if key == "visual.conv1_alpha.weight":
            assert not value.any()
        else:
            assert torch.equal(value, ref[key]), key


# --- a TorchScript archive whose scripted __setstate__ writes files -------------------------------------------


class _Payload(nn.Module):
    """A CLIP vision tower whose restore step maps two files with ``shared=True`` and writes zeros into them."""

    def __init__(self, victim: str, created: str):
        super().__init__()
        self.victim, self.created = victim, created
        self.proj = nn.Parameter(torch.zeros(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, str, torch.Tensor, bool]:
        return (self.victim, self.created, self.proj, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, str, torch.Tensor, bool]) -> None:
        self.victim, self.created, self.proj, self.training = state[0], state[1], state[2], state[3]
        a = torch.from_file(self.victim, shared=True, size=8, dtype=torch.uint8).fill_(0)
        b = torch.from_file(self.created, shared=True, size=8, dtype=torch.uint8).fill_(0)
        self.proj = self.proj + a.sum() + b.sum()


def _hostile_archive(directory: Path, name: str) -> Tuple[Path, Path, Path]:
    directory.mkdir()
    victim, created = directory / "victim.txt", directory / "created.bin"
    victim.write_bytes(b"precious data, keep me")
    path = _script(_OpenAICLIP(_Payload(str(victim), str(created))), directory / name)
    return path, victim, created


def test_hostile_archive_really_writes_files_when_jit_loaded(tmp_path):
    """The fixture is live: torch.jit.load runs its __setstate__ (so the tests below can show the bug)."""
    path, victim, created = _hostile_archive(tmp_path / "oracle", "ViT-B-16.pt")
    torch.jit.load(str(path))
    assert created.exists() and victim.read_bytes()[:8] == bytes(8)


@pytest.mark.parametrize("name", ["ViT-B-16.pt", "pytorch_model.bin", "clip_b16_grit1m_fultune_8xe.pth"])
def test_hostile_archive_runs_nothing_on_any_entry_point(tmp_path, name, capsys):
    path, victim, created = _hostile_archive(tmp_path / "files", name)
    readers = {
        "read_state_dict": lambda: read_state_dict(path),
        "create_model": lambda: create_model("tiny", pretrained=path),
        "alpha_checkpoint": lambda: create_model("tiny", alpha_checkpoint=path),
    }
    for what, read in readers.items():
        with pytest.raises(CheckpointError, match=r"__torch__.*_Payload.*__setstate__"):
            read()
    for argv in (["info", str(path)], ["convert", str(path), str(tmp_path / "out.safetensors"), "--to", "open_clip"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code != 0
        assert "__setstate__" in capsys.readouterr().err
    assert victim.read_bytes() == b"precious data, keep me"
    assert not created.exists()
    assert not (tmp_path / "out.safetensors").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _replace_member(src: Path, dst: Path, member_suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith(member_suffix) else zin.read(info))


def test_code_running_pickle_inside_a_torchscript_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    genuine = _script(_randomise(_OpenAICLIP(_Visual())), tmp_path / "genuine.pt")
    _replace_member(genuine, tmp_path / "evil.pt", "/data.pkl", pickle.dumps({"visual": _Exploit()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"references (posix|os|nt)\.system"):
        read_state_dict(tmp_path / "evil.pt")
    with open(tmp_path / "evil.pth", "wb") as f:  # and a plain pickle doing the same
        pickle.dump({"conv1.weight": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_torchscript_storage_record_of_the_wrong_size_is_refused(tmp_path):
    genuine = _script(_randomise(_OpenAICLIP(_Visual())), tmp_path / "genuine.pt")
    _replace_member(genuine, tmp_path / "short.pt", "/data/0", b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"storage record .*data/0 holds 4 bytes"):
        read_state_dict(tmp_path / "short.pt")
