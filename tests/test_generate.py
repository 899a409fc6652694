"""tools/generate.py: sampling rules, generation on an in-process model, and the command line on a
saved checkpoint (with megatron.checkpoint's API)."""

from __future__ import annotations

import pytest
import torch

from harness import ted_groups
from megatron.model.params import stored_tensors
from test_export import ROPE, checkpoint_api, moe, null_tokenizer_meta, tiny
from tools import generate as gen
from util import run_main


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def support(logits, n: int = 400, **kw) -> set[int]:
    g = generator()
    return {gen.next_token(logits, generator=g,
                           **{"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw})
            for _ in range(n)}


# ---- sampling rules -----------------------------------------------------------------------------
PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)


def test_greedy_and_truncations():
    logits = PROBS.log()
    assert support(logits, temperature=0.0) == {1}
    assert support(logits, top_k=1, temperature=5.0) == {1}
    assert support(logits, top_k=2) == {1, 3}
    assert support(logits) == {0, 1, 2, 3}
    # top-p keeps the most likely ids until they hold p: 0.5 + 0.3 reaches 0.8, not 0.81
    assert support(logits, top_p=0.8) == {1, 3}
    assert support(logits, top_p=0.81) == {1, 3, 2}
    assert support(logits, top_p=1e-6) == {1}
    assert support(logits, top_k=3, top_p=0.6) == {1, 3}


def test_sampling_follows_the_distribution():
    g = generator(1)
    counts = torch.bincount(torch.tensor([gen.next_token(PROBS.log(), 1.0, 0, 1.0, g)
                                          for _ in range(4000)]),
                            minlength=4)
    assert (counts / 4000 - PROBS).abs().max() < 0.03, counts


# ---- generation on an in-process model ---------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    # padded vocabulary (90 real ids of 128), MoE in layer 1 with token dropping at eval capacity
    return tiny(ROPE, moe(layers=(1,), drop_tokens=True))


def test_greedy_is_the_argmax_of_the_whole_sequence(model):
    prompt = [5, 17, 3]
    new = gen.generate(model, prompt, max_new_tokens=6, temperature=0.0)
    assert len(new) == 6
    ids = torch.tensor([prompt + new])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None])[0, :, :90]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == new


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=8, temperature=1.5, top_k=40, top_p=0.95)
    first = gen.generate(model, [1, 2], seed=7, **kw)
    assert gen.generate(model, [1, 2], seed=7, **kw) == first
    assert any(gen.generate(model, [1, 2], seed=s, **kw) != first for s in (8, 9, 10))


def test_padded_ids_are_never_sampled(model):
    assert model.cfg.padded_vocab_size > model.cfg.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2]]), torch.arange(2)[None])
    assert torch.isinf(logits[..., model.cfg.vocab_size:]).all()
    new = gen.generate(model, [1], max_new_tokens=15, temperature=50.0, seed=3)
    assert new and max(new) < model.cfg.vocab_size


def test_stops_at_max_positions_and_eod(model):
    limit = model.cfg.max_position_embeddings
    assert len(gen.generate(model, [1] * (limit - 4), max_new_tokens=100, temperature=0.0)) == 4
    assert gen.generate(model, [1] * limit, max_new_tokens=5, temperature=0.0) == []
    with pytest.raises(ValueError, match="more than the model's --max-position-embeddings"):
        gen.generate(model, [1] * (limit + 1), max_new_tokens=1)
    first = gen.generate(model, [4, 4], max_new_tokens=1, temperature=0.0)[0]
    assert gen.generate(model, [4, 4], max_new_tokens=5, temperature=0.0, eod=first) == []


# ---- the command line ---------------------------------------------------------------------------
def run(capsys, *argv) -> tuple[int, str, str]:
    return run_main(capsys, gen.main, *argv)


def test_cli_on_a_saved_checkpoint(model, tmp_path, capsys):
    api = checkpoint_api()
    api.write_model_checkpoint(str(tmp_path / "ckpt"), stored_tensors(model, ted_groups(1, 1)),
                               null_tokenizer_meta(model))
    argv = ["--load", tmp_path / "ckpt", "--prompt", "5 17 3", "--max-new-tokens", 6,
            "--ignore-eod"]
    code, out, err = run(capsys, *argv, "--temperature", 0)
    assert code == 0, err
    want = gen.generate(model, [5, 17, 3], max_new_tokens=6, temperature=0.0)
    assert out.split() == [str(i) for i in [5, 17, 3] + want]
    sampled = [run(capsys, *argv, "--seed", 11, "--top-p", 0.9)[1] for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0].split()) == 9
    # an empty prompt: starts from eod
    code, out, err = run(capsys, "--load", tmp_path / "ckpt", "--max-new-tokens", 3,
                         "--temperature", 0, "--ignore-eod", "--disable-moe-token-dropping")
    assert code == 0 and len(out.split()) == 3, err


@pytest.mark.parametrize("argv,expected", [
    (["--load", "{tmp}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--load", "{tmp}", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--load", "{tmp}", "--top-k", "-2"], "--top-k must be >= 0"),
    (["--load", "{tmp}/missing"], "--load {tmp}/missing: no such directory"),
])
def test_cli_bad_input_exits_2(argv, expected, tmp_path, capsys):
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and expected.format(tmp=tmp_path) in err and "Traceback" not in err, err
