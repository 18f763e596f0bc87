"""Reading and writing checkpoint files safely: no arbitrary unpickling, atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterator, Union

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


# Integer entries that checkpoints legitimately carry beside float weights (they are metadata, not weights).
_INTEGER_ENTRIES = ("input_resolution", "context_length", "vocab_size", "position_ids", "num_batches_tracked")


def _check_readable(path: Path) -> None:
    """A regular file we may open: FIFOs and devices would hang or stream forever."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"
        raise CheckpointError(f"{path} is a {kind}, not a regular file; refusing to read it as a checkpoint")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise CheckpointError(f"cannot read {path}: permission denied (check the file's permissions)") from None


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
    _check_readable(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        # OpenAI's release files are TorchScript archives: read their tensors without running their code.
        from .torchscript import TorchScriptError, read_torchscript

        try:
            return read_torchscript(path)
        except TorchScriptError as e:
            raise CheckpointError(f"refusing to read the TorchScript archive {path}: {e}") from None
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
            _check_readable(f)
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(_read_file(_shard_path(path, shard)))
            return sd
        return _read_file(f)
    raise CheckpointError(f"{path} is a directory without weights; expected one of: {', '.join(_DIR_FILES)}")


def _shard_path(directory: Path, shard: object) -> Path:
    """A shard named by an index must be a plain file name inside the index's own folder."""
    if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
        raise CheckpointError(f"{directory}'s shard index names {shard!r}; a shard must be a file name inside "
                              f"{directory} (no folders, no absolute paths)")
    return directory / shard


def check_weights(sd: StateDict, source: object) -> None:
    """Refuse tensors no model weight can be: integer or bool weights, NaN or infinity.

    Raises:
        CheckpointError: naming the first offending tensor.
    """
    for key, value in sd.items():
        if not value.is_floating_point():
            if key.rsplit(".", 1)[-1] in _INTEGER_ENTRIES:
                continue
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {value.dtype}; model weights must be "
                                  f"floating point (a quantised or corrupt file?)")
        if value.numel() and not bool(torch.isfinite(value).all()):
            bad = "NaN" if bool(torch.isnan(value).any()) else "infinite values"
            raise CheckpointError(f"{source}: tensor {key!r} contains {bad}; the checkpoint is corrupt "
                                  f"(or was saved from a diverged run)")


def read_state_dict(path: PathLike, *, check: bool = True) -> StateDict:
    """Load the tensors of a checkpoint file or directory, in whatever layout it has. Nothing in the file runs.

    Pickles load with ``weights_only=True`` (tensors and plain containers only); TorchScript archives through
    a restricted reader that takes the tensors of the archive's records and never runs its code
    (``core/torchscript.py``); ``.safetensors`` (and sharded Hugging Face directories) directly.

    Args:
        path: a file, or a directory holding one of the usual weight files or a shard index.
        check: refuse non-float tensors (other than known metadata such as ``position_ids``) and NaN/inf.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is corrupt, truncated, unreadable, not a regular file, would need unsafe
            unpickling or running code, or holds non-float or non-finite weights.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        sd = _read_dir(path) if path.is_dir() else _read_file(path)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as e:  # zip, safetensors header, EOF ...: all mean the bytes are not a checkpoint
        raise CheckpointError(
            f"could not read {path}: the file is corrupt, truncated or not a checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if check:
        check_weights(sd, path)
    return sd


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


@contextlib.contextmanager
def atomic_directory(path: PathLike, overwrite: bool = False, marker: str = "") -> Iterator[Path]:
    """Write a directory all-or-nothing: yield an empty temporary sibling, then rename it onto ``path``.

    An existing ``path`` is replaced whole (no stale files of an earlier write survive), and only with
    ``overwrite=True`` and when it is empty or holds ``marker`` (a file every earlier write left there), so
    that an unrelated folder is never deleted. If the body raises, ``path`` is left as it was.

    Raises:
        FileExistsError: ``path`` exists and may not be replaced (see above), or is not a directory.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise FileExistsError(f"{path} exists and is not a directory; choose another destination")
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (--force) to replace it")
        if marker and any(path.iterdir()) and not (path / marker).is_file():
            raise FileExistsError(f"{path} is not empty and holds no {marker}, so it is not an earlier export; "
                                  f"refusing to replace it: choose another destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
    try:
        yield tmp
        if path.exists():
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old.exists():
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
