"""OpenAI CLIP byte-level BPE tokenizer as a Keras layer that runs in a TF graph.

The reference is `clip.tokenize` from openai/CLIP, which open_clip ships as
`open_clip.tokenize` / `SimpleTokenizer`. `CLIPTokenizer.call` is built only from
TensorFlow core and tensorflow-text ops (no `py_function`), so it runs inside
`tf.data`, `tf.function` and exported SavedModels. `tokenize` is the host-side
twin of `clip.tokenize`: it runs the Python cleaning (`clean_text`) and then the
same layer.
"""
import functools
import gzip
import html
import html.entities
import os

import keras
import tensorflow as tf
import tensorflow_text as tf_text
from absl import logging

VOCABULARY_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "assets",
    "bpe_simple_vocab_16e6.txt.gz",
)
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
# Lines [1, 1 + NUM_MERGES) of the vocabulary file are the merges, as in OpenAI's
# SimpleTokenizer (49152 - 256 byte tokens - 2 special tokens).
NUM_MERGES = 49152 - 256 - 2
VOCABULARY_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408

# OpenAI's pre-tokenisation pattern, compiled by the reference with the `regex`
# module and IGNORECASE. RE2's `(?i)` would also case-fold `\p{L}` (making
# U+0345, which folds to iota, a letter), so only the literals are
# case-insensitive here. `\s` is ASCII-only in RE2, which is enough because the
# text has gone through the Python-whitespace collapse before it is split.
_WORD_PATTERN = (
    r"(?i:<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d)"
    r"|\p{L}+|\p{N}|[^\s\x{345}\p{L}\p{N}]+"
)
# Under IGNORECASE the `regex` module matches U+0345 COMBINING GREEK
# YPOGEGRAMMENI (it folds to iota) with no alternative, so findall skips it:
# it behaves exactly like whitespace.
_SKIPPED_PATTERN = r"\x{345}"

# Text for which every cleaning step except whitespace and case is a no-op:
# printable ASCII and ASCII whitespace without `&` (no HTML entities).
_PLAIN_ASCII_PATTERN = r"[\t\n\f\r\x20-\x25\x27-\x7e]*"
_ASCII_PATTERN = r"[\x00-\x7f]*"

# ftfy.fixes.remove_terminal_escapes (ftfy's `\d` is Unicode, hence \p{Nd}).
_ANSI_ESCAPE_PATTERN = r"\x1b\[[\p{Nd};]*[a-zA-Z]"
# ftfy.fixes.remove_control_chars (ftfy.chardata.CONTROL_CHARS).
_CONTROL_CHARS_PATTERN = (
    r"[\x00-\x08\x0b\x0e-\x1f\x7f\x{206a}-\x{206f}\x{feff}\x{fff9}-\x{fffc}]"
)
# ftfy.chardata.HTML_ENTITY_RE: the entities ftfy decodes (semicolon required).
_FTFY_ENTITY_PATTERN = r"&#?[0-9A-Za-z]{1,24};"
# html.unescape's pattern (semicolon optional).
_HTML_ENTITY_PATTERN = r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)"
_NUMERIC_ENTITY_PATTERN = r"&#([0-9]+|[xX][0-9a-fA-F]+);?"
_NUMERIC_ENTITY_STRICT_PATTERN = r"&#([0-9]+|[xX][0-9a-fA-F]+);"
_NO_MERGE = 2**31 - 1
_REPLACEMENT_CHARACTER = "\ufffd"


def bytes_to_unicode():
    """Returns OpenAI's reversible byte -> printable unicode character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to
    U+0100 onwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    # Order of the first 256 vocabulary entries: printable bytes, then the rest.
    return {byte: table[byte] for byte in printable + [b for b in range(256) if b not in printable]}


def load_merges(path=VOCABULARY_FILE):
    """Returns the BPE merges, lowest rank first, as `(left, right)` pairs."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]


def build_vocabulary(merges):
    """Returns the 49,408 tokens in id order, like OpenAI's `SimpleTokenizer`."""
    byte_chars = list(bytes_to_unicode().values())
    return (
        byte_chars
        + [char + END_OF_WORD for char in byte_chars]
        + ["".join(merge) for merge in merges]
        + [START_OF_TEXT, END_OF_TEXT]
    )


def clean_text(text):
    """Host-side cleaning of the reference: `ftfy.fix_text`, HTML-unescape twice, strip.

    This is OpenAI's `basic_clean`. Whitespace collapsing and lowercasing are
    left to `CLIPTokenizer`, which does them in the graph exactly as the
    reference does.

    Args:
        text: a Python `str`.

    Returns:
        The cleaned `str`.
    """
    import ftfy  # Not needed to run the layer or a SavedModel that holds it.

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def _python_whitespace_class():
    """RE2 class of the characters Python's `str.split()` treats as whitespace."""
    chars = [c for c in range(0x10000) if chr(c).isspace()]
    return "[" + "".join(f"\\x{{{c:x}}}" for c in chars) + "]+"


def _fixed_point(fn, text):
    while True:
        fixed = fn(text)
        if fixed == text:
            return text
        text = fixed


def _ftfy_character_map():
    """Single-character fixes of `ftfy.fix_text`, composed to their fixed point.

    Covers C1 controls read as Windows-1252, Latin ligatures, half/fullwidth
    forms (and U+3000), curly quotes and line-break characters: the fixes that
    `ftfy` applies character by character. Control-character removal and
    terminal escapes are separate regexes because they must run after these.
    """
    from ftfy import chardata, fixes

    def chain(text):
        for fix in (
            fixes.fix_c1_controls,
            fixes.fix_latin_ligatures,
            fixes.fix_character_width,
            fixes.uncurl_quotes,
            fixes.fix_line_breaks,
        ):
            text = fix(text)
        return text

    candidates = set(range(0x80, 0xA0))
    candidates |= set(chardata.LIGATURES) | set(chardata.WIDTH_MAP)
    candidates |= {0x02BC, 0x2028, 0x2029, 0x0D} | set(range(0x2018, 0x2020))
    mapping = {}
    for code in sorted(candidates):
        fixed = _fixed_point(chain, chr(code))
        if fixed != chr(code):
            mapping[chr(code)] = fixed
    return mapping


def _python_lowercase_map():
    """Python's `str.lower` for the non-ASCII characters it changes.

    `tf.strings.lower` uses ICU, whose Unicode tables can be older than
    Python's; re-applying Python's per-character mapping afterwards fixes the
    characters ICU leaves unchanged, and is a no-op on everything ICU lowered.
    """
    mapping = {}
    for code in range(0x80, 0x1F000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        lower = char.lower()
        if lower != char:
            mapping[char] = lower
    return mapping


def _numeric_reference_specials():
    """`html.unescape` results for code points it does not turn into `chr(n)`."""
    codes = list(range(0x00, 0xA0)) + list(range(0xFDD0, 0xFDF0))
    codes += [plane * 0x10000 + low for plane in range(17) for low in (0xFFFE, 0xFFFF)]
    specials = {}
    for code in codes:
        text = html.unescape(f"&#{code};")
        if text != chr(code):
            specials[code] = text
    return specials


def _static_table(keys, values, key_dtype, value_dtype, default_value, name):
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, dtype=key_dtype),
            tf.constant(values, dtype=value_dtype),
        ),
        default_value=default_value,
        name=name,
    )


def _ragged_from_flat(flat_values, like):
    return tf.RaggedTensor.from_row_splits(flat_values, like.row_splits, validate=False)


def _replace_rows(texts, mask, fn):
    """Applies `fn` to the rows of `texts` where `mask` is true; others unchanged.

    Batches with no such row skip `fn` entirely (the common, all-ASCII case).
    """

    def replace():
        indices = tf.where(mask)  # (S, 1)
        updated = fn(tf.gather_nd(texts, indices))  # (S,)
        return tf.tensor_scatter_nd_update(texts, indices, updated)

    return tf.cond(tf.reduce_any(mask), replace, lambda: texts)


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPTokenizer(keras.layers.Layer):
    """OpenAI CLIP byte-level BPE tokenizer that runs inside a TensorFlow graph.

    Maps a batch of strings to `[start] + BPE ids + [end]`, zero padded to
    `context_length`, exactly as `clip.tokenize` / `open_clip.tokenize` do for
    any text that is already clean (see below), including truncation: a text
    that does not fit keeps its first `context_length - 1` tokens and ends with
    `end_token_id`. The vocabulary (49,408 tokens: 256 byte symbols, the same
    with `</w>`, 48,894 merges, `<start_of_text>`, `<end_of_text>`) is OpenAI's
    `bpe_simple_vocab_16e6.txt.gz`, shipped with the package.

    The layer uses only TensorFlow core and tensorflow-text ops: it runs under
    `tf.function`, in `tf.data.Dataset.map`, and in SavedModels that a server
    loads with `import tensorflow_text` and no Python tokenizer. The steps:

    1. Cleaning (when `fix_text=True`), an in-graph approximation of the
       reference's `ftfy.fix_text` + `html.unescape` twice: the single-character
       fixes of ftfy (C1 controls as Windows-1252, Latin ligatures, fullwidth and
       halfwidth forms and U+3000, curly quotes, line breaks), ANSI terminal
       escapes and control-character removal, NFC normalisation and ftfy's HTML
       entity decoding, repeated to a fixed point as ftfy does (skipped, as in
       ftfy, from the first line containing `<`); then Python's `html.unescape`
       applied twice (all HTML5 named references, with and without `;`, and
       numeric references with Python's replacement rules).
    2. Python-`str.split()` whitespace collapse (which, unlike RE2's `\\s`,
       includes U+001C-U+001F, U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028,
       U+2029, U+202F, U+205F, U+3000), strip, lowercase (ICU, then Python's
       per-character `str.lower` table for characters ICU's older tables miss).
    3. OpenAI's pre-tokenisation regex (RE2, `\\p{L}`, `\\p{N}`; every digit is
       its own word; literal `<start_of_text>` / `<end_of_text>` become the
       special ids, and U+0345 is dropped, as in the reference).
    4. UTF-8 bytes through OpenAI's byte -> unicode table, `</w>` on the last
       symbol. Words that are whole vocabulary tokens map straight to their id
       (BPE provably gives that token for this vocabulary); the others go
       through BPE, all distinct words of the batch at once in a
       `tf.while_loop`: each step merges, in every word, all non-overlapping
       occurrences (left to right) of that word's lowest-ranked pair.

    Differences from the reference (all confined to step 1 or to characters
    newer than the TF libraries' Unicode tables; there are none on the 40,455
    Flickr8k captions). The last two also apply to `tokenize`:

    - No mojibake repair: ftfy's `fix_encoding` (for example `"cafÃ©"` ->
      `"café"`, `"â€™"` -> `"'"`) and its `restore_byte_a0`,
      `replace_lossy_sequences`, `decode_inconsistent_utf8` steps need a
      charset detector and are not done. C1 controls are always read as
      Windows-1252 characters, never as parts of mojibake.
    - ftfy stops decoding HTML for the rest of the text from the first line
      containing `<`, checked line by line on the input; the layer does the
      same, but ftfy's splitting of lines longer than 1,000,000 characters is
      not reproduced.
    - Unpaired UTF-16 surrogates cannot occur in UTF-8 input; invalid UTF-8 is
      read with U+FFFD replacement.
    - Letters and digits assigned after Unicode 15.1 (RE2's tables; Python's
      `regex` module is newer) are split as punctuation.
    - Greek final sigma: ICU's lowercasing predates Unicode 14, so marks new
      in Unicode 14 (for example U+1AC7) do not count as case-ignorable
      (`"Α\\u1ac7Σ"` gives `σ` where Python gives `ς`).

    Building the layer with `fix_text=True` reads ftfy's tables (ftfy is
    needed to build it, not to run it or a SavedModel that holds it).

    Text cleaned on the host with `clean_text` (as `tokenize` does) should be
    tokenized with `fix_text=False`, which skips step 1 and then matches the
    reference up to the last two differences above: re-running the HTML and quote fixes on already cleaned
    text would, for example, turn a literal `&amp;` into `&`.

    Args:
        context_length: int. Length of every output row, start and end tokens
            included. At least 2. Defaults to 77, OpenAI's value.
        fix_text: bool. Whether `call` runs the in-graph cleaning of step 1.
            Set to `False` for text already cleaned with `clean_text`.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`...).
            `dtype` is the output dtype, `"int32"` by default.

    Call arguments:
        texts: `tf.string` tensor of shape `(B,)`, or a scalar (treated as
            `(1,)`).

    Returns:
        Token ids of shape `(B, context_length)` and the layer's dtype, padded
        with `pad_token_id` (0) after `end_token_id`.

    Example:

    >>> tokenizer = CLIPTokenizer(context_length=8)
    >>> tokenizer(tf.constant(["A dog on the beach."])).numpy()
    array([[49406,   320,  1929,   525,   518,  2117,   269, 49407]],
          dtype=int32)
    >>> tokenizer.detokenize(tokenizer(tf.constant(["A dog."]))).numpy()
    array([b'a dog . '], dtype=object)
    """

    def __init__(self, context_length=77, fix_text=True, **kwargs):
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        # Accept Python strings and lists as well as tensors, as Keras
        # preprocessing layers do.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        if context_length < 2:
            raise ValueError(
                "`context_length` must be at least 2 (start and end tokens). "
                f"Received: context_length={context_length}"
            )
        if self.compute_dtype not in ("int32", "int64"):
            raise ValueError(
                "`dtype` must be 'int32' or 'int64'. "
                f"Received: dtype={self.compute_dtype}"
            )
        self.context_length = int(context_length)
        self.fix_text = bool(fix_text)
        self.vocabulary_size = VOCABULARY_SIZE
        self.start_token_id = VOCABULARY_SIZE - 2
        self.end_token_id = VOCABULARY_SIZE - 1
        self.pad_token_id = 0

        merges = load_merges()
        vocabulary = build_vocabulary(merges)
        byte_encoder = bytes_to_unicode()
        self._whitespace_pattern = _python_whitespace_class()
        # Tables are tracked attributes, so SavedModels carry them as resources.
        self._byte_encoder = _static_table(
            [bytes([b]) for b in byte_encoder],
            [c.encode("utf-8") for c in byte_encoder.values()],
            tf.string, tf.string, "", "byte_encoder",
        )
        self._byte_decoder = _static_table(
            [c.encode("utf-8") for c in byte_encoder.values()],
            [bytes([b]) for b in byte_encoder],
            tf.string, tf.string, "", "byte_decoder",
        )
        self._merge_ranks = _static_table(
            [f"{left} {right}" for left, right in merges],
            list(range(len(merges))),
            tf.string, tf.int32, _NO_MERGE, "merge_ranks",
        )
        self._token_to_id = _static_table(
            vocabulary, list(range(len(vocabulary))), tf.string, tf.int32, -1,
            "token_to_id",
        )
        self._vocabulary = tf.constant(vocabulary)
        lowercase = _python_lowercase_map()
        self._lowercase = _static_table(
            list(lowercase), list(lowercase.values()), tf.string, tf.string, "",
            "python_lowercase",
        )
        if self.fix_text:
            self._build_cleaning_tables()
        self.built = True

    def _build_cleaning_tables(self):
        from ftfy import chardata

        characters = _ftfy_character_map()
        self._ftfy_characters = _static_table(
            list(characters), list(characters.values()), tf.string, tf.string, "",
            "ftfy_characters",
        )
        ftfy_entities = chardata.HTML_ENTITIES  # "&name;" -> text
        self._ftfy_entities = _static_table(
            list(ftfy_entities), list(ftfy_entities.values()), tf.string, tf.string,
            "", "ftfy_entities",
        )
        html5 = html.entities.html5  # "name;" or legacy "name" -> text
        self._html_entities = _static_table(
            ["&" + name for name in html5], list(html5.values()), tf.string,
            tf.string, "", "html_entities",
        )
        # Legacy names (no `;`) that html.unescape also finds as a prefix; the
        # longest one wins, so list them longest first for RE2's leftmost-first
        # alternation.
        legacy = sorted((n for n in html5 if not n.endswith(";")), key=len, reverse=True)
        self._legacy_entity_pattern = "^&(" + "|".join(legacy) + ")(.+)$"
        specials = _numeric_reference_specials()
        self._numeric_specials = _static_table(
            list(specials), list(specials.values()), tf.int64, tf.string, "\x00",
            "numeric_reference_specials",
        )

    # ----------------------------------------------------------------- call

    def call(self, texts):
        texts = tf.convert_to_tensor(texts, dtype=tf.string)
        if texts.shape.rank == 0:
            texts = tf.reshape(texts, [1])
        texts = tf.reshape(texts, [-1])  # (B,)
        if self.fix_text:
            needs_fixing = tf.logical_not(
                tf.strings.regex_full_match(texts, _PLAIN_ASCII_PATTERN)
            )
            texts = _replace_rows(texts, needs_fixing, self._fix_text)
        texts = tf.strings.regex_replace(texts, self._whitespace_pattern, " ")
        texts = tf.strings.strip(texts)
        texts = tf.strings.lower(texts, encoding="utf-8")
        non_ascii = tf.logical_not(tf.strings.regex_full_match(texts, _ASCII_PATTERN))
        texts = _replace_rows(
            texts, non_ascii, lambda t: self._map_characters(t, self._lowercase)
        )

        # findall(pattern) as a space-separated string, then split on spaces:
        # words never contain spaces, and RE2 finds plain match bounds (no
        # capture groups) much faster than `tf_text.regex_split`.
        texts = tf.strings.regex_replace(texts, _SKIPPED_PATTERN, " ")
        texts = tf.strings.regex_replace(texts, _WORD_PATTERN, r" \0 ")
        words = tf.strings.split(texts)  # (B, (W))
        unique_words, word_index = tf.unique(words.flat_values)  # (U,), (N,)
        word_ids = self._bpe_ids(unique_words)  # (U, (T))
        ids = tf.gather(word_ids, word_index)  # (N, (T))
        ids = _ragged_from_flat(ids, words).merge_dims(1, 2)  # (B, (K))

        batch_size = tf.shape(texts)[0]
        ids = ids[:, : self.context_length - 2]
        start = tf.fill([batch_size, 1], self.start_token_id)
        end = tf.fill([batch_size, 1], self.end_token_id)
        ids = tf.concat(
            [
                tf.RaggedTensor.from_tensor(start),
                ids,
                tf.RaggedTensor.from_tensor(end),
            ],
            axis=1,
        )  # (B, (K + 2))
        ids = ids.to_tensor(
            default_value=self.pad_token_id, shape=[None, self.context_length]
        )  # (B, context_length)
        return tf.cast(ids, self.compute_dtype)

    def _bpe_ids(self, words):
        """BPE token ids of distinct words `(U,)` as a ragged `(U, (T))` tensor."""
        is_start = tf.equal(words, START_OF_TEXT)
        is_end = tf.equal(words, END_OF_TEXT)
        is_special = tf.logical_or(is_start, is_end)
        # Special words are a single token; encode a one-byte placeholder instead.
        words = tf.where(is_special, "!", words)
        byte_strings = tf.strings.bytes_split(words)  # (U, (L))
        symbols = self._byte_encoder.lookup(byte_strings.flat_values)  # (M,)
        last = byte_strings.row_limits() - 1  # (U,)
        symbols = tf.tensor_scatter_nd_update(
            symbols,
            tf.expand_dims(last, 1),
            tf.strings.join([tf.gather(symbols, last), END_OF_WORD]),
        )
        symbols = _ragged_from_flat(symbols, byte_strings)  # (U, (L))

        # Every vocabulary token that ends in </w> is exactly what BPE makes of
        # its word (checked for this vocabulary in tests/test_tokenizer.py), so
        # words found whole in the vocabulary skip the merge loop.
        whole_ids = self._token_to_id.lookup(tf.strings.reduce_join(symbols, axis=1))
        is_whole = tf.greater_equal(whole_ids, 0)  # (U,)
        whole_index = tf.reshape(tf.where(is_whole), [-1])  # (U1,)
        merge_index = tf.reshape(tf.where(tf.logical_not(is_whole)), [-1])  # (U2,)
        merged = self._merge(tf.gather(symbols, merge_index))  # (U2, (T))
        whole = tf.RaggedTensor.from_tensor(
            tf.expand_dims(tf.gather(whole_ids, whole_index), 1)
        )  # (U1, 1)
        ids = tf.gather(
            tf.concat([whole, self._token_to_id.lookup(merged)], axis=0),
            tf.math.invert_permutation(tf.concat([whole_index, merge_index], axis=0)),
        )  # (U, (T))

        special_ids = tf.where(is_start, self.start_token_id, self.end_token_id)
        row_ids = ids.value_rowids()
        return ids.with_flat_values(
            tf.where(
                tf.gather(is_special, row_ids),
                tf.gather(special_ids, row_ids),
                ids.flat_values,
            )
        )

    def _merge(self, words):
        """Applies BPE merges to ragged symbols `(W, (L))`; returns `(W, (T))`."""
        num_words = tf.cast(words.nrows(), tf.int32)

        def body(symbols, row_ids, _):
            pair_rows = row_ids[:-1]  # (M - 1,)
            pairs = tf.strings.join([symbols[:-1], symbols[1:]], separator=" ")
            ranks = tf.where(
                tf.equal(pair_rows, row_ids[1:]),
                self._merge_ranks.lookup(pairs),
                _NO_MERGE,
            )
            best = tf.math.unsorted_segment_min(ranks, pair_rows, num_words)  # (W,)
            chosen = tf.logical_and(
                tf.equal(ranks, tf.gather(best, pair_rows)), ranks < _NO_MERGE
            )  # (M - 1,)
            # Occurrences of a pair overlap only in runs like "a a a": within a
            # run of chosen positions, the reference merges the even offsets.
            # `run` numbers the runs (constant inside one); `first` is where
            # each run begins.
            positions = tf.range(tf.size(chosen))
            run = tf.cumsum(tf.cast(tf.logical_not(chosen), tf.int32))
            first = tf.math.unsorted_segment_min(
                tf.where(chosen, positions, tf.size(chosen)), run, tf.size(chosen) + 1
            )
            even = tf.equal((positions - tf.gather(first, run)) % 2, 0)
            merge = tf.logical_and(chosen, even)  # pair i -> one symbol

            merge_here = tf.concat([merge, [False]], axis=0)  # (M,)
            keep = tf.logical_not(tf.concat([[False], merge], axis=0))  # (M,)
            next_symbols = tf.concat([symbols[1:], [""]], axis=0)
            symbols = tf.where(merge_here, tf.strings.join([symbols, next_symbols]), symbols)
            return (
                tf.boolean_mask(symbols, keep),
                tf.boolean_mask(row_ids, keep),
                tf.reduce_any(merge),
            )

        symbols, row_ids, _ = tf.while_loop(
            lambda symbols, row_ids, changed: changed,
            body,
            (
                words.flat_values,
                tf.cast(words.value_rowids(), tf.int32),
                tf.size(words.flat_values) > 1,  # Else there is no pair at all.
            ),
            shape_invariants=(
                tf.TensorShape([None]),
                tf.TensorShape([None]),
                tf.TensorShape([]),
            ),
        )
        return tf.RaggedTensor.from_value_rowids(
            symbols, tf.cast(row_ids, tf.int64), nrows=words.nrows(), validate=False
        )

    # ------------------------------------------------------------- cleaning

    def _map_characters(self, texts, table):
        """Replaces each character found in `table` (char -> text) in `texts` `(S,)`."""
        chars = tf.strings.unicode_split(texts, "UTF-8")  # (S, (C))
        mapped = table.lookup(chars.flat_values)
        flat = tf.where(tf.equal(mapped, ""), chars.flat_values, mapped)
        return tf.strings.reduce_join(_ragged_from_flat(flat, chars), axis=1)

    def _fix_text(self, texts):
        """In-graph approximation of `clean_text` on strings `(S,)`."""
        # tensorflow-text's regex ops stop at NUL. ftfy deletes NUL together with
        # U+FFFC (remove_control_chars), and U+FFFC is inert in every step before
        # that, so it is a faithful stand-in.
        texts = tf.strings.regex_replace(texts, r"\x00", "\ufffc")
        # ftfy fixes each line separately and stops decoding HTML from the first
        # line that contains "<".
        lines = tf_text.regex_split(texts, r"\n", r"\n")  # (S, (G))
        has_markup = tf.cast(tf.strings.regex_full_match(lines.flat_values, "(?s).*<.*"), tf.int32)
        markup_so_far = tf.cumsum(has_markup)
        before_row = tf.gather(
            tf.concat([[0], markup_so_far], axis=0), lines.row_starts()
        )
        unescape = tf.equal(
            markup_so_far - tf.gather(before_row, lines.value_rowids()), 0
        )  # (G_total,)

        def ftfy_step(segments):
            decoded = self._replace_entities(segments, _FTFY_ENTITY_PATTERN, ftfy=True)
            segments = tf.where(unescape, decoded, segments)
            segments = self._map_characters(segments, self._ftfy_characters)
            segments = tf.strings.regex_replace(segments, _ANSI_ESCAPE_PATTERN, "")
            segments = tf.strings.regex_replace(segments, _CONTROL_CHARS_PATTERN, "")
            return tf_text.normalize_utf8(segments, "NFC")

        def body(segments, _):
            fixed = ftfy_step(segments)
            return fixed, tf.reduce_any(tf.not_equal(fixed, segments))

        segments, _ = tf.while_loop(
            lambda segments, changed: changed,
            body,
            (lines.flat_values, tf.constant(True)),
        )
        for _ in range(2):  # html.unescape(html.unescape(text))
            segments = self._replace_entities(segments, _HTML_ENTITY_PATTERN, ftfy=False)
        return tf.strings.reduce_join(_ragged_from_flat(segments, lines), axis=1)

    def _replace_entities(self, texts, pattern, ftfy):
        """Decodes HTML character references in `texts` `(S,)`.

        `ftfy=True` follows `ftfy.fixes.unescape_html` (`;` required, ftfy's
        upper-case names); `ftfy=False` follows `html.unescape`.
        """
        has_entity = tf.strings.regex_full_match(texts, "(?s).*&.*")

        def decode(texts):
            pieces = tf_text.regex_split(texts, pattern, pattern)  # (S, (P))
            flat = pieces.flat_values
            is_entity = tf.strings.regex_full_match(flat, pattern)
            numeric_pattern = (
                _NUMERIC_ENTITY_STRICT_PATTERN if ftfy else _NUMERIC_ENTITY_PATTERN
            )
            is_numeric = tf.strings.regex_full_match(flat, numeric_pattern)
            numeric = self._decode_numeric_references(flat)
            if ftfy:
                named = self._ftfy_entities.lookup(flat)
                # ftfy keeps a reference whose decoded text contains ";".
                numeric = tf.where(
                    tf.strings.regex_full_match(numeric, "(?s).*;.*"), flat, numeric
                )
            else:
                named = self._html_entities.lookup(flat)
                # Otherwise the longest legacy name (no ";") that is a prefix.
                is_legacy = tf.strings.regex_full_match(flat, self._legacy_entity_pattern)
                name = tf.strings.regex_replace(flat, self._legacy_entity_pattern, r"&\1")
                rest = tf.strings.regex_replace(flat, self._legacy_entity_pattern, r"\2")
                legacy = tf.strings.join([self._html_entities.lookup(name), rest])
                named = tf.where(
                    tf.logical_and(tf.equal(named, ""), is_legacy), legacy, named
                )
            # No entity decodes to "", so "" marks "not found": keep the text.
            named = tf.where(tf.equal(named, ""), flat, named)
            decoded = tf.where(is_numeric, numeric, named)
            flat = tf.where(is_entity, decoded, flat)
            return tf.strings.reduce_join(_ragged_from_flat(flat, pieces), axis=1)

        return _replace_rows(texts, has_entity, decode)

    def _decode_numeric_references(self, references):
        """`&#NN;` / `&#xNN;` (`;` optional) -> text, with `html.unescape`'s rules.

        Entries that are not numeric references give unspecified text.
        """
        digits = tf.strings.regex_replace(
            references, r"^&#[xX]?0*([0-9a-fA-F]*);?$", r"\1"
        )
        is_hex = tf.strings.regex_full_match(references, "&#[xX].*")
        codes = tf.strings.unicode_decode(digits, "UTF-8")  # (R, (D))
        values = tf.cast(codes.flat_values, tf.int64)
        values = tf.where(
            values >= ord("a"), values - ord("a") + 10,
            tf.where(values >= ord("A"), values - ord("A") + 10, values - ord("0")),
        )
        base = tf.where(is_hex, tf.constant(16, tf.int64), tf.constant(10, tf.int64))
        num_digits = codes.row_lengths()
        # Seven significant digits or fewer fit comfortably in int64; longer
        # numbers are beyond U+10FFFF in either base.
        too_long = num_digits > 7
        position = tf.cast(codes.value_rowids(), tf.int64)
        index_in_row = tf.range(tf.size(values, out_type=tf.int64)) - tf.gather(
            codes.row_starts(), position
        )
        exponent = tf.gather(num_digits, position) - 1 - index_in_row
        exponent = tf.minimum(exponent, 7)
        weights = tf.cast(
            tf.pow(tf.cast(tf.gather(base, position), tf.float64), tf.cast(exponent, tf.float64)),
            tf.int64,
        )
        value = tf.math.unsorted_segment_sum(
            values * weights, position, tf.shape(references, out_type=tf.int64)[0]
        )  # (R,)
        invalid = (
            too_long
            | (value < 0)  # Only for entries that are not numeric references.
            | (value > 0x10FFFF)
            | ((value >= 0xD800) & (value <= 0xDFFF))
        )
        code_points = tf.cast(tf.where(invalid, tf.zeros_like(value), value), tf.int32)
        text = tf.strings.unicode_encode(tf.expand_dims(code_points, 1), "UTF-8")
        special = self._numeric_specials.lookup(tf.where(invalid, -tf.ones_like(value), value))
        text = tf.where(tf.equal(special, "\x00"), text, special)
        return tf.where(invalid, _REPLACEMENT_CHARACTER, text)

    # -------------------------------------------------------------- decoding

    def detokenize(self, token_ids):
        """Decodes token ids back to text, like OpenAI's `SimpleTokenizer.decode`.

        Start tokens are dropped and decoding stops at the first end token, so
        padded output of `call` decodes to the text between the special tokens
        (words end with a space, as in the reference).

        Args:
            token_ids: integer tensor of shape `(B, T)` (or `(T,)` -> `(1,)`).

        Returns:
            `tf.string` tensor of shape `(B,)`.
        """
        token_ids = tf.convert_to_tensor(token_ids)
        if token_ids.shape.rank == 1:
            token_ids = tf.expand_dims(token_ids, 0)
        token_ids = tf.cast(token_ids, tf.int32)  # (B, T)
        before_end = tf.equal(
            tf.cumsum(tf.cast(tf.equal(token_ids, self.end_token_id), tf.int32), axis=1), 0
        )
        keep = tf.logical_and(before_end, tf.not_equal(token_ids, self.start_token_id))
        ids = tf.ragged.boolean_mask(token_ids, keep)  # (B, (T'))
        tokens = tf.gather(self._vocabulary, ids)
        text = tf.strings.reduce_join(tokens, axis=1)  # byte-encoded, (B,)
        chars = tf.strings.unicode_split(text, "UTF-8")
        byte_values = self._byte_decoder.lookup(chars.flat_values)
        text = tf.strings.reduce_join(_ragged_from_flat(byte_values, chars), axis=1)
        text = tf.strings.unicode_transcode(
            text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
        )
        return tf.strings.regex_replace(text, END_OF_WORD, " ")

    # --------------------------------------------------------------- config

    def compute_output_shape(self, input_shape):
        batch = input_shape[0] if len(input_shape) else 1
        return (batch, self.context_length)

    def compute_output_spec(self, texts):
        return keras.KerasTensor(
            self.compute_output_shape(texts.shape), dtype=self.compute_dtype
        )

    def get_config(self):
        config = super().get_config()
        config.update({"context_length": self.context_length, "fix_text": self.fix_text})
        return config


@functools.lru_cache(maxsize=8)
def _host_tokenizer(context_length):
    """A `fix_text=False` layer and its traced call, built once per length."""
    layer = CLIPTokenizer(context_length=context_length, fix_text=False, name="clip_tokenizer")
    logging.info("Built CLIPTokenizer(context_length=%d) for tokenize().", context_length)
    return tf.function(
        layer.call, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False
    )


def tokenize(texts, context_length=77):
    """Tokenizes text like `clip.tokenize` / `open_clip.tokenize`, exactly.

    Runs the reference's host-side cleaning (`clean_text`: ftfy, HTML
    unescaping, including mojibake repair) in Python and the rest in the graph
    with `CLIPTokenizer(fix_text=False)`. Identical to the reference except for
    characters newer than the TF libraries' Unicode tables (see
    `CLIPTokenizer`).

    Args:
        texts: a `str` or a list of `str`.
        context_length: int, length of every output row. Defaults to 77.

    Returns:
        `tf.int32` tensor of shape `(len(texts), context_length)`.
    """
    if isinstance(texts, str):
        texts = [texts]
    cleaned = tf.constant([clean_text(text) for text in texts], dtype=tf.string, shape=[len(texts)])
    return _host_tokenizer(int(context_length))(cleaned)
