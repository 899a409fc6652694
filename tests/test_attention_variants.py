"""Attention variants (issue 23, item 3): partial rotary (--rotary-percent), YaRN
(--rope-type yarn, --rotary-scaling-factor, --mscale, --mscale-all-dim, ...), QK-norm
(--qk-layernorm), --kv-channels and multi-latent attention (--multi-latent-attention ...).

References, each independent of the code under test:
- rotary: megatron-core 0.16.1's own RotaryEmbedding / YarnRotaryEmbedding and its unfused apply
  (run on CPU with torch.cuda.current_device answering "cpu");
- standard attention: a plain-torch computation from the module's full weights (Megatron's QKV
  row layout, per-head norms by formula, megatron-core's rotary, an explicit causal softmax);
- multi-latent attention: transformers' DeepseekV3Attention on the same weights;
- layouts: one process (losses, aux losses, grad norms, gradients, parameters after Adam) for
  TP x EP x DP x PP on gloo worlds of 2 and 4;
- the planner: the real model's parameters, torch's FLOP counter, the collective counter.
"""

from __future__ import annotations

import functools
import math
import zlib

import pytest
import torch

from harness import run, ted_groups
from megatron.parallel.stages import StagePlan
from util import (FULL_MATRIX, PARAM_FLOOR, assert_close_dicts, rel_err, tiny_model_config,
                  train_and_record)

SEQ, MBS = 16, 2
MLA = dict(multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=10, qk_head_dim=6,
           qk_pos_emb_head_dim=4, v_head_dim=5, position_embedding_type="rope")
YARN = dict(rotary_scaling_factor=4.0, original_max_position_embeddings=4, mscale=0.9,
            mscale_all_dim=0.5)
VARIANTS = {
    # GQA with 12-wide heads (hidden 32 / 4 heads would be 8), LayerNorm QK-norm (weight and
    # bias), half of each head rotated
    "gqa-kvch-qknorm-partial": dict(num_query_groups=2, kv_channels=12, qk_layernorm=True,
                                    rotary_percent=0.5, position_embedding_type="rope"),
    # YaRN on standard attention, RMSNorm QK-norm, SwiGLU, no biases
    "yarn-qknorm-rms": dict(position_embedding_type="rope", rope_type="yarn", qk_layernorm=True,
                            normalization="RMSNorm", swiglu=True, add_bias_linear=False, **YARN),
    # DeepSeek-V3's attention: low-rank q, latent norms, YaRN by default
    "mla-qlora-yarn": dict(MLA, qk_layernorm=True, normalization="RMSNorm", **YARN),
    # DeepSeek-V2-Lite's: full-rank q, no latent norms, plain partial rope, LayerNorm elsewhere
    "mla-noqlora-rope": dict(MLA, q_lora_rank=None, qk_pos_emb_head_dim=8, rope_type="rope",
                             rotary_percent=0.5),
}


def mcore_on_cpu(monkeypatch):
    """megatron-core's rotary modules move their frequencies to torch.cuda.current_device()."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")


# ---- rotary against megatron-core ----------------------------------------------------------------
ROPE_CASES = {
    "full": (16, dict()),
    "partial-0.5": (16, dict(percent=0.5)),
    "yarn": (16, dict(rope_type="yarn", scaling_factor=40.0, original_max_position_embeddings=64,
                      mscale=0.707, mscale_all_dim=0.707)),
    "yarn-mscale-only": (8, dict(rope_type="yarn", scaling_factor=8.0,
                                 original_max_position_embeddings=32, mscale=1.0,
                                 mscale_all_dim=0.0, beta_fast=16.0, beta_slow=2.0)),
}


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "mla-pairs"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_equals_megatron_cores(case, interleaved, monkeypatch):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding as MCoreRope)
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding)
    from megatron.model.rotary import RotaryEmbedding, apply_rotary

    mcore_on_cpu(monkeypatch)
    dim, kw = ROPE_CASES[case]
    s, heads, base = 300, 3, 10000.0
    if kw.get("rope_type") == "yarn":
        theirs = YarnRotaryEmbedding(
            dim, rotary_base=base, use_cpu_initialization=True,
            scaling_factor=kw["scaling_factor"],
            original_max_position_embeddings=kw["original_max_position_embeddings"],
            beta_fast=kw.get("beta_fast", 32.0), beta_slow=kw.get("beta_slow", 1.0),
            mscale=kw["mscale"], mscale_all_dim=kw["mscale_all_dim"])
        freqs, mscale = theirs(s)
    else:
        theirs = MCoreRope(dim, rotary_percent=kw.get("percent", 1.0), rotary_base=base,
                           use_cpu_initialization=True)
        freqs, mscale = theirs(s), 1.0
    x = torch.randn(s, 1, heads, dim, generator=torch.Generator().manual_seed(3))  # [s, b, h, d]
    want = _apply_rotary_pos_emb_bshd(x, freqs, multi_latent_attention=interleaved,
                                      mscale=mscale)
    ours = RotaryEmbedding(dim, base, **kw)
    cos, sin = ours(torch.arange(s).unsqueeze(0))  # [1, 1, s, rot]
    got = apply_rotary(x.permute(1, 2, 0, 3), cos, sin, interleaved_input=interleaved)
    assert got.shape == x.permute(1, 2, 0, 3).shape
    assert (got.permute(2, 0, 1, 3) - want).abs().max() < 2e-5
    if kw.get("percent"):  # the unrotated half passes through untouched
        assert torch.equal(got[..., dim // 2:], x.permute(1, 2, 0, 3)[..., dim // 2:])


# ---- standard attention against a plain computation --------------------------------------------
def _perturbed_norms(model):
    """Random norm weights and biases (init ones / zeros would hide a wrong norm), drawn per
    parameter name: the same on every layout (norms are replicated over TP, named globally)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def plain_attention(cfg, att, x, positions):
    """SelfAttention's function from its full weights (TP 1), written out."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding as MCoreRope)
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding)

    b, s, _ = x.shape
    n, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    qkv = x @ att.qkv.weight.T + (att.qkv.bias if att.qkv.bias is not None else 0)
    qkv = qkv.view(b, s, g, n // g + 2, d)
    q = qkv[:, :, :, :n // g].reshape(b, s, n, d)
    k, v = qkv[:, :, :, n // g], qkv[:, :, :, n // g + 1]

    def norm(t, mod):
        if mod is None:
            return t
        if cfg.normalization == "RMSNorm":
            return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_epsilon) * mod.weight
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + cfg.norm_epsilon) * mod.weight + mod.bias

    q, k = norm(q, att.q_norm), norm(k, att.k_norm)
    if cfg.rope_type == "yarn":
        rope = YarnRotaryEmbedding(d, rotary_base=cfg.rotary_base, use_cpu_initialization=True,
                                   scaling_factor=cfg.rotary_scaling_factor,
                                   original_max_position_embeddings=(
                                       cfg.original_max_position_embeddings),
                                   mscale=cfg.mscale, mscale_all_dim=cfg.mscale_all_dim)
        freqs, mscale = rope(s)
    else:
        rope = MCoreRope(d, rotary_percent=cfg.rotary_percent, rotary_base=cfg.rotary_base,
                         use_cpu_initialization=True)
        freqs, mscale = rope(s), 1.0
    q = _apply_rotary_pos_emb_bshd(q.transpose(0, 1), freqs, mscale=mscale).transpose(0, 1)
    k = _apply_rotary_pos_emb_bshd(k.transpose(0, 1), freqs, mscale=mscale).transpose(0, 1)
    k, v = k.repeat_interleave(n // g, dim=2), v.repeat_interleave(n // g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, n * d)
    return ctx @ att.proj.weight.T + (att.proj.bias if att.proj.bias is not None else 0)


@pytest.mark.parametrize("variant", ["gqa-kvch-qknorm-partial", "yarn-qknorm-rms"])
def test_self_attention_variants_compute_megatrons_function(variant, monkeypatch):
    from ted_patches.build import build_model

    mcore_on_cpu(monkeypatch)
    cfg = tiny_model_config(**VARIANTS[variant])
    model = build_model(cfg, None, ted_groups(1, 1), seed=3)
    _perturbed_norms(model)
    att = model.layers[0].attention
    x = torch.randn(2, SEQ, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        got = att(x, model.rope(positions))
        want = plain_attention(cfg, att, x, positions)
    assert rel_err(got, want) < 1e-5


# ---- multi-latent attention against transformers' DeepseekV3Attention --------------------------
def deepseek_v3_attention(cfg, mla):
    """transformers' DeepseekV3Attention (and its rotary) holding `mla`'s weights (TP 1)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention, DeepseekV3RotaryEmbedding)

    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": cfg.rotary_base,
                "factor": cfg.rotary_scaling_factor, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale_all_dim,
                "original_max_position_embeddings": cfg.original_max_position_embeddings}
    hf = DeepseekV3Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_head_dim,
        qk_rope_head_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim,
        rms_norm_eps=cfg.norm_epsilon, attention_bias=False, rope_interleave=True,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=rope,
        attention_dropout=0.0)
    hf._attn_implementation = "sdpa"
    attn, rotary = DeepseekV3Attention(hf, 0).eval(), DeepseekV3RotaryEmbedding(hf)
    weights = {"kv_a_proj_with_mqa.weight": mla.kv_down.weight,
               "kv_b_proj.weight": mla.kv_up.weight, "o_proj.weight": mla.proj.weight,
               "kv_a_layernorm.weight": mla.kv_norm.weight}
    if cfg.q_lora_rank:
        weights.update({"q_a_proj.weight": mla.q_down.weight, "q_b_proj.weight": mla.q_up.weight,
                        "q_a_layernorm.weight": mla.q_norm.weight})
    else:
        weights["q_proj.weight"] = mla.q_up.weight
    missing, unexpected = attn.load_state_dict({k: v.detach() for k, v in weights.items()},
                                               strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return attn, rotary


@pytest.mark.parametrize("kw", [dict(**YARN), dict(q_lora_rank=None, rope_type="rope"),
                                dict(q_lora_rank=None, rotary_scaling_factor=40.0, mscale=0.707,
                                     mscale_all_dim=0.707, original_max_position_embeddings=4)],
                         ids=["qlora-yarn", "rope", "yarn-deepseek-v2-lite"])
def test_mla_equals_transformers_deepseek_v3(kw):
    from ted_patches.build import build_model

    # transformers' latent norms use their default eps 1e-6 (DeepSeek's), whatever rms_norm_eps
    cfg = tiny_model_config(**{**MLA, "qk_layernorm": True, "normalization": "RMSNorm",
                               "add_bias_linear": False, "norm_epsilon": 1e-6, **kw})
    model = build_model(cfg, None, ted_groups(1, 1), seed=4)
    _perturbed_norms(model)
    mla = model.layers[0].attention
    attn, rotary = deepseek_v3_attention(cfg, mla)
    x = torch.randn(2, SEQ, cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        want, _ = attn(x, rotary(x, positions), None)
        got = mla(x, model.rope(positions))
    assert rel_err(got, want) < 1e-5


# ---- every layout equals one process ------------------------------------------------------------
def variant_case(tp: int, ep: int, pp: int, variant: str, steps: int = 2, micro: int = 4,
                 sp: bool = False, recompute: str | None = None) -> dict:
    """`steps` AdamW steps of a 4-layer GPT-MoE (4 experts in layers 1 and 3) with the attention
    variant: losses, aux losses, grad norms, the first step's reduced gradients and the final
    parameters, in full."""
    from megatron.training.optimizer import Optimizer, OptimizerConfig
    from megatron.training.pipeline import Pipeline
    from ted_patches.build import build_model
    from ted_patches.config import MoEConfig

    groups = ted_groups(tp, ep, pp, sp=sp)
    cfg = tiny_model_config(num_layers=4, **VARIANTS[variant])
    moe = MoEConfig(num_experts=4, layers=(1, 3), topk=2, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    plan = StagePlan(4, pp, 1, None, None, "1f1b")
    from megatron.model.config import RecomputeConfig

    method = "uniform" if recompute == "full" else None
    model = build_model(cfg, moe, groups, seed=21, stages=plan,
                        recompute=RecomputeConfig(recompute, method) if recompute else None)
    _perturbed_norms(model)  # the same on every layout: drawn from full tensors' names
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=1.0))
    pipe = (Pipeline(model, plan, groups, micro // groups.dp.size, MBS, SEQ, torch.device("cpu"))
            if pp > 1 else None)

    return train_and_record(model, opt, groups, pipe, steps, micro, MBS, SEQ, cfg.vocab_size,
                            zero1=False)


@functools.cache
def one_process(variant: str) -> dict:
    return variant_case(1, 1, 1, variant)


def _merged(ranks: list[dict], key: str) -> dict:
    out = {}
    for r in ranks:
        out.update(r[key] or {})
    return out


# (tp, ep, pp, dp) per variant: TP 2 and 4 (heads split), EP with DP, PP 2, and TP x EP x DP
LAYOUTS = [
    ("gqa-kvch-qknorm-partial", (2, 1, 1, 1)), ("gqa-kvch-qknorm-partial", (2, 2, 1, 2)),
    ("gqa-kvch-qknorm-partial", (2, 1, 2, 1)),
    ("yarn-qknorm-rms", (4, 1, 1, 1)), ("yarn-qknorm-rms", (1, 2, 2, 2)),
    ("mla-qlora-yarn", (2, 1, 1, 1)), ("mla-qlora-yarn", (2, 2, 1, 2)),
    ("mla-qlora-yarn", (1, 2, 2, 2)), ("mla-qlora-yarn", (4, 1, 1, 1)),
    ("mla-noqlora-rope", (2, 1, 2, 1)), ("mla-noqlora-rope", (1, 2, 1, 2)),
    ("mla-noqlora-rope", (2, 2, 1, 2)),
]
# with sequence parallelism (--sequence-parallel): (tp, ep, pp, dp)
SP_LAYOUTS = [("gqa-kvch-qknorm-partial", (2, 1, 1, 1)), ("mla-qlora-yarn", (2, 2, 1, 2)),
              ("mla-noqlora-rope", (4, 1, 1, 1))]


# Left out in CI (TED_FULL_MATRIX=1 runs them): each repeats what its variant runs elsewhere. The
# SP and recompute tests below run gqa and both MLAs at TP 2 (alone and with EP 2, DP 2), and the
# EP x DP layout without TP is the MLAs' (1, 2, 2, 2) without the pipeline.
REPEATS = {("gqa-kvch-qknorm-partial", (2, 1, 1, 1)), ("mla-qlora-yarn", (2, 1, 1, 1)),
           ("mla-qlora-yarn", (2, 2, 1, 2)), ("mla-noqlora-rope", (1, 2, 1, 2))}
CI_LAYOUTS = [c for c in LAYOUTS if FULL_MATRIX or c not in REPEATS]


@pytest.mark.parametrize("variant,layout", CI_LAYOUTS, ids=[f"{v}-tp{t}ep{e}pp{p}dp{d}"
                                                            for v, (t, e, p, d) in CI_LAYOUTS])
def test_every_layout_equals_one_process(variant, layout, sp=False, recompute=None):
    tp, ep, pp, dp = layout
    ref = one_process(variant)
    ranks = run(tp * pp * dp, variant_case, tp, ep, pp, variant, sp=sp, recompute=recompute)
    got = ranks[0]
    for key in ("loss", "aux", "norm"):
        for a, b in zip(got[key], ref[key]):
            assert abs(a - b) <= 1e-5 * abs(b), f"{key}: {got[key]} != {ref[key]}"
    assert_close_dicts(_merged(ranks, "grads"), ref["grads"], 1e-5, "gradient")
    # after Adam's steps (which turn gradient rounding into updates of ~lr): relative to
    # max(scale, init std), with test_pipeline.py's bound
    assert_close_dicts(_merged(ranks, "final"), ref["final"], 5e-5, "parameter", PARAM_FLOOR)


@pytest.mark.parametrize("variant,layout", SP_LAYOUTS, ids=[f"{v}-tp{t}ep{e}dp{d}-sp"
                                                            for v, (t, e, p, d) in SP_LAYOUTS])
def test_sequence_parallel_layouts_equal_one_process(variant, layout):
    test_every_layout_equals_one_process(variant, layout, sp=True)


@pytest.mark.parametrize("variant,recompute", [("mla-qlora-yarn", "full"),
                                               ("mla-noqlora-rope", "selective"),
                                               ("gqa-kvch-qknorm-partial", "full")])
def test_recomputed_layouts_equal_one_process(variant, recompute):
    """Activation recompute (full, with CAC on the MoE layers; selective: the attention core)
    at TP 2 x EP 2 x DP 2 against the plain one-process run."""
    test_every_layout_equals_one_process(variant, (2, 2, 1, 2), recompute=recompute)


def test_the_reference_is_not_trivial():
    """The variants differ from plain attention and their gradients reach every new weight."""
    ref = one_process("mla-qlora-yarn")
    for name in ("layers.0.attention.q_down.weight", "layers.0.attention.q_norm.weight",
                 "layers.0.attention.kv_norm.weight", "layers.2.attention.kv_up.weight"):
        assert ref["grads"][name].abs().max() > 1e-6, name
    qk = one_process("gqa-kvch-qknorm-partial")
    for name in ("layers.0.attention.q_norm.bias", "layers.3.attention.k_norm.weight"):
        assert qk["grads"][name].abs().max() > 1e-6, name


# ---- through the command line: Megatron-LM's flags, a checkpoint across TP sizes ----------------
MLA_FLAGS = ("--multi-latent-attention --q-lora-rank 12 --kv-lora-rank 10 --qk-head-dim 6 "
             "--qk-pos-emb-head-dim 4 --v-head-dim 5 --qk-layernorm --normalization RMSNorm "
             "--position-embedding-type rope --rotary-scaling-factor 4 "
             "--original-max-position-embeddings 4 --mscale 0.9 --mscale-all-dim 0.5 "
             "--micro-batch-size 2 --global-batch-size 4 --train-iters 4 "
             "--lr-warmup-iters 1").split()


def test_flags_set_the_fields_megatron_names():
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config
    from test_training import MODEL

    m = build_config(parse_args(MODEL + MLA_FLAGS), 1, 121).model
    assert (m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim,
            m.qk_pos_emb_head_dim, m.v_head_dim, m.qk_layernorm) == (True, 12, 10, 6, 4, 5, True)
    assert (m.rope_type, m.rotary_scaling_factor, m.original_max_position_embeddings, m.mscale,
            m.mscale_all_dim, m.beta_fast, m.beta_slow) == ("yarn", 4.0, 4, 0.9, 0.5, 32.0, 1.0)
    schedule = MLA_FLAGS[-8:]  # batch sizes and iterations
    plain = build_config(parse_args(MODEL + schedule + "--kv-channels 12 --rotary-percent 0.5 "
                                    "--position-embedding-type rope".split()), 1, 121).model
    assert (plain.head_dim, plain.rotary_percent, plain.rope_type) == (12, 0.5, "rope")


BAD_FLAGS = [
    ("--kv-channels 12 --rotary-percent 0.25 --position-embedding-type rope",
     "--rotary-percent 0.25 rotates 3 of the 12 dims of a head: it must be an even number >= 2"),
    ("--rotary-percent 0.5 --rope-type yarn",
     "--rotary-percent below 1 with --rope-type yarn: YaRN scales the whole head"),
    ("--rotary-percent 1.5", "--rotary-percent must be in (0, 1] (got 1.5)"),
    ("--multi-latent-attention --group-query-attention --num-query-groups 2",
     "--multi-latent-attention has no query groups"),
    ("--multi-latent-attention --qk-pos-emb-head-dim 5",
     "--qk-pos-emb-head-dim 5 must be even"),
    ("--multi-latent-attention --q-lora-rank 0", "--q-lora-rank must be >= 1 (got 0)"),
    ("--num-attention-heads 5", "--hidden-size 32 is not divisible by --num-attention-heads 5 "
                                "(or give --kv-channels)"),
    ("--rope-type yarn --rotary-scaling-factor 0", "--rotary-scaling-factor must be > 0"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_attention_flags_name_the_flag_before_any_collective(flags, message):
    from megatron.cli.arguments import ConfigError, parse_args
    from megatron.cli.configs import build_config
    from test_training import MODEL

    args = parse_args(MODEL + MLA_FLAGS[-8:] + flags.split())  # the last value of a flag counts
    with pytest.raises(ConfigError) as err:
        build_config(args, 1, 121)  # one process, no process group: nothing communicated
    assert message in str(err.value)


def test_kv_channels_with_mla_is_a_notice_as_in_megatron_core():
    """Megatron-Core's DeepSeek proxies pass --kv-channels beside MLA, which ignores it."""
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config
    from test_training import MODEL

    args = parse_args(MODEL + MLA_FLAGS + ["--kv-channels", "8"])
    cfg = build_config(args, 1, 121)
    assert cfg.model.kv_channels is None
    assert any("--kv-channels has no effect with --multi-latent-attention" in n
               for n in cfg.notices)


def test_an_mla_checkpoint_saved_at_tp2_resumes_at_tp1(tmp_path):
    """4 iterations at TP 1 straight == 2 at TP 2 (saved) + 2 at TP 1 loading that checkpoint:
    every parameter of MLA (replicated down projections and norms, split up projections) is
    stored layout-free."""
    from test_training import MODEL, MOE, logged, pretrain_case

    argv = MODEL + MOE + MLA_FLAGS
    straight = logged(pretrain_case(argv)["printed"], "lm loss")
    first = run(2, pretrain_case, argv + ["--tensor-model-parallel-size", "2", "--save",
                                          str(tmp_path), "--exit-interval", "2"])[0]
    second = pretrain_case(argv + ["--load", str(tmp_path), "--save", str(tmp_path)])
    resumed = logged(first["printed"], "lm loss") + logged(second["printed"], "lm loss")
    assert len(straight) == len(resumed) == 4
    for a, b in zip(resumed, straight):
        assert abs(a - b) <= 1e-5 * abs(b), (resumed, straight)
    assert "iteration        3/       4" in second["printed"]


# ---- the planner and the logged FLOPs ------------------------------------------------------------
# name -> (world, the layout's flags, the attention's flags)
PLAN_FLAGS = {
    "mla tp2": (2, "--tensor-model-parallel-size 2 --global-batch-size 4",
                " ".join(MLA_FLAGS[:MLA_FLAGS.index("--micro-batch-size")])),
    "qknorm kv-channels gqa tp2": (2, "--tensor-model-parallel-size 2 --global-batch-size 4",
                                   "--qk-layernorm --kv-channels 12 --group-query-attention "
                                   "--num-query-groups 2 --position-embedding-type rope "
                                   "--rotary-percent 0.5"),
    "mla-noqlora tp2-ep2 recompute": (4, "--tensor-model-parallel-size 2 "
                                         "--expert-model-parallel-size 2 --global-batch-size 8 "
                                         "--recompute-granularity full --recompute-method uniform",
                                      "--multi-latent-attention --kv-lora-rank 10 "
                                      "--qk-head-dim 6 --qk-pos-emb-head-dim 4 --v-head-dim 5"),
}


def plan_cases(names: list[str]) -> dict:
    """Each case's real step, with and without its attention flags."""
    from test_planner import step_case

    out = {}
    for name in names:
        _, layout, attention = PLAN_FLAGS[name]
        out[name] = (step_case(layout), step_case(f"{layout} {attention}"))
    return out


def _minus(a: dict, b: dict) -> dict:
    """Collectives of `a` beyond `b`'s, per (kind, group): (calls, bytes)."""
    keys = set(a) | set(b)
    out = {k: tuple(x - y for x, y in zip(a.get(k, (0, 0)), b.get(k, (0, 0)))) for k in keys}
    return {k: v for k, v in out.items() if v != (0, 0)}


@pytest.mark.parametrize("world", [2, 4])
def test_planned_parameters_and_collectives_equal_the_real_steps(world):
    """The planner's parameter table and optimizer state equal a real train_step's model, and
    the collectives the attention variant adds or removes (calls and bytes per group, against the
    same layout with plain attention: tests/test_planner.py checks that one) equal what the
    counter sees on every rank."""
    from megatron import plan as planner
    from test_planner import _plan_summary, config

    names = [n for n, (w, _, _) in PLAN_FLAGS.items() if w == world]
    measured = run(world, plan_cases, names)
    for name in names:
        _, layout, attention = PLAN_FLAGS[name]
        base, cfg = config(layout, world), config(f"{layout} {attention}", world)
        table = [(p.name, p.numel) for p in planner.param_table(cfg)]
        want = _minus(_plan_summary(cfg), _plan_summary(base))
        assert want, name  # the variant changes the attention's collectives
        for rank, (got_base, got) in enumerate(r[name] for r in measured):
            assert got["params"] == table, (name, rank)
            assert got["state_bytes"] == planner.optimizer_state_bytes(cfg), (name, rank)
            assert _minus(got["counter"], got_base["counter"]) == want, (name, rank)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_flops_equal_torchs_flop_counter(variant):
    """ModelConfig.attention_flops (the log's and the planner's) against torch's FLOP counter on
    one attention forward (TP 1, the math attention kernel, whose matmuls it sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ted_patches.build import build_model

    cfg = tiny_model_config(**VARIANTS[variant])
    model = build_model(cfg, None, ted_groups(1, 1), seed=3)
    x = torch.randn(2, SEQ, cfg.hidden_size)
    rope = model.rope(torch.arange(SEQ).expand(2, SEQ))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.layers[0].attention(x, rope)
    assert fc.get_total_flops() == 2 * SEQ * sum(cfg.attention_flops(SEQ))


# ---- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kw", [("mixtral", dict(num_query_groups=2)),
                                    ("qwen2_moe", dict())])
def test_kv_channels_export_with_transformers_logits(fmt, kw, tmp_path):
    """--kv-channels is config.json's head_dim: Mixtral and Qwen2-MoE compute the same logits."""
    from test_export import (ROPE, export_dir, hf_load, moe, our_logits, sample_tokens,
                             tiny)

    layers = (0, 1) if fmt == "mixtral" else (1,)
    model = tiny(dict(ROPE, kv_channels=12, **kw), moe(layers=layers))
    hf_model = hf_load(fmt, export_dir(model, fmt, str(tmp_path)))
    assert hf_model.config.head_dim == 12
    tokens = sample_tokens(model.cfg)
    ours = our_logits(model, tokens)
    assert ours.abs().max() > 1.0
    assert (ours - hf_model(input_ids=tokens).logits).abs().max() <= 1e-5


REFUSED = [
    (dict(rotary_percent=0.5), "partial rotary (--rotary-percent 0.5): {fmt} rotates whole heads"),
    (dict(rope_type="yarn", rotary_scaling_factor=4.0),
     "YaRN (--rope-type yarn): {fmt} is exported with plain RoPE (--rope-type rope)"),
    (dict(qk_layernorm=True), "per-head QK-norm (--qk-layernorm): {fmt} has none"),
    (dict(MLA), "multi-latent attention (--multi-latent-attention): {fmt} has q/k/v projections "
                "per head"),
]


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe", "gpt2"])
@pytest.mark.parametrize("kw,message", REFUSED, ids=["partial", "yarn", "qknorm", "mla"])
def test_what_a_format_cannot_express_is_refused_by_name(fmt, kw, message):
    from megatron import convert
    from ted_patches.config import MoEConfig

    base = (dict(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                 add_bias_linear=False) if fmt != "gpt2" else {})
    if fmt == "gpt2" and ("rotary_percent" in kw or "rope_type" in kw):
        # learned positions: rotary settings change nothing there
        assert convert.blockers(fmt, tiny_model_config(**{**base, **kw}), None) == []
        return
    model = tiny_model_config(**{**base, **kw})
    moe = None if fmt == "gpt2" else MoEConfig(num_experts=4, layers=(0, 1) if fmt == "mixtral"
                                               else (1,), topk=2)
    found = convert.blockers(fmt, model, moe)
    name = "GPT-2" if fmt == "gpt2" else fmt
    assert message.format(fmt=name) in found, found
    if fmt == "gpt2":
        wide = tiny_model_config(kv_channels=12)
        assert convert.blockers(fmt, wide, None) == ["--kv-channels 12: GPT-2's head dim is "
                                                     "hidden / heads = 8"]


DEEPSEEK = {  # name -> (model flags, MoE flags)
    # DeepSeek-V3's shape: low-rank q, YaRN, sigmoid router with bias, groups, shared expert
    "qlora-yarn-groups-shared": (
        dict(YARN, q_lora_rank=12),
        dict(num_experts=8, layers=(1,), topk=4, score_function="sigmoid",
             enable_expert_bias=True, router_num_groups=4, router_group_topk=2,
             topk_scaling_factor=2.5, gate_normalization="topk", expert_ffn_hidden_size=24,
             shared_expert_intermediate_size=48)),
    # DeepSeek-V2-Lite's attention (full-rank q, YaRN with mscale = mscale_all_dim), untied
    "noqlora-yarn-mscale": (
        dict(q_lora_rank=None, rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707,
             original_max_position_embeddings=4, untie_embeddings_and_output_weights=True),
        dict(num_experts=4, layers=(0, 1), topk=2, score_function="sigmoid",
             gate_normalization="none")),
    "rope": (dict(rope_type="rope"), dict(num_experts=4, layers=(1,), topk=2,
                                          score_function="sigmoid", enable_expert_bias=True,
                                          gate_normalization="topk")),
}


@pytest.mark.parametrize("case", list(DEEPSEEK))
def test_mla_exports_to_deepseek_v3_with_transformers_logits(case, tmp_path):
    """megatron/convert/deepseek_v3.py (not registered in megatron.convert yet): the export
    loads in transformers' DeepseekV3ForCausalLM with no missing or unexpected keys and gives
    our logits within 1e-5."""
    from megatron import convert as hf_convert
    from megatron.convert import deepseek_v3
    from megatron.model.params import stored_tensors
    from ted_patches.config import MoEConfig
    from test_export_moe import tiny

    transformers = pytest.importorskip("transformers")
    model_kw, moe_kw = DEEPSEEK[case]
    moe = MoEConfig(**{"drop_tokens": False, **moe_kw})
    model = tiny({**MLA, "qk_layernorm": True, "norm_epsilon": 1e-6, **model_kw}, moe)
    assert deepseek_v3.EXPRESSES.blockers(model.cfg, moe) == []
    tensors = stored_tensors(model, ted_groups(1, 1))
    hf = deepseek_v3.hub_tensors(tensors, model.cfg, moe, torch.float32)
    hf_convert.write_hf(str(tmp_path), deepseek_v3.hub_config(model.cfg, moe, torch.float32), hf)
    hf_model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    tokens = torch.randint(0, model.cfg.vocab_size, (2, SEQ),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens, torch.arange(SEQ).expand_as(tokens))[..., :model.cfg.vocab_size]
        theirs = hf_model.eval()(input_ids=tokens).logits
    assert ours.abs().max() > 1.0
    assert (ours - theirs).abs().max() <= 1e-5


def test_deepseek_v3_refuses_what_it_cannot_express():
    from megatron.convert import deepseek_v3
    from ted_patches.config import MoEConfig

    moe = MoEConfig(num_experts=4, layers=(1,), topk=2, score_function="sigmoid")
    rope = dict(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                add_bias_linear=False)
    fits = tiny_model_config(**{**rope, **MLA, "qk_layernorm": True, "norm_epsilon": 1e-6})
    assert deepseek_v3.EXPRESSES.blockers(fits, moe) == []
    assert deepseek_v3.EXPRESSES.undeclared() == deepseek_v3.EXPRESSES.stale() == []
    for changes, message in [
        (dict(multi_latent_attention=False, q_lora_rank=None, rope_type="rope"),
         "standard attention: deepseek_v3 is multi-latent attention"),
        (dict(qk_layernorm=False), "no latent norms: deepseek_v3 normalizes the q and kv latents"),
        (dict(norm_epsilon=1e-5), "--norm-epsilon 1e-05: deepseek_v3's latent norms use 1e-6"),
        (dict(rotary_percent=0.5, rope_type="rope"), "partial rotary (--rotary-percent 0.5)"),
    ]:
        model = tiny_model_config(**{**rope, **MLA, "qk_layernorm": True, "norm_epsilon": 1e-6,
                                     **changes})
        found = deepseek_v3.EXPRESSES.blockers(model, moe)
        assert any(message in f for f in found), (changes, found)
