"""Vocab-parallel cross-entropy over an explicit TP group.

megatron-core's `vocab_parallel_cross_entropy` reads parallel_state's global TP group; this is
the same computation (its static helpers do the math) with the group passed in. Contract:
logits [..., V/TP] split over TP by vocabulary; forward all-reduces max, predicted logit and
sum-exp over TP; backward is local (softmax - one-hot of this rank's vocabulary slice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as _Math
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron.parallel import comm
from megatron.parallel.topology import Group


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp: Group):
        logits, logits_max = _Math.calculate_logits_max(logits)
        comm.all_reduce_(logits_max, tp, op=dist.ReduceOp.MAX)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), tp.rank, tp.size
        )
        target_mask, masked_target_1d, predicted, sum_exp, exp_logits = (
            _Math.calculate_predicted_logits(logits, target, logits_max, start, end)
        )
        comm.all_reduce_(predicted, tp)
        comm.all_reduce_(sum_exp, tp)
        softmax, loss = _Math.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_mask, masked_target_1d = ctx.saved_tensors
        grad_2d, arange_1d, update, grad_input = _Math.prepare_gradient_calculation_operands(
            softmax, target_mask
        )
        grad = _Math.calculate_gradients(grad_2d, arange_1d, masked_target_1d, update, grad_input,
                                         grad_loss)
        return grad, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 tp: Group) -> torch.Tensor:
    """Per-token loss [...] from vocab-split logits [..., V/TP] (fp32 math)."""
    return _VocabParallelCE.apply(logits, target, tp)
