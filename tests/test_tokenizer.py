"""Tests for keras_clip.preprocessing.tokenizer against open_clip's tokenizer."""
import csv
import doctest
import html
import json
import os
import subprocess
import sys

import ftfy
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip.preprocessing import tokenizer as tokenizer_lib
from keras_clip.preprocessing.tokenizer import CLIPTokenizer, clean_text, tokenize

# Strings that stress every cleaning and splitting step. Both `tokenize()` and
# the in-graph layer must match open_clip exactly on all of them.
HARD_STRINGS = [
    # Accents, composed and decomposed (NFC), and combining marks.
    "café", "naïve résumé", "Ångström", "CAFÉ", "cafe\u0301", "e\u0301\u0302 a\u0308",
    "a\u0345b .\u0345.",  # U+0345: IGNORECASE makes OpenAI's regex drop it.
    # Emoji, CJK, Hangul, Arabic, Hebrew.
    "I ❤️ 🐶🐱 emoji 👩‍👩‍👧", "東京タワーの写真", "한국어 텍스트", "مرحبا بالعالم", "שלום",
    # HTML entities: ftfy decodes to a fixed point unless a line has "<";
    # html.unescape twice also handles legacy names without ";" and numbers.
    "Tom &amp; Jerry", "it&#39;s", "&quot;quoted&quot;", "&apos;x&apos;",
    "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;amp;", "<b>&amp;amp;amp;</b>",
    "line one &amp;amp;\n<i>x</i> &amp;amp;", "&nbsp;x&nbsp;", "&#x2019;s",
    "&rsquo;s", "&eacute;t&eacute;", "&EACUTE;", "&ampx", "&notit;", "&copy 2020",
    "&#128;", "&#0;", "&#59;", "&#xD800;", "&#99999999999;", "&#x110000;", "&#65&#66",
    "AT&T", "a & b",
    # Digits: every digit is its own word.
    "2019", "3.14", "1,000,000", "１２３", "٣٤٥", "½ ² ⅷ",
    # Apostrophes and contractions, straight and curly.
    "she's they're we'll I've I'm he'd don't", "SHE'S", "it’s", "‘single’ “double”",
    "'ſ", "l'amour",
    # Fullwidth/halfwidth forms and ligatures (ftfy).
    "ＬＯＵＤ　ＮＯＩＳＥＳ", "Ｕﾀｰﾝ", "ﬁne ﬂuﬃest", "Ĳssel ǅ", "ŉ",
    # Whitespace that Python splits on but RE2's \s does not, control characters,
    # terminal escapes, C1 controls (read as Windows-1252 by ftfy).
    "a\tb\nc\r\nd", "x\u3000y\xa0z\u2003w\u202fv", "a\x1cb\x1fc", "a\x85b", "a\x0bb",
    "line1\u2028line2", "\x1b[31mred\x1b[0m", "zero\u200bwidth", "\ufeffbom", "\x80\x91\x92",
    "nul\x00byte",
    # Case mapping: final sigma, dotted I, sharp s.
    "ΣΑΣ ὈΔΥΣΣΕΎΣ", "İstanbul", "ß STRASSE", "ǅ",
    # Empty, whitespace only, punctuation only, special tokens spelled out.
    "", "   ", "\t\n \u3000", "!!!", "...?!", "@#$%^&*()", "<start_of_text>",
    "<end_of_text> hi", "</w>",
    # Longer than the context: truncated, 49407 last.
    " ".join(["word"] * 100), "a" * 300, "supercalifragilisticexpialidocious" * 5, "ab" * 200,
]

# Documented differences of the in-graph path, each with the reference text it
# does tokenize like. Mojibake repair (ftfy.fix_encoding) is host-only.
MOJIBAKE_STRINGS = ["cafÃ©", "â€™", "naÃ¯ve Ã©tÃ©"]
# Letters assigned after Unicode 15.1 (RE2's tables) split as punctuation, in
# both paths; U+0C5C is a Unicode 16 Telugu letter.
NEW_LETTER = ("ab\u0c5ccd", "ab \u0c5c cd")
# ICU (tf.strings.lower) predates Unicode 14, so U+1AC7 does not count as
# case-ignorable for the final-sigma rule.
FINAL_SIGMA = ("Α\u1ac7Σ", "α\u1ac7σ")


def read_captions(flickr8k_dir):
    with open(flickr8k_dir / "captions.tsv", encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row["caption"] for row in rows]


@pytest.fixture(scope="module")
def captions(flickr8k_dir):
    return read_captions(flickr8k_dir)


@pytest.fixture(scope="module")
def reference_caption_ids(open_clip_module, captions):
    return open_clip_module.tokenize(captions).numpy()


@pytest.fixture(scope="module")
def layer():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def traced(layer):
    return tf.function(layer, input_signature=[tf.TensorSpec([None], tf.string)])


def run_in_batches(fn, texts, batch_size=1024):
    starts = range(0, len(texts), batch_size)
    return np.concatenate([fn(tf.constant(texts[i : i + batch_size])).numpy() for i in starts])


def mismatched(texts, ids, reference_ids):
    return [text for text, a, b in zip(texts, ids, reference_ids) if not np.array_equal(a, b)]


def reference_without_mojibake_repair(open_clip_module, texts):
    """open_clip's tokenizer with ftfy's fix_encoding step turned off."""
    tok = open_clip_module.tokenizer.SimpleTokenizer()
    tok.clean_fn = lambda t: " ".join(
        html.unescape(html.unescape(ftfy.fix_text(t, fix_encoding=False))).split()
    ).lower()
    return tok(texts).numpy()


# ------------------------------------------------------------------ parity


def test_tokenize_matches_open_clip_on_all_flickr8k_captions(captions, reference_caption_ids, flickr8k_dir):
    rows = (flickr8k_dir / "captions.tsv").read_text(encoding="utf-8").count("\n") - 1
    assert len(captions) == rows  # 40,455 in the real data
    ids = tokenize(captions).numpy()
    assert ids.dtype == np.int32 and ids.shape == (rows, 77)
    assert mismatched(captions, ids, reference_caption_ids) == []


def test_in_graph_layer_matches_open_clip_on_all_flickr8k_captions(
    captions, reference_caption_ids, traced
):
    ids = run_in_batches(traced, captions)
    assert mismatched(captions, ids, reference_caption_ids) == []


def test_tokenize_matches_open_clip_on_hard_strings(open_clip_module):
    ids = tokenize(HARD_STRINGS).numpy()
    reference = open_clip_module.tokenize(HARD_STRINGS).numpy()
    assert mismatched(HARD_STRINGS, ids, reference) == []


def test_in_graph_layer_matches_open_clip_on_hard_strings(open_clip_module, traced):
    ids = traced(tf.constant(HARD_STRINGS)).numpy()
    reference = open_clip_module.tokenize(HARD_STRINGS).numpy()
    assert mismatched(HARD_STRINGS, ids, reference) == []


def test_tokenize_repairs_mojibake_like_open_clip(open_clip_module):
    ids = tokenize(MOJIBAKE_STRINGS).numpy()
    np.testing.assert_array_equal(ids, open_clip_module.tokenize(MOJIBAKE_STRINGS).numpy())


def test_in_graph_layer_skips_only_mojibake_repair(open_clip_module, traced):
    ids = traced(tf.constant(MOJIBAKE_STRINGS)).numpy()
    reference = open_clip_module.tokenize(MOJIBAKE_STRINGS).numpy()
    assert all(not np.array_equal(a, b) for a, b in zip(ids, reference))
    # Exactly the reference with ftfy's fix_encoding turned off.
    np.testing.assert_array_equal(
        ids, reference_without_mojibake_repair(open_clip_module, MOJIBAKE_STRINGS)
    )
    # "cafÃ©" keeps its mojibake: "caf", "ã", "©" instead of "café".
    assert ids[0, 1] != open_clip_module.tokenize(["café"]).numpy()[0, 1]


def test_letters_newer_than_unicode_15_1_split_as_punctuation(open_clip_module, traced):
    text, as_split = NEW_LETTER
    reference = open_clip_module.tokenize([text, as_split]).numpy()
    assert not np.array_equal(reference[0], reference[1])
    np.testing.assert_array_equal(traced(tf.constant([text])).numpy()[0], reference[1])
    np.testing.assert_array_equal(tokenize(text).numpy()[0], reference[1])


def test_final_sigma_ignores_unicode_14_case_ignorable_marks(open_clip_module, traced):
    text, icu_lowercase = FINAL_SIGMA
    reference = open_clip_module.tokenize([text, icu_lowercase]).numpy()
    assert not np.array_equal(reference[0], reference[1])
    np.testing.assert_array_equal(traced(tf.constant([text])).numpy()[0], reference[1])


def test_clean_text_is_the_reference_basic_clean(open_clip_module):
    for text in HARD_STRINGS + MOJIBAKE_STRINGS:
        assert clean_text(text) == open_clip_module.tokenizer.basic_clean(text)


def test_vocabulary_matches_open_clip_encoder(open_clip_module):
    vocabulary = tokenizer_lib.build_vocabulary(tokenizer_lib.load_merges())
    assert len(vocabulary) == 49408
    assert vocabulary == list(open_clip_module.tokenizer.SimpleTokenizer().encoder)


def test_every_whole_word_token_is_what_bpe_makes_of_its_word(open_clip_module):
    # The layer maps words found whole in the vocabulary straight to their id;
    # that is exact because reference BPE reproduces every such token.
    reference = open_clip_module.tokenizer.SimpleTokenizer()
    tokens = [t for t in tokenizer_lib.build_vocabulary(tokenizer_lib.load_merges())
              if t.endswith("</w>")]
    assert len(tokens) == 34483
    assert [t for t in tokens if reference.bpe(t[: -len("</w>")]) != t] == []


# ------------------------------------------------------- shapes and tokens


def test_output_has_start_ids_end_and_zero_padding(layer):
    ids = layer(tf.constant(["a dog", "", "two dogs run"])).numpy()
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[:, :5], [
        [49406, 320, 1929, 49407, 0],
        [49406, 49407, 0, 0, 0],
        [49406, 1237, 3255, 1934, 49407],  # open_clip.tokenize
    ])
    assert not ids[:, 5:].any()
    assert (layer.vocabulary_size, layer.start_token_id, layer.end_token_id,
            layer.pad_token_id, layer.context_length) == (49408, 49406, 49407, 0, 77)


def test_long_text_is_truncated_with_end_token_last(open_clip_module, layer):
    text = " ".join(["word"] * 100)
    ids = layer(tf.constant([text])).numpy()[0]
    np.testing.assert_array_equal(ids, open_clip_module.tokenize([text]).numpy()[0])
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:-1] == 2653).all()


def test_context_length_16_matches_open_clip_truncation(open_clip_module, captions):
    layer = CLIPTokenizer(context_length=16)
    texts = captions[:200] + HARD_STRINGS
    ids = layer(tf.constant(texts)).numpy()
    assert ids.shape == (len(texts), 16)
    reference = open_clip_module.tokenize(texts, context_length=16).numpy()
    assert mismatched(texts, ids, reference) == []
    assert (ids[:, -1] == 49407).sum() > 0
    np.testing.assert_array_equal(tokenize(texts, context_length=16).numpy(), reference)


def test_scalar_empty_batch_and_blank_strings(layer, traced):
    scalar = layer(tf.constant("a dog")).numpy()
    assert scalar.shape == (1, 77) and list(scalar[0, :4]) == [49406, 320, 1929, 49407]
    np.testing.assert_array_equal(layer(["a dog"]).numpy(), scalar)  # Python list input.
    empty = traced(tf.constant([], dtype=tf.string)).numpy()
    assert empty.shape == (0, 77) and empty.dtype == np.int32
    blanks = traced(tf.constant(["", "   ", "\u3000\xa0\t"])).numpy()
    np.testing.assert_array_equal(blanks[:, :3], [[49406, 49407, 0]] * 3)


def test_invalid_context_length_is_rejected():
    with pytest.raises(ValueError, match="context_length"):
        CLIPTokenizer(context_length=1)


# ------------------------------------------------------ Keras and tf.data


def test_config_round_trip_keeps_arguments_and_output():
    layer = CLIPTokenizer(context_length=16, fix_text=False, name="tok", dtype="int64")
    config = layer.get_config()
    assert config["context_length"] == 16 and config["fix_text"] is False
    restored = CLIPTokenizer.from_config(config)
    assert restored.get_config() == config
    texts = tf.constant(["A dog &amp; a cat", "Ｗide"])
    np.testing.assert_array_equal(restored(texts).numpy(), layer(texts).numpy())
    assert restored(texts).dtype == tf.int64



def test_fix_text_false_leaves_entities_to_clean_text(open_clip_module):
    layer = CLIPTokenizer(fix_text=False)
    ids = layer(tf.constant(["A dog &amp; a cat"])).numpy()
    # The entity stays literal: "&", "amp", ";" are three words.
    np.testing.assert_array_equal(ids, open_clip_module.tokenize(["a dog & amp ; a cat"]).numpy())
    fixed = CLIPTokenizer()(tf.constant(["A dog &amp; a cat"])).numpy()
    np.testing.assert_array_equal(fixed, open_clip_module.tokenize(["a dog & a cat"]).numpy())


def test_keras_model_saves_and_reloads_from_keras_file(tmp_path):
    inputs = keras.Input(shape=(), dtype="string")
    model = keras.Model(inputs, CLIPTokenizer(context_length=16)(inputs))
    assert model.output.shape == (None, 16) and model.output.dtype == "int32"
    path = str(tmp_path / "tokenizer.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    texts = tf.constant(["A dog &amp; a cat", "café"])
    np.testing.assert_array_equal(restored(texts).numpy(), model(texts).numpy())


def test_dataset_map_gives_the_same_ids(layer, captions, reference_caption_ids):
    dataset = tf.data.Dataset.from_tensor_slices(captions[:600]).batch(256).map(layer)
    ids = np.concatenate(list(dataset.as_numpy_iterator()))
    np.testing.assert_array_equal(ids, reference_caption_ids[:600])


def test_saved_model_reloads_with_only_tensorflow_text(tmp_path, layer):
    class Serving(tf.Module):
        def __init__(self, tokenizer):
            super().__init__()
            self.tokenizer = tokenizer

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")])
        def serve(self, texts):
            return {"token_ids": self.tokenizer(texts)}

    texts = ["A dog &amp; a cat", "Ｌoud ﬁsh café", "", "it’s 2019"]
    export_dir = str(tmp_path / "saved_model")
    tf.saved_model.save(Serving(layer), export_dir)

    from tensorflow.python.saved_model import loader_impl

    saved_model = loader_impl.parse_saved_model(export_dir)
    ops = set()
    for graph in saved_model.meta_graphs:
        ops |= {node.op for node in graph.graph_def.node}
        for function in graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    assert "RegexSplitWithOffsets" in ops and "LookupTableFindV2" in ops
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}

    script = (
        "import json, sys\n"
        "import tensorflow as tf\n"
        "import tensorflow_text  # noqa: F401 (registers the ops)\n"
        f"model = tf.saved_model.load({export_dir!r})\n"
        f"ids = model.serve(tf.constant({texts!r}))['token_ids'].numpy()\n"
        "assert not any(m.startswith('keras_clip') for m in sys.modules)\n"
        "print(json.dumps(ids.tolist()))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    reloaded = np.array(json.loads(result.stdout.strip().splitlines()[-1]))
    np.testing.assert_array_equal(reloaded, layer(tf.constant(texts)).numpy())


# -------------------------------------------------------------- decoding


def test_detokenize_matches_open_clip_decode(open_clip_module, layer, captions):
    texts = captions[:300] + ["café ☕ 東京", "it's 3.14!"]
    ids = layer(tf.constant(texts)).numpy()
    decoded = [t.decode("utf-8") for t in layer.detokenize(ids).numpy()]
    reference = open_clip_module.tokenizer._tokenizer
    for row, text in zip(ids, decoded):
        content = row[1 : int(np.argmax(row == 49407))]
        assert text == reference.decode(content)
    assert decoded[0] == " ".join(captions[0].lower().split()) + " "


def test_docstring_example_runs():
    results = doctest.testmod(
        tokenizer_lib,
        extraglobs={"tf": tf, "CLIPTokenizer": CLIPTokenizer},
        optionflags=doctest.NORMALIZE_WHITESPACE,
    )
    assert results.attempted >= 2 and results.failed == 0
