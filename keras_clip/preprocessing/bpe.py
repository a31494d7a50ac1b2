"""OpenAI CLIP's byte-level BPE: vocabulary, byte table and the in-graph merges.

`BytePairEncoding` holds the graph code of the merges; `CLIPTokenizer`
(`keras_clip.preprocessing.tokenizer`) combines it with the text cleaning
(`keras_clip.preprocessing.text_cleaning`). The reference is OpenAI's
`SimpleTokenizer.bpe`.
"""
import gzip
import os

import tensorflow as tf

from keras_clip.preprocessing._tensors import _ragged_from_flat

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
_NO_MERGE = 2**31 - 1


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


class BytePairEncoding:
    """The BPE half of `CLIPTokenizer`: word -> token ids, in the graph.

    A mixin: the layer creates the tables it reads (`_byte_encoder`,
    `_merge_ranks`, `_token_to_id`) and the `start_token_id`/`end_token_id`.
    """

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
