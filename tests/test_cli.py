"""Bad input fails before any collective, on every rank, naming the flag and a way out, in one
line printed once (by rank 0 when every rank sees the same error)."""

import os
import subprocess
import sys
import time

import pytest

import pretrain_gpt_moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --train-iters 2 --lr 1e-3 --mock-data --vocab-size 100").split()


def fails(argv, world, capsys, rank=0, monkeypatch=None) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    # a quiet rank's wait (so that under torchrun the printing rank leaves first) is real-launch
    # behaviour, checked with torchrun in test_preemption.py; in-process it only costs 5 s a case
    monkeypatch.setattr("megatron.cli.preflight.QUIET_EXIT_DELAY_S", 0.0)
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpt_moe.load_config(BASE + argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("world,argv,expect", [
    (6, ["--tensor-model-parallel-size", "4"], "--tensor-model-parallel-size 4; use one of [1, 2]"),
    (2, ["--tensor-model-parallel-size", "2", "--num-attention-heads", "1"],
     "--num-attention-heads 1 is not divisible"),
    (4, ["--tensor-model-parallel-size", "4", "--ffn-hidden-size", "66"],
     "--ffn-hidden-size 66 is not divisible"),
    (1, ["--hidden-size", "66"], "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    (2, ["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be >= 1"),
    (8, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "3",
         "--num-experts", "6"],
     "--expert-model-parallel-size 3; use one of [1, 2]"),
    (4, ["--expert-model-parallel-size", "4", "--num-experts", "6"],
     "--num-experts 6 is not divisible"),
    (1, ["--num-experts", "8", "--moe-router-topk", "9"],
     "--moe-router-topk 9 must be between 1 and --num-experts 8"),
    (1, ["--num-experts", "8", "--moe-expert-capacity-factor", "0"],
     "--moe-expert-capacity-factor must be > 0"),
    (1, ["--num-experts", "8", "--topk", "2", "--moe-train-capacity-factor", "-1"],
     "--moe-expert-capacity-factor must be > 0"),
    (2, ["--expert-model-parallel-size", "2"], "needs --num-experts"),
    (1, ["--fp16", "--bf16"], "--fp16 and --bf16 are both given"),
    (2, ["--global-batch-size", "6"],
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (1, ["--pipeline-model-parallel-size", "2"],
     "world size 1 is not divisible by --pipeline-model-parallel-size 2; use one of [1]"),
    (2, ["--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
         "--num-experts", "4", "--disable-moe-dtd"],
     "--expert-tensor-parallel-size 1 != --tensor-model-parallel-size 2: the TP ranks must send "
     "different tokens to the experts; drop --disable-moe-dtd or add --sequence-parallel"),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "15"],
     "use a multiple of 2"),
    (1, ["--recompute-granularity", "full"], "--recompute-method uniform or block"),
    (1, ["--num-experts", "4", "--expert-interval", "3", "--num-layers", "2"],
     "no layer of --num-layers 2"),
    (1, ["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (1, ["--seq-length", "0"], "--seq-length must be >= 1"),
    (1, ["--num-attention-heads", "0"], "--num-attention-heads must be >= 1"),
    (1, ["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)"),
    (1, ["--min-lr", "-1"], "--min-lr must be >= 0"),
    (1, ["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (1, ["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1)"),
    (1, ["--adam-beta2", "1.0"], "--adam-beta2 must be in [0, 1)"),
    (1, ["--fp16", "--loss-scale-window", "0"], "--loss-scale-window must be >= 1"),
    (1, ["--lr-warmup-iters", "1", "--lr-warmup-fraction", "0.1"], "are both given"),
    (1, ["--lr-decay-iters", "0"], "--lr-decay-iters must be >= 1"),
    (1, ["--swiglu", "--hidden-size", "16", "--num-attention-heads", "4"], "give it explicitly"),
    (1, ["--data-path", "corpus_text_document"], "--mock-data and --data-path both given"),
    (1, ["--save-retain-interval", "0"], "--save-retain-interval must be >= 1"),
    (1, ["--ckpt-format", "fsdp_dtensor"], "use --ckpt-format torch_dist"),
])
def test_bad_layout_or_flag_is_a_clear_error(world, argv, expect, capsys, monkeypatch):
    err = fails(argv, world, capsys, rank=0, monkeypatch=monkeypatch)
    assert (err.startswith("pretrain_gpt_moe.py: error: ") and expect in err
            and err.count("\n") == 1), err
    if world > 1:  # every rank sees the same error: only rank 0 prints it, all exit with 2
        assert fails(argv, world, capsys, rank=world - 1, monkeypatch=monkeypatch) == ""


def test_missing_or_broken_data_files_name_the_file(tmp_path, capsys, monkeypatch):
    base = [a for a in BASE if a != "--mock-data"]
    monkeypatch.setattr(sys, "argv", ["x"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    prefix = str(tmp_path / "corpus_text_document")
    with pytest.raises(SystemExit):
        pretrain_gpt_moe.load_config(base + ["--tokenizer-type", "NullTokenizer",
                                             "--data-path", prefix])
    assert f"{prefix}.idx not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain_gpt_moe.load_config(base + ["--tokenizer-type", "SentencePieceTokenizer",
                                             "--tokenizer-model", str(tmp_path / "nope.model"),
                                             "--data-path", prefix])
    assert "--tokenizer-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain_gpt_moe.load_config([a for a in base if a != "--vocab-size" and a != "100"])
    assert "--data-path" in capsys.readouterr().err


def test_split_and_tensorboard_problems_are_caught_before_training(tmp_path, capsys, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import numpy
    import torch

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    prefix = str(tmp_path / "tiny_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in range(3):
        builder.add_document(torch.arange(50, dtype=torch.int64) + doc, [50])
    builder.finalize(prefix + ".idx")
    base = [a for a in BASE if a != "--mock-data"] + ["--tokenizer-type", "NullTokenizer",
                                                      "--data-path", prefix]
    cases = [
        (["--split", "abc"], "--split 'abc': give up to three non-negative weights"),
        # 3 documents: none for train
        (["--split", "1,999,0", "--eval-iters", "1"], "the train split of"),
        (["--split", "1,1,1", "--tensorboard-dir", prefix + ".bin/tb"],
         "is not a writable directory"),
    ]
    for argv, expect in cases:
        with pytest.raises(SystemExit) as exit_info:
            pretrain_gpt_moe.load_config(base + argv)
        assert exit_info.value.code == 2 and expect in capsys.readouterr().err, argv
    cfg, _ = pretrain_gpt_moe.load_config(base + ["--split", "1,1,1", "--eval-iters", "1"])  # fine
    # 2 steps of 2 samples; one evaluation and one test of 1 batch
    assert cfg.train.num_samples() == (4, 2, 2)
    capsys.readouterr()
    # Megatron's default split on 3 documents leaves valid and test empty: a warning each, then
    # training
    pretrain_gpt_moe.load_config(base + ["--eval-iters", "1"])
    warnings = capsys.readouterr().err.splitlines()
    assert ([w.split(" split of")[0].rsplit(" ", 1)[-1] for w in warnings]
            == ["valid", "test"]), warnings
    assert all(w.startswith("pretrain_gpt_moe.py: warning: --split 969, 30, 1: the ")
               for w in warnings)


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpt_moe.load_config(BASE + ["--no-such-flag", "/tmp/ckpt"])
    assert (exit_info.value.code == 2
            and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err)


def test_every_rank_of_a_real_launch_exits_before_any_collective():
    """Four real processes of a world of 4 with an invalid layout (TP=3): each exits with status 2
    without ever waiting for a peer (no rendezvous happens); rank 0 alone prints the error."""
    argv = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *BASE,
            "--tensor-model-parallel-size", "3"]
    start = time.time()
    procs = []
    for rank in range(4):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="1", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err
        if rank == 0:
            assert err.startswith("pretrain_gpt_moe.py: error: world size 4 is not divisible by "
                                  "--tensor-model-parallel-size 3") and err.count("\n") == 1, err
        else:
            assert err == "", err
    assert time.time() - start < 60


def test_help_documents_every_flag():
    from megatron.cli.arguments import build_parser

    undocumented = [a.option_strings[0] for a in build_parser()._actions
                    if a.option_strings and not a.help]
    assert undocumented == []


def test_bf16_reduces_gradients_in_fp32_unless_told_otherwise(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    cfg, _ = pretrain_gpt_moe.load_config(BASE + ["--bf16"])
    assert cfg.optim.accumulate_grads_in_fp32
    cfg, _ = pretrain_gpt_moe.load_config(BASE + ["--bf16", "--grad-reduce-in-bf16"])
    assert not cfg.optim.accumulate_grads_in_fp32
    cfg, _ = pretrain_gpt_moe.load_config(BASE + ["--fp16"])
    assert not cfg.optim.accumulate_grads_in_fp32
