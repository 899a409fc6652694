"""Padding-free dispatch with one row per (token, destination EP rank): a token whose top-k experts
share an EP rank is sent there once (DeepSeek's node- / device-limited routing is where this pays:
with group-limited routing over the EP ranks a token reaches at most `router_group_topk` of them).

Shapes: T tokens, K top-k, E_l local experts, R unique (token, destination) rows, ordered
destination-major (the all-to-all's chunks), S DTD slices (each destination's rows cut over TP as
the padding-free path cuts each expert's), Ms rows of the largest slice, Mr rows received per
ETP peer (padded to the largest), J = the (row, choice) pairs the local experts compute.

Sender: the unique rows of x, and per row its K (local expert + 1, gate weight) pairs (0: that
choice goes elsewhere or was dropped), all-to-all'd over EP (the weights differentiably). Receiver
(after the experts' TP gather): the J pairs in expert-major order, the experts on packed rows, each
output weighted by its gate weight and summed per row in choice order (a fixed-order sum: no
atomics), reduced over the experts' TP group and sent back. Sender: each token's output is the sum
of its rows over the destinations, in destination order. Two host synchronizations: the count
exchange (rows per destination, every rank of the experts' TP x EP block) and the receiver's
per-expert counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron.parallel import comm
from ted_patches.router import Routing, expert_block


@dataclass(frozen=True)
class PerRankPlan:
    """What combine needs (all of it fixed by the dispatch)."""

    pos_R: torch.Tensor  # each unique row's place in the [S * Ms] send buffer
    row_TD: torch.Tensor  # [T, EP]: the unique row of (token, destination); R: none
    order_J: torch.Tensor  # received (row * K + choice) of each expert pair, expert-major
    weight_J: torch.Tensor  # its gate weight (differentiable)
    send: list
    recv: list
    peers: int  # ETP peers whose rows are gathered (1: none)
    recv_rows: int  # rows I received
    recv_max: int  # Mr
    slices: int  # S
    slice_rows: int  # Ms
    received: int  # peers * Mr: the gathered rows
    topk: int
    sequence_split: bool = False  # the padding-free path sends a rank's own tokens: never


def dispatch(d, x_TH: torch.Tensor, routing: Routing, own: bool):
    """(the local experts' rows [J, H] expert-major, rows per local expert, plan). `d`: the
    Dispatcher (its groups and modes)."""
    g, El, H = d.groups, d.local_experts, x_TH.shape[-1]
    S, r = (g.tp.size, g.tp.rank) if d.dtd and not own else (1, 0)
    j, EP, T, K = g.ep.rank, g.ep.size, routing.num_tokens, routing.topk
    dev = x_TH.device
    keep = routing.keep_A
    token_A = torch.arange(T, device=dev).repeat(K)
    dest_A = routing.expert_A // El
    # 1. the unique (token, destination) pairs, destination-major, and the count exchange
    pair_DT = torch.zeros(EP, T, dtype=torch.bool, device=dev)
    pair_DT[dest_A[keep], token_A[keep]] = True
    block = expert_block(g)
    n_all = comm.host_ints(comm.raw_all_gather(pair_DT.sum(1), block))  # [member][EP]
    Q = g.etp.size if block is not g.ep else 1
    peers = [g.etp.rank] if d.replicated or Q == 1 else list(range(Q))

    def sent(member: int, dest: int) -> int:
        """Rows the block's `member` sends to EP rank `dest`: its DTD slice of them."""
        n = n_all[member][dest]
        if S == 1:
            return n
        s = g.topology.coords(block.ranks[member]).tp
        c = d.slice_starts(n, S)
        return c[s + 1] - c[s]

    mine = n_all[g.etp.rank + Q * j]
    R = sum(mine)
    cuts = [d.slice_starts(n, S) for n in mine]  # [EP][S + 1]
    share = [[cuts[e][s + 1] - cuts[e][s] for e in range(EP)] for s in range(S)]
    slice_rows = [sum(share[s]) for s in range(S)]
    Ms = max(slice_rows + [1])
    rs = [[sent(q + Q * i, j) for i in range(EP)] for q in peers]  # [peer][source]
    me = peers.index(g.etp.rank)
    recv_rows = [sum(rs[a]) for a in range(len(peers))]
    Mr = max(recv_rows + [1])
    # 2. each unique row's token, destination, slice and place in the [S, Ms] send buffer
    nz = pair_DT.nonzero()
    d_R, t_R = nz[:, 0], nz[:, 1]
    first = torch.tensor(np.concatenate([[0], np.cumsum(mine)[:-1]]).tolist(), device=dev,
                         dtype=torch.int64)
    i_R = torch.arange(R, device=dev) - first.index_select(0, d_R)
    n_R = torch.tensor(mine, device=dev, dtype=torch.int64).index_select(0, d_R)
    s_R = (i_R * S) // n_R.clamp(min=1)
    lo_SD = torch.tensor([[cuts[e][s] for e in range(EP)] for s in range(S)], device=dev)
    off_SD = torch.tensor([np.concatenate([[0], np.cumsum(share[s])[:-1]]).tolist()
                           for s in range(S)], device=dev, dtype=torch.int64)
    flat = s_R * EP + d_R
    pos_R = s_R * Ms + off_SD.view(-1).index_select(0, flat) + i_R - lo_SD.view(-1).index_select(
        0, flat)
    # 3. the rows, and per row its K (local expert + 1, weight) pairs
    row_of = torch.full((EP * T,), R, dtype=torch.int64, device=dev)
    row_of[d_R * T + t_R] = torch.arange(R, device=dev)
    row_A = row_of.index_select(0, dest_A * T + token_A)
    slot = (row_A * K + torch.arange(K, device=dev).repeat_interleave(T))[keep]
    expert_RK = torch.zeros(R * K, dtype=torch.int64, device=dev)
    expert_RK[slot] = (routing.expert_A % El + 1)[keep]
    weight_RK = torch.zeros(R * K, dtype=routing.weight_A.dtype, device=dev).index_put(
        (slot,), routing.weight_A[keep])
    buffer = x_TH.new_zeros(S * Ms, H).index_copy(0, pos_R, x_TH.index_select(0, t_R))
    w_buf = weight_RK.new_zeros(S * Ms, K).index_copy(0, pos_R, weight_RK.view(R, K))
    e_buf = expert_RK.new_zeros(S * Ms, K).index_copy(0, pos_R, expert_RK.view(R, K))
    send = [share[r][i] for i in range(EP)]
    recv = [rs[me][i] for i in range(EP)]
    if S > 1:
        x_mine = comm.drop(buffer.view(S, Ms, H), g.tp)[:slice_rows[r]]
        w_mine = comm.drop(w_buf.view(S, Ms, K), g.tp)[:slice_rows[r]]
        e_mine = e_buf.view(S, Ms, K)[r, :slice_rows[r]]
    else:
        x_mine, w_mine, e_mine = buffer[:R], w_buf[:R], e_buf[:R]
    x_recv = comm.all_to_all_var(x_mine, g.ep, send, recv, out_rows=Mr)
    w_recv = comm.all_to_all_var(w_mine, g.ep, send, recv, out_rows=Mr)
    e_recv = comm.raw_all_to_all_var(e_mine, g.ep, send, recv, out_rows=Mr)
    x_recv = d._gather_peers(x_recv).reshape(-1, H)
    w_recv = d._gather_peers(w_recv).reshape(-1, K)
    if not d.replicated:
        e_recv = comm.raw_all_gather(e_recv, g.etp).reshape(-1, K)
    # 4. the (row, choice) pairs of my experts, expert-major (one more host read: their counts)
    e_flat = e_recv.reshape(-1) - 1
    valid = e_flat >= 0
    key = torch.where(valid, e_flat, El) * e_flat.numel() + torch.arange(e_flat.numel(), device=dev)
    counts = torch.bincount(e_flat[valid], minlength=El).tolist()
    order_J = key.argsort()[:sum(counts)]
    tokens = x_recv.index_select(0, order_J // K)
    row_TD = torch.full((T * EP,), R, dtype=torch.int64, device=dev)
    row_TD[t_R * EP + d_R] = torch.arange(R, device=dev)
    plan = PerRankPlan(pos_R=pos_R, row_TD=row_TD.view(T, EP), order_J=order_J,
                       weight_J=w_recv.reshape(-1).index_select(0, order_J), send=send,
                       recv=recv, peers=len(peers), recv_rows=recv_rows[me], recv_max=Mr,
                       slices=S, slice_rows=Ms, received=x_recv.shape[0], topk=K)
    return tokens, counts, plan


def combine(d, partial_JH: torch.Tensor, plan: PerRankPlan) -> torch.Tensor:
    """The experts' output (before the experts' TP reduction) -> y [T, H]."""
    g, H, K = d.groups, partial_JH.shape[-1], plan.topk
    weighted = partial_JH * plan.weight_J.to(partial_JH.dtype)[:, None]
    slots = weighted.new_zeros(plan.received * K, H).index_copy(0, plan.order_J, weighted)
    rows = slots.view(plan.received, K, H).sum(1)  # each row's choices, in choice order
    rows = d._reduce_peers(rows.view(plan.peers, plan.recv_max, H))[:plan.recv_rows]
    back = comm.all_to_all_var(rows, g.ep, plan.recv, plan.send, out_rows=plan.slice_rows)
    unique = d._all_slices(back, plan).reshape(-1, H).index_select(0, plan.pos_R)
    table = torch.cat([unique, unique.new_zeros(1, H)])
    T, EP = plan.row_TD.shape
    return table.index_select(0, plan.row_TD.reshape(-1)).view(T, EP, H).sum(1)
