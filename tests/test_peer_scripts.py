"""The peers' own launch scripts run unchanged (sizes shrunk, data and tokenizer paths ours):
Megatron-DeepSpeed's examples_deepspeed/MoE/ds_pretrain_gpt_350M_MoE128.sh and Megatron-LM's
examples/mixtral/train_mixtral_8x7b_distributed.sh, each flag meaning what it means there."""

import json
import os
import subprocess
import sys

import numpy
import pytest
import torch

from harness import run
from megatron.cli.arguments import ConfigError, parse_args
from megatron.cli.configs import build_config
from test_training import logged, pretrain_case
from util import gpt2_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpt2_corpus(tmp_path_factory) -> str:
    """A .bin/.idx corpus of GPT-2 ids (random documents)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("gpt2") / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        doc = torch.randint(0, 50256, (int(torch.randint(20, 80, (1,), generator=gen)),),
                            generator=gen)
        builder.add_document(torch.cat([doc, torch.tensor([50256])]), [len(doc) + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def ds_config(path, **overrides) -> str:
    """The script's ds_config_gpt_TEMPLATE.json as its sed lines fill it (fp16 as its flags say)."""
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1,
              "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
              "prescale_gradients": False,
              "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
                       "min_loss_scale": 1, "initial_scale_power": 11},
              "bf16": {"enabled": False},
              "curriculum_learning": {"enabled": False, "curriculum_type": "seqlen",
                                      "min_difficulty": 80, "max_difficulty": 2048,
                                      "schedule_type": "fixed_linear"},
              "wall_clock_breakdown": False}
    config.update(overrides)
    with open(path, "w") as f:
        json.dump(config, f)
    return str(path)


def deepspeed_moe_script(tmp_path, data: str, config: str) -> list[str]:
    """megatron_options + data_options + deepspeed_options of ds_pretrain_gpt_350M_MoE128.sh, with
    ACTIVATION_CHECKPOINT=true and EP_SIZE > 1, shrunk: 2 layers, hidden 32, 4 experts on 2 ranks,
    128-token steps, --train-tokens cutting 12 iterations to 5."""
    vocab, merges = gpt2_files()
    ckpt, tb = str(tmp_path / "checkpoint"), str(tmp_path / "tensorboard")
    return (f"--override-opt_param-scheduler --adam-beta1 0.9 --adam-beta2 0.95 "
            f"--tensor-model-parallel-size 1 --moe-expert-parallel-size 2 --num-experts 4 "
            f"--moe-loss-coeff 0.01 --moe-train-capacity-factor 1.0 --moe-eval-capacity-factor 1.0 "
            f"--moe-min-capacity 4 --init-method-std 0.014 --lr-decay-tokens 1280 "
            f"--lr-warmup-tokens 256 --micro-batch-size 2 --exit-duration-in-mins 30000000 "
            f"--global-batch-size 8 --num-layers 2 --hidden-size 32 --num-attention-heads 4 "
            f"--seq-length 16 --max-position-embeddings 16 --train-tokens 640 --train-iters 12 "
            f"--lr 2.0e-4 --min-lr 2e-06 --lr-decay-style cosine --split 98,2,0 --log-interval 1 "
            f"--eval-interval 3 --eval-iters 1 --save-interval 3 --weight-decay 0.1 "
            f"--clip-grad 1.0 --hysteresis 2 --num-workers 0 --fp16 --load {ckpt} --save {ckpt} "
            f"--tensorboard-queue-size 1 --log-timers-to-tensorboard "
            f"--log-batch-size-to-tensorboard --log-validation-ppl-to-tensorboard "
            f"--tensorboard-dir {tb} --checkpoint-activations --create-moe-param-group "
            f"--vocab-file {vocab} --merge-file {merges} --data-path {data} --data-impl mmap "
            f"--deepspeed --deepspeed_config {config} --pipeline-model-parallel-size 1 "
            f"--no-pipeline-parallel --deepspeed-activation-checkpointing").split() + [
                "--tokenizer-type", "GPT2BPETokenizer"]


def mixtral_script(tokenizer_model: str) -> list[str]:
    """MODEL_ARGS .. LOGGING_ARGS of train_mixtral_8x7b_distributed.sh, shrunk (hidden 32, seq
    16)."""
    return (f"--use-mcore-models --disable-bias-linear --seq-length 16 "
            f"--max-position-embeddings 32 --num-layers 2 --hidden-size 32 --ffn-hidden-size 56 "
            f"--num-attention-heads 4 --init-method-std 0.01 --attention-dropout 0.0 "
            f"--hidden-dropout 0.0 --normalization RMSNorm --position-embedding-type rope "
            f"--swiglu --untie-embeddings-and-output-weights --group-query-attention "
            f"--num-query-groups 2 --no-masked-softmax-fusion --no-position-embedding "
            f"--rotary-base 1000000 --num-experts 2 --moe-router-topk 2 "
            f"--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2 "
            f"--moe-token-dispatcher-type alltoall --overlap-param-gather --overlap-grad-reduce "
            f"--tokenizer-type Llama2Tokenizer --tokenizer-model {tokenizer_model} --mock-data "
            f"--split 99990,8,2 --micro-batch-size 1 --global-batch-size 4 --lr 1e-4 "
            f"--train-iters 7 --min-lr 1.0e-5 --weight-decay 0.1 --clip-grad 1.0 "
            f"--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
            f"--expert-model-parallel-size 2 --use-distributed-optimizer --sequence-parallel "
            f"--eval-iters 10 --no-load-optim --no-load-rng").split() + ["--log-interval", "1"]


def test_megatron_deepspeed_moe_example_runs_and_resumes(tmp_path, gpt2_corpus):
    argv = deepspeed_moe_script(tmp_path, gpt2_corpus, ds_config(tmp_path / "ds.json"))
    first = run(2, pretrain_case, argv)[0]
    assert (len(logged(first["printed"], "lm loss"))
            + first["printed"].count("number of skipped iterations:   1") >= 5)
    # --train-tokens 640 = 5 steps of 128 tokens
    assert "iteration        5/       5" in first["printed"]
    assert ("accepted with no effect here: --create-moe-param-group --no-pipeline-parallel"
            in first["printed"])
    assert ("fields with no meaning here, ignored: curriculum_learning, prescale_gradients, "
            "steps_per_print" in first["printed"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"batch-size", "forward-backward-time", "iteration-time",
            "lm-loss validation ppl"} <= tags, tags
    cfg = build_config(parse_args(argv), 2, 50257)
    assert (cfg.optim.fp16 and cfg.optim.use_distributed_optimizer
            and cfg.optim.initial_loss_scale == 2.0**11)
    assert cfg.recompute.granularity == "full" and cfg.recompute.method == "uniform"
    assert cfg.train.schedule.unit == "tokens" and cfg.train.schedule.warmup_steps == 256
    # the script passes --load and --save of one directory: run again with more tokens and it
    # resumes
    more = [a if a != "640" else "1280" for a in argv]
    second = run(2, pretrain_case, more)[0]
    assert "loaded" in second["printed"] and "iteration        6/      10" in second["printed"]


def test_mixtral_example_runs(tmp_path):
    model = str(tmp_path / "spm")
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("\n".join(
        json.dumps({"text": f"line {i} of a small corpus with words to learn, number {i * 7}"})
        for i in range(400)))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"),
                           "--input", str(corpus), "--model-prefix", model, "--vocab-size", "320"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # data read in the rank itself: two loader processes per rank and per evaluation cost ~100 s
    # of CPU inside the test harness's worlds (and test nothing the script's flags say)
    argv = mixtral_script(model + ".model") + ["--num-workers", "0"]
    out = run(2, pretrain_case, argv)[0]
    losses = logged(out["printed"], "lm loss")
    assert len(losses) == 7 and all(l == l for l in losses)
    assert "--use-mcore-models --no-masked-softmax-fusion" in out["printed"]
    assert "--sequence-parallel has no effect with --tensor-model-parallel-size 1" in out["printed"]
    cfg = build_config(parse_args(argv), 2, 320)
    assert cfg.model.num_query_groups == 2 and cfg.model.position_embedding_type == "rope"
    assert cfg.optim.overlap_grad_reduce and cfg.optim.overlap_param_gather
    assert (cfg.moe.aux_loss_type == "aux_loss"
            and cfg.data.tokenizer_type == "SentencePieceTokenizer")


# ---- one flag at a time --------------------------------------------------------------------------
BASE = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 --mock-data "
        "--vocab-size 100").split()


def config(argv, world=2):
    return build_config(parse_args(BASE + argv), world, 101)


def test_deepspeed_config_fills_flags_and_rejects_contradictions(tmp_path):
    path = ds_config(tmp_path / "ds.json", train_batch_size=16, train_micro_batch_size_per_gpu=4,
                     gradient_clipping=0.5, zero_optimization={"stage": 0},
                     fp16={"enabled": False}, bf16={"enabled": True})
    batch = {BASE.index("--micro-batch-size"), BASE.index("--global-batch-size")}
    argv = [a for i, a in enumerate(BASE) if i not in batch and i - 1 not in batch]
    cfg = build_config(parse_args(argv + ["--micro-batch-size", "4", "--deepspeed",
                                          "--deepspeed_config", path]), 2, 101)
    assert ((cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.optim.clip_grad)
            == (16, 4, 0.5))
    assert cfg.model.params_dtype == torch.bfloat16 and not cfg.optim.use_distributed_optimizer
    # --micro-batch-size 2 contradicts train_micro_batch_size_per_gpu 4
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--deepspeed", "--deepspeed_config", path])
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--deepspeed_config", ds_config(tmp_path / "z2.json",
                                                           zero_optimization={"stage": 2})])
    accumulate = ds_config(tmp_path / "gas.json", gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 3"):
        config(["--deepspeed", "--deepspeed_config", accumulate, "--fp16"])


def test_bad_peer_flags_name_the_flag(capsys):
    for argv, expect in ((["--moe-token-dispatcher-type", "allgather"], "only alltoall"),
                         (["--data-impl", "lazy"], "only mmap"),
                         (["--deepspeed"], "--deepspeed needs --deepspeed_config FILE")):
        with pytest.raises(SystemExit):
            parse_args(BASE + argv)
        assert expect in capsys.readouterr().err, argv
    with pytest.raises(ConfigError, match="--num-query-groups 2 is not divisible by "
                                          "--tensor-model-parallel-size 4"):
        config(["--group-query-attention", "--num-query-groups", "2",
                "--tensor-model-parallel-size", "4"], world=4)


def test_schedules_in_iterations_samples_and_tokens_are_one_schedule():
    """Warmup 2 and decay 8 iterations of 8 samples of 16 tokens, in each unit: the same learning
    rates."""
    from megatron.training.lr_schedule import build_scheduler

    def lrs(argv):
        cfg = config(argv + ["--lr-decay-style", "cosine"])
        holder = type("Opt", (), {"param_groups": [{"lr": 0.0, "weight_decay": 0.0,
                                                    "wd_mult": 1.0}]})()
        sched = build_scheduler(holder, cfg.train.schedule, 1e-3, 1e-4, 0.0)
        out = []
        for _ in range(10):
            sched.step(cfg.train.schedule.per_iteration)
            out.append(holder.param_groups[0]["lr"])
        return out

    iters = lrs(["--lr-warmup-iters", "2", "--lr-decay-iters", "8"])
    assert lrs(["--lr-warmup-samples", "16", "--lr-decay-samples", "64"]) == iters
    assert lrs(["--lr-warmup-tokens", "256", "--lr-decay-tokens", "1024"]) == iters
    at = BASE.index("--train-iters")
    by_samples = build_config(parse_args(BASE[:at] + BASE[at + 2:] + ["--train-samples", "40"]),
                              2, 101)
    assert by_samples.train.train_iters == 5  # 40 samples in global batches of 8
    # 128 tokens a step: the 3rd reaches 300
    assert config(["--train-tokens", "300"]).train.train_iters == 3


def test_pyramid_moe_gives_each_layer_its_expert_count():
    """--num-experts 4 8 with MoE every other layer of 4: layer 2 has 4 experts, layer 4 has 8, each
    split over EP = 2 (2 and 4 local experts)."""
    from harness import ted_groups  # noqa: F401  (the world's groups are built inside the case)

    counts = run(2, pyramid_case)[0]
    assert counts == {1: (4, 2), 3: (8, 4)}
    with pytest.raises(ConfigError, match="gives 3 counts for 2 MoE layers"):
        config(["--num-experts", "4", "8", "8"])
    with pytest.raises(ConfigError, match=r"--num-experts \(MoE layer 1 of 2\) 6 is not divisible"):
        config(["--num-experts", "6", "8", "--expert-model-parallel-size", "4"], world=4)


def pyramid_case():
    from harness import ted_groups
    from ted_patches.build import build_model

    cfg = build_config(parse_args(BASE + ["--num-experts", "4", "8",
                                          "--expert-model-parallel-size", "2",
                                          "--mlp-type", "residual"]), 2, 101)
    model = build_model(cfg.model, cfg.moe, ted_groups(1, 2), seed=cfg.train.seed, device="cpu",
                        recompute=cfg.recompute)
    out = {i: (layer.mlp.router.weight.shape[0], layer.mlp.experts.w1.shape[0])
           for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "router")}
    return out if torch.distributed.get_rank() == 0 else None
