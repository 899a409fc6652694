#!/usr/bin/env bash
# GPT-MoE on one node with torchrun: a 1.3B base (24 layers, hidden 2048) with 16 experts in every
# other layer, TP=2 x EP=4 on 8 GPUs (DP=4, expert-DP=1). Megatron-LM's flags.
#   DATA=/path/corpus_text_document VOCAB=gpt2-vocab.json MERGES=gpt2-merges.txt \
#       bash examples/pretrain_gpt_moe_1.3b_torchrun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8}
torchrun --standalone --nproc-per-node "$GPUS" pretrain_gpt_moe.py \
    --tensor-model-parallel-size 2 --expert-model-parallel-size 4 \
    --num-experts 16 --moe-router-topk 2 --expert-interval 2 \
    --moe-expert-capacity-factor 1.0 --moe-eval-capacity-factor 1.0 --moe-aux-loss-coeff 0.01 \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \
    --max-position-embeddings 2048 --micro-batch-size 4 --global-batch-size 256 \
    --train-iters 300000 --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
    --weight-decay 0.1 --clip-grad 1.0 --bf16 \
    --use-distributed-optimizer --optimizer-tile-size 178956971 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    --data-path "${DATA:?set DATA to a preprocessed prefix}" --split 969,30,1 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "${VOCAB:?}" --merge-file "${MERGES:?}" \
    --log-interval 10 --eval-interval 1000 --eval-iters 10 \
    --tensorboard-dir "${TB_DIR:-outputs/tb}"
