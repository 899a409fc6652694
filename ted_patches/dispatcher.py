"""Token dispatch to the experts and combine back, over EP (all-to-all) and TP (DTD).

Shapes: T tokens, H hidden, E experts (E_l = E / EP local ones), K top-k, A = K * T assignments,
C capacity, S capacity slices (TP with DTD, else 1), Cs = C / S, R rows of the dispatch buffer.

Two paths share the row machinery (`_GatherRows`, `_CombineRows`): a buffer of R rows, filled
from x through a slot -> token map (empty rows read a zero row), and read back through an
assignment -> row map (dropped assignments have weight 0). Both are gathers with a fixed-order
sum over the K choices: no atomics, so TP ranks stay bit-identical on GPUs too.

Padded (`dispatch`): the capacity buffer [S, E, Cs, H]: slot c of expert e lives at
(c // Cs, e, c % Cs), so a TP rank's DTD slice is one contiguous block and the buffer's a2a
chunks are EP ranks. Every shape is known from T and the capacity: no host synchronization.

Forward (docs/architecture.md, "One MoE layer", steps 2-9), with DTD:
    dispatch   x_TH -> buffer [S, E, Cs, H] (replicated over TP)
               drop: my slice [E, Cs, H]                     backward: all-gather over TP
               all-to-all over EP -> [EP, E_l, Cs, H]        backward: all-to-all
               all-gather over TP -> [TP, EP, E_l, Cs, H]    backward: reduce-scatter over TP
               -> expert-major [E_l, TP * EP * Cs, H]
    experts    fc1 column-parallel, activation, fc2 row-parallel WITHOUT its TP reduction; the
               fc2 bias inside fc2's GEMM on TP rank 0 only (`fc2_bias`: the reduction counts it
               once; its grad: all-reduce over TP)
    combine    reduce-scatter over TP -> my slice [EP, E_l, Cs, H]   backward: all-gather
               all-to-all over EP back -> [E, Cs, H]                 backward: all-to-all
               all-gather over TP -> [S, E, Cs, H]                    backward: keep my slice
               gate-weighted sum into y_TH (dropped tokens get 0: the residual carries them)
Without DTD the buffer is one slice, the all-to-alls carry TP times the bytes, the experts'
input is copied into the TP region (backward: all-reduce) and their output all-reduced.

Padding-free (`dispatch_packed`): the same kept assignments, but only they are sent and
computed. One count exchange (all-gather over EP of the kept counts per expert, then ONE read
to the host: the path's only synchronization) sizes everything. Each expert's k_e kept slots
are cut into S balanced slices (slice s: slots [ceil(s k_e / S), ceil((s+1) k_e / S))); the
buffer is [S, Ms_max, H], slice s holding its rows of every expert in expert order (padded to
the largest slice so the TP collectives stay equal-sized). The steps are those above with
variable all-to-all splits, and the experts run grouped GEMMs over their real rows
[sum of counts, H] (expert-major, via one row permutation when TP * EP > 1), or, where the local
experts' counts are within TIGHT_SLACK of equal, one bmm over [E_l, largest count, H]. Without
any all-to-all or TP slicing (EP = 1, no DTD) the dispatch buffer is the experts' layout itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron.parallel import comm
from ted_patches import per_rank
from ted_patches.router import Routing, expert_block
from megatron.parallel.topology import TEDGroups


def _two_term_scatter_ok(t: torch.Tensor) -> bool:
    """A scatter-add of at most two terms per row onto zeros is exact and order-free
    (a + b == b + a), so index_add_ is as deterministic as a gather; on CUDA it is refused in
    deterministic mode."""
    return t.device.type == "cpu" or not torch.are_deterministic_algorithms_enabled()


class _GatherRows(torch.autograd.Function):
    """out[r] = x[source_R[r]], a zero row where source_R[r] == T. Backward: a token's gradient
    is the sum over its K assignments, in choice order, of the gradient rows they occupy (zero
    where dropped): one gather and a fixed-order sum; for K <= 2 one index_add_ over the rows
    (at most two terms per token: the same bits in any order)."""

    @staticmethod
    def forward(ctx, x_TH, source_R, row_A, drop_A, topk):
        T, H = x_TH.shape
        ctx.save_for_backward(source_R, row_A, drop_A)
        ctx.topk, ctx.T = topk, T
        return torch.cat([x_TH, x_TH.new_zeros(1, H)]).index_select(0, source_R)

    @staticmethod
    def backward(ctx, g_RH):
        source_R, row_A, drop_A = ctx.saved_tensors
        K, T = ctx.topk, ctx.T
        g_RH = g_RH.contiguous()
        if K <= 2 and _two_term_scatter_ok(g_RH):
            return (g_RH.new_zeros(T + 1, g_RH.shape[1]).index_add_(0, source_R, g_RH)[:T],
                    None, None, None, None)
        g_AH = g_RH.index_select(0, row_A)
        if drop_A is not None:
            g_AH.masked_fill_(drop_A[:, None], 0)
        g_TH = g_AH.view(K, T, -1).sum(0) if K > 1 else g_AH
        return g_TH, None, None, None, None


def _weighted_bags(table: torch.Tensor, index_A: torch.Tensor, weight_A: torch.Tensor,
                   topk: int) -> torch.Tensor:
    """out[t] = sum over k, in choice order, of weight[k, t] * table[index[k, t]] (A = K * T,
    choice-major): one embedding bag of K rows per token, a single pass that writes only the
    [T, H] result (no [A, H] intermediate and no separate sum: about 3x faster on CPUs)."""
    T = index_A.numel() // topk
    index_TK = index_A.view(topk, T).t().contiguous()
    weight_TK = weight_A.view(topk, T).t().contiguous()
    return torch.nn.functional.embedding_bag(index_TK, table, per_sample_weights=weight_TK,
                                             mode="sum")


class _CombineRows(torch.autograd.Function):
    """y[t] = sum over k, in choice order, of w[k, t] * full[row[k, t]] (w = 0 where dropped).
    Backward: grad w[a] = full[row a] . grad y[t]; grad full[r] = grad y[token_R[r]] * w_R[r]
    (0 for rows no kept assignment reads)."""

    @staticmethod
    def forward(ctx, full_RH, w_A, row_A, scatter_A, token_R, drop_A, topk, num_tokens):
        ctx.save_for_backward(full_RH, w_A, row_A, scatter_A, token_R, drop_A)
        ctx.topk, ctx.T = topk, num_tokens
        return _weighted_bags(full_RH, row_A, w_A, topk)

    @staticmethod
    def backward(ctx, gy_TH):
        full_RH, w_A, row_A, scatter_A, token_R, drop_A = ctx.saved_tensors
        R = full_RH.shape[0]
        D_RH = gy_TH.contiguous().index_select(0, token_R)  # the output gradient each row fed
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (full_RH * D_RH).sum(-1).index_select(0, row_A)
            if drop_A is not None:
                grad_w.masked_fill_(drop_A, 0)
        w_R = w_A.new_zeros(R + 1).scatter_(0, scatter_A, w_A.detach())[:R]
        return D_RH.mul_(w_R[:, None]), grad_w, None, None, None, None, None, None


@dataclass(frozen=True)
class DispatchPlan:
    """What combine needs from dispatch; nothing is kept on the module between the two."""

    row_A: torch.Tensor  # buffer row of each assignment (0 where dropped: its weight is 0)
    scatter_A: torch.Tensor  # the same, R where dropped (a scratch entry)
    source_R: torch.Tensor  # token of each buffer row (T: an empty row, reads zeros)
    token_R: torch.Tensor  # the same, clamped to a valid token (for gathers whose weight is 0)
    drop_A: Optional[torch.Tensor]  # bool, where dropped (None: nothing can be dropped)
    weight_A: torch.Tensor
    num_tokens: int
    topk: int
    slices: int  # S
    slot_per_slice: int  # Cs (padded); Ms_max, the rows of the largest slice (padding-free)
    packed: Optional["PackedPlan"] = None
    sequence_split: bool = False  # see Dispatcher.dispatch


@dataclass(frozen=True)
class PackedPlan:
    """The padding-free layout, all of it known on the host after the count exchange."""

    send: list  # rows of my slice to each EP rank
    recv: list  # rows from each EP rank (for my local experts)
    send_rows: int  # rows of my slice (sum(send))
    recv_rows: int  # sum(recv)
    recv_max: int  # rows per TP slice of the received buffer (its padded size)
    counts: list  # rows per local expert after the TP gather
    # experts' rows as [E_l, max(counts), H] (a bmm) rather than packed [sum(counts), H]
    tight: bool
    direct: bool  # no all-to-all or TP slicing: the dispatch buffer is the experts' layout itself
    to_experts: Optional[torch.Tensor]  # experts' row -> gathered row (None: identity)
    from_experts: Optional[torch.Tensor]  # gathered row -> experts' row (padding rows read row 0)
    peers: int  # ETP peers whose received rows the experts compute (1: replicated or ETP 1)

    @property
    def experts_shape(self) -> tuple[int, ...]:
        return (len(self.counts), max(self.counts + [0])) if self.tight else (sum(self.counts),)


def slice_starts(count: int, slices: int) -> list[int]:
    """Balanced cut of `count` rows into `slices`: slice s starts at ceil(s * count / slices)."""
    return [(s * count + slices - 1) // slices for s in range(slices + 1)]


def _kept_slots(routing: Routing) -> torch.Tensor:
    """slot_A with every dropped assignment's slot set to 0. A dropped slot means nothing (the
    probs policy leaves -1 there, the others a slot past capacity), yet the padding-free plan
    computes a row for every assignment before masking the dropped ones: each must index in
    range."""
    if not routing.may_drop:
        return routing.slot_A
    return torch.where(routing.keep_A, routing.slot_A, 0)


class Dispatcher:
    """Who sends which tokens, over which groups (see the module docstring for the data flow):

    - the TP ranks' tokens are the same (no sequence parallelism) and DTD cuts each expert's
      slots into S = TP slices, one per TP rank (`dtd`); or, without DTD, every TP rank sends
      them all (`replicated`: only where the experts' TP group is the TP group);
    - under sequence parallelism each TP rank holds its own tokens (`own=True` padding-free),
      or, padded, the whole sequence is cut into the DTD slices (`sequence_split=True`);
    - the all-to-all runs over the experts' EP group, and the experts' TP group (ETP, = TP unless
      --expert-tensor-parallel-size says otherwise) gathers the rows its members received, since
      they hold different tokens (ETP != TP: the EP group may span TP ranks)."""

    slice_starts = staticmethod(slice_starts)  # for ted_patches/per_rank.py

    def __init__(self, groups: TEDGroups, num_experts: int, topk: int, dtd: bool,
                 per_rank: bool = False):
        """`per_rank`: the padding-free path sends one row per (token, destination EP rank)
        (ted_patches/per_rank.py) instead of one per (token, expert)."""
        self.groups, self.num_experts, self.topk = groups, num_experts, topk
        self.per_rank = per_rank
        split = dtd or groups.sequence_parallel
        self.dtd = split and groups.tp.size > 1
        self.replicated = not split and groups.tp.size > 1
        if self.replicated and groups.etp.ranks != groups.tp.ranks:
            raise ValueError("without DTD or sequence parallelism the TP ranks send the same "
                             "tokens: the experts' TP group must be the TP group")
        self.local_experts = num_experts // groups.ep.size

    # ---- shared row maps ------------------------------------------------------------------------
    def _maps(self, routing: Routing, row_A: torch.Tensor, rows: int, drops: bool):
        keep_A, T = routing.keep_A, routing.num_tokens
        scatter_A = torch.where(keep_A, row_A, rows) if drops else row_A
        token_A = torch.arange(T, device=row_A.device).repeat(routing.topk)
        source_R = torch.full((rows + 1,), T, dtype=torch.int64, device=row_A.device).scatter_(
            0, scatter_A, token_A)[:rows]
        return dict(row_A=torch.where(keep_A, row_A, 0) if drops else row_A, scatter_A=scatter_A,
                    source_R=source_R, token_R=source_R.clamp(max=max(T - 1, 0)),
                    drop_A=~keep_A if drops else None, weight_A=routing.weight_A, num_tokens=T,
                    topk=routing.topk)

    def _gather(self, x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return _GatherRows.apply(x_TH, plan.source_R, plan.row_A, plan.drop_A, plan.topk)

    def _combine_rows(self, full_RH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return _CombineRows.apply(full_RH, plan.weight_A.to(full_RH.dtype), plan.row_A,
                                  plan.scatter_A, plan.token_R, plan.drop_A, plan.topk,
                                  plan.num_tokens)

    # ---- padded ---------------------------------------------------------------------------------
    def dispatch(self, x_TH: torch.Tensor, routing: Routing,
                 sequence_split: bool = False) -> tuple[torch.Tensor, DispatchPlan]:
        """`sequence_split`: x_TH is the whole sequence but each TP rank uses its own part of
        the output (the final gather's backward then sums the ranks' partial gradients)."""
        g, E, H = self.groups, self.num_experts, x_TH.shape[-1]
        S = g.tp.size if self.dtd else 1
        Cs = routing.capacity // S
        slot_A = routing.slot_A
        row_A = ((slot_A // Cs) * E + routing.expert_A) * Cs + slot_A % Cs
        plan = DispatchPlan(**self._maps(routing, row_A, S * E * Cs, routing.may_drop), slices=S,
                            slot_per_slice=Cs, sequence_split=sequence_split)
        buffer = self._gather(x_TH, plan)
        mine_ECH = comm.drop(buffer.view(S, E, Cs, H), g.tp) if self.dtd else buffer.view(E, Cs, H)
        recv = comm.all_to_all(mine_ECH, g.ep).view(g.ep.size, self.local_experts, Cs, H)
        recv = self._gather_peers(recv)  # [ETP, EP, E_l, Cs, H]
        tokens = recv.permute(2, 0, 1, 3, 4).reshape(self.local_experts, -1, H)
        return tokens, plan

    def combine(self, partial: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """partial: the experts' fc2 output before its TP reduction (the fc2 bias included, see
        `fc2_bias`), token order as dispatched ([E_l, N, H] padded, the experts' layout of the
        plan padding-free)."""
        if isinstance(plan, per_rank.PerRankPlan):
            return per_rank.combine(self, partial, plan)
        if plan.packed is not None:
            return self._combine_packed(partial, plan)
        g, H = self.groups, partial.shape[-1]
        G = 1 if self.replicated else g.etp.size
        y = partial.view(self.local_experts, G, g.ep.size, plan.slot_per_slice, H)
        y = self._reduce_peers(y.permute(1, 2, 0, 3, 4))  # [ETP, EP, E_l, Cs, H] -> mine
        back = comm.all_to_all(y, g.ep)  # [EP owner, E_l, Cs, H] = [E, Cs, H]
        return self._combine_rows(self._all_slices(back, plan).reshape(-1, H), plan)

    def _gather_peers(self, recv: torch.Tensor) -> torch.Tensor:
        """The rows my ETP peers received, gathered [peers, ...] (backward: reduce-scatter);
        `replicated`: my own, copied into the ETP region as [1, ...] (backward: all-reduce)."""
        if self.replicated:  # my ETP (= TP) peers received the same rows
            return comm.copy_to_split(recv, self.groups.etp).unsqueeze(0)
        return comm.gather_to_split(recv, self.groups.etp)

    def _reduce_peers(self, y: torch.Tensor) -> torch.Tensor:
        """[peers, ...] partial outputs of the experts' TP shards -> my entry, summed (the
        inverse of `_gather_peers`)."""
        if self.replicated:
            return comm.reduce_from_split(y[0], self.groups.etp)
        return comm.reduce_scatter(y, self.groups.etp)

    def _all_slices(self, mine: torch.Tensor, plan) -> torch.Tensor:
        """DTD: every TP rank's slice of the combined rows [S, ...]. Backward: my slice of the
        gradient where every TP rank computes it alike (its consumer is replicated), or the sum
        of the ranks' partial gradients where each uses its own tokens (`sequence_split`)."""
        if plan.slices == 1:
            return mine
        gather = comm.gather_to_split if plan.sequence_split else comm.gather_to_replicated
        return gather(mine, self.groups.tp)

    # ---- padding-free ---------------------------------------------------------------------------
    # The experts run their real rows packed [sum of counts, H] (grouped GEMMs), or, where the
    # local experts' counts are nearly equal, padded only to the largest local expert
    # [E_l, max count, H] (one bmm: on CPUs its batch-parallel GEMMs beat per-expert ones by about
    # as much as that padding costs): TIGHT_SLACK bounds the padding it may add.
    TIGHT_SLACK = 1.05
    layout: Optional[str] = None  # None: by the rule above; "packed" or "tight" to force one

    def _tight(self, device: torch.device, counts: list[int]) -> bool:
        if self.layout is not None:
            return self.layout == "tight"
        total = sum(counts)
        return (device.type == "cpu" and total > 0
                and len(counts) * max(counts) <= self.TIGHT_SLACK * total)

    def dispatch_packed(self, x_TH: torch.Tensor, routing: Routing,
                        own: bool = False) -> tuple[torch.Tensor, list, DispatchPlan]:
        """Only kept assignments: (the experts' rows, expert-major: [sum of counts, H] packed or
        [E_l, max count, H] tight, see `plan.packed.tight`; rows per local expert; plan). One host
        synchronization: the kept counts of every rank of the experts' TP x EP block. `own`: the
        tokens are this rank's alone (sequence parallelism), sent whole (no DTD slices)."""
        if self.per_rank:
            return per_rank.dispatch(self, x_TH, routing, own)
        g, E, El, H = self.groups, self.num_experts, self.local_experts, x_TH.shape[-1]
        S, r = (g.tp.size, g.tp.rank) if self.dtd and not own else (1, 0)
        j, EP = g.ep.rank, g.ep.size
        dev = x_TH.device
        # 1. the count exchange; rs[a][i][l]: rows for my local expert l that EP rank i sends to
        # my ETP peer a (after the ETP gather I hold every peer's rows; `replicated`: only mine)
        block = expert_block(g)
        kept = comm.host_ints(comm.raw_all_gather(routing.kept_E, block))  # [member][E]
        Q = g.etp.size if block is not g.ep else 1
        peers = [g.etp.rank] if self.replicated or Q == 1 else list(range(Q))

        def sent(member: int) -> list[int]:
            """Rows per expert the block's `member` (= etp + Q * ep) sends: its DTD slice."""
            if S == 1:
                return kept[member]
            s = g.topology.coords(block.ranks[member]).tp
            return [c[s + 1] - c[s] for c in (slice_starts(n, S) for n in kept[member])]

        rs = [[sent(q + Q * i)[j * El:(j + 1) * El] for i in range(EP)] for q in peers]
        me = peers.index(g.etp.rank)
        local = [sum(rs[a][i][l] for a in range(len(peers)) for i in range(EP))
                 for l in range(El)]
        tight = self._tight(dev, local)
        cmax = max(local + [1])
        expert_A, slot_A = routing.expert_A, _kept_slots(routing)
        if S == 1 and EP == 1 and len(peers) == 1:  # 2. no communication: the experts' layout
            if tight:
                rows, row_A = El * cmax, expert_A * cmax + slot_A
            else:
                off_E = torch.tensor(np.concatenate([[0], np.cumsum(local)[:-1]]).tolist(),
                                     device=dev, dtype=torch.int64)
                rows, row_A = sum(local), off_E.index_select(0, expert_A) + slot_A
            packed = PackedPlan(send=[rows], recv=[rows], send_rows=rows, recv_rows=rows,
                                recv_max=rows, counts=local, tight=tight, direct=True,
                                to_experts=None, from_experts=None, peers=1)
            plan = DispatchPlan(**self._maps(routing, row_A, rows, routing.may_drop), slices=1,
                                slot_per_slice=rows, packed=packed)
            tokens = comm.copy_to_split(self._gather(x_TH, plan), g.etp)
            return (tokens.view(El, cmax, H) if tight else tokens), local, plan
        mine = kept[g.etp.rank + Q * j]  # my own kept counts
        starts = [slice_starts(c, S) for c in mine]  # [E][S + 1]
        share = [[starts[e][s + 1] - starts[e][s] for e in range(E)] for s in range(S)]  # [S][E]
        off = [np.concatenate([[0], np.cumsum(share[s])[:-1]]).tolist() for s in range(S)]
        slice_rows = [sum(share[s]) for s in range(S)]
        Ms = max(slice_rows)
        # 2. each kept assignment's row in the [S, Ms, H] send buffer (slice s: its rows of every
        # expert, in expert order, so its a2a chunks are EP ranks)
        lo_SE = torch.tensor([[starts[e][s] for e in range(E)] for s in range(S)],
                             device=dev).view(-1)
        off_SE = torch.tensor(off, device=dev, dtype=torch.int64).view(-1)
        # the slice of each slot: slot_A < kept_E[e] (dropped ones read slot 0), so s_A < S
        if S > 1:
            s_A = (slot_A * S) // routing.kept_E.clamp(min=1).index_select(0, expert_A)
        else:
            s_A = torch.zeros_like(slot_A)
        flat = s_A * E + expert_A
        row_A = s_A * Ms + off_SE.index_select(0, flat) + slot_A - lo_SE.index_select(0, flat)
        # 3. splits: my slice to each EP rank, and what each EP rank sends me (for my local experts)
        send = [sum(share[r][i * El:(i + 1) * El]) for i in range(EP)]
        recv_rows = [sum(map(sum, rs[a])) for a in range(len(peers))]
        # tight: each peer's part ends in a zero row, for the padding
        Mr = max(recv_rows) + (1 if tight else 0)
        # 4. the experts' rows in the gathered [peers, Mr] buffer: (local expert, start, length)
        segs = []
        for a in range(len(peers)):
            pos = a * Mr
            for i in range(EP):
                for l in range(El):
                    segs.append((l, pos, rs[a][i][l]))
                    pos += rs[a][i][l]
        # peer, then source order
        by_expert = [[(p, n) for l2, p, n in segs if l2 == l] for l in range(El)]
        pieces = []
        end = len(peers) * Mr
        for l in range(El):
            pieces += [np.arange(p, p + n) for p, n in by_expert[l]]
            if tight:  # pad this expert's rows to cmax with the zero row ending the last part
                pieces.append(np.full(cmax - local[l], end - 1))
        to_np = np.concatenate(pieces + [np.zeros(0, np.int64)]).astype(np.int64)
        from_np = np.zeros(end, np.int64)
        real = to_np != end - 1 if tight else np.ones(len(to_np), bool)
        from_np[to_np[real]] = np.flatnonzero(real)
        identity = (not tight and len(to_np) == end
                    and bool((to_np == np.arange(len(to_np))).all()))
        packed = PackedPlan(send=send, recv=[sum(rs[me][i]) for i in range(EP)],
                            send_rows=slice_rows[r], recv_rows=recv_rows[me], recv_max=Mr,
                            counts=local, tight=tight, direct=False,
                            to_experts=None if identity else torch.from_numpy(to_np).to(dev),
                            from_experts=None if identity else torch.from_numpy(from_np).to(dev),
                            peers=len(peers))
        plan = DispatchPlan(**self._maps(routing, row_A, S * Ms, routing.may_drop), slices=S,
                            slot_per_slice=Ms, packed=packed)
        # 5. dispatch: buffer, DTD drop, all-to-all, the ETP gather, the experts' order
        buffer = self._gather(x_TH, plan).view(S, Ms, H)
        mine_MH = comm.drop(buffer, g.tp)[:slice_rows[r]] if S > 1 else buffer[0]
        recv = comm.all_to_all_var(mine_MH, g.ep, packed.send, packed.recv, out_rows=Mr)
        recv = self._gather_peers(recv).reshape(-1, H)
        tokens = recv.index_select(0, packed.to_experts) if packed.to_experts is not None else recv
        return (tokens.view(El, cmax, H) if tight else tokens), local, plan

    def fc2_bias(self, bias_EH: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The fc2 bias as the experts add it inside their fc2 GEMM, before fc2's reduction over
        the experts' TP group (both paths): on its rank 0 only (zero elsewhere), so the reduction
        counts it once; its gradient (nonzero there only) is all-reduced over that group, as the
        bias is replicated."""
        etp = self.groups.etp
        if bias_EH is None or etp.size == 1:
            return bias_EH
        bias_EH = comm.copy_to_split(bias_EH, etp)
        return bias_EH if etp.rank == 0 else bias_EH * 0.0

    def _combine_packed(self, partial, plan: DispatchPlan) -> torch.Tensor:
        """partial: the experts' output in their layout (tight or packed)."""
        g, H, p = self.groups, partial.shape[-1], plan.packed
        y = partial.reshape(-1, H)
        if p.direct:
            return self._combine_rows(comm.reduce_from_split(y, g.etp), plan)
        if p.from_experts is not None:
            y = y.index_select(0, p.from_experts)
        y = self._reduce_peers(y.view(p.peers, p.recv_max, H))[:p.recv_rows]
        back = comm.all_to_all_var(y, g.ep, p.recv, p.send, out_rows=plan.slot_per_slice)
        return self._combine_rows(self._all_slices(back, plan).reshape(-1, H), plan)
