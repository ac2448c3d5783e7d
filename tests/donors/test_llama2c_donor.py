"""llama2.c donors: a synthetic checkpoint against a port of run.c's forward (interleaved RoPE),
synthetic tokenizers against a port of `encode()`, and the real stories260K (XATL_DATA_DIR)
against llama2.c's own reference output and the measured validation cross-entropy."""

import random

import pytest
import torch
import torch.nn.functional as F
from llama2c_reference import encode, forward, read_tokenizer, write_checkpoint, write_tokenizer
from transformers import AutoTokenizer

from xatl.donors import load_donor
from xatl.donors.llama2c_tokenizer import load_tokenizer
from xatl.model import XatlForCausalLM

# llama2.c test_all.py, `expected_stdout` (karpathy/llama2.c @ 350e04fe, test_runc): run.c's output
# for stories260K.bin with tok512.bin, temperature 0, 200 steps, BOS-only prompt, without run.c's
# final newline.
EXPECTED_STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. "
    "She said, \"I want to play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she"
)


def rebuild(donor):
    model = XatlForCausalLM(donor.config).eval()
    model.load_state_dict(donor.state_dict, strict=True)
    return model


# -- synthetic checkpoints --------------------------------------------------------------------


def synthetic_checkpoint(path, *, shared_classifier, dim=32, hidden=40, layers=2, heads=4, kv_heads=2,
                         vocab=50, seq_len=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head_dim = dim // heads

    def rand(*shape, center=0.0):
        return torch.randn(*shape, generator=gen) * 0.3 + center

    weights = {
        "tok_embeddings": rand(vocab, dim),
        "rms_att": rand(layers, dim, center=1.0),
        "wq": rand(layers, dim, dim),
        "wk": rand(layers, kv_heads * head_dim, dim),
        "wv": rand(layers, kv_heads * head_dim, dim),
        "wo": rand(layers, dim, dim),
        "rms_ffn": rand(layers, dim, center=1.0),
        "w1": rand(layers, hidden, dim),
        "w2": rand(layers, dim, hidden),
        "w3": rand(layers, hidden, dim),
        "rms_final": rand(dim, center=1.0),
    }
    rope_table = [rand(seq_len, head_dim // 2), rand(seq_len, head_dim // 2)]  # unused, skipped
    if not shared_classifier:
        weights["wcls"] = rand(vocab, dim)
    header = (dim, hidden, layers, heads, kv_heads, vocab if shared_classifier else -vocab, seq_len)
    arrays = [*(weights[k] for k in list(weights)[:11]), *rope_table, *([weights["wcls"]] if "wcls" in weights else [])]
    write_checkpoint(path, header, arrays)
    return weights


@pytest.mark.parametrize("shared_classifier", [True, False], ids=["shared-classifier", "own-classifier"])
def test_synthetic_checkpoint_matches_runc_forward(tmp_path, shared_classifier):
    path = tmp_path / "model.bin"
    weights = synthetic_checkpoint(path, shared_classifier=shared_classifier)
    donor = load_donor(str(path))
    assert donor.model_type == "llama2c" and donor.tokenizer is None
    assert donor.config.tie_word_embeddings == shared_classifier
    assert (donor.config.num_key_value_heads, donor.config.max_position_embeddings) == (2, 16)
    tokens = torch.randint(0, 50, (16,), generator=torch.Generator().manual_seed(3))
    expected = forward(weights, tokens, n_heads=4, n_kv_heads=2).float()
    with torch.no_grad():
        actual = rebuild(donor)(tokens[None], use_cache=False).logits[0]
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert donor.origins["model.layers.1.mixer.k_proj.weight"].startswith("layers.1.attention.wk.weight rows permuted")


# -- synthetic tokenizers -------------------------------------------------------------------------


def synthetic_tokenizer(path, words, alphabet):
    """A llama2.c-format BPE vocabulary: specials, 256 bytes, then merges learned greedily from
    `words` (scores -0, -1, ...), then the single characters."""
    merges, corpus = [], [[" ", *w] for w in words]
    for _ in range(40):
        counts = {}
        for seq in corpus:
            for a, b in zip(seq, seq[1:]):
                counts[a + b] = counts.get(a + b, 0) + 1
        if not counts:
            break
        best = max(counts, key=counts.get)
        merges.append(best)
        for seq in corpus:
            i = 0
            while i < len(seq) - 1:
                if seq[i] + seq[i + 1] == best:
                    seq[i:i + 2] = [best]
                i += 1
    singles = [" ", *alphabet]
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", *(f"<0x{b:02X}>".encode() for b in range(256))]
    pieces += [p.encode() for p in dict.fromkeys(merges + singles)]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    write_tokenizer(path, pieces, scores)
    return pieces, scores


def test_synthetic_tokenizer_encodes_like_runc(tmp_path):
    rng = random.Random(0)
    alphabet = "abcde"
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(60)]
    pieces, scores = synthetic_tokenizer(tmp_path / "tok.bin", words, alphabet)
    tokenizer = load_tokenizer(tmp_path / "tok.bin")
    texts = ["", " ", "a", "  ab", "xyz é", *(
        " ".join(rng.choice(words + ["q", "\n"]) for _ in range(rng.randint(1, 8))) for _ in range(200)
    )]
    for text in texts:
        assert tokenizer(text)["input_ids"] == encode(pieces, scores, text), repr(text)
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


# -- stories260K (XATL_DATA_DIR) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stories(data_file):
    return load_donor(str(data_file("stories260K/stories260K.bin")),
                      tokenizer=str(data_file("stories260K/tok512.bin")))


def test_stories260K_greedy_story_is_llama2c_reference(stories):
    assert (stories.config.num_hidden_layers, stories.config.hidden_size, stories.config.vocab_size) == (5, 64, 512)
    model = rebuild(stories)
    generated, cache = [], None
    token = torch.tensor([[stories.tokenizer.bos_token_id]])
    with torch.no_grad():
        for _ in range(200):
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
            token = out.logits[:, -1:].argmax(-1)  # (1, 1)
            generated.append(token.item())
    assert stories.tokenizer.decode(generated) == EXPECTED_STORY


def test_stories260K_validation_cross_entropy(stories, data_file):
    # SOURCE.md: blocks 0-399, joined by "\n" (byte token 13, never merged, so encoding the joined
    # text equals encoding each block), one BOS, the dummy prefix only before the first block
    text = data_file("tinystories_val_subset/tinystories_val.txt").read_text(encoding="utf-8")
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()][:400]
    ids = torch.tensor(stories.tokenizer("\n".join(blocks), verbose=False)["input_ids"])
    assert ids[0] == 1 and int((ids == 1).sum()) == 1
    model = rebuild(stories)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 512):  # non-overlapping 512-token windows
            window = ids[start:start + 513]
            logits = model(window[None, :-1], use_cache=False).logits[0]
            total += F.cross_entropy(logits.double(), window[1:], reduction="sum").item()
            count += len(window) - 1
    assert count == 39_403
    assert total / count == pytest.approx(1.3212, rel=0.005)


def test_stories260K_tokenizer_encodes_like_runc(stories, data_file, tmp_path):
    pieces, scores = read_tokenizer(data_file("stories260K/tok512.bin"))
    texts = [
        "Once upon a time, there was a little girl named Lily.",
        " Spot saw the shiny car and said, \"Wow, Kitty!\"\n\nThe end.",
        "naïve café — 東京 🙂 <s> </s>",
        "",
    ]
    stories.tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        expected = encode(pieces, scores, text)
        assert stories.tokenizer(text)["input_ids"] == expected, repr(text)
        assert reloaded(text)["input_ids"] == expected, repr(text)
        assert reloaded.decode(expected, skip_special_tokens=True) == text
    assert (stories.tokenizer.unk_token_id, stories.tokenizer.bos_token_id, stories.tokenizer.eos_token_id) == (0, 1, 2)
