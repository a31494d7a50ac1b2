"""One definition of blank text (`str.isspace` whitespace), in Python and in the graph.

The input pipeline (caption choice, evaluation pairs), shard conversion, the
tokenizer and the export's text check all use `text_cleaning.is_blank` /
`blank_mask`; these tests feed each of them Unicode whitespace (U+3000, U+00A0).
"""
import numpy as np
import pytest
import tensorflow as tf

from keras_clip.data import pipeline, shards
from keras_clip.export.saved_model import CLIPServingModule
from keras_clip.preprocessing import text_cleaning, tokenizer
from keras_clip.preprocessing.text_cleaning import blank_mask, is_blank
from tests.harness import encode, sample_photo, tiny_clip

UNICODE_BLANKS = ["\u3000", "\u00a0", " \u3000\u00a0\t\n", "\u2028\u200a\x1c", ""]
NOT_BLANK = ["a", "\u200b", "\u3000a\u00a0", "\ufeff", "\x00"]


def test_python_rule_is_str_isspace():
    assert [is_blank(t) for t in UNICODE_BLANKS] == [True] * len(UNICODE_BLANKS)
    assert [is_blank(t) for t in NOT_BLANK] == [False] * len(NOT_BLANK)


def test_graph_rule_equals_python_rule_on_every_code_point():
    codes = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = [chr(c) for c in codes] + [chr(c) * 3 for c in codes[::97]] + UNICODE_BLANKS + NOT_BLANK
    graph = blank_mask(tf.constant(texts)).numpy()
    python = np.array([is_blank(t) for t in texts])
    np.testing.assert_array_equal(graph, python)
    assert int(python[:len(codes)].sum()) == 29  # Python 3.11: 29 whitespace code points


def test_tokenizer_reads_blank_text_as_empty():
    ids = tokenizer.CLIPTokenizer(context_length=6)(UNICODE_BLANKS).numpy()
    expected = np.array([[49406, 49407, 0, 0, 0, 0]] * len(UNICODE_BLANKS))
    np.testing.assert_array_equal(ids, expected)
    assert tokenizer.is_blank is text_cleaning.is_blank  # the old module re-exports


def test_pipeline_skips_unicode_blank_captions():
    caption, found = pipeline._choose_caption(
        tf.constant(["\u3000\u00a0", "\u00a0", "a dog", "\u3000"]), tf.constant([0, 0], tf.int64), training=False)
    assert (caption.numpy().decode(), bool(found)) == ("a dog", True)
    caption, found = pipeline._choose_caption(
        tf.constant(UNICODE_BLANKS), tf.constant([0, 0], tf.int64), training=True)
    assert (caption.numpy(), bool(found)) == (b"", False)


def test_tfrecord_evaluation_pairs_drop_unicode_blank_captions(tmp_path):
    image = encode(sample_photo().resize((40, 40)))
    shards.write_shards([("a", image, ["\u3000", "a woman", "\u00a0 "]), ("b", image, ["\u3000\u00a0"])],
                        str(tmp_path), prefix="val")
    images, captions = pipeline.load_image_caption_pairs(str(tmp_path / "val-*.tfrecord"))
    assert (len(images), captions) == (1, [["a woman"]])


def test_table_reader_counts_unicode_blank_captions(tmp_path):
    table = tmp_path / "captions.csv"
    table.write_text("image,caption\nx.jpg,\u3000\nx.jpg,a cat\ny.jpg,\u00a0\u3000\n", encoding="utf-8")
    records, counts = shards.read_caption_table(str(table))
    assert records == [("x", "x.jpg", ["a cat"])]
    assert (counts["empty_captions"], counts["records"]) == (2, 1)


def test_export_text_check_rejects_unicode_blank_text():
    module = CLIPServingModule(tiny_clip())
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty or whitespace-only string at batch index.*1"):
        module.encode_text(tf.constant(["a cat", "\u3000\u00a0"]))
    out = module.encode_text(tf.constant(["a cat", "\u3000a"]))["text_embeddings"].numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
