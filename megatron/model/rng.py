"""A second random stream for dropout inside tensor-parallel regions, on any device.

Megatron keeps two streams: the default one, seeded alike on every TP rank, for dropout on
activations that are replicated over TP (they must stay identical), and a "model-parallel" one,
seeded per TP rank, for dropout on activations that are split over TP (attention probabilities
of this rank's heads). Megatron's tracker is CUDA-only; this one swaps the device's default
generator state, so CPU and GPU take the same path.
"""

from __future__ import annotations

import contextlib

import torch

TP_SEED_OFFSET = 2718  # Megatron's offset for the model-parallel stream


def default_generator(device: torch.device) -> torch.Generator:
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    return module.default_generators[index]


class TPRandom:
    """The per-TP-rank stream: `with rng.fork(): dropout(...)`."""

    def __init__(self, seed: int, tp_rank: int, device):
        self.device = torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed + TP_SEED_OFFSET + tp_rank)
        self._state = gen.get_state()

    @contextlib.contextmanager
    def fork(self):
        gen = default_generator(self.device)
        outer = gen.get_state()
        gen.set_state(self._state)
        try:
            yield
        finally:
            self._state = gen.get_state()
            gen.set_state(outer)

    def state_dict(self) -> dict:
        return {"state": self._state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._state = state["state"].clone()
