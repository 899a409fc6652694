"""Reading the peers' pickled checkpoint files without running code from them.

Megatron-LM's `model_optim_rng.pt`, DeepSpeed's `*_model_states.pt` and Megatron-Core's
`common.pt` are `torch.save` pickles. They are read with `torch.load(weights_only=True)` (torch's
restricted unpickler: tensors, containers, numbers and strings) plus an explicit allow-list of the
few classes these files hold besides: `argparse.Namespace` (Megatron's `args`), numpy's arrays
(the RNG states), and Megatron-Core's enums when it is installed. Anything else, e.g. a crafted
file whose pickle would call `os.system`, is refused by name before any of it is built.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

import torch

from megatron.convert.common import ConversionError


def _numpy_globals() -> list:
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    scalars = [np.dtype(t).__class__ for t in ("float64", "float32", "int64", "int32", "uint32",
                                               "uint8", "bool")]
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
            multiarray.multiarray.scalar, *scalars]


def _megatron_enums() -> list:
    """Megatron-Core's enums in Megatron-LM's `args` (constructed by value: no code runs)."""
    found = []
    try:
        from megatron.core import enums
        from megatron.core.transformer import enums as transformer_enums
    except ImportError:
        return found
    for module in (enums, transformer_enums):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, __import__("enum").Enum):
                found.append(value)
    return found


def allowed_globals() -> list:
    """The classes and functions beyond torch's own weights-only set that a peer file may name."""
    return [argparse.Namespace, *_numpy_globals(), *_megatron_enums()]


_REFUSED = re.compile(r"GLOBAL\s+([\w.]+)")


def load(path: str, what: str) -> Any:
    """`torch.load` of a peer's pickle, weights only. Raises ConversionError naming the class a
    crafted (or unknown) file would import, and FileNotFoundError naming a missing file; `what`
    says which file it is (in messages)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, and others for corrupt files
        message = str(e)
        found = _REFUSED.search(message)
        if found:
            raise ConversionError(f"{what} {path}: refused to load: it names {found.group(1)}, "
                                  "which is not on the allow-list of safe classes (the file may "
                                  "run code; nothing of it was run)") from None
        first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        raise ConversionError(f"{what} {path} is not a readable torch file ({first[:200]})") \
            from None


# ---- DCP metadata as megatron-core writes it ----------------------------------------------------
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    # megatron-core's planner keeps its save plans in the metadata (plain dataclasses and enums)
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType",
                                             "TensorWriteData", "LoadPlan", "ReadItem",
                                             "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "strided"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "builtins": {"set", "frozenset"},
}


class _DCPUnpickler(__import__("pickle").Unpickler):
    def find_class(self, module, name):
        if (name in _DCP_CLASSES.get(module, ())
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise ConversionError(f"refused to load: it names {module}.{name}, which is not on the "
                              "allow-list of DCP metadata classes (nothing of it was run)")

    def persistent_load(self, pid):
        raise ConversionError("refused to load: a persistent id in DCP metadata")


def load_dcp_metadata(path: str):
    """A DCP `.metadata` file (torch.distributed.checkpoint's pickle), classes allow-listed."""
    import pickle

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    try:
        with open(path, "rb") as f:
            metadata = _DCPUnpickler(f).load()
    except ConversionError as e:
        raise ConversionError(f"{path}: {e}") from None
    except (EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
        raise ConversionError(f"{path} is unreadable or truncated ({type(e).__name__}: "
                              f"{e})") from None
    if type(metadata).__name__ != "Metadata":
        raise ConversionError(f"{path}: not DCP metadata")
    return metadata
