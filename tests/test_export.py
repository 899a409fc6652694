"""Hugging Face export / import (megatron/convert/) and tools/checkpoint_convert.py.

Each export is loaded by transformers (5.24.0, the test extra) with no missing, unexpected or
mismatched keys and must give our logits within 1e-5; our MoE models run with no token dropped
(no Hugging Face model has an expert capacity). Models are tiny (hidden 32, 2 layers) with a
larger init std and perturbed norms so that every tensor moves the logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from harness import ted_groups
from megatron.model import GPTModel
from megatron.model.params import stored_tensors
from megatron import convert as hf_convert
from megatron.convert import ConversionError
from ted_patches.config import MoEConfig
from ted_patches.build import build_model
from tools import checkpoint_convert
from tools.generate import load_model
from util import gpt2_files, run_main, tiny_model_config

TOL = 1e-5
CHECKPOINT_API = ("read_checkpoint_meta", "configs_from_meta", "read_stored_tensors",
                  "write_model_checkpoint")
ROPE = dict(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
            add_bias_linear=False)
VOCAB = dict(vocab_size=90, padded_vocab_size=128)  # padded rows are not exported


def transformers_or_skip():
    return pytest.importorskip("transformers",
                               reason="transformers (the [test] extra, 5.24.0) is not installed")


def checkpoint_api():
    """megatron.checkpoint's one-process API, or a skip naming what is missing."""
    try:
        from megatron import checkpoint as checkpointing
    except ImportError as e:
        pytest.skip(f"megatron.checkpoint does not import: {e}")
    missing = [name for name in CHECKPOINT_API if not hasattr(checkpointing, name)]
    if missing:
        pytest.skip(f"megatron.checkpoint has no {', '.join(missing)} yet")
    return checkpointing


def tiny(model_kw: dict, moe: MoEConfig | None, seed: int = 3) -> GPTModel:
    """A tiny GPT(-MoE) in eval mode whose every parameter matters (norms and biases perturbed)."""
    groups = ted_groups(1, 1)
    cfg = tiny_model_config(**{"init_method_std": 0.2, **VOCAB, **model_kw})
    model = build_model(cfg, moe, groups, seed=seed)
    model.moe_cfg = moe
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or ".b1" in name or ".b2" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, "layers": (0, 1), "topk": 2, "drop_tokens": False, **kw})


def sample_tokens(cfg, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.max_position_embeddings), generator=gen)


@torch.no_grad()
def our_logits(model, tokens) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return model(tokens, positions)[..., :model.cfg.vocab_size]


@torch.no_grad()
def hf_load(fmt: str, path: str):
    """The directory loaded by transformers, asserting every tensor was found and used."""
    transformers = transformers_or_skip()
    cls = getattr(transformers, hf_convert.ARCHITECTURES[fmt])
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{fmt}: {problems}"
    return model.eval()


def export_dir(model, fmt: str, path: str) -> str:
    groups = ted_groups(1, 1)
    config, hf = hf_convert.to_hf(fmt, stored_tensors(model, groups), model.cfg, _moe_of(model))
    hf_convert.write_hf(path, config, hf)
    return path


def _moe_of(model):
    return model.moe_cfg


# ---- export: logits equal transformers' ---------------------------------------------------------
EXPORTS = {
    "mixtral-top2-untied": ("mixtral", dict(ROPE, untie_embeddings_and_output_weights=True), moe()),
    "mixtral-top1-weight1": ("mixtral", dict(ROPE, rotary_base=500.0),
                             moe(topk=1, gate_normalization="topk")),
    # DeepSpeed's top-1 (raw probability) with a dense layer 0: fits Qwen2-MoE, not Mixtral
    "qwen2_moe-top1-raw-dense0": ("qwen2_moe", dict(ROPE, norm_epsilon=1e-6),
                                  moe(topk=1, layers=(1,), expert_ffn_hidden_size=48)),
    "qwen2_moe-top2-none-untied": ("qwen2_moe",
                                   dict(ROPE, untie_embeddings_and_output_weights=True),
                                   moe(gate_normalization="none")),
    "qwen2_moe-top2-surviving": ("qwen2_moe", ROPE, moe(layers=(0,), num_experts=8)),
    "qwen2_moe-gqa": ("qwen2_moe", dict(ROPE, num_query_groups=2), moe(layers=(1,))),
    "mixtral-gqa": ("mixtral", dict(ROPE, num_query_groups=1), moe()),
    "gpt2-biases": ("gpt2", {}, None),
    "gpt2-nobias-untied": ("gpt2", dict(add_bias_linear=False,
                                        untie_embeddings_and_output_weights=True), None),
}


if not hf_convert._HAS_GQA:  # grouped-query attention is newer than this test file
    EXPORTS = {k: v for k, v in EXPORTS.items() if "gqa" not in k}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_logits_equal_transformers(case, tmp_path):
    fmt, model_kw, moe_cfg = EXPORTS[case]
    model = tiny(model_kw, moe_cfg)
    hf_model = hf_load(fmt, export_dir(model, fmt, str(tmp_path)))
    tokens = sample_tokens(model.cfg)
    ours = our_logits(model, tokens)
    theirs = hf_model(input_ids=tokens).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit difference| {diff:.3e} (logits up to {ours.abs().max().item():.2f})")
    assert ours.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert diff <= TOL, f"{case}: max logit difference {diff:.3e} > {TOL}"


def test_raw_top1_gates_differ_from_renormalized(tmp_path):
    """The comparison sees the gate normalization: the DeepSpeed top-1 model read with Mixtral's
    semantics (weight 1.0, Qwen2-MoE's norm_topk_prob true) gives other logits."""
    fmt, model_kw, moe_cfg = EXPORTS["qwen2_moe-top1-raw-dense0"]
    model = tiny(model_kw, moe_cfg)
    path = export_dir(model, fmt, str(tmp_path))
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    assert config["norm_topk_prob"] is False
    json.dump({**config, "norm_topk_prob": True}, open(config_path, "w"))
    tokens = sample_tokens(model.cfg)
    theirs = hf_load(fmt, path)(input_ids=tokens).logits
    diff = (our_logits(model, tokens) - theirs).abs().max().item()
    assert diff > 1e-2, diff


# ---- what does not fit --------------------------------------------------------------------------
BLOCKED = [
    ("mixtral", ROPE, moe(topk=1), ["top-1 gates are the raw probability", "qwen2_moe"]),
    ("mixtral", ROPE, moe(gate_normalization="none"), ["raw probabilities"]),
    ("mixtral", ROPE, moe(layers=(1,)), ["MoE not in every layer (layers [0] are dense)"]),
    ("mixtral", ROPE, None, ["a dense model"]),
    ("mixtral", {}, moe(), ["LayerNorm", "learned absolute positions", "GELU", "biases"]),
    ("qwen2_moe", ROPE, moe(mlp_type="residual"), ["residual MoE"]),
    ("qwen2_moe", dict(ROPE, add_bias_linear=True), moe(), ["biases"]),
    ("gpt2", {}, moe(), ["GPT-2 is dense"]),
    ("gpt2", ROPE, None, ["RMSNorm", "RoPE", "SwiGLU"]),
]
if hf_convert._HAS_GQA:
    BLOCKED.append(("gpt2", dict(num_query_groups=2), None,
                    ["grouped-query attention (--group-query-attention)"]))
if "experts_per_layer" in MoEConfig.__dataclass_fields__:
    BLOCKED.append(("qwen2_moe", ROPE, moe(experts_per_layer=(4, 8)),
                    ["pyramid MoE, --num-experts 4 8"]))


@pytest.mark.parametrize("fmt,model_kw,moe_cfg,expected", BLOCKED)
def test_unfit_models_name_what_blocks_them(fmt, model_kw, moe_cfg, expected):
    cfg = tiny_model_config(**model_kw)
    with pytest.raises(ConversionError) as err:
        hf_convert.check_exportable(fmt, cfg, moe_cfg)
    message = str(err.value)
    assert message.startswith(f"cannot export as {fmt}: ") and "\n" not in message
    for part in expected:
        assert part in message, message


def test_export_dtype():
    model = tiny(ROPE, moe())
    config, hf = hf_convert.to_hf("mixtral", stored_tensors(model, ted_groups(1, 1)), model.cfg,
                                  model.moe_cfg, dtype=torch.bfloat16)
    assert config["dtype"] == "bfloat16" and {t.dtype for t in hf.values()} == {torch.bfloat16}


def test_fitting_models_have_no_blockers():
    for fmt, model_kw, moe_cfg in EXPORTS.values():
        assert hf_convert.blockers(fmt, tiny_model_config(**model_kw), moe_cfg) == []


# ---- import (Mixtral) ---------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [None, 2] if hf_convert._HAS_GQA else [None])
def test_round_trip_ours_hf_ours_is_exact(groups):
    extra = {} if groups is None else {"num_query_groups": groups}
    model = tiny(dict(ROPE, untie_embeddings_and_output_weights=True, **extra), moe())
    stored = stored_tensors(model, ted_groups(1, 1))
    config, hf = hf_convert.to_hf("mixtral", stored, model.cfg, _moe_of(model))
    cfg, moe_cfg, back = hf_convert.from_hf("mixtral", json.loads(json.dumps(config)), hf)
    assert back.keys() == stored.keys()
    for name in stored:
        assert (back[name].dtype == stored[name].dtype
                and torch.equal(back[name], stored[name])), name
    architecture = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "ffn_hidden_size", "position_embedding_type",
                    "rotary_base", "normalization", "norm_epsilon", "swiglu", "add_bias_linear",
                    "untie_embeddings_and_output_weights", "params_dtype", *extra)
    assert ({k: getattr(cfg, k) for k in architecture}
            == {k: getattr(model.cfg, k) for k in architecture})
    assert (moe_cfg.num_experts, moe_cfg.layers, moe_cfg.topk) == (4, (0, 1), 2)


def hf_mixtral(path: str, tied: bool = False, **kw):
    """A random MixtralForCausalLM saved by transformers itself (the Hub layout), norms
    perturbed."""
    transformers = transformers_or_skip()
    config = transformers.MixtralConfig(**{
        "vocab_size": 90, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 16, "initializer_range": 0.2, "tie_word_embeddings": tied, **kw})
    torch.manual_seed(5)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(path)
    return model


IMPORTS = {"untied": dict(tied=False), "tied": dict(tied=True), "gqa": dict(num_key_value_heads=2)}
if not hf_convert._HAS_GQA:
    IMPORTS.pop("gqa")


@pytest.mark.parametrize("case", list(IMPORTS))
def test_imported_mixtral_logits_equal_transformers(case, tmp_path):
    kw = IMPORTS[case]
    tied = kw.get("tied", False)
    hf_model = hf_mixtral(str(tmp_path),
                          rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **kw)
    config, hf = hf_convert.read_hf(str(tmp_path))
    cfg, moe_cfg, stored = hf_convert.from_hf("mixtral", config, hf)
    assert cfg.untie_embeddings_and_output_weights is not tied and cfg.rotary_base == 1e4
    model = load_model(cfg, moe_cfg, stored, ted_groups(1, 1))
    tokens = sample_tokens(cfg)
    with torch.no_grad():
        diff = (our_logits(model, tokens) - hf_model(input_ids=tokens).logits).abs().max().item()
    print(f"import mixtral ({case}): max |logit difference| {diff:.3e}")
    assert diff <= TOL
    # and back: the Hub tensors themselves, bit for bit
    _, again = hf_convert.to_hf("mixtral", stored, cfg, moe_cfg)
    assert again.keys() == hf.keys() and all(torch.equal(again[k], hf[k]) for k in hf)


def test_import_refuses_what_we_cannot_represent(tmp_path):
    hf_mixtral(str(tmp_path))
    config, hf = hf_convert.read_hf(str(tmp_path))
    for key, value, message in (("sliding_window", 8, "sliding-window attention is not supported"),
                                ("head_dim", 16,
                                 "head_dim 16 != hidden_size / num_attention_heads 8"),
                                ("hidden_act", "gelu", "hidden_act 'gelu': only silu"),
                                ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4},
                                 "rope_type 'yarn'")):
        with pytest.raises(ConversionError, match=message):
            hf_convert.from_hf("mixtral", {**config, key: value}, hf)
    with pytest.raises(ConversionError, match="unexpected model.layers.0.extra"):
        hf_convert.from_hf("mixtral", config, {**hf, "model.layers.0.extra": torch.zeros(1)})
    with pytest.raises(ConversionError,
                       match=r"model.layers.1.block_sparse_moe.experts.3.w2.weight has shape "
                             r"\(32, 8\), config.json implies \(32, 64\)"):
        hf_convert.from_hf("mixtral", config,
                           {**hf, "model.layers.1.block_sparse_moe.experts.3.w2.weight":
                            torch.zeros(32, 8)})
    with pytest.raises(ConversionError, match="config.json has no 'num_local_experts'"):
        hf_convert.configs_from_hf("mixtral", {k: v for k, v in config.items()
                                               if k != "num_local_experts"})
    with pytest.raises(ConversionError, match="model_type 'gpt2', not 'mixtral'"):
        hf_convert.configs_from_hf("mixtral", {**config, "model_type": "gpt2"})


# ---- tools/checkpoint_convert.py ---------------------------------------------------------------
def null_tokenizer_meta(model, vocab: int = 89) -> dict:
    """A checkpoint meta for `model` with NullTokenizer --vocab-size 89 (90 ids)."""
    tokenizer = {"tokenizer_type": "NullTokenizer", "tokenizer_model": None, "vocab_file": None,
                 "merge_file": None, "vocab_size": vocab}
    from megatron.checkpoint import config_dict

    moe_cfg = _moe_of(model)
    return {"model": config_dict(model.cfg), "moe": config_dict(moe_cfg) if moe_cfg else None,
            "tokenizer": tokenizer, "iteration": 0}


def save_checkpoint(model, path: str) -> str:
    api = checkpoint_api()
    api.write_model_checkpoint(path, stored_tensors(model, ted_groups(1, 1)),
                               null_tokenizer_meta(model))
    return path


def run_tool(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of checkpoint_convert.main in this process."""
    return run_main(capsys, checkpoint_convert.main, *argv)


def test_tool_consolidate_export_import(tmp_path, capsys):
    model = tiny(ROPE, moe(drop_tokens=True))
    ckpt = save_checkpoint(model, str(tmp_path / "ckpt"))
    code, out, err = run_tool(capsys, "consolidate", "--load", ckpt, "--output", tmp_path / "one")
    assert code == 0, err
    meta, tensors = hf_convert.read_model(str(tmp_path / "one"))
    stored = stored_tensors(model, ted_groups(1, 1))
    assert (tensors.keys() == stored.keys()
            and all(torch.equal(tensors[k], stored[k]) for k in stored))
    assert meta["tokenizer"]["tokenizer_type"] == "NullTokenizer"

    for source in (ckpt, tmp_path / "one"):  # a checkpoint and a consolidated directory
        out_dir = tmp_path / f"hf-{os.path.basename(str(source))}"
        code, out, err = run_tool(capsys, "export", "--load", source, "--format", "mixtral",
                                  "--output", out_dir)
        assert (code == 0 and "MixtralForCausalLM" in out
                and "--disable-moe-token-dropping" in out), err
    config = json.load(open(tmp_path / "hf-one" / "config.json"))
    assert config["eos_token_id"] == 89 and config["bos_token_id"] is None
    tokens = sample_tokens(model.cfg)
    nodrop = tiny(ROPE, moe())  # the same weights, routed with no capacity
    diff = (our_logits(nodrop, tokens)
            - hf_load("mixtral", str(tmp_path / "hf-one"))(input_ids=tokens).logits)
    assert diff.abs().max() <= TOL

    code, out, err = run_tool(capsys, "import", "--format", "mixtral",
                              "--input", tmp_path / "hf-one", "--save", tmp_path / "back",
                              "--tokenizer-type", "NullTokenizer", "--vocab-size", 89)
    assert code == 0, err
    api = checkpoint_api()
    back = api.read_stored_tensors(str(tmp_path / "back"))
    assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored)
    cfg, moe_cfg = api.configs_from_meta(api.read_checkpoint_meta(str(tmp_path / "back")))
    assert ((cfg.hidden_size, cfg.swiglu, moe_cfg.num_experts, moe_cfg.topk, moe_cfg.drop_tokens)
            == (32, True, 4, 2, False))


TEXTS = ["Hello world", "thou art more lovely and more temperate",
         "  two leading spaces,\ttab and\nnew line", "naïve émigré, 日本語 and 🙂",
         "rough winds do shake the darling buds of may!"]


def _trained_sentencepiece(tmp_path) -> str:
    from tools import train_tokenizer

    words = ("thou art more lovely and more temperate rough winds do shake the darling buds of "
             "may").split()
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(200):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9))
            f.write(json.dumps({"text": text}) + "\n")
    return train_tokenizer.main(["--input", str(tmp_path / "corpus.jsonl"),
                                 "--model-prefix", str(tmp_path / "spm"), "--vocab-size", "400"])


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPT2BPETokenizer"])
def test_export_writes_the_tokenizer_transformers_reads_as_we_do(kind, tmp_path, capsys):
    """The exported folder holds the checkpoint's tokenizer: AutoTokenizer gives our ids for text
    (no BOS or EOS added, as ours adds none) and decodes them back."""
    from transformers import AutoTokenizer

    from megatron.data.tokenizer import build_tokenizer

    record = {"tokenizer_type": kind, "tokenizer_model": None, "vocab_file": None,
              "merge_file": None, "vocab_size": None}
    if kind == "GPT2BPETokenizer":
        record["vocab_file"], record["merge_file"] = gpt2_files()
    else:
        record["tokenizer_model"] = _trained_sentencepiece(tmp_path)
    model = tiny(ROPE, moe())
    meta = {**null_tokenizer_meta(model), "tokenizer": record}
    checkpoint_api().write_model_checkpoint(str(tmp_path / "ckpt"),
                                            stored_tensors(model, ted_groups(1, 1)), meta)
    code, out, err = run_tool(capsys, "export", "--load", tmp_path / "ckpt", "--format", "mixtral",
                              "--output", tmp_path / "hf")
    assert code == 0 and "tokenizer as" in out, err
    ours, theirs = build_tokenizer(**record), AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in TEXTS:
        ids = ours.tokenize(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.detokenize(ids), text
    assert theirs.eos_token_id == ours.eod


def test_tool_export_refuses_unfit_model(tmp_path, capsys):
    ckpt = save_checkpoint(tiny(ROPE, moe(topk=1)), str(tmp_path / "ckpt"))
    code, out, err = run_tool(capsys, "export", "--load", ckpt, "--format", "mixtral",
                              "--output", tmp_path / "hf")
    assert code == 2 and "top-1 gates are the raw probability" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("argv,expected", [
    (["export", "--load", "{tmp}/missing", "--format", "gpt2", "--output", "{tmp}/o"],
     "--load {tmp}/missing: no such directory"),
    (["consolidate", "--load", "{tmp}", "--output", "{tmp}"],
     "--output {tmp} exists and is not an empty directory"),
    (["import", "--format", "mixtral", "--input", "{tmp}", "--save", "{tmp}/s"],
     "--tokenizer-type is required"),
    (["import", "--format", "mixtral", "--input", "{tmp}", "--save", "{tmp}/s", "--tokenizer-type",
      "NullTokenizer", "--vocab-size", "8"], "no config.json"),
    (["import", "--format", "mixtral", "--input", "{tmp}", "--save", "{tmp}/s", "--tokenizer-type",
      "SentencePieceTokenizer"], "--tokenizer-model is required"),
])
def test_tool_bad_input_is_one_error_line(argv, expected, tmp_path, capsys):
    (tmp_path / "x").write_text("")
    code, out, err = run_tool(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert (code == 2 and err.startswith("checkpoint_convert.py: error: ")
            and "Traceback" not in err), err
    assert expected.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1, err


def test_tool_import_checks_the_tokenizer_vocabulary(tmp_path, capsys):
    hf_mixtral(str(tmp_path / "hf"))
    code, out, err = run_tool(capsys, "import", "--format", "mixtral", "--input", tmp_path / "hf",
                              "--save", tmp_path / "s", "--tokenizer-type", "NullTokenizer",
                              "--vocab-size", 50)
    assert code == 2 and "the tokenizer has 51 ids but" in err and "vocab_size 90" in err, err
