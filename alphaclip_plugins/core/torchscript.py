"""The tensors of a TorchScript archive (OpenAI's ``ViT-B-16.pt``), read without running any of it.

``torch.jit.load`` compiles the archive's ``code/`` and calls each scripted ``__setstate__``: a crafted
archive runs whatever that code does (``torch.from_file(path, shared=True)`` writes files). This reader
runs nothing from the file:

* ``<root>/data.pkl`` is unpickled by :class:`_Unpickler`, whose ``find_class`` returns only this module's
  own harmless stand-ins: a tensor rebuild, ``OrderedDict``, storage dtypes, identity list builders, and a
  placeholder for every ``__torch__.*`` class that records the attributes it is given. Any other global is
  refused with a :class:`CheckpointError` naming it. No ``__setstate__`` of the file is ever called.
* Storages come from the ``<root>/data/<key>`` records, checked against the size the pickle claims.
* ``<root>/code/`` is read as text, only to learn which attributes of each scripted module are parameters
  and buffers (its ``__parameters__`` / ``__buffers__`` lines, parsed with ``ast.literal_eval``), so that the
  result has the keys ``module.state_dict()`` would give. A class whose code defines ``__setstate__`` is
  refused: its state can only be restored by running that code.
"""
from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

StateDict = Dict[str, torch.Tensor]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS_LINE = re.compile(r"^class (\w+)\((\w+)\):")
_LIST_LINE = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])\s*$")


class TorchScriptError(ValueError):
    """Raised for archives this reader refuses; io.py turns it into a CheckpointError."""


class _Storage:
    """A typed view of one ``data/<key>`` record."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped, self.dtype = untyped, dtype


class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class ScriptObject:
    """Stand-in for a ``__torch__.*`` class: holds the attributes the pickle gives it, runs nothing."""

    qualname = "__torch__"
    registry: List["ScriptObject"] = []  # replaced per archive: every object the unpickler made

    def __new__(cls, *args: Any) -> "ScriptObject":  # pickle's NEWOBJ calls __new__ only
        if args:
            raise TorchScriptError(f"{cls.qualname} is constructed with arguments in data.pkl; refusing")
        obj = super().__new__(cls)
        obj.state = None
        cls.registry.append(obj)
        return obj

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: record, never call the file's code
        self.state = state


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` with every argument checked (no hooks, in-bounds views)."""
    if not isinstance(storage, _Storage):
        raise TorchScriptError(f"a tensor rebuild got {type(storage).__name__} instead of a storage record")
    ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
    if ints is None or len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in ints):
        raise TorchScriptError(f"a tensor rebuild has malformed geometry (offset {offset!r}, size {size!r}, "
                               f"stride {stride!r})")
    if hooks or metadata:
        raise TorchScriptError("a tensor in data.pkl carries backward hooks or metadata; refusing")
    numel = storage.untyped.nbytes() // storage.dtype.itemsize
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if end > numel:
        raise TorchScriptError(f"a tensor of size {size} reads past the end of its {numel}-element storage")
    t = torch.empty(0, dtype=storage.dtype)
    return t.set_(storage.untyped, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or hooks:
        raise TorchScriptError("a parameter rebuild in data.pkl is not a plain tensor; refusing")
    return data


def _identity(value: Any, *_: Any) -> Any:
    return value


def _ordered_dict(*args: Any) -> collections.OrderedDict:
    if args:
        raise TorchScriptError("an OrderedDict in data.pkl is built from arguments; refusing")
    return collections.OrderedDict()


# The only callables data.pkl can reach: all defined here, none of them torch's own.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self.zf, self.root = zf, root
        self.classes: Dict[str, type] = {}
        self.storages: Dict[str, torch.UntypedStorage] = {}
        self.objects: List[ScriptObject] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                attrs = {"qualname": qualname, "registry": self.objects}
                self.classes[qualname] = type(name, (ScriptObject,), attrs)
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise TorchScriptError(
            f"data.pkl references {module}.{name}, which is neither a tensor, a storage nor a scripted class; "
            f"refusing to load it"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and type(pid[4]) is int):
            raise TorchScriptError(f"data.pkl has a persistent reference {pid!r} that is not a storage record")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            record = f"{self.root}/data/{key}"
            try:
                declared = self.zf.getinfo(record).file_size
            except KeyError:
                raise TorchScriptError(f"data.pkl refers to storage record {record}, which the archive lacks") from None
            if declared != numel * kind.dtype.itemsize:  # checked before reading: no zip bombs
                raise TorchScriptError(f"storage record {record} holds {declared} bytes but data.pkl expects "
                                       f"{numel} x {kind.dtype} ({numel * kind.dtype.itemsize} bytes)")
            raw = self.zf.read(record)
            self.storages[key] = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw \
                else torch.UntypedStorage(0)
        return _Storage(self.storages[key], kind.dtype)


@dataclass
class _ClassInfo:
    """What ``code/`` says about one scripted class (read as text, never compiled)."""

    is_module: bool
    parameters: List[str] = field(default_factory=list)
    buffers: List[str] = field(default_factory=list)
    has_setstate: bool = False


def _class_table(zf: zipfile.ZipFile, root: str) -> Dict[str, _ClassInfo]:
    """``qualname -> _ClassInfo`` for every class defined in ``<root>/code/``."""
    table: Dict[str, _ClassInfo] = {}
    prefix = f"{root}/code/"
    for name in zf.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        module = name[len(prefix):-3].replace("/", ".")
        info: Optional[_ClassInfo] = None
        for line in zf.read(name).decode("utf-8", "replace").splitlines():
            m = _CLASS_LINE.match(line)
            if m:
                info = table[f"{module}.{m.group(1)}"] = _ClassInfo(is_module=m.group(2) == "Module")
            elif info is not None and _LIST_LINE.match(line):
                kind, names = _LIST_LINE.match(line).groups()  # type: ignore[union-attr]
                (info.parameters if kind == "__parameters__" else info.buffers).extend(map(str, ast.literal_eval(names)))
            elif info is not None and line.startswith("  def __setstate__("):
                info.has_setstate = True
    return table


def _check_objects(objects: List[ScriptObject], table: Dict[str, _ClassInfo]) -> None:
    """Every scripted object must be plain data: defined in ``code/``, state a dict, no ``__setstate__``."""
    for obj in objects:
        info = table.get(obj.qualname)
        if info is None:
            raise TorchScriptError(f"{obj.qualname} has no definition in the archive's code/; refusing")
        if info.has_setstate or not isinstance(obj.state, dict):
            raise TorchScriptError(
                f"{obj.qualname} restores its state with scripted code (__setstate__), which would run on load; "
                f"refusing. If you trust the file, export its tensors with torch.jit.load(...).state_dict() to "
                f"safetensors"
            )


def _collect(obj: ScriptObject, prefix: str, table: Dict[str, _ClassInfo], out: StateDict) -> None:
    """Walk scripted modules as ``Module.state_dict`` does: parameters, buffers, then submodules."""
    info = table[obj.qualname]
    for key in (*info.parameters, *info.buffers):
        value = obj.state.get(key)
        if value is None:  # an optional parameter left unset (MultiheadAttention's q_proj_weight)
            continue
        if not isinstance(value, torch.Tensor):
            raise TorchScriptError(f"{prefix}{key} of {obj.qualname} is a {type(value).__name__}, not a tensor")
        out[prefix + key] = value
    for key, value in obj.state.items():
        if isinstance(value, ScriptObject) and table[value.qualname].is_module:
            _collect(value, f"{prefix}{key}.", table, out)


def read_torchscript(path: Any) -> StateDict:
    """``torch.jit.load(path).state_dict()``, detached, on CPU, computed without running the archive.

    Raises:
        TorchScriptError: the archive holds anything besides scripted modules of plain tensors.
    """
    with zipfile.ZipFile(path) as zf:
        roots = sorted({n.split("/")[0] for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")})
        if len(roots) != 1:
            raise TorchScriptError(f"{path} is a zip without exactly one <root>/data.pkl; not a TorchScript archive "
                                   f"this reader knows (found roots {roots})")
        root = roots[0]
        if f"{root}/byteorder" in zf.namelist() and zf.read(f"{root}/byteorder").strip() != b"little":
            raise TorchScriptError(f"{path} stores big-endian tensors; re-save it on a little-endian machine")
        unpickler = _Unpickler(zf.read(f"{root}/data.pkl"), zf, root)
        top = unpickler.load()
        table = _class_table(zf, root)
    if not isinstance(top, ScriptObject):
        raise TorchScriptError(f"{path}'s data.pkl holds a {type(top).__name__}, not a scripted module")
    _check_objects(unpickler.objects, table)
    if not table[top.qualname].is_module:
        raise TorchScriptError(f"{path}'s data.pkl holds a {top.qualname}, not a scripted module")
    out: StateDict = {}
    _collect(top, "", table, out)
    return out
