"""Rank layout arithmetic, with no process groups (tier 1: hand-worked tables)."""

import pytest

from megatron.parallel.topology import LayoutError, Topology, check_layout, valid_layouts


def as_sets(table):
    return sorted(tuple(g) for g in table)


def test_world8_tp2_ep2_matches_design_table():
    t = Topology(8, tp=2, ep=2)
    assert (t.dp, t.edp) == (4, 2)
    assert as_sets(t.tp_groups()) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert as_sets(t.dp_groups()) == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert as_sets(t.ep_groups()) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert as_sets(t.edp_groups()) == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_world16_tp2_ep4_matches_paper_table():
    t = Topology(16, tp=2, ep=4)
    assert as_sets(t.tp_groups()) == [(2 * i, 2 * i + 1) for i in range(8)]
    assert as_sets(t.ep_groups()) == [(0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)]
    assert as_sets(t.edp_groups()) == sorted((r, r + 8) for r in range(8))


@pytest.mark.parametrize("world,tp,ep", [(8, 2, 2), (16, 2, 4), (8, 1, 8), (8, 4, 1), (12, 2, 3)])
def test_coords_round_trip_and_groups_partition_the_world(world, tp, ep):
    t = Topology(world, tp, ep)
    for rank in range(world):
        c = t.coords(rank)
        assert t.rank(tp=c.tp, dp=c.dp) == rank == t.rank(tp=c.tp, ep=c.ep, edp=c.edp)
        assert c.dp == c.ep + ep * c.edp
    for table, size, count in [
        (t.tp_groups(), tp, world // tp), (t.dp_groups(), t.dp, tp),
        (t.ep_groups(), ep, world // ep), (t.edp_groups(), t.edp, world // t.edp),
    ]:
        assert len(table) == count and all(len(g) == size for g in table)
        assert sorted(r for g in table for r in g) == list(range(world))
    # EP peers share the TP rank (all-to-all moves whole TP shards); expert-DP peers share TP and
    # EP.
    for g in t.ep_groups():
        assert len({t.coords(r).tp for r in g}) == 1
    for g in t.edp_groups():
        assert len({(t.coords(r).tp, t.coords(r).ep) for r in g}) == 1


@pytest.mark.parametrize("world,tp,ep,flag", [
    (6, 4, 1, "--tensor-model-parallel-size"),
    (8, 2, 3, "--expert-model-parallel-size"),
    (8, 0, 1, "--tensor-model-parallel-size"),
])
def test_invalid_layouts_name_the_flag_and_a_valid_choice(world, tp, ep, flag):
    with pytest.raises(LayoutError, match=flag) as err:
        Topology(world, tp, ep)
    assert "use one of" in str(err.value) or ">= 1" in str(err.value)


@pytest.mark.parametrize("world,tp,ep,tp_divides,ep_divides", [
    (6, 4, 1, {"--num-attention-heads": 4}, {}),  # 3 and 6 divide the world but not the heads
    (8, 2, 3, {}, {"--num-experts": 6}),  # DP 4: EP 4 divides DP but not the experts
    (8, 1, 3, {"--ffn-hidden-size": 64}, {"--num-experts": 12}),
    (4, 2, 1, {"--num-attention-heads": 3}, {}),  # no TP > 1 fits: the only offer is 1
])
def test_suggestions_are_valid_for_the_whole_layout(world, tp, ep, tp_divides, ep_divides):
    with pytest.raises(LayoutError) as err:
        check_layout(world, tp, ep, tp_divides=tp_divides, ep_divides=ep_divides)
    message = str(err.value)
    offered = [int(v) for v in message.split("use one of [")[1].rstrip("]").split(", ")]
    fixing_tp = "--tensor-model-parallel-size" in message
    for value in offered:  # each offer, taken alone, fixes the layout
        new_tp, new_ep = (value, ep) if fixing_tp else (tp, value)
        check_layout(world, new_tp, new_ep, tp_divides=tp_divides, ep_divides=ep_divides)
    every = {t if fixing_tp else e for t, e in valid_layouts(world, tp_divides, ep_divides)
             if (e == ep if fixing_tp else t == tp)}
    assert set(offered) == every
