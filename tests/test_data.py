import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from xatl.data import BatchStream, TextBlocks, iter_documents, pack_blocks, resolve_paths, tokenize_documents

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def word_tokenizer(style: str = "llama") -> PreTrainedTokenizerFast:
    """Whitespace words -> ids; `llama`: <s> and </s>; `gpt2`: one <|endoftext|> as BOS and EOS; `none`."""
    vocab = {w: i for i, w in enumerate(WORDS + ["<|endoftext|>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {
        "llama": dict(bos_token="<s>", eos_token="</s>"),
        "gpt2": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>"),
        "none": {},
    }[style]
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **specials)


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def test_documents_are_wrapped_in_the_tokenizers_own_boundaries():
    texts = ["one two", "three"]
    llama = list(tokenize_documents(texts, word_tokenizer("llama")))
    assert llama == [[1, *ids("one two"), 2], [1, *ids("three"), 2]]
    eot = len(WORDS)
    assert list(tokenize_documents(texts, word_tokenizer("gpt2"))) == [[*ids("one two"), eot], [*ids("three"), eot]]
    assert list(tokenize_documents(texts, word_tokenizer("none"))) == [ids("one two"), ids("three")]


def test_blocks_overlap_by_one_token_so_every_token_is_predicted_once():
    stream = list(range(23))
    blocks = list(pack_blocks([stream[:10], stream[10:]], 5, keep_partial=True))
    assert all(len(b) == 5 for b in blocks[:-1]) and len(blocks[-1]) < 5
    targets = [t for b in blocks for t in b[1:]]
    assert targets == stream[1:]  # each token after the first exactly once, in order
    full = list(pack_blocks([stream], 5))
    assert full == blocks[:-1]  # training keeps full blocks only


def test_block_size_below_two_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        list(pack_blocks([[1, 2, 3]], 1))
    with pytest.raises(ValueError, match="block_size"):
        TextBlocks(lambda: [], word_tokenizer(), 1)


def test_txt_jsonl_directories_globs_and_saved_datasets(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("one two\r\nthree\r\n", encoding="utf-8", newline="")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "four five", "id": 1}) + "\n\n" + json.dumps({"text": "six", "id": 2}) + "\n"
    )
    (tmp_path / "sub" / "ignored.csv").write_text("seven")
    datasets.Dataset.from_dict({"text": ["seven", "eight nine"]}).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["nine"]})}).save_to_disk(str(tmp_path / "dd"))

    assert list(iter_documents([tmp_path / "a.txt"])) == ["one two\nthree\n"]  # CRLF read as LF
    assert list(iter_documents([tmp_path / "sub"])) == ["four five", "six"]
    assert list(iter_documents([str(tmp_path / "**" / "*.jsonl")])) == ["four five", "six"]
    assert list(iter_documents([tmp_path / "ds"])) == ["seven", "eight nine"]
    assert list(iter_documents([tmp_path / "dd"])) == ["nine"]
    everything = resolve_paths([tmp_path])  # a directory: its text files, sorted, recursively
    assert [p.name for p in everything] == ["a.txt", "b.jsonl"]


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d / "x.csv").write_text("one"), "unsupported data file"),
        (lambda d: (d / "x.jsonl").write_text('{"body": "one"}\n'), "no text field 'text'"),
        (lambda d: (d / "x.jsonl").write_text("{not json\n"), "not valid JSON"),
    ],
    ids=["missing", "csv", "no-field", "bad-json"],
)
def test_bad_sources_raise_a_clear_error(tmp_path, setup, message):
    setup(tmp_path)
    name = {"does not exist": "missing.txt", "unsupported data file": "x.csv"}.get(message, "x.jsonl")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        list(iter_documents([tmp_path / name]))


def test_empty_glob_and_directory_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        resolve_paths([str(tmp_path / "*.txt")])
    with pytest.raises(FileNotFoundError, match="holds no"):
        resolve_paths([tmp_path])


def _corpus(count=200):
    """`count` different documents of 4 to 8 words (the base-9 digits of their index, then filler)."""
    def words(i):
        digits = [WORDS[4 + (i // 9**k) % 9] for k in range(3)]
        return digits + ["one"] * (1 + i % 5)
    return [" ".join(words(i)) for i in range(count)]


def test_split_by_document_is_deterministic_disjoint_and_independent_of_order():
    texts = _corpus()
    tokenizer = word_tokenizer()

    def documents(split, order=1, seed=0):
        data = TextBlocks(lambda: iter(texts[::order]), tokenizer, 8, split=split, valid_fraction=0.2, seed=seed)
        return set(data.texts())

    train, valid = documents("train"), documents("validation")
    assert train | valid == set(texts) and not train & valid
    assert 0.08 < len(valid) / len(texts) < 0.35
    assert documents("validation", order=-1) == valid  # a document's side depends on its text alone
    assert documents("validation", seed=1) != valid  # the seed picks another split
    blocks = TextBlocks(lambda: iter(texts), tokenizer, 8, split="validation", valid_fraction=0.2)
    assert [b.tolist() for b in blocks] == [b.tolist() for b in TextBlocks(lambda: iter(t for t in texts if t in valid),
                                                                         tokenizer, 8)]


def test_split_by_block_is_deterministic_disjoint_and_complete():
    texts = _corpus()
    tokenizer = word_tokenizer()

    def blocks(split, seed=0):
        data = TextBlocks(lambda: iter(texts), tokenizer, 8, split=split, valid_fraction=0.2, split_by="block",
                          seed=seed)
        return [tuple(b.tolist()) for b in data]

    train, valid = blocks("train"), blocks("validation")
    assert train == blocks("train") and valid == blocks("validation")
    assert sorted(train + valid) == sorted(blocks(None))
    assert 0.08 < len(valid) / (len(train) + len(valid)) < 0.35
    assert blocks("validation", seed=1) != valid


def test_bad_split_settings_name_the_field():
    with pytest.raises(ValueError, match="valid_fraction"):
        TextBlocks(lambda: [], word_tokenizer(), 8, split="validation")
    with pytest.raises(ValueError, match="split must be"):
        TextBlocks(lambda: [], word_tokenizer(), 8, split="test", valid_fraction=0.1)
    with pytest.raises(ValueError, match="split_by"):
        TextBlocks(lambda: [], word_tokenizer(), 8, split="train", valid_fraction=0.1, split_by="line")


def test_text_blocks_stream_without_reading_the_whole_corpus():
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield " ".join(WORDS[4 + (i + j) % 9] for j in range(20))

    blocks = TextBlocks(endless, word_tokenizer(), 16)
    stream = BatchStream(blocks, batch_size=4, shuffle_buffer=32, seed=0)
    for _ in range(5):
        batch = stream.next_batch()
    assert batch.shape == (4, 16) and batch.dtype == torch.long
    # 20 blocks taken through a 32-block shuffle buffer: only a bounded prefix was ever read
    assert pulled < 100


def test_batch_stream_walks_epochs_reshuffled_and_resumes_exactly():
    blocks = [torch.full((4,), i) for i in range(10)]
    stream = BatchStream(blocks, batch_size=3, seed=7)
    batches = [stream.next_batch()[:, 0].tolist() for _ in range(7)]  # 21 blocks: two epochs and one
    flat = sum(batches, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch has its own order

    again = BatchStream(blocks, batch_size=3, seed=7)
    for _ in range(4):
        again.next_batch()
    state = again.state_dict()
    resumed = BatchStream(blocks, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()[:, 0].tolist() for _ in range(3)] == batches[4:]
    with pytest.raises(ValueError, match="cannot resume"):
        BatchStream(blocks, batch_size=2, seed=7).load_state_dict(state)


def test_batch_stream_with_no_full_block_is_an_error():
    blocks = TextBlocks(lambda: ["one two"], word_tokenizer(), 64)
    with pytest.raises(ValueError, match="no full block"):
        BatchStream(blocks, batch_size=1).next_batch()


def test_real_text_packs_into_full_blocks_every_character_once():
    data_dir = os.environ.get("XATL_DATA_DIR")
    if not data_dir:
        pytest.skip("XATL_DATA_DIR is not set")
    book = Path(data_dir) / "gutenberg_mini" / "valid" / "pg1656.txt"
    assert book.is_file(), f"{book} is missing"
    # one token per character: exact counts without training a tokenizer
    vocab = {"<s>": 0, "</s>": 1, **{chr(i): i + 2 for i in range(256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="?")
    blocks = list(TextBlocks([book], tokenizer, 1024, keep_partial=True))
    assert all(len(b) == 1024 for b in blocks[:-1])
    stream = torch.cat([blocks[0], *(b[1:] for b in blocks[1:])])
    assert len(stream) == 85_753 + 2  # SOURCE.md's count (CRLF read as LF), plus BOS and EOS
    assert stream[0] == 0 and stream[-1] == 1 and int((stream <= 1).sum()) == 2
