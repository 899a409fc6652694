"""Each rank's random-number streams: saved beside a checkpoint as tensors and plain numbers
only."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from megatron.checkpoint.storage import CheckpointError


def rng_state(model) -> dict:
    """Every random stream training draws from on this rank, as tensors and numbers only."""
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "tp_stream": model.rng.state_dict()["state"],
           "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64),
                      "gauss": gauss},
           "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                     "has_gauss": has_gauss, "cached": cached}}
    if model.rng.device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(model.rng.device)
    return out


def set_rng_state(model, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    model.rng.load_state_dict({"state": state["tp_stream"]})
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    if "cuda" in state and model.rng.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], model.rng.device)


def read_rng_file(folder: str, rank: int) -> dict:
    path = rng_file(folder, rank)
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete (or pass "
                              "--no-load-rng)") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain data
        raise CheckpointError(f"{path} is unreadable or not plain data; refused "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, "rng", f"rank_{rank:05d}.pt")


def save_torch(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
