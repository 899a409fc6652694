"""Checkpoints of the peers (megatron/convert/{megatron_deepspeed,mcore,megatron_legacy}.py) through
tools/checkpoint_convert.py, tested against files the peers' OWN libraries wrote
(tests/peer_checkpoints.py, one 2-rank gloo world of its own): DeepSpeed 0.19's engine saving a
Megatron-DeepSpeed-named GPT with deepspeed.moe.layer.MoE at EP 2 (per-expert files by global
id), megatron-core 0.16's dist_checkpointing.save of its GPTModel with MoE at EP 2, and
megatron-core's GPTModel at TP 2 torch.saved per rank as Megatron-LM's --ckpt-format torch does.

After import our one-process model's logits equal the source model's on the same tokens within
1e-5; training continues from the import at a layout other than the source's, equal to one
process; the mcore export loads in megatron-core (at TP 2, from an EP 2 source) with the same
logits; crafted pickles are refused and run nothing; bad input is one error line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from harness import run, ted_groups
from megatron.checkpoint import configs_from_meta, read_checkpoint_meta, read_stored_tensors
from megatron.convert import ConversionError, peers
from megatron.model.params import load_stored_tensors
from ted_patches.build import build_model
from tools import checkpoint_convert
from util import run_main

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5
FROM = {"deepspeed": "megatron-deepspeed", "mcore": "mcore", "legacy": "megatron-legacy"}
SOURCE_LAYOUT = {"deepspeed": "TP 1, PP 1, EP 2", "mcore": "TP 1, PP 1, EP 2",
                 "legacy": "TP 2, PP 1, EP 1"}


@pytest.fixture(scope="module")
def peer_dir(tmp_path_factory) -> str:
    pytest.importorskip("deepspeed", reason="deepspeed (the [test] extra) writes one source")
    if os.environ.get("TED_PEER_CHECKPOINTS"):  # a folder peer_checkpoints.py wrote (reruns)
        return os.environ["TED_PEER_CHECKPOINTS"]
    out = str(tmp_path_factory.mktemp("peers"))
    done = subprocess.run([sys.executable, os.path.join(HERE, "peer_checkpoints.py"), out],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def imported(peer_dir, tmp_path_factory) -> dict:
    """kind -> (our checkpoint folder, the tool's output)."""
    out = {}
    for kind, fmt in FROM.items():
        dst = str(tmp_path_factory.mktemp(f"ours_{kind}"))
        shutil.rmtree(dst)
        message = checkpoint_convert.main(["import", "--from", fmt,
                                           os.path.join(peer_dir, kind, "ckpt"), dst])
        out[kind] = (dst, message)
    return out


@torch.no_grad()
def our_logits(folder: str, tokens: torch.Tensor) -> torch.Tensor:
    meta = read_checkpoint_meta(folder)
    model_cfg, moe_cfg = configs_from_meta(meta)
    groups = ted_groups(1, 1)
    model = build_model(model_cfg, moe_cfg, groups, seed=0)
    load_stored_tensors(model, read_stored_tensors(folder), groups)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model.eval()(tokens, positions)[..., :model_cfg.vocab_size]


def assert_close(ours, reference, what):
    theirs = reference["logits"][..., :ours.shape[-1]]
    diff = (ours - theirs).abs().max().item()
    print(f"{what}: max |logit difference| {diff:.2e} (logits up to {theirs.abs().max():.2f})")
    assert theirs.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert diff <= TOL, f"{what}: logits differ by {diff:.2e}"


# ---- imports: the source model's logits ----------------------------------------------------------
@pytest.mark.parametrize("kind", list(FROM))
def test_import_gives_the_source_models_logits(kind, peer_dir, imported):
    folder, message = imported[kind]
    reference = torch.load(os.path.join(peer_dir, kind, "reference.pt"))
    assert_close(our_logits(folder, reference["tokens"]), reference, f"{kind} import")
    assert f"saved at {SOURCE_LAYOUT[kind]}" in message
    carried = "yes (Adam moments, step 2)" if kind in STEPPED else "no"
    assert f"carried: weights yes; optimizer {carried}" in message and "RNG no" in message


def test_import_carries_iteration_consumed_samples_and_layout(imported):
    expected = {"deepspeed": (2, 8), "mcore": (5, 40), "legacy": (7, 40)}
    for kind, (folder, _) in imported.items():
        meta = read_checkpoint_meta(folder)
        assert (meta["iteration"], meta["consumed_samples"]) == expected[kind], kind
        assert meta["imported_from"]["format"] == FROM[kind]
    ds = configs_from_meta(read_checkpoint_meta(imported["deepspeed"][0]))[1]
    assert (ds.layers, ds.mlp_type, ds.topk, ds.drop_tokens) == ((1, 3), "residual", 2, True)
    mc = configs_from_meta(read_checkpoint_meta(imported["mcore"][0]))
    assert mc[1].layers == (1, 3) and mc[0].swiglu and mc[0].untie_embeddings_and_output_weights
    assert configs_from_meta(read_checkpoint_meta(imported["legacy"][0]))[1].layers == (0, 2)


def test_export_to_mcore_loads_in_megatron_core_with_the_same_logits(peer_dir):
    """peer_checkpoints.py's roundtrip: import of the mcore source, export --to mcore,
    dist_checkpointing.load into megatron-core's GPTModel at TP 2 / EP 1 (saved at EP 2)."""
    source = torch.load(os.path.join(peer_dir, "mcore", "reference.pt"))
    back = torch.load(os.path.join(peer_dir, "roundtrip", "reference.pt"))
    assert torch.equal(source["tokens"], back["tokens"])
    assert_close(back["logits"][..., :97], source, "mcore export loaded by megatron-core")


# ---- training goes on from an import, at another layout ------------------------------------------
def _flags(folder: str, iters: int) -> list[str]:
    meta = read_checkpoint_meta(folder)
    m, moe = configs_from_meta(meta)
    argv = (f"--num-layers {m.num_layers} --hidden-size {m.hidden_size} --num-attention-heads "
            f"{m.num_attention_heads} --ffn-hidden-size {m.ffn_hidden_size} --seq-length 16 "
            f"--max-position-embeddings {m.max_position_embeddings} --mock-data --vocab-size 96 "
            "--make-vocab-size-divisible-by 8 --hidden-dropout 0 --attention-dropout 0 "
            "--lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 0 --adam-eps 1e-6 --seed 5 "
            "--log-interval 1 --eval-interval 100 --eval-iters 1 --num-workers 0 "
            f"--micro-batch-size 2 --global-batch-size 4 --train-iters {iters} "
            f"--num-experts {moe.num_experts} --moe-router-topk {moe.topk} "
            f"--moe-aux-loss-coeff {moe.aux_loss_coeff} --load {folder} "
            "--use-checkpoint-opt_param-scheduler").split()
    argv += ["--moe-layer-freq", "[" + ",".join(str(int(i in moe.layers))
                                                for i in range(m.num_layers)) + "]"]
    argv += ["--swiglu"] if m.swiglu else []
    argv += ["--normalization", m.normalization, "--position-embedding-type",
             m.position_embedding_type]
    argv += [] if m.add_bias_linear else ["--disable-bias-linear"]
    argv += ["--untie-embeddings-and-output-weights"] if m.untie_embeddings_and_output_weights \
        else []
    argv += ["--mlp-type", moe.mlp_type, "--moe-gate-normalization", moe.gate_normalization,
             "--moe-router-load-balancing-type", moe.aux_loss_type, "--moe-token-drop-policy",
             moe.drop_policy, "--moe-min-capacity", str(moe.min_capacity),
             "--moe-train-capacity-factor", str(moe.capacity_factor),
             "--moe-eval-capacity-factor", str(moe.eval_capacity_factor)]
    argv += [] if moe.drop_tokens else ["--disable-moe-token-dropping"]
    return argv


# a layout the source did not run at (world 2)
CONTINUE_AT = {"deepspeed": (2, 1), "mcore": (2, 1), "legacy": (1, 2)}


@pytest.mark.parametrize("kind", list(FROM))
def test_training_continues_from_the_import_at_another_layout(kind, imported):
    from test_training import logged, pretrain_case

    folder = imported[kind][0]
    start = read_checkpoint_meta(folder)["iteration"]
    tp, ep = CONTINUE_AT[kind]
    argv = _flags(folder, start + 2)
    layout = ["--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep)]
    got = run(2, pretrain_case, argv + layout)[0]
    one = pretrain_case(argv)
    assert "loaded" in got["printed"] and f"(iteration {start}," in got["printed"]
    assert f"iteration {start + 1:>8}/{start + 2:>8}" in got["printed"]
    got_loss, want = logged(got["printed"], "lm loss"), logged(one["printed"], "lm loss")
    assert len(got_loss) == 2 and got_loss == pytest.approx(want, rel=1e-5)


# ---- safe loading ------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_rank_file_is_refused_by_name_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    rank = tmp_path / "src" / "iter_0000001" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"args": _RunsCode(str(marker)), "model": {}}, rank / "model_optim_rng.pt")
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("1")
    code, out, err = run_main(capsys, checkpoint_convert.main, "import", "--from",
                              "megatron-legacy", tmp_path / "src", tmp_path / "dst")
    assert code == 2 and not marker.exists() and not (tmp_path / "dst").exists()
    assert err.count("\n") == 1 and "refused to load" in err and "system" in err, err


def test_crafted_dcp_metadata_is_refused_and_runs_nothing(tmp_path, capsys, peer_dir):
    src = tmp_path / "mcore"
    shutil.copytree(os.path.join(peer_dir, "mcore", "ckpt"), src)
    marker = tmp_path / "ran"
    with open(src / "iter_0000005" / ".metadata", "wb") as f:
        pickle.dump(_RunsCode(str(marker)), f)
    code, _, err = run_main(capsys, checkpoint_convert.main, "import", "--from", "mcore", src,
                            tmp_path / "dst")
    assert code == 2 and not marker.exists() and "refused to load" in err and "system" in err


def test_benign_files_with_namespaces_and_numpy_states_load(tmp_path):
    import numpy as np

    from megatron.convert import safe_pickle

    path = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(a=1, dtype=torch.bfloat16),
                "rng": np.random.RandomState(0).get_state(), "w": torch.ones(2)}, path)
    loaded = safe_pickle.load(str(path), "file")
    assert loaded["args"].dtype is torch.bfloat16 and loaded["rng"][1].shape == (624,)


# ---- bad input: one line, exit 2 ---------------------------------------------------------------
def _fails(capsys, *argv) -> str:
    code, out, err = run_main(capsys, checkpoint_convert.main, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("checkpoint_convert.py: error:")
    return err


def test_a_wrong_from_names_the_formats(tmp_path, capsys):
    err = _fails(capsys, "import", "--from", "megatron-lm", tmp_path, tmp_path / "dst")
    assert "--from 'megatron-lm'" in err and "megatron-deepspeed, mcore, megatron-legacy" in err
    err = _fails(capsys, "export", "--load", tmp_path, "--to", "hf", "--output", tmp_path / "o")
    assert "--to 'hf'" in err and "mcore" in err


def test_a_missing_rank_file_is_named(tmp_path, capsys, peer_dir):
    ds = tmp_path / "ds"
    shutil.copytree(os.path.join(peer_dir, "deepspeed", "ckpt"), ds)
    gone = ds / "global_step2" / "layer_1_expert_3_mp_rank_00_model_states.pt"
    gone.unlink()
    err = _fails(capsys, "import", "--from", "megatron-deepspeed", ds, tmp_path / "d1")
    assert str(gone) in err and "missing" in err
    legacy = tmp_path / "legacy"
    shutil.copytree(os.path.join(peer_dir, "legacy", "ckpt"), legacy)
    shutil.rmtree(legacy / "iter_0000007" / "mp_rank_01")
    err = _fails(capsys, "import", "--from", "megatron-legacy", legacy, tmp_path / "d2")
    assert "mp_rank_01/model_optim_rng.pt" in err and "missing" in err
    mc = tmp_path / "mc"
    shutil.copytree(os.path.join(peer_dir, "mcore", "ckpt"), mc)
    (mc / "iter_0000005" / "__1_0.distcp").unlink()
    err = _fails(capsys, "import", "--from", "mcore", mc, tmp_path / "d3")
    assert "__1_0.distcp is missing" in err


def _edit_args(path, **changes) -> None:
    from megatron.convert import safe_pickle

    ckpt = safe_pickle.load(str(path), "file")
    for k, v in changes.items():
        setattr(ckpt["args"], k, v)
    torch.save(ckpt, path)


def test_an_incompatible_model_names_the_field(tmp_path, capsys, peer_dir):
    mc = tmp_path / "mc"
    shutil.copytree(os.path.join(peer_dir, "mcore", "ckpt"), mc)
    _edit_args(mc / "iter_0000005" / "common.pt", moe_router_score_function="sigmoid")
    err = _fails(capsys, "import", "--from", "mcore", mc, tmp_path / "d1")
    assert "args.moe_router_score_function = 'sigmoid'" in err
    ds = tmp_path / "ds"
    shutil.copytree(os.path.join(peer_dir, "deepspeed", "ckpt"), ds)
    _edit_args(ds / "global_step2" / "mp_rank_00_model_states.pt", ffn_hidden_size=48)
    err = _fails(capsys, "import", "--from", "megatron-deepspeed", ds, tmp_path / "d2")
    assert "layers.0.mlp.fc1.weight has shape (64, 32), the args imply (48, 32)" in err
    legacy = tmp_path / "legacy"
    shutil.copytree(os.path.join(peer_dir, "legacy", "ckpt"), legacy)
    _edit_args(legacy / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt",
               apply_residual_connection_post_layernorm=True)
    err = _fails(capsys, "import", "--from", "megatron-legacy", legacy, tmp_path / "d3")
    assert "args.apply_residual_connection_post_layernorm = True" in err


def test_export_to_mcore_refuses_what_megatron_core_cannot_express(imported, tmp_path, capsys):
    # DeepSpeed's residual MoE and surviving-choice gates have no Megatron-Core counterpart
    err = _fails(capsys, "export", "--load", imported["deepspeed"][0], "--to", "mcore",
                 "--output", tmp_path / "o")
    assert "residual MoE" in err and "surviving" in err
    assert peers.mcore.EXPRESSES.undeclared() == [] and peers.mcore.EXPRESSES.stale() == []


def test_import_usage_errors(tmp_path, capsys):
    err = _fails(capsys, "import", "--from", "mcore", tmp_path / "nowhere", tmp_path / "d")
    assert "SRC" in err and "no such directory" in err
    err = _fails(capsys, "import", "--from", "mcore", tmp_path)
    assert "SRC and DST" in err
    err = _fails(capsys, "import", "--from", "mcore", tmp_path, tmp_path / "d")
    assert "no Megatron-Core checkpoint" in err
    with pytest.raises(ConversionError, match="no 'args'"):
        (tmp_path / "x").mkdir()
        torch.save({"module": {}}, tmp_path / "x" / "mp_rank_00_model_states.pt")
        peers.IMPORTERS["megatron-deepspeed"].read(str(tmp_path / "x"), {})


def test_a_tanh_gelu_source_is_imported_with_a_warning(tmp_path, capsys, peer_dir):
    ds = tmp_path / "ds"
    shutil.copytree(os.path.join(peer_dir, "deepspeed", "ckpt"), ds)
    _edit_args(ds / "global_step2" / "mp_rank_00_model_states.pt", bias_gelu_fusion=True)
    code, out, err = run_main(capsys, checkpoint_convert.main, "import", "--from",
                              "megatron-deepspeed", ds, tmp_path / "d")
    assert code == 0 and "wrote" in out
    assert "warning: args.bias_gelu_fusion = True" in err and "tanh" in err


# ---- Adam's moments and the schedule: one more step in our code = the source library's --------
# peer_checkpoints.py steps the source once more after its save (DeepSpeed: engine.step;
# Megatron-LM: its torch AdamW under megatron-core's OptimizerParamScheduler) and keeps the
# gradients it stepped with and the weights after. Our import, loaded by the Checkpointer as
# pretrain_gpt_moe.py --load does (moments, step count, scheduler), steps with those gradients.
STEPPED = {"deepspeed": 4, "legacy": 8}  # scheduler steps (samples) per iteration at the source


def _source_stored(peer_dir: str, kind: str, which: str, model_cfg) -> dict:
    """The source's `which` ("grads" / "after") of both ranks as our stored tensors."""
    from megatron.convert import mcore, megatron_legacy, safe_pickle
    from megatron.convert.peer_common import canonical, legacy_to_stored

    per_rank = [torch.load(os.path.join(peer_dir, kind, f"next_step_rank{r}.pt"))[which]
                for r in (0, 1)]
    if kind == "deepspeed":  # EP 2: each rank's experts, rank 0's copy of the rest
        full = {canonical(k): v for sd in reversed(per_rank) for k, v in sd.items()}
        return legacy_to_stored(full, model_cfg)
    rank0 = os.path.join(peer_dir, kind, "ckpt", "iter_0000007", "mp_rank_00",
                         "model_optim_rng.pt")
    args = safe_pickle.load(rank0, "rank file")["args"]
    return mcore.to_stored(megatron_legacy._stage([per_rank], args, 0), model_cfg)


def step_import(folder: str, grads: dict, per_iteration: int, tp: int, ep: int, zero: bool,
                fresh: bool, out: str):
    """Load the import (optimizer and scheduler unless `fresh`), step once with the source's
    gradients at layout (tp, ep), save; rank 0 returns the stored weights after the step."""
    import torch.distributed as dist

    from megatron.checkpoint import CheckpointConfig, Checkpointer
    from megatron.training.lr_schedule import ScheduleConfig, build_scheduler
    from megatron.training.optimizer import Optimizer, OptimizerConfig

    import dataclasses

    from megatron.model.params import spec_of

    model_cfg, moe_cfg = configs_from_meta(read_checkpoint_meta(folder))
    rows = 8 * tp  # the vocabulary padded for this TP (as --make-vocab-size-divisible-by 8)
    model_cfg = dataclasses.replace(model_cfg,
                                    padded_vocab_size=-(-model_cfg.vocab_size // rows) * rows)
    groups = ted_groups(tp, ep)
    model = build_model(model_cfg, moe_cfg, groups, seed=0)
    optimizer = Optimizer(model, groups, OptimizerConfig(
        lr=1e-3, min_lr=1e-4, weight_decay=0.01, clip_grad=0.0, adam_eps=1e-8,
        use_distributed_optimizer=zero))
    schedule = ScheduleConfig("samples", per_iteration, warmup_steps=4, decay_steps=400,
                              train_iters=400 // per_iteration, decay_style="cosine")
    scheduler = build_scheduler(optimizer, schedule, 1e-3, 1e-4, 0.01)
    Checkpointer(CheckpointConfig(load=folder, no_load_optim=fresh), groups).load(
        model, optimizer, scheduler, lambda line: None)
    source = build_model(model_cfg, moe_cfg, groups, seed=1)
    load_stored_tensors(source, grads, groups)
    # Our reduction takes an expert's local gradient as the sum over its EP peers' tokens and
    # divides by DP (optimizer.py, step 1): each rank holding the whole gradient gives it
    # DP / expert-DP times over
    for p, g in zip(model.parameters(), source.parameters()):
        p.grad = g.detach() * (groups.dp.size / groups.edp.size if spec_of(p).expert else 1.0)
    optimizer.collect_gradients()
    optimizer.reduce_gradients()
    optimizer.step()
    saver = Checkpointer(CheckpointConfig(save=out), groups)
    saver.save(1, {"consumed_samples": 0}, model, optimizer, scheduler)
    saver.close()
    return read_stored_tensors(out) if dist.get_rank() == 0 else None


@pytest.mark.parametrize("kind, world, tp, ep, zero", [
    ("deepspeed", 1, 1, 1, False), ("deepspeed", 2, 1, 2, True),
    ("legacy", 1, 1, 1, False), ("legacy", 2, 2, 1, False)])
def test_one_more_step_equals_the_source_librarys_step(kind, world, tp, ep, zero, peer_dir,
                                                       imported, tmp_path):
    folder, message = imported[kind]
    assert "optimizer yes (Adam moments, step 2)" in message and "lr scheduler" in message
    model_cfg = configs_from_meta(read_checkpoint_meta(folder))[0]
    grads = _source_stored(peer_dir, kind, "grads", model_cfg)
    want = _source_stored(peer_dir, kind, "after", model_cfg)
    before = read_stored_tensors(folder)
    got = run(world, step_import, folder, grads, STEPPED[kind], tp, ep, zero, False,
              str(tmp_path / "ours"))[0]
    fresh = run(world, step_import, folder, grads, STEPPED[kind], tp, ep, zero, True,
                str(tmp_path / "fresh"))[0]
    assert set(got) == set(want)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    moved = max((want[k] - before[k]).abs().max().item() for k in want)
    off = max((fresh[k] - want[k]).abs().max().item() for k in want)
    print(f"{kind} at world {world} (TP {tp}, EP {ep}, ZeRO {zero}): max |ours - source| "
          f"{diff:.1e} after an update of up to {moved:.1e}; fresh optimizer: {off:.1e}")
    assert moved > 1e-4, "the source's step moved nothing: the comparison means nothing"
    assert diff <= 1e-6, f"{kind}: weights after one more step differ by {diff:.2e}"
    assert off > 100 * 1e-6, "a fresh optimizer gave the same step: moments were not compared"


# ---- pretrain_gpt_moe.py --load of a peer's folder: what it is and the command, before training --
@pytest.mark.parametrize("kind, inside", [("deepspeed", ""), ("deepspeed", "global_step2"),
                                          ("mcore", ""), ("mcore", "iter_0000005"),
                                          ("legacy", ""), ("legacy", "iter_0000007")])
def test_loading_a_peer_folder_names_its_format_and_the_conversion(kind, inside, peer_dir,
                                                                   imported, capsys,
                                                                   monkeypatch):
    import pretrain_gpt_moe

    folder = os.path.join(peer_dir, kind, "ckpt", inside) if inside else os.path.join(
        peer_dir, kind, "ckpt")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        pretrain_gpt_moe.load_config(_flags(imported[kind][0], 3) + ["--load", folder])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"--load {folder} holds" in err and "not one of ours" in err
    assert (f"`python tools/checkpoint_convert.py import --from {FROM[kind]} {folder} DST`"
            in err)
    # and the command it names works
    dst = os.path.join(str(imported[kind][0]) + "_again_" + (inside or "top"))
    message = checkpoint_convert.main(["import", "--from", FROM[kind], folder, dst])
    assert message.startswith(f"wrote {dst}")
