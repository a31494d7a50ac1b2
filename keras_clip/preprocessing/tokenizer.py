"""OpenAI CLIP byte-level BPE tokenizer as a Keras layer that runs in a TF graph.

The reference is `clip.tokenize` from openai/CLIP, which open_clip ships as
`open_clip.tokenize` / `SimpleTokenizer`. `CLIPTokenizer.call` is built only from
TensorFlow core and tensorflow-text ops (no `py_function`), so it runs inside
`tf.data`, `tf.function` and exported SavedModels. `tokenize` is the host-side
twin of `clip.tokenize`: it runs the Python cleaning (`clean_text`) and then the
same layer.
"""
import functools

import keras
import tensorflow as tf
from absl import logging

# The BPE and the text cleaning live in their own modules; their names stay
# importable from here.
from keras_clip.preprocessing._tensors import _ragged_from_flat, _replace_rows, _static_table  # noqa: F401
from keras_clip.preprocessing.bpe import (END_OF_TEXT, END_OF_WORD, NUM_MERGES, START_OF_TEXT,  # noqa: F401
                                          VOCABULARY_FILE, VOCABULARY_SIZE, _NO_MERGE, BytePairEncoding,
                                          build_vocabulary, bytes_to_unicode, load_merges)
from keras_clip.preprocessing.text_cleaning import (_ANSI_ESCAPE_PATTERN, _ASCII_PATTERN,  # noqa: F401
                                                    _CONTROL_CHARS_PATTERN, _FTFY_ENTITY_PATTERN,
                                                    _HTML_ENTITY_PATTERN, _NUMERIC_ENTITY_PATTERN,
                                                    _NUMERIC_ENTITY_STRICT_PATTERN, _PLAIN_ASCII_PATTERN,
                                                    _REPLACEMENT_CHARACTER, TextCleaning, _fixed_point,
                                                    _ftfy_character_map, _numeric_reference_specials,
                                                    _python_lowercase_map, _python_whitespace_class,
                                                    blank_mask, clean_text, is_blank)

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



@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPTokenizer(TextCleaning, BytePairEncoding, keras.layers.Layer):
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

    # ----------------------------------------------------------------- call

    # TensorFlow control flow throughout, so AutoGraph (which a `tf.data` map or a
    # `tf.function` applies) is skipped: its conversion only slowed the trace.
    @tf.autograph.experimental.do_not_convert
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


@functools.lru_cache(maxsize=16)
def traced_tokenizer(context_length=77, fix_text=True):
    """`CLIPTokenizer(context_length, fix_text)` as a `tf.function` over a batch of
    strings, built and traced once per process and argument pair.

    Graphs that tokenize (every `tf.data` pipeline, `tokenize()`) call it instead of
    tracing the layer again: its trace (the in-graph text cleaning above all) took
    about 9 s per pipeline on a 2-core 2.0 GHz Xeon. A call from another graph adds a
    call to the traced function.

    Returns:
        a function of a `tf.string` tensor of shape `(B,)` -> `int32` `(B, context_length)`.
    """
    layer = CLIPTokenizer(context_length=context_length, fix_text=fix_text, name="clip_tokenizer")
    logging.info("Built CLIPTokenizer(context_length=%d, fix_text=%s) for traced use.",
                 context_length, fix_text)
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
    return traced_tokenizer(int(context_length), False)(cleaned)
