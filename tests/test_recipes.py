"""Megatron-Core's own MoE recipes (Megatron-LM's tests/functional_tests/test_cases/moe), one per
family, run with their own flags at a layout of their shape, shrunk: sizes, steps and paths
replaced, every other flag as the recipe gives it. Each trains to the end; the notices name the
flags that only tune a kernel here; the flags still refused are listed with why.

Families: the expert grid apart from TP with sequence parallelism and the logging / checkpoint
switches (gpt3_mcore_te_tp2_pp1_te_8experts_etp1_ep4); TP 4 x PP 2 with the experts' own TP and
sinkhorn routing (gpt3_mcore_tp2_pp2_ep2_etp2_te_4experts2parallel); the DeepSeek-V3 proxy (MLA,
sigmoid router with expert bias and groups, shared expert, seq_aux_loss, layer pattern, PP 2, EP 2;
deepseek_proxy_ep2_pp2_1node_conv).
"""

from __future__ import annotations

import pytest

from harness import run
from test_training import logged, pretrain_case

# flags that would resize the run: replaced by the shrunk values below (the rest is the recipe's)
SHRUNK = {"--hidden-size": "32", "--num-attention-heads": "4", "--seq-length": "16",
          "--max-position-embeddings": "16", "--micro-batch-size": "2",
          "--global-batch-size": "8", "--train-iters": "3", "--eval-interval": "3",
          "--eval-iters": "1", "--ffn-hidden-size": "64", "--moe-ffn-hidden-size": "32",
          "--moe-shared-expert-intermediate-size": "32", "--kv-channels": "8",
          "--q-lora-rank": "16", "--kv-lora-rank": "8", "--qk-head-dim": "8",
          "--qk-pos-emb-head-dim": "4", "--v-head-dim": "8", "--make-vocab-size-divisible-by": "8"}
# paths and data: a mock corpus, this test's folders
DROPPED = {"--data-path", "--vocab-file", "--merge-file", "--split", "--data-cache-path"}

# the flags both GPT-3 MoE recipes below start with
GPT3_MOE = """--num-layers 12 --hidden-size 512 --num-attention-heads 8 --log-params-norm
--log-num-zeros-in-grad --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard
--tensorboard-dir TB --micro-batch-size 4 --global-batch-size 32 --seq-length 1024
--max-position-embeddings 1024 --train-iters 50 --timing-log-level 0 --lr-decay-iters 320000
--save CKPT --load CKPT --data-path DATA --vocab-file V --merge-file M --split 949,50,1
--distributed-backend nccl --lr 0.00015 --lr-decay-style cosine --min-lr 1.0e-5 --weight-decay 1e-2
--clip-grad 1.0 --lr-warmup-fraction .01 --log-interval 1 --save-interval 10000
--eval-interval 1000 --eval-iters 10
"""
ETP1_EP4 = GPT3_MOE + """--transformer-impl transformer_engine
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --expert-model-parallel-size 4
--expert-tensor-parallel-size 1 --disable-bias-linear --sequence-parallel --num-experts 8
--moe-router-load-balancing-type aux_loss --moe-router-topk 2 --moe-aux-loss-coeff 1e-2
--deterministic-mode --no-gradient-accumulation-fusion --moe-grouped-gemm
--attention-softmax-in-fp32 --use-mcore-models --ckpt-format torch_dist
--dist-ckpt-optim-fully-reshardable --dist-ckpt-strictness log_all --data-cache-path C --bf16
--attention-backend unfused --no-bias-gelu-fusion --log-memory-to-tensorboard"""

TP4_PP2_ETP2 = GPT3_MOE + """--transformer-impl local --tensor-model-parallel-size 4
--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --expert-tensor-parallel-size 2
--sequence-parallel --num-experts 4 --moe-router-load-balancing-type sinkhorn --moe-router-topk 1
--deterministic-mode --no-gradient-accumulation-fusion --use-mcore-models --ckpt-format torch_dist
--dist-ckpt-strictness log_all --data-cache-path C --bf16 --attention-backend unfused
--disable-bias-linear --no-bias-gelu-fusion --log-memory-to-tensorboard --async-save
--use-persistent-ckpt-worker"""

DEEPSEEK_PROXY = """--distributed-timeout-minutes 60 --tensor-model-parallel-size 1
--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --context-parallel-size 1
--expert-tensor-parallel-size 1 --use-distributed-optimizer --overlap-grad-reduce
--overlap-param-gather --use-mcore-models --sequence-parallel --disable-bias-linear
--micro-batch-size 128 --global-batch-size 1024 --train-iters 1000 --exit-duration-in-mins 60
--cross-entropy-fusion-impl te --manual-gc --manual-gc-interval 10 --deterministic-mode --seed 42
--transformer-impl transformer_engine --recompute-granularity selective
--recompute-modules [layernorm mla_up_proj moe_act] --fine-grained-activation-offloading
--offload-modules [core_attn attn_proj] --seq-length 1024 --data-cache-path C --data-path DATA
--vocab-file V --merge-file M --split 949,50,1 --num-layers 2 --hidden-size 512
--ffn-hidden-size 2048 --num-attention-heads 8 --kv-channels 128 --max-position-embeddings 1024
--position-embedding-type rope --rotary-base 10000 --make-vocab-size-divisible-by 64
--normalization RMSNorm --norm-epsilon 1e-6 --swiglu --untie-embeddings-and-output-weights
--multi-latent-attention --attention-dropout 0.0 --hidden-dropout 0.0 --clip-grad 1.0
--weight-decay 0.1 --qk-layernorm --lr-warmup-fraction .01 --lr 0.00015 --min-lr 1.0e-5
--lr-decay-style cosine --adam-beta1 0.9 --adam-beta2 0.95 --num-experts 8
--moe-layer-freq ([0]*1+[1]*1) --moe-ffn-hidden-size 1024
--moe-shared-expert-intermediate-size 1024 --moe-router-load-balancing-type seq_aux_loss
--moe-router-topk 2 --moe-grouped-gemm --moe-aux-loss-coeff 1e-4 --moe-router-group-topk 4
--moe-router-num-groups 4 --moe-router-topk-scaling-factor 2.5 --moe-router-score-function sigmoid
--moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3 --moe-router-dtype fp32
--moe-permute-fusion --moe-router-pre-softmax --moe-token-dispatcher-type alltoall
--q-lora-rank 256 --kv-lora-rank 128 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128
--rotary-scaling-factor 1.0 --mscale 1.0 --mscale-all-dim 1.0 --eval-iters 10 --eval-interval 100
--init-method-std 0.02 --log-timers-to-tensorboard --log-memory-to-tensorboard
--log-num-zeros-in-grad --log-params-norm --log-validation-ppl-to-tensorboard --log-throughput
--log-interval 1 --tensorboard-dir TB"""
# still refused in that recipe, and why: FP8 needs Transformer Engine's kernels
DEEPSEEK_PROXY_REFUSED = "--fp8-format hybrid --fp8-recipe tensorwise"


def shrunk(recipe: str, tmp_path) -> list[str]:
    words, out, i = recipe.split(), [], 0
    paths = {"TB": str(tmp_path / "tb"), "CKPT": str(tmp_path / "ckpt")}
    while i < len(words):
        flag = words[i]
        values = []
        while i + 1 < len(words) and not words[i + 1].startswith("--"):
            i += 1
            values.append(words[i])
        i += 1
        if flag in DROPPED:
            continue
        if flag in SHRUNK:
            values = [SHRUNK[flag]]
        out += [flag] + [paths.get(v, v) for v in values]
    if "--num-layers" in out:  # 12 layers: 4 (2 per pipeline stage)
        j = out.index("--num-layers") + 1
        out[j] = str(min(int(out[j]), 4))
    return out + ["--mock-data", "--vocab-size", "120", "--num-workers", "0"]


def trains(world: int, argv: list[str]) -> str:
    printed = run(world, pretrain_case, argv)[0]["printed"]
    losses = logged(printed, "lm loss")
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses), printed[-3000:]
    return printed


def test_the_expert_grid_recipe_with_its_logging_and_checkpoint_switches(tmp_path):
    printed = trains(4, shrunk(ETP1_EP4, tmp_path))
    assert "TP=2 SP EP=4 expert-TP=1 DP=2 expert-DP=1" in printed
    for fragment in ("params norm:", "num zeros:", "--attention-backend unfused",
                     "--dist-ckpt-optim-fully-reshardable",
                     "--transformer-impl transformer_engine"):
        assert fragment in printed, fragment
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


def test_tp4_pp2_with_the_experts_own_tp_and_sinkhorn(tmp_path):
    printed = trains(8, shrunk(TP4_PP2_ETP2, tmp_path))
    assert "TP=4 SP PP=2 EP=2 expert-TP=2 DP=1 expert-DP=1" in printed


def test_the_deepseek_v3_proxy_recipe(tmp_path):
    argv = shrunk(DEEPSEEK_PROXY, tmp_path)
    printed = trains(4, argv)
    assert "throughput per GPU (TFLOP/s/GPU):" in printed
    for fragment in ("--recompute-modules", "--fine-grained-activation-offloading",
                     "--cross-entropy-fusion-impl te"):
        assert fragment in printed, fragment


def test_the_deepseek_v3_proxy_recipe_with_context_parallelism(tmp_path):
    """Its layout with --context-parallel-size 2 (Megatron-LM's CP recipes' size): MLA over the
    gathered keys, the sigmoid / bias / group routing and seq_aux_loss over whole sequences."""
    argv = shrunk(DEEPSEEK_PROXY.replace("--context-parallel-size 1",
                                         "--context-parallel-size 2 --cp-comm-type p2p"),
                  tmp_path)
    printed = trains(4, argv)  # EP 2 over the two CP ranks of each stage
    assert "TP=1 CP=2 PP=2 EP=2 DP=1 expert-DP=1" in printed, printed[-2000:]
    assert "--cp-comm-type p2p: keys and values are all-gathered" in printed


@pytest.mark.parametrize("flags,message", [
    (DEEPSEEK_PROXY_REFUSED, "FP8 training needs Transformer Engine"),
])
def test_what_the_recipes_carry_that_is_still_refused(flags, message, tmp_path, capsys):
    from megatron.cli.arguments import parse_args

    argv = shrunk(DEEPSEEK_PROXY, tmp_path) + flags.split()
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err
