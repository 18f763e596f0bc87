"""Reading and writing checkpoint files safely: no arbitrary unpickling, atomic writes."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Union

import torch

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

# Files a checkpoint directory may hold, in the order they are looked for.
_DIR_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that holds something other than what was asked for."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _unwrap(obj: object, path: Path) -> StateDict:
    """Training checkpoints nest the weights (``{'state_dict': ...}``, ``{'model': ...}``)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _read_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        # OpenAI's release files are TorchScript archives; TorchScript cannot run arbitrary Python.
        return {k: v.detach() for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to unpickle {path}: it holds objects other than tensors, and unpickling those can run "
            f"arbitrary code. If you trust the file, re-save its state dict with plain tensors or as safetensors. "
            f"({str(e).splitlines()[0]})"
        ) from None
    return _unwrap(obj, path)


def _read_dir(path: Path) -> StateDict:
    for name in _DIR_FILES:
        f = path / name
        if not f.exists():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(_read_file(path / shard))
            return sd
        return _read_file(f)
    raise CheckpointError(f"{path} is a directory without weights; expected one of: {', '.join(_DIR_FILES)}")


def read_state_dict(path: PathLike) -> StateDict:
    """Load the tensors of a checkpoint file or directory, in whatever layout it has.

    Pickles load with ``weights_only=True``; TorchScript archives through ``torch.jit.load``;
    ``.safetensors`` (and sharded Hugging Face directories) directly.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is corrupt or truncated, or would need unsafe unpickling.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return _read_dir(path) if path.is_dir() else _read_file(path)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as e:  # zip, safetensors header, EOF ...: all mean the bytes are not a checkpoint
        raise CheckpointError(
            f"could not read {path}: the file is corrupt, truncated or not a checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the permissions a plain open() would
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(sd: StateDict, path: PathLike, metadata: Dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


def save_torch(sd: StateDict, path: PathLike) -> None:
    """A plain pickled dict of tensors (what the original Alpha-CLIP code reads); written atomically."""
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: torch.save(sd, tmp))


def write_json(obj: object, path: PathLike) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))
