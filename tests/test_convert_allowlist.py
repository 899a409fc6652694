"""The export adapters' allow-lists (megatron/convert/allowlist.py): each format declares, for
every field of ModelConfig and MoEConfig, what it can express; a field it does not declare, or a
value its declaration does not allow, is refused by name. No transformers needed."""

from __future__ import annotations

import dataclasses

import pytest

from megatron import convert
from megatron.convert import ConversionError
from megatron.convert.allowlist import ANY, Declaration, Rule, only
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig
from util import tiny_model_config

ROPE = dict(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
            add_bias_linear=False)
# a model each format expresses
FITS = {"mixtral": (ROPE, dict(num_experts=4, layers=(0, 1), topk=2)),
        "qwen2_moe": (ROPE, dict(num_experts=4, layers=(1,), topk=1)),
        "qwen3_moe": (dict(ROPE, qk_layernorm=True), dict(num_experts=4, layers=(1,), topk=2)),
        "glm4_moe": (ROPE, dict(num_experts=4, layers=(1,), topk=2, score_function="sigmoid")),
        "deepseek_v3": (dict(ROPE, multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=10,
                             qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5,
                             qk_layernorm=True, norm_epsilon=1e-6),
                        dict(num_experts=4, layers=(1,), topk=2, score_function="sigmoid")),
        "gpt2": ({}, None)}


def fitting(fmt: str) -> tuple[ModelConfig, MoEConfig | None]:
    model_kw, moe_kw = FITS[fmt]
    return tiny_model_config(**model_kw), None if moe_kw is None else MoEConfig(**moe_kw)


def replaced(cfg, **changes):
    """`cfg` with fields changed, bypassing any validation in __post_init__."""
    cfg = dataclasses.replace(cfg)
    for name, value in changes.items():
        object.__setattr__(cfg, name, value)
    return cfg


@dataclasses.dataclass(frozen=True)
class FutureMoEConfig(MoEConfig):
    """MoEConfig with a feature no adapter has declared yet."""

    shared_experts: int = 0


@dataclasses.dataclass(frozen=True)
class FutureModelConfig(ModelConfig):
    future_attention: bool = False


def future(cfg, cls, **extra):
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, **extra)


def test_the_registry_lists_one_adapter_per_format():
    assert convert.EXPORT_FORMATS == ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe",
                                      "deepseek_v3", "gpt2")
    assert convert.IMPORT_FORMATS == ("mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe")
    for fmt, adapter in convert.ADAPTERS.items():
        assert adapter.FORMAT == fmt and adapter.EXPRESSES.fmt == fmt
        assert convert.ARCHITECTURES[fmt] == adapter.ARCHITECTURE
    assert set(FITS) == set(convert.EXPORT_FORMATS)


# ---- (a) every field is declared --------------------------------------------------------------
@pytest.mark.parametrize("fmt", convert.EXPORT_FORMATS)
def test_every_config_field_is_declared(fmt):
    """A field added to ModelConfig or MoEConfig fails here until each adapter says what it can
    express of it (megatron/convert/<format>.py, EXPRESSES)."""
    declaration = convert.ADAPTERS[fmt].EXPRESSES
    assert declaration.undeclared() == [], (
        f"{fmt}: declare these fields in megatron/convert/{fmt}.py: {declaration.undeclared()}")
    assert declaration.stale() == [], f"{fmt}: no such fields: {declaration.stale()}"


@pytest.mark.parametrize("fmt", convert.EXPORT_FORMATS)
def test_fitting_models_have_no_blockers(fmt):
    assert convert.blockers(fmt, *fitting(fmt)) == []


def test_a_dense_format_covers_every_moe_field_by_refusing_moe():
    declaration = convert.ADAPTERS["gpt2"].EXPRESSES
    assert declaration.moe is None
    assert not [name for name in declaration.undeclared() if name.startswith("MoEConfig.")]
    model, _ = fitting("gpt2")
    found = convert.blockers("gpt2", model, FutureMoEConfig(num_experts=4, layers=(0,)))
    assert found == ["MoE layers (--num-experts): GPT-2 is dense; export as mixtral or qwen2_moe"]


# ---- (b) what a declaration does not name is refused by name ---------------------------------
@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_an_undeclared_moe_field_is_refused_by_name(fmt):
    model, moe = fitting(fmt)
    moe = future(moe, FutureMoEConfig, shared_experts=2)
    expected = (f"MoEConfig.shared_experts = 2 is not something the {fmt} adapter knows how to "
                "express")
    assert [b for b in convert.blockers(fmt, model, moe) if "shared_experts" in b] == [
        expected + f" (megatron.convert.{fmt}.EXPRESSES does not declare it)"]
    with pytest.raises(ConversionError) as err:
        convert.to_hf(fmt, {}, model, moe)  # refused before any tensor is read
    assert str(err.value).startswith(f"cannot export as {fmt}: ") and expected in str(err.value)
    # refused even at its default: nobody has decided what the field means for this format
    assert convert.blockers(fmt, model, future(moe, FutureMoEConfig))


@pytest.mark.parametrize("fmt", convert.EXPORT_FORMATS)
def test_an_undeclared_model_field_is_refused_by_name(fmt):
    model, moe = fitting(fmt)
    model = future(model, FutureModelConfig, future_attention=True)
    with pytest.raises(ConversionError, match=f"cannot export as {fmt}: ModelConfig."
                                              f"future_attention = True is not something the "
                                              f"{fmt} adapter knows"):
        convert.check_exportable(fmt, model, moe)


@pytest.mark.parametrize("fmt", convert.EXPORT_FORMATS)
def test_dropping_any_field_from_a_declaration_refuses_it(fmt, monkeypatch):
    """Every field is checked against the declaration: forget any one and a model that fit is
    refused, naming that field."""
    adapter = convert.ADAPTERS[fmt]
    declaration = adapter.EXPRESSES
    model, moe = fitting(fmt)
    sides = [("ModelConfig", "model", model)] + ([("MoEConfig", "moe", moe)] if moe else [])
    for side, attr, cfg in sides:
        entries = getattr(declaration, attr)
        for name in entries:
            fewer = {k: v for k, v in entries.items() if k != name}
            monkeypatch.setattr(adapter, "EXPRESSES", dataclasses.replace(declaration,
                                                                          **{attr: fewer}))
            found = convert.blockers(fmt, model, moe)
            assert found == [f"{side}.{name} = {getattr(cfg, name)!r} is not something the "
                             f"{fmt} adapter knows how to express (megatron.convert.{fmt}."
                             "EXPRESSES does not declare it)"], found
    monkeypatch.setattr(adapter, "EXPRESSES", declaration)
    assert convert.blockers(fmt, model, moe) == []


# ---- (b) a value the declaration does not allow is refused naming field and value ------------
@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_a_score_function_other_than_softmax_is_refused(fmt):
    model, moe = fitting(fmt)
    found = convert.blockers(fmt, model, replaced(moe, score_function="sigmoid"))
    assert found == [f"a sigmoid router (MoEConfig.score_function 'sigmoid'): {fmt}'s router is "
                     "a softmax (--moe-router-score-function softmax)"]


@pytest.mark.parametrize("fmt", convert.EXPORT_FORMATS)
def test_what_does_not_change_the_function_exports(fmt):
    """Training-only and how-we-compute settings are ANY: they do not block."""
    model, moe = fitting(fmt)
    model = dataclasses.replace(model, hidden_dropout=0.3, attention_dropout=0.2,
                                init_method_std=0.5, padded_vocab_size=128)
    if moe is not None:
        moe = dataclasses.replace(moe, capacity_factor=2.0, eval_capacity_factor=3.0,
                                  min_capacity=0, drop_tokens=True, drop_policy="probs",
                                  aux_loss_type="none", aux_loss_coeff=0.0, z_loss_coeff=0.1,
                                  jitter_eps=0.01, dtd=False, pad_free=True, check_tp_routing=7)
    assert convert.blockers(fmt, model, moe) == []


# ---- the declaration vocabulary -------------------------------------------------------------
def test_a_declaration_holds_only_any_or_rules():
    with pytest.raises(TypeError, match=r"ModelConfig \['swiglu'\] must be declared ANY or a Rule"):
        Declaration("x", model={"swiglu": True}, dense_refused="dense")
    with pytest.raises(TypeError, match="moe_refused"):
        Declaration("x", model={})
    declaration = Declaration("x", model={"swiglu": only(True, message="no"), "nope": ANY},
                              moe_refused="dense only")
    assert "ModelConfig.nope" in declaration.stale()
    assert "ModelConfig.normalization" in declaration.undeclared()
    assert isinstance(declaration.model["swiglu"], Rule)
