"""mmengine checkpoints under ``torch.load(weights_only=True)`` (the default since torch 2.6).

An mmengine 0.10 checkpoint (``Runner.save_checkpoint`` / ``CheckpointHook``) pickles, besides tensors, the
message hub's ``HistoryBuffer`` objects: numpy arrays and scalars, and the buffer's statistics functions as
``getattr(HistoryBuffer, "min")``. None of that is on torch's allow-list, so ``mmengine.runner.load_checkpoint``
and ``Runner.resume`` fail with "Unsupported global". :func:`register_mmengine_safe_globals` (run when
``alphaclip_plugins.integrations.mmdet`` is imported) allows exactly those, each restricted to data:

* ``HistoryBuffer``: a plain data class (two arrays and a length; no ``__setstate__``, no ``__reduce__``);
* ``numpy.ndarray`` / ``numpy.dtype`` (and numpy 2's dtype classes) and numpy's array and scalar
  rebuilders, refusing array subclasses and object scalars: they only turn bytes into numbers (the
  elements of an object array would come from the same restricted unpickler);
* ``getattr``, registered under its name but answering only ``HistoryBuffer``'s four statistics
  (``min``, ``max``, ``current``, ``mean``): any other lookup is refused, so nothing can reach ``os.system``.
"""
from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

_STATISTICS = ("min", "max", "current", "mean")
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x, 2.x


def _history_buffer_statistic(obj: Any, name: str) -> Any:
    """``getattr`` limited to ``HistoryBuffer.min/max/current/mean``, what mmengine pickles."""
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refusing getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) while loading "
                     f"a checkpoint: only HistoryBuffer's statistics ({', '.join(_STATISTICS)}) are allowed")


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing a numpy array of dtype {dtype!r} while loading a checkpoint: only plain "
                         f"numeric dtypes are allowed")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` for plain ``ndarray`` only (an empty array; ``__setstate__`` fills it)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing the numpy array subclass {subtype!r} while loading a checkpoint")
    if isinstance(dtype, (bytes, str)):
        dtype = np.dtype(dtype)
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _scalar(dtype: np.dtype, data: bytes = b"") -> Any:
    """numpy's ``scalar`` for numeric dtypes: the value from its bytes."""
    _check_dtype(dtype)
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing a numpy scalar built from {type(data).__name__} while loading a checkpoint")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def register_mmengine_safe_globals() -> None:
    """Allow what mmengine checkpoints pickle in ``torch.load(weights_only=True)``; idempotent."""
    if not hasattr(torch.serialization, "add_safe_globals"):  # torch < 2.4 loads them anyway
        return
    allowed = [HistoryBuffer, np.ndarray, np.dtype, (_history_buffer_statistic, "builtins.getattr")]
    for module in _NUMPY_CORE:
        allowed += [(_reconstruct, f"{module}._reconstruct"), (_scalar, f"{module}.scalar")]
    # numpy >= 1.25 pickles dtypes by class (numpy.dtypes.Float64DType); all are plain numeric or string types.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"]
    torch.serialization.add_safe_globals(allowed)
