"""Pure units (tier 1): sharding arithmetic, the TP dropout stream, config derivations."""

import pytest
import torch

from megatron.model.config import RecomputeConfig
from megatron.model.params import shard, unshard
from megatron.model.rng import TPRandom
from megatron.cli.configs import padded_vocab_size
from ted_patches.config import moe_layer_indices


@pytest.mark.parametrize("stride", [1, 2])
def test_shard_unshard_round_trip_keeps_swiglu_halves_together(stride):
    full = torch.arange(2 * 12 * 3).view(2 * 12, 3)  # [gate; up] rows when stride 2
    shards = [shard(full, 0, r, 4, stride) for r in range(4)]
    assert torch.equal(unshard(shards, 0, stride), full)
    if stride == 2:  # rank r holds rows r*3..r*3+2 of the gate half and of the up half
        assert torch.equal(shards[1], torch.cat([full[3:6], full[15:18]]))


def test_tp_dropout_stream_differs_per_tp_rank_and_leaves_the_default_stream_alone():
    torch.manual_seed(0)
    expected_default = torch.rand(4)
    torch.manual_seed(0)
    streams = [TPRandom(seed=5, tp_rank=r, device="cpu") for r in range(2)]
    draws = []
    for rng in streams:
        with rng.fork():
            draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(torch.rand(4), expected_default)  # forks did not consume the default stream
    again = TPRandom(seed=5, tp_rank=0, device="cpu")
    with again.fork():
        assert torch.equal(torch.rand(4), draws[0])  # reproducible from the seed
    state = streams[0].state_dict()
    with streams[0].fork():
        a = torch.rand(3)
    streams[0].load_state_dict(state)
    with streams[0].fork():
        assert torch.equal(torch.rand(3), a)  # what checkpoint recompute relies on


def test_vocab_padding_and_moe_layer_placement():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 4) == 50688
    # Megatron-DeepSpeed: layers 2, 4, 6
    assert moe_layer_indices(6, expert_interval=2) == (1, 3, 5)
    assert moe_layer_indices(6, layer_freq=2) == (0, 2, 4)  # Megatron-Core: layers 0, 2, 4
    assert moe_layer_indices(4, layer_freq=1) == (0, 1, 2, 3)


def test_recompute_chunks():
    assert RecomputeConfig("full", "uniform", 2).full_chunks(5) == [[0, 1], [2, 3], [4]]
    assert RecomputeConfig("full", "block", 2).full_chunks(5) == [[0], [1]]
    assert RecomputeConfig("selective").full_chunks(5) == []
    with pytest.raises(ValueError, match="method applies to granularity full only") as err:
        RecomputeConfig("selective", "uniform").check(4)
    # the library names config fields; the command line shows its flags (RecomputeConfig's own)
    from megatron.cli.configs import flag_names

    shown = err.value.render(flag_names(err.value.owner))
    assert shown == "--recompute-method applies to --recompute-granularity full only"


def test_comm_ledger_keeps_totals_not_a_growing_list():
    from megatron.parallel.comm import CommLedger
    from megatron.parallel.topology import Group

    ledger = CommLedger()
    ep = Group("ep", None, (0, 1), 0, ledger)
    for _ in range(1000):
        ledger.record("all_to_all", ep, torch.empty(4, 8))
    ledger.record("all_gather", Group("tp", None, (0, 1), 0, ledger),
                  torch.empty(3, dtype=torch.float64))
    assert ledger.count("all_to_all", "ep") == 1000 and ledger.nbytes("all_to_all") == 1000 * 128
    assert ledger.summary() == {("all_to_all", "ep"): (1000, 128000), ("all_gather", "tp"): (1, 24)}
    assert len(ledger.calls) == 2  # bounded by (kind, group) pairs, not by calls
    ledger.reset()
    assert ledger.count() == 0


def test_loss_scaler_follows_megatrons_dynamic_rule():
    from megatron.training.optimizer import LossScaler, OptimizerConfig

    scaler = LossScaler(OptimizerConfig(fp16=True, initial_loss_scale=1024, loss_scale_window=3,
                                        hysteresis=2))
    seen = []
    for overflow in [True, True, True, False, False, False, True, True]:
        scaler.update(overflow)
        seen.append(scaler.scale)
    # hysteresis 2: the 2nd overflow halves, and so does every further one until a clean window
    # of 3 doubles the scale and restores the hysteresis
    assert seen == [1024, 512, 256, 256, 256, 512, 512, 256]
    static = LossScaler(OptimizerConfig(fp16=True, loss_scale=8.0))
    static.update(True)
    assert static.scale == 8.0 and LossScaler(OptimizerConfig()).scale == 1.0


def test_rope_frequencies_stay_fp32_in_a_bf16_model():
    from megatron.model.transformer import RotaryEmbedding

    rope = RotaryEmbedding(64, 10000.0).to(torch.bfloat16)
    cos, _ = rope(torch.tensor([[2047]]))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    want = torch.cos(2047 * inv_freq).float()
    assert cos.dtype == torch.float32 and (cos[0, 0, 0, :32] - want).abs().max() < 1e-3



def test_keep_freed_memory_mapped_applies_and_defers_to_the_users_choice(monkeypatch):
    """pretrain_gpt_moe.py calls it on CPUs: glibc's malloc then keeps freed blocks up to 32 MiB in
    its heap (no page faults for every step's buffers). Run in fresh interpreters: it changes the
    process's allocator for good."""
    import os
    import subprocess
    import sys

    for name in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    code = "from megatron.launch.initialize import keep_freed_memory_mapped as k; print(k())"

    def applied(**env) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={**os.environ, **env}).stdout.strip()

    assert applied() == "True"  # these machines: Linux, glibc
    assert applied(MALLOC_MMAP_THRESHOLD_="65536") == "False"  # the user's own setting stands
