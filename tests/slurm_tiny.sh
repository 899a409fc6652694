# shellcheck shell=bash disable=SC2034  # sourced: the batch script reads these arrays
# The CPU configuration tests/test_slurm.py gives examples/pretrain_gpt_moe.sbatch (TED_CONFIG):
# a tiny GPT-MoE on mock data, 4 ranks as TP=2 x EP=2 (DP=2), TINY_ITERS iterations.
MODEL_ARGS=(
    --num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 --seq-length 16
    --num-experts 4 --moe-router-topk 2 --expert-interval 2 --hidden-dropout 0 --attention-dropout 0
    --micro-batch-size 2 --global-batch-size 4 --train-iters "${TINY_ITERS:-8}" --lr 1e-3
    --log-interval 1 --eval-iters 0 --make-vocab-size-divisible-by 8
)
DATA_ARGS=(--mock-data --vocab-size 120)
ted_layout() { PARALLEL_ARGS=(--tensor-model-parallel-size 2 --expert-model-parallel-size 2); }
