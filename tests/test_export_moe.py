"""Hugging Face exports of the MoE blocks of issue 20 (megatron/convert/qwen2_moe.py, qwen3_moe.py,
glm4_moe.py).

Each export loads in transformers 5.24.0 with no missing, unexpected or mismatched keys and gives
our logits within 1e-5 (our MoE runs with no token dropped); import gives back our stored
tensors bit for bit. Qwen2-MoE's shared expert is ours: gated, ungated (a zero gate, down_proj
doubled) or absent (zeros). What a format cannot express is refused by name.
"""

from __future__ import annotations

import pytest
import torch

from harness import ted_groups
from megatron import convert as hf_convert
from megatron.convert import ConversionError
from megatron.model.params import stored_tensors
from ted_patches.build import build_model
from ted_patches.config import MoEConfig
from util import tiny_model_config

TOL = 1e-5
ROPE = dict(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
            add_bias_linear=False, vocab_size=90, padded_vocab_size=128, init_method_std=0.2)


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, "layers": (0, 1), "topk": 2, "drop_tokens": False, **kw})


def tiny(model_kw: dict, moe_cfg: MoEConfig, seed: int = 3):
    """A tiny GPT-MoE in eval mode whose every parameter matters (norms perturbed)."""
    cfg = tiny_model_config(**{**ROPE, **model_kw})
    model = build_model(cfg, moe_cfg, ted_groups(1, 1), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():  # a trained selection bias: it changes choices
            if name.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model.eval()


@torch.no_grad()
def hf_load(fmt: str, path: str):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, hf_convert.ARCHITECTURES[fmt])
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{fmt}: {problems}"
    return model.eval()


SHARED = {
    "gated": dict(shared_expert_intermediate_size=48, shared_expert_gate=True),
    "ungated": dict(shared_expert_intermediate_size=40),
    "none": {},
}
CASES = {  # name -> (format, model flags, MoE config)
    "qwen2_moe-shared-gated-dense0": ("qwen2_moe", {}, moe(layers=(1,), **SHARED["gated"])),
    "qwen2_moe-shared-ungated-top1": ("qwen2_moe", dict(num_query_groups=2),
                                      moe(topk=1, gate_normalization="topk",
                                          **SHARED["ungated"])),
    "qwen2_moe-shared-none": ("qwen2_moe", dict(untie_embeddings_and_output_weights=True),
                              moe(gate_normalization="none")),
    "qwen3_moe-qknorm-headdim": ("qwen3_moe", dict(qk_layernorm=True, kv_channels=12),
                                 moe(layers=(1,), gate_normalization="topk",
                                     expert_ffn_hidden_size=24)),
    "qwen3_moe-qknorm-raw-gqa": ("qwen3_moe", dict(qk_layernorm=True, num_query_groups=2),
                                 moe(gate_normalization="none")),
    # sigmoid scores, a selection bias, 4 groups of which 2 per token, scaling, a shared expert
    # of 2 x the experts' FFN, partial rotary, QK-norm, head_dim 16
    "glm4_moe-sigmoid-bias-groups-shared": (
        "glm4_moe", dict(qk_layernorm=True, kv_channels=16, rotary_percent=0.5,
                         num_query_groups=2),
        moe(num_experts=8, layers=(1,), topk=4, score_function="sigmoid", enable_expert_bias=True,
            router_num_groups=4, router_group_topk=2, topk_scaling_factor=2.5,
            gate_normalization="topk", expert_ffn_hidden_size=24,
            shared_expert_intermediate_size=48)),
    "glm4_moe-sigmoid-raw-no-shared": ("glm4_moe", {},
                                       moe(score_function="sigmoid", enable_expert_bias=True,
                                           gate_normalization="none")),
}


def export(model, moe_cfg, fmt: str, path: str):
    tensors = stored_tensors(model, ted_groups(1, 1))
    config, hf = hf_convert.to_hf(fmt, tensors, model.cfg, moe_cfg)
    hf_convert.write_hf(path, config, hf)
    return tensors, config, hf


@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_equal_transformers_and_import_is_exact(case, tmp_path):
    fmt, model_kw, moe_cfg = CASES[case]
    model = tiny(model_kw, moe_cfg)
    tensors, config, hf = export(model, moe_cfg, fmt, str(tmp_path))
    hf_model = hf_load(fmt, str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        ours = model(tokens, torch.arange(16).expand_as(tokens))[..., :model.cfg.vocab_size]
        theirs = hf_model(input_ids=tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit difference| {diff:.3e}")
    assert ours.abs().max() > 1.0 and diff <= TOL, diff
    # import: the same configs (up to what the format does not carry) and every tensor bit-exact
    config_back, hf_back = hf_convert.read_hf(str(tmp_path))
    model_back, moe_back, tensors_back = hf_convert.from_hf(fmt, config_back, hf_back)
    assert tensors_back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(tensors_back[name], t), name
    for field in ("shared_expert_intermediate_size", "shared_expert_gate", "layers", "topk",
                  "num_experts"):
        assert getattr(moe_back, field) == getattr(moe_cfg, field), field
    for field in ("qk_layernorm", "head_dim", "num_query_groups", "num_layers", "hidden_size",
                  "rotary_percent"):
        assert getattr(model_back, field) == getattr(model.cfg, field), field
    rebuilt = build_model(model_back, moe_back, ted_groups(1, 1), seed=0)
    from megatron.model.params import load_stored_tensors

    load_stored_tensors(rebuilt, tensors_back, ted_groups(1, 1))
    with torch.no_grad():
        again = rebuilt.eval()(tokens, torch.arange(16).expand_as(tokens))
    assert torch.equal(again[..., :model.cfg.vocab_size], ours)


def test_qwen2_moe_shared_expert_is_the_real_one(tmp_path):
    """Zeroing our shared expert changes transformers' logits: the export carries it (it was
    written as zeros before)."""
    fmt, model_kw, moe_cfg = CASES["qwen2_moe-shared-gated-dense0"]
    model = tiny(model_kw, moe_cfg)
    _, config, hf = export(model, moe_cfg, fmt, str(tmp_path))
    name = "model.layers.1.mlp.shared_expert.down_proj.weight"
    assert hf[name].abs().sum() > 0 and config["shared_expert_intermediate_size"] == 48
    ungated = CASES["qwen2_moe-shared-ungated-top1"][2]
    model2 = tiny(CASES["qwen2_moe-shared-ungated-top1"][1], ungated)
    tensors2, _, hf2 = export(model2, ungated, fmt, str(tmp_path / "u"))
    assert torch.equal(hf2["model.layers.0.mlp.shared_expert_gate.weight"], torch.zeros(1, 32))
    assert torch.equal(hf2["model.layers.0.mlp.shared_expert.down_proj.weight"],
                       2 * tensors2["layers.0.mlp.shared_expert.fc2.weight"])


BLOCKED = [
    ("mixtral", {}, moe(gate_normalization="topk", **SHARED["gated"]),
     ["a shared expert", "export as qwen2_moe"]),
    ("qwen3_moe", dict(qk_layernorm=True), moe(**SHARED["gated"]), ["a shared expert"]),
    ("qwen3_moe", {}, moe(), ["QK-norm", "--qk-layernorm"]),
    ("qwen2_moe", dict(qk_layernorm=True), moe(), ["QK-norm"]),
    ("glm4_moe", {}, moe(), ["a softmax router", "--moe-router-score-function sigmoid"]),
    ("glm4_moe", {}, moe(score_function="sigmoid", **SHARED["gated"]),
     ["a gated shared expert"]),
    ("glm4_moe", {}, moe(score_function="sigmoid", shared_expert_intermediate_size=40,
                         expert_ffn_hidden_size=16), ["n_shared_experts x the experts' FFN 16"]),
    ("glm4_moe", {}, moe(num_experts=8, topk=2, score_function="sigmoid", router_num_groups=4,
                         router_group_topk=2), ["by its best 2 (use --moe-router-topk = 2 x"]),
    ("glm4_moe", {}, moe(score_function="sigmoid", layers=(0,)),
     ["MoE layers [0]", "--first-k-dense-replace"]),
]


@pytest.mark.parametrize("fmt,model_kw,moe_cfg,expected", BLOCKED)
def test_what_a_format_cannot_express_is_refused_by_name(fmt, model_kw, moe_cfg, expected):
    model = tiny(model_kw, moe_cfg)
    with pytest.raises(ConversionError) as e:
        hf_convert.to_hf(fmt, stored_tensors(model, ted_groups(1, 1)), model.cfg, moe_cfg)
    for text in expected:
        assert text in str(e.value), str(e.value)


def test_qwen2_moe_import_refuses_attention_biases():
    config = {"model_type": "qwen2_moe", "num_attention_heads": 4, "hidden_size": 32,
              "num_hidden_layers": 2, "vocab_size": 90, "max_position_embeddings": 16,
              "intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 64, "shared_expert_intermediate_size": 8}
    with pytest.raises(ConversionError, match="qkv_bias true"):
        hf_convert.configs_from_hf("qwen2_moe", config)
