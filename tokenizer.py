"""
GPT-2's byte-level BPE tokenizer, from scratch, standard library only; plus a byte tokenizer. The same
code reads GPT-J's files and GPT-NeoX / Pythia's tokenizer.json (the same kind of BPE, plus a Unicode
normalization and added tokens for runs of spaces).

The story, top to bottom:
  1. bytes <-> printable unicode characters (so every byte sequence is a string of "symbols"),
  2. the Unicode letter / number / whitespace classes that GPT-2's pre-tokenization pattern
     needs, built from `unicodedata` because Python's `re` has no \\p{L} or \\p{N},
  3. the pattern itself, which cuts text into words before BPE ever sees it,
  4. BPE: merge the adjacent pair with the lowest merge rank until no pair is in the merge table,
  5. `Tokenizer` (reads the public files: vocab.json + merges.txt, or tokenizer.json) and
     `ByteTokenizer` (256 bytes + <|endoftext|>, for tiny models trained from scratch), which share
     one interface:
        encode(text, allowed_special=()) -> list[int]
        decode(ids, skip_special=False) -> str
        eos_id, vocab_size, special_tokens
  6. `train_bpe`: where merge tables come from: learn one from a corpus (a tiny model's own, smaller
     vocabulary, so its texts are a few tokens long instead of one token per byte).

Special tokens. By default `encode` treats "<|endoftext|>" in the text as ordinary text (a user's
caption that happens to contain it must not end a sequence), like tiktoken's `encode_ordinary`.
Pass allowed_special="all", or a set of names, to have those strings become their single id.
`decode` writes special tokens out as their text, or drops them with skip_special=True.

    python tokenizer.py PATH --text "Hello world"     # ids and pieces (PATH: directory, tokenizer.json or "byte")
"""

import argparse
import collections
import collections.abc
import heapq
import json
import operator
import os
import re
import sys
import unicodedata
from functools import lru_cache

EOT = "<|endoftext|>"

# -----------------------------------------------------------------------------
# 1. bytes <-> unicode symbols
#
# BPE works on strings, and GPT-2's files store tokens as strings. Raw bytes such as 0x20 (space)
# or 0x0A (newline) would be invisible or break the "a b" lines of the merges file, so each byte
# is given a visible character: the 188 bytes that are already printable Latin-1 characters map to
# themselves, the other 68 (controls, space, 0x7F-0xA0, 0xAD) map to chr(256), chr(257), ... in
# byte order. That is why a leading space shows up as "Ġ" (chr(256 + 32)) in vocab.json.


def bytes_to_unicode():
    """The GPT-2 table: byte value (0..255) -> the one-character string that stands for it."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_ENCODER = bytes_to_unicode()  # int -> str
BYTE_DECODER = {s: b for b, s in BYTE_ENCODER.items()}  # str -> int

# -----------------------------------------------------------------------------
# 2. Unicode character classes
#
# GPT-2 was written with the `regex` package, whose \p{L} is "any letter" (general categories Lu,
# Ll, Lt, Lm, Lo) and \p{N} "any number" (Nd, Nl, No). Python's `re` has neither. The usual
# stand-in for letters, [^\W\d_], is not the same class: `re`'s \w is str.isalnum(), which is true
# for every number (Nd, Nl, No), while \d only removes the decimal digits (Nd). So superscripts and
# fractions (², ½, category No) and Roman numerals (Ⅻ, category Nl) would be "letters", and "x²"
# would be one pre-token instead of "x" + "²": different tokens from GPT-2's. `re`'s \s is not
# GPT-2's either: str.isspace() also counts the ASCII separators U+001C-U+001F, which are not in
# Unicode's White_Space property that `regex` (and tiktoken) use.
# So the classes are built exactly, once, by scanning all code points' categories (under a second) into
# ranges for a `re` character class. They follow this Python's Unicode version
# (unicodedata.unidata_version); a character assigned only in a later version is "other" here.

# Unicode's White_Space property: a fixed list, not derivable from unicodedata.
WHITESPACE = (
    [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680)]
    + [(0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
)


@lru_cache(maxsize=None)
def unicode_ranges(major_category):
    """Sorted (first, last) code point ranges whose general category starts with major_category
    ("L" letters, "N" numbers)."""
    ranges, start = [], None
    category = unicodedata.category
    for cp in range(sys.maxunicode + 1):
        if category(chr(cp))[0] == major_category:
            if start is None:
                start = cp
        elif start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, sys.maxunicode))
    return tuple(ranges)


def char_class(ranges):
    """The body of a `re` character class (no brackets) matching the given code point ranges."""
    esc = lambda cp: f"\\U{cp:08x}"  # `re` reads \U + 8 hex digits inside a class
    return "".join(esc(a) if a == b else f"{esc(a)}-{esc(b)}" for a, b in ranges)


# -----------------------------------------------------------------------------
# 3. Pre-tokenization: GPT-2's pattern, written with the classes above
#
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
#
# English contractions (lower case only, as in GPT-2), then a run of letters, of numbers, or of
# anything else, each optionally preceded by one space (so " world" is one word and BPE learns
# "Ġworld"). A run of whitespace gives up its last character when a word follows, so that the space
# can start the next word: "a   b" -> "a", "  ", " b". `re` and `regex` both try alternatives left
# to right and backtrack the same way, so the same pattern splits text the same way.


@lru_cache(maxsize=None)
def gpt2_pattern():
    """GPT-2's pre-tokenization regex, compiled for Python's `re` (built on first use, cached)."""
    L, N, S = char_class(unicode_ranges("L")), char_class(unicode_ranges("N")), char_class(WHITESPACE)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
    )


def pretokenize(text):
    """Split text into the pieces that BPE encodes independently ("Hello world" -> ["Hello", " world"])."""
    return gpt2_pattern().findall(text)


# -----------------------------------------------------------------------------
# 4. BPE

NO_RANK = float("inf")  # the rank of a pair the merge table does not hold


def bpe(word, ranks):
    """Merge a word (a string of byte symbols) into tokens: repeatedly join the adjacent pair with the
    lowest rank in the merge table (the leftmost one on a tie), until no adjacent pair has a rank.

    The plain way rescans the whole word after every merge, which is quadratic: a 16,000-letter word
    (a URL or a base64 blob in a caption) took 12 s. Here the candidate pairs wait in a heap ordered by
    (rank, position), and the symbols form a linked list, so each merge costs O(log n). A merge makes
    some waiting entries stale (one of their two symbols has grown or gone); they are recognised by
    their text when popped and skipped. Hugging Face `tokenizers` and tiktoken merge in the same order."""
    parts = list(word)  # parts[i]: the symbol that starts at position i, or None once merged into its left
    n = len(parts)
    nxt = list(range(1, n + 1))  # position of the next live symbol (n = none)
    prv = list(range(-1, n - 1))  # position of the previous live symbol (-1 = none)
    heap = [(ranks[pair], i, *pair) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
    heapq.heapify(heap)

    def push(i):  # the pair that starts at live position i, if it is in the table
        j = nxt[i]
        if 0 <= i and j < n and (parts[i], parts[j]) in ranks:
            heapq.heappush(heap, (ranks[parts[i], parts[j]], i, parts[i], parts[j]))

    while heap:
        _, i, a, b = heapq.heappop(heap)
        j = nxt[i] if parts[i] is not None else n
        if parts[i] != a or j == n or parts[j] != b:  # stale: a symbol only ever grows, so text tells
            continue
        parts[i], parts[j] = a + b, None  # position j joins position i
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        push(prv[i])  # the merged symbol makes two new pairs, with its left and its right neighbour
        push(i)
    return [p for p in parts if p is not None]


# -----------------------------------------------------------------------------
# 5. The two tokenizers and what they share


def _encodable(text):
    """text, made encodable as UTF-8: lone surrogates become U+FFFD and a surrogate pair written
    as two characters becomes its character, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _allowed(allowed_special, special_tokens):
    """The set of special token strings that encode(text, allowed_special) may match."""
    if allowed_special == "all":
        return set(special_tokens)
    if isinstance(allowed_special, str) or not isinstance(allowed_special, collections.abc.Iterable):
        raise ValueError(f'allowed_special must be "all" or a set of token strings, got {allowed_special!r}')
    allowed = set(allowed_special)
    unknown = allowed - set(special_tokens)
    if unknown:
        raise ValueError(f"unknown special token(s) {sorted(unknown)}; this tokenizer has {sorted(special_tokens)}")
    return allowed


def _split_on(text, tokens, as_text=()):
    """Cut text around occurrences of the given tokens ({string: id}): a list of (piece, None) and
    (token, id). Matches are found left to right, the longest where several start at the same place
    (so a token that is a prefix of another cannot cut it). A match on a token in as_text (a special
    token encode was not allowed to use) stays text, but its characters are still taken: no other
    token can match across them, as in Hugging Face `tokenizers`."""
    if not tokens:
        return [(text, None)] if text else []
    pattern = _alternation(frozenset(tokens))
    out, start = [], 0  # text[start:] is not in out yet
    for match in pattern.finditer(text):
        token = match.group()
        if token in as_text:
            continue
        if match.start() > start:
            out.append((text[start:match.start()], None))
        out.append((token, tokens[token]))
        start = match.end()
    if start < len(text):
        out.append((text[start:], None))
    return out


@lru_cache(maxsize=64)
def _alternation(tokens):
    """A regex matching any of the strings in the frozenset tokens, the longest first (built once)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))))


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return _encodable(text)


def _token_bytes(token):
    """What a token decodes to, by the rule of Hugging Face's byte-level decoder: its byte symbols'
    bytes if every character is one ("Ġworld", "<|endoftext|>"), else its own UTF-8 (only added tokens
    can be spelled otherwise, such as NeoX's runs of spaces "   ")."""
    if all(c in BYTE_DECODER for c in token):
        return bytes(BYTE_DECODER[c] for c in token)
    return token.encode("utf-8")


def _check_ids(ids, vocab_size):
    """ids as a list of Python ints: any 1-D sequence of integers (a list, a tensor, a numpy array), never
    a string or floats, which int() would quietly turn into other ids."""
    def describe(x):
        return f"a {type(x).__name__} of shape {tuple(x.shape)}" if getattr(x, "ndim", 0) else repr(x)[:40]

    if isinstance(ids, (str, bytes)) or not isinstance(ids, collections.abc.Iterable):
        raise TypeError(f"decode expects a sequence of integer token ids, got {describe(ids)}")
    checked = []
    for i in ids:
        try:
            checked.append(operator.index(i))  # an int, a numpy integer or a 0-d integer tensor
        except TypeError:
            raise TypeError(f"decode expects a 1-D sequence of integer token ids, got {describe(i)} in it") from None
    ids = checked
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for this tokenizer (vocab_size {vocab_size})")
    return ids


# The options of tokenizer.json's BPE model that would change its result, with the value byte-level BPE
# has; for the prefix and suffix, "" means the same as null.
BPE_OPTIONS = {"dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
               "byte_fallback": False, "ignore_merges": False}


class Tokenizer:
    """Byte-level BPE, the tokenizer of GPT-2, GPT-J and GPT-NeoX / Pythia: a vocabulary (byte-symbol
    string -> id), merges in rank order, and added tokens, cut out of the text before BPE sees it.
    Special added tokens ("<|endoftext|>") are cut out only when encode's allowed_special names them
    (otherwise they stay text, though no other added token can match across one); the others (NeoX's
    runs of 2 to 24 spaces) always are. All of this follows Hugging Face `tokenizers`.
    A tokenizer.json may add three things GPT-2's files cannot say:
      normalizer        a Unicode normal form ("NFC" for NeoX) applied to the text first,
      normalized        the added tokens that are looked for after normalizing rather than before,
      add_prefix_space  a space put in front of each piece of text that lacks one ("Hello" -> " Hello"),
    and use_regex=False, which skips GPT-2's pre-tokenization pattern (each piece is one BPE word)."""

    def __init__(self, encoder, merges, special_tokens=None, added_tokens=None, normalized=(), normalizer=None,
                 add_prefix_space=False, use_regex=True):
        # encoder: {"Ġworld": 995, ...}; merges: [("Ġ", "t"), ...], first = merged first (rank 0)
        self.encoder = dict(encoder)
        self.merges = [tuple(pair) for pair in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        if special_tokens is None:
            special_tokens = {EOT: self.encoder[EOT]} if EOT in self.encoder else {}
        self.special_tokens = dict(special_tokens)  # {token: id}, matched when allowed
        self.added_tokens = {**(added_tokens or {}), **self.special_tokens}  # {token: id}, specials included
        self.normalized = frozenset(normalized)
        self._raw_and_after = ({t: i for t, i in self.added_tokens.items() if t not in self.normalized},
                               {t: i for t, i in self.added_tokens.items() if t in self.normalized})
        self.normalizer = normalizer  # None or a form for unicodedata.normalize
        self.add_prefix_space, self.use_regex = add_prefix_space, use_regex
        # id -> bytes, for decoding (an added token that is also in the vocabulary has the same id there)
        self.decoder = {i: _token_bytes(tok) for tok, i in {**self.encoder, **self.added_tokens}.items()}
        self.vocab_size = max(self.decoder) + 1
        self.eos_id = self.special_tokens.get(EOT)
        self.cache = {}  # word -> ids; words repeat a lot in real text

    @classmethod
    def from_pretrained(cls, path):
        """Load a tokenizer directory, or a tokenizer.json file. In a directory, the first that is there:
          vocab.json + merges.txt (Hugging Face names) or encoder.json + vocab.bpe (OpenAI names), with
            an optional added_tokens.json of special tokens: GPT-2's files;
          tokenizer.json: the Hugging Face `tokenizers` file, which GPT-NeoX and Pythia ship alone
            (see from_tokenizer_json)."""
        if os.path.isfile(path) and path.endswith(".json"):
            return cls.from_tokenizer_json(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no tokenizer directory or tokenizer.json file at {path!r}")
        conventions = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")]
        for vocab_name, merges_name in conventions:
            vocab_file, merges_file = os.path.join(path, vocab_name), os.path.join(path, merges_name)
            if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
                break
        else:
            if os.path.isfile(os.path.join(path, "tokenizer.json")):
                return cls.from_tokenizer_json(os.path.join(path, "tokenizer.json"))
            looked_for = " or ".join(f"{v} + {m}" for v, m in conventions) + " or tokenizer.json"
            found = [name for pair in conventions for name in pair if os.path.isfile(os.path.join(path, name))]
            found = f" (found only {', '.join(found)})" if found else ""
            raise FileNotFoundError(f"no tokenizer files in {path!r}: looked for {looked_for}{found}")
        encoder = _read_json(vocab_file)
        merges = _read_merges(merges_file)
        added_file = os.path.join(path, "added_tokens.json")
        added = _read_json(added_file) if os.path.isfile(added_file) else {}
        _check_vocabulary(encoder, merges, vocab_file, merges_file, specials={EOT, *added})
        if EOT not in encoder:
            raise ValueError(f"{vocab_file} has no {EOT} token (needed as the end-of-text id)")
        _check_added(added, encoder, added_file)
        special_tokens = {EOT: encoder[EOT], **added}
        return cls(encoder, merges, special_tokens)

    @classmethod
    def from_tokenizer_json(cls, file):
        """Read a Hugging Face tokenizer.json that describes byte-level BPE: model BPE, pre-tokenizer
        ByteLevel, decoder ByteLevel, normalizer none or a Unicode normal form, added tokens without
        lstrip / rstrip / single_word. Whatever else the format can describe (WordPiece, Unigram,
        SentencePiece's Metaspace, a custom Split pattern, BPE dropout, byte fallback) is refused by
        name, never read half-way, and so is a file on which `tokenizers` would act otherwise than it
        reads (see _added_from_json). Left out on purpose: the post-processor (it only adds tokens such
        as a BOS when `tokenizers` is asked for add_special_tokens, which encode here never does) and
        the truncation and padding settings. The normal forms come from Python's `unicodedata`, whose
        Unicode version can differ from the Rust tables `tokenizers` uses (Python 3.11 against
        `tokenizers` 0.23: 72 characters normalize differently under NFKC, 1 under NFD, none alone
        under NFC, though NFC composes U+11935 U+11930 here and not there)."""
        spec = _load_json(file)

        def refuse(what):
            raise ValueError(f"{file}: {what}; only byte-level BPE (as GPT-2, GPT-J and GPT-NeoX / Pythia use "
                             "it) is read")

        def kind(component):  # its type ("ByteLevel"), None for null, or what is wrong with it
            if component is None:
                return None
            if isinstance(component, dict) and isinstance(component.get("type"), str):
                return component["type"]
            return f"<not an object with a type: {json.dumps(component)[:40]}>"

        if isinstance(spec, dict) and spec.get("version", "1.0") != "1.0":
            refuse(f"format version {spec['version']!r} (this reader knows version \"1.0\")")
        model = spec.get("model") if isinstance(spec, dict) else None
        if isinstance(model, dict) and model.get("type", "BPE") != "BPE":
            refuse(f"model type {model['type']!r}")
        if not isinstance(model, dict) or not {"vocab", "merges"} <= set(model):
            refuse('no "model" object with "vocab" and "merges" (is this a tokenizer.json?)')
        for option, default in BPE_OPTIONS.items():
            value = model.get(option, default)
            if value != default and not (value == "" and option.endswith("fix")):  # "" is null's twin
                refuse(f"model option {option} = {value!r} (byte-level BPE has {json.dumps(default)})")
        pre = spec.get("pre_tokenizer")
        if kind(pre) != "ByteLevel":
            refuse(f"pre_tokenizer {kind(pre)!r} (byte-level BPE has 'ByteLevel')")
        if kind(spec.get("decoder")) != "ByteLevel":
            refuse(f"decoder {kind(spec.get('decoder'))!r} (byte-level BPE has 'ByteLevel')")
        normalizer = kind(spec.get("normalizer"))
        if normalizer not in (None, "NFC", "NFD", "NFKC", "NFKD"):
            refuse(f"normalizer {normalizer!r} (read: none, NFC, NFD, NFKC or NFKD)")
        flags = {name: pre.get(name, default) for name, default in (("add_prefix_space", False), ("use_regex", True))}
        for name, value in flags.items():
            if not isinstance(value, bool):
                refuse(f"pre_tokenizer {name} = {value!r} (expected true or false)")

        encoder = _check_token_table(model["vocab"], f"{file} (model.vocab)")
        merges = _merges_from_json(model["merges"], file)
        added, specials, normalized = _added_from_json(spec.get("added_tokens", []), encoder, normalizer, file)
        _check_vocabulary(encoder, merges, file, file, specials=set(added))
        if EOT not in specials:  # special only as the file says: `tokenizers` makes nothing special itself
            why = "is not marked special" if EOT in added else "is not among its added tokens"
            raise ValueError(f"{file}: {EOT} {why} (it is needed as the end-of-text id)")
        return cls(encoder, merges, {t: added[t] for t in specials}, added_tokens=added, normalized=normalized,
                   normalizer=normalizer, **flags)

    @classmethod
    def from_merges(cls, merges):
        """The tokenizer a merge table alone defines (what train_bpe learns): ids 0-255 are the byte
        symbols in byte order, then one id per new token in merge order, then <|endoftext|>."""
        encoder = {BYTE_ENCODER[b]: b for b in range(256)}
        for rank, pair in enumerate(merges):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise ValueError(f"merge #{rank} {pair!r}: a merge is a pair of two token strings")
            a, b = pair
            if a not in encoder or b not in encoder:
                raise ValueError(f"merge #{rank} {a!r} + {b!r} uses a token no earlier merge made")
            if a + b in encoder:  # (also a pair listed twice): BPE could not have learned it
                raise ValueError(f"merge #{rank} {a!r} + {b!r} makes {a + b!r}, which an earlier merge made")
            encoder[a + b] = len(encoder)
        encoder[EOT] = len(encoder)
        return cls(encoder, merges)

    def encode(self, text, allowed_special=()):
        """text -> token ids. Special tokens become their one id only if named in allowed_special
        ("all" or a set of strings); otherwise they are encoded as plain text."""
        ids = []
        for piece, token_id in self._split(text, allowed_special):
            if token_id is not None:
                ids.append(token_id)
                continue
            if self.add_prefix_space and not piece.startswith(" "):
                piece = " " + piece
            for word in pretokenize(piece) if self.use_regex else [piece]:
                ids.extend(self._encode_word(word))
        return ids

    def _split(self, text, allowed_special):
        """text -> [(piece, None) or (added token, id)], in the order of Hugging Face `tokenizers`: the
        added tokens looked for in the raw text are cut out first; each piece left is normalized; then
        the added tokens looked for in normalized text are cut out of it."""
        as_text = set(self.special_tokens) - _allowed(allowed_special, self.special_tokens)
        raw, after = self._raw_and_after  # the added tokens looked for before / after normalizing
        out = []
        for piece, token_id in _split_on(_check_text(text), raw, as_text):
            if token_id is not None:
                out.append((piece, token_id))
                continue
            if self.normalizer:
                piece = unicodedata.normalize(self.normalizer, piece)
            out.extend(_split_on(piece, after, as_text))
        return out

    def _encode_word(self, word):
        if word not in self.cache:
            if len(self.cache) >= 100_000:  # bounded: random text would otherwise grow it forever
                self.cache.clear()
            symbols = "".join(BYTE_ENCODER[b] for b in word.encode("utf-8"))
            self.cache[word] = [self.encoder[token] for token in bpe(symbols, self.ranks)]
        return self.cache[word]

    def decode(self, ids, skip_special=False):
        """token ids -> text. Byte sequences that are not valid UTF-8 (a character cut between tokens)
        become U+FFFD. Special tokens are written as their text, or dropped with skip_special=True."""
        ids = _check_ids(ids, self.vocab_size)
        specials = set(self.special_tokens.values()) if skip_special else set()
        missing = [i for i in ids if i not in self.decoder]
        if missing:
            raise ValueError(f"token id {missing[0]} is not in this tokenizer's vocabulary")
        return b"".join(self.decoder[i] for i in ids if i not in specials).decode("utf-8", errors="replace")


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text, 256 is <|endoftext|> (eos_id); vocab_size 257.
    For tiny models trained from scratch: no files, every string encodable, same interface as Tokenizer."""

    def __init__(self):
        self.special_tokens = {EOT: 256}
        self.eos_id = 256
        self.vocab_size = 257

    def encode(self, text, allowed_special=()):
        """text -> UTF-8 byte values (allowed special tokens become their id, as in Tokenizer.encode)."""
        as_text = set(self.special_tokens) - _allowed(allowed_special, self.special_tokens)
        ids = []
        for piece, special_id in _split_on(_check_text(text), self.special_tokens, as_text):
            ids.extend([special_id] if special_id is not None else piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special=False):
        """ids -> text; invalid UTF-8 becomes U+FFFD; 256 is written "<|endoftext|>" or dropped with
        skip_special=True."""
        ids = _check_ids(ids, self.vocab_size)
        out = bytearray()
        for i in ids:
            if i < 256:
                out.append(i)
            elif not skip_special:
                out += EOT.encode("utf-8")
        return out.decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# 6. Learning a merge table (Sennrich et al., 2016, "Neural Machine Translation of Rare Words with
# Subword Units", on GPT-2's byte symbols and pre-tokenizer)


def train_bpe(texts, max_merges):
    """Learn byte-level BPE from `texts`: start from single bytes; count every adjacent pair of symbols
    inside the pre-tokenized words (weighted by how often each word occurs); make the most frequent
    pair one new symbol; repeat until max_merges merges or no pair occurs twice. Ties go to the
    larger pair, compared as symbol strings (so "Ġ", a space, comes after every ASCII letter): the
    result depends on the texts only. Returns Tokenizer.from_merges(merges), which
    encodes every training word into the pieces its last merge left."""
    if isinstance(texts, str):  # iterating it would count single characters: nothing to merge
        raise TypeError("train_bpe(texts, max_merges): texts must be a list of strings, not one string")
    word_counts = collections.Counter(word for text in texts for word in pretokenize(text))
    words = [([BYTE_ENCODER[b] for b in word.encode("utf-8")], n) for word, n in word_counts.items()]
    merges = []
    while len(merges) < max_merges:
        pairs = collections.Counter()
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best, count = max(pairs.items(), key=lambda item: (item[1], item[0]))
        if count < 2:
            break
        merges.append(best)
        for symbols, _ in words:  # merge it in place, left to right, as bpe() will when encoding
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [best[0] + best[1]]
                i += 1
    return Tokenizer.from_merges(merges)


# -----------------------------------------------------------------------------
# file readers: every problem is one error that names the file


def _load_json(file):
    """A JSON file, or one ValueError naming it. An object that lists one key twice is an error:
    json.load would keep the last entry for a token silently."""
    def no_repeats(pairs):
        table = {}
        for key, value in pairs:
            if key in table:
                raise ValueError(f"{file}: {key!r} is listed twice")
            table[key] = value
        return table

    try:  # utf-8-sig: a byte-order mark some editors write is not part of the first token
        with open(file, encoding="utf-8-sig") as f:
            return json.load(f, object_pairs_hook=no_repeats)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"cannot read {file}: {e or 'nested too deeply'}") from None


def _check_token_table(table, where):
    """table must be {token: integer id >= 0}, with no id given twice."""
    # (JSON's true is a Python bool, and bool is an int: refuse it by name)
    if not isinstance(table, dict) or not all(type(v) is int and 0 <= v < 2**32 for v in table.values()):
        raise ValueError(f"{where} is not a JSON object of token -> integer id (0 <= id < 2**32)")
    ids = {}
    for token, i in table.items():  # two tokens with one id: decode could give only one of them
        if i in ids:
            raise ValueError(f"{where}: tokens {ids[i]!r} and {token!r} have the same id {i}")
        ids[i] = token
    return table


def _read_json(file):
    return _check_token_table(_load_json(file), file)


def _merges_from_json(merges, file):
    """tokenizer.json's merges: ["Ġ t", ...] (older files) or [["Ġ", "t"], ...] (newer ones)."""
    if not isinstance(merges, list):
        raise ValueError(f"{file}: model.merges is not a list")
    pairs, seen = [], set()
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
            raise ValueError(f"{file}: merge #{rank} {merge!r} is not two tokens ('a b' or [\"a\", \"b\"])")
        if tuple(pair) in seen:
            raise ValueError(f"{file}: merge #{rank} {merge!r} is listed twice")
        seen.add(tuple(pair))
        pairs.append(tuple(pair))
    return pairs


def _added_from_json(entries, encoder, normalizer, file):
    """tokenizer.json's added_tokens -> ({token: id}, the special ones, the ones matched after
    normalizing). What would make `tokenizers` behave otherwise than the file reads is refused:
      lstrip, rstrip, single_word  they move where a token matches (byte-level BPE files leave them off);
      a normalized token that the normalizer changes: `tokenizers` matches and decodes its normal form;
      an id other than the one `tokenizers` gives it on loading, whatever the file says: a token
        in the vocabulary keeps its id there, any other takes the next id after the vocabulary and
        after the added tokens before it, in list order."""
    if not isinstance(entries, list):
        raise ValueError(f"{file}: added_tokens is not a list")
    added, specials, normalized = {}, [], set()
    for n, entry in enumerate(entries):
        token, i = (entry.get("content"), entry.get("id")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(token, str) and token and type(i) is int and i >= 0):
            raise ValueError(f"{file}: added_tokens[{n}] needs a non-empty \"content\" and an integer \"id\" >= 0")
        flags = {flag: entry.get(flag, default) for flag, default in
                 (("special", False), ("normalized", not entry.get("special", False)),  # `tokenizers`' defaults
                  ("lstrip", False), ("rstrip", False), ("single_word", False))}
        for flag, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{file}: added token {token!r} has {flag} = {json.dumps(value)} (true or false)")
            if value and flag in ("lstrip", "rstrip", "single_word"):
                raise ValueError(f"{file}: added token {token!r} has {flag} = true, which this tokenizer does "
                                 "not implement (byte-level BPE files leave it off)")
        if token in added:
            raise ValueError(f"{file}: added token {token!r} is listed twice")
        if flags["normalized"] and normalizer and unicodedata.normalize(normalizer, token) != token:
            raise ValueError(f"{file}: added token {token!r} changes under the {normalizer} normalizer, which "
                             "this tokenizer does not implement (Hugging Face matches and decodes its normal form)")
        expected = encoder.get(token)
        if expected is None:
            last = max(added.values(), default=-1)
            expected = last + 1 if last >= len(encoder) else len(encoder)
        if i != expected:
            raise ValueError(f"{file}: added token {token!r} is listed with id {i}, but Hugging Face `tokenizers` "
                             f"gives it id {expected} (the vocabulary's id, or else the next one after the "
                             "vocabulary and the added tokens before it)")
        added[token] = i
        if flags["special"]:
            specials.append(token)
        if flags["normalized"]:
            normalized.add(token)
    return added, specials, normalized


def _read_merges(file):
    try:
        with open(file, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read merges file {file}: {e}") from None
    merges, seen = [], {}
    for n, line in enumerate(lines, start=1):
        if not line or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{file} line {n}: expected two tokens separated by one space, got {line!r}")
        if tuple(pair) in seen:  # which rank would it have? (the two copies give different tokens)
            raise ValueError(f"{file} line {n}: the merge {line!r} is already on line {seen[tuple(pair)]}")
        seen[tuple(pair)] = n
        merges.append(tuple(pair))
    return merges


def _check_vocabulary(encoder, merges, vocab_file, merges_file, specials=(EOT,)):
    """Every byte symbol and every merge result must have an id, every token must be spelled in byte
    symbols, and every longer token must be made by a merge (specials aside), or encoding / decoding
    would fail or differ later, far from the file."""
    for b, symbol in BYTE_ENCODER.items():
        if symbol not in encoder:
            raise ValueError(f"{vocab_file} has no token for byte {b} (symbol {symbol!r})")
    for token in encoder:
        if token not in specials and not all(c in BYTE_DECODER for c in token):
            raise ValueError(f"{vocab_file}: token {token!r} is not written in GPT-2's byte symbols")
    for rank, (a, b) in enumerate(merges):
        for part in (a, b):
            if part not in encoder:
                raise ValueError(f"{merges_file}: merge #{rank} {a!r} + {b!r} uses {part!r}, which is not in "
                                 f"{vocab_file}")
        if a + b not in encoder:
            raise ValueError(
                f"{merges_file}: merge #{rank} {a!r} + {b!r} gives {a + b!r}, which is not in {vocab_file}"
            )
    # A token longer than one symbol that no merge makes can never be produced: the merges file was
    # cut short, or belongs to another vocabulary (GPT-2: 256 byte symbols + 50,000 merges + <|endoftext|>).
    # (Special tokens some folders also list in vocab.json, e.g. "<|extratoken_1|>", are not made by merges.)
    made = {a + b for a, b in merges}
    unmade = [t for t in encoder if len(t) > 1 and t not in made and t not in specials
              and not (t.startswith("<|") and t.endswith("|>"))]
    if unmade:
        raise ValueError(f"{vocab_file}: {len(unmade)} token(s) that no merge in {merges_file} makes, e.g. "
                         f"{unmade[0]!r} (is {os.path.basename(merges_file)} cut short, or from another vocabulary?)")


def _check_added(added, encoder, added_file):
    """added_tokens.json may name new special tokens, or repeat a vocabulary token with its own id; it may
    not give an id that another token has (decode would write the wrong text) or rename an id."""
    token_of = {i: t for t, i in encoder.items()}  # ids are unique (_check_token_table checked)
    for token, i in added.items():
        if not token:
            raise ValueError(f"{added_file}: an added token with an empty name (id {i})")
        if token in encoder and encoder[token] != i:
            raise ValueError(f"{added_file}: {token!r} has id {i}, but {encoder[token]} in the vocabulary")
        if token_of.get(i, token) != token:
            raise ValueError(f"{added_file}: {token!r} has id {i}, which is already {token_of[i]!r}'s")


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Encode text with a byte-level BPE tokenizer (GPT-2, GPT-J, GPT-NeoX / Pythia) or the byte "
                    "tokenizer, and show the pieces."
    )
    parser.add_argument(
        "path", help='tokenizer directory (vocab.json + merges.txt, encoder.json + vocab.bpe, or tokenizer.json), a '
             'tokenizer.json file, or "byte"'
    )
    parser.add_argument("--text", default="Hello world, don't panic! ½ ² 👋🏽", help="text to encode")
    parser.add_argument(
        "--allow-special", action="store_true", help="encode <|endoftext|> in the text as its single id"
    )
    args = parser.parse_args()
    try:
        tok = ByteTokenizer() if args.path in ("byte", "bytes") else Tokenizer.from_pretrained(args.path)
    except (OSError, ValueError) as e:
        sys.exit(f"tokenizer.py: error: {e}")
    ids = tok.encode(args.text, allowed_special="all" if args.allow_special else ())
    print(f"vocab_size {tok.vocab_size}, eos_id {tok.eos_id}, {len(ids)} tokens")
    print(ids)
    print([tok.decode([i]) for i in ids])
