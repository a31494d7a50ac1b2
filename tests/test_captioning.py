"""Predictive baselines (Figure 2): losses against numpy / hand-computed values, decoder
causality, likelihood scoring against the model's own logits, zero-shot on known answers."""
import doctest
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip.models import captioning
from keras_clip.models.captioning import (
    BagOfWordsPredictionHead, CaptionDecoder, CaptionPredictionModel,
    bag_of_words_prediction_loss, bag_of_words_targets, caption_lm_loss,
    zero_shot_by_likelihood)

V, START, END = 64, 62, 63  # a small vocabulary with its own start and end ids
IGNORE = (0, START, END)
TINY = dict(embed_dim=16, image_size=32, vision_num_layers=1, vision_hidden_dim=32,
            vision_num_heads=2, vision_patch_size=16, vocabulary_size=V, context_length=8,
            decoder_hidden_dim=32, decoder_num_layers=1, decoder_num_heads=2,
            start_token_id=START, end_token_id=END)


def _model(head, seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    return CaptionPredictionModel(head, **dict(TINY, **overrides))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _captions(rng, n, length, pad_from):
    """`[START, words..., END, 0...]` rows, with words repeated (ids 1..5) and
    `pad_from[i]` the row's first padding position."""
    ids = np.zeros((n, length), np.int32)
    for i in range(n):
        ids[i, 0] = START
        ids[i, 1:pad_from[i] - 1] = rng.integers(1, 6, size=pad_from[i] - 2)
        ids[i, pad_from[i] - 1] = END
    return ids


# ---------------------------------------------------------------------------------------
# Bag-of-words targets and loss
# ---------------------------------------------------------------------------------------


def _numpy_targets(ids, vocabulary, ignore):
    out = np.zeros((len(ids), vocabulary))
    for i, row in enumerate(ids):
        words = [t for t in row if t not in ignore]
        for t in words:
            out[i, t] += 1.0 / len(words)
    return out


def test_bag_of_words_targets_match_numpy_counts():
    ids = _captions(np.random.default_rng(0), 5, 8, pad_from=[8, 5, 3, 7, 4])
    ids[2] = [START, END, 0, 0, 0, 0, 0, 0]  # no word token: all zeros
    got = np.asarray(bag_of_words_targets(ids, V, IGNORE))
    np.testing.assert_allclose(got, _numpy_targets(ids, V, IGNORE), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got[2], 0.0)
    np.testing.assert_allclose(got.sum(axis=1), [1, 1, 0, 1, 1], rtol=1e-6)
    # A hand-written row: "5 7 5" -> 2/3 on 5, 1/3 on 7.
    row = np.asarray(bag_of_words_targets([[START, 5, 7, 5, END, 0]], V, IGNORE))[0]
    assert row[5] == pytest.approx(2 / 3) and row[7] == pytest.approx(1 / 3)
    assert np.count_nonzero(row) == 2
    # The default ignore ids are OpenAI's (0, 49406, 49407).
    default = np.asarray(bag_of_words_targets([[49406, 320, 1929, 320, 49407, 0]], 49408))[0]
    assert default[320] == pytest.approx(2 / 3) and default[1929] == pytest.approx(1 / 3)
    assert default[49406] == 0 and default[49407] == 0 and default[0] == 0


def test_bag_of_words_prediction_loss_matches_numpy_and_skips_empty_rows():
    rng = np.random.default_rng(1)
    ids = _captions(rng, 6, 8, pad_from=[8, 5, 3, 7, 4, 6])
    ids[3] = [START, END, 0, 0, 0, 0, 0, 0]
    logits = rng.normal(0, 3, size=(6, V)).astype(np.float32)
    targets = _numpy_targets(ids, V, IGNORE)
    per_row = -(targets * _log_softmax(logits)).sum(axis=1)
    expected = per_row[[0, 1, 2, 4, 5]].mean()  # the row without words is left out
    got = bag_of_words_prediction_loss(logits, ids, IGNORE)
    assert got.dtype == "float32"
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # bf16 logits: the loss is still float32, computed from the bf16 values.
    rounded = np.asarray(keras.ops.cast(keras.ops.cast(logits, "bfloat16"), "float32"))
    got16 = bag_of_words_prediction_loss(keras.ops.cast(logits, "bfloat16"), ids, IGNORE)
    assert got16.dtype == "float32"
    expected16 = (-(targets * _log_softmax(rounded)).sum(axis=1))[[0, 1, 2, 4, 5]].mean()
    assert float(got16) == pytest.approx(expected16, rel=1e-5)
    # No row with a word: 0.0, not NaN.
    assert float(bag_of_words_prediction_loss(logits[:1], ids[3:4], IGNORE)) == 0.0


# ---------------------------------------------------------------------------------------
# Caption language-model loss
# ---------------------------------------------------------------------------------------


def test_caption_lm_loss_hand_computed_case():
    # Vocabulary {0: pad, 1, 2}; caption [2, 1, 2, pad]. Position 0 predicts 1 with
    # uniform logits: -log(1/3). Position 1 predicts 2 with logits (0, 0, ln 2), i.e.
    # probabilities (1/4, 1/4, 1/2): -log(1/2). Position 2's target is padding and
    # position 3 predicts nothing: their logits must not matter.
    logits = np.array([[[0.0, 0.0, 0.0],
                        [0.0, 0.0, math.log(2.0)],
                        [5.0, -3.0, 9.0],
                        [-7.0, 4.0, 1.0]]], np.float32)
    ids = np.array([[2, 1, 2, 0]])
    expected = (math.log(3.0) + math.log(2.0)) / 2  # = ln(6) / 2 = 0.8958797...
    assert float(caption_lm_loss(logits, ids)) == pytest.approx(expected, rel=1e-6)
    assert float(caption_lm_loss(logits, ids)) == pytest.approx(0.8958797346140275, rel=1e-6)


def test_caption_lm_loss_matches_numpy_with_padding():
    rng = np.random.default_rng(2)
    ids = _captions(rng, 4, 8, pad_from=[8, 3, 6, 5])
    logits = rng.normal(0, 2, size=(4, 8, V)).astype(np.float32)
    log_probs = _log_softmax(logits)
    terms = [-log_probs[b, t, ids[b, t + 1]]
             for b in range(4) for t in range(7) if ids[b, t + 1] != 0]
    got = caption_lm_loss(keras.ops.cast(logits, "bfloat16"), ids)
    assert got.dtype == "float32"
    assert float(caption_lm_loss(logits, ids)) == pytest.approx(np.mean(terms), rel=1e-5)
    assert len(terms) == 7 + 2 + 5 + 4  # the end token is a target, padding is not


# ---------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------


def test_decoder_is_causal_and_conditioned_on_the_image():
    keras.utils.set_random_seed(3)
    decoder = CaptionDecoder(vocabulary_size=V, context_length=8, hidden_dim=32, num_layers=2,
                             num_heads=2)
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 16)).astype(np.float32)
    ids = _captions(rng, 2, 8, pad_from=[8, 8])
    base = np.asarray(decoder(features, ids))
    assert base.shape == (2, 8, V)
    for t in range(7):
        changed = ids.copy()
        changed[:, t + 1:] = rng.integers(1, V, size=(2, 7 - t))
        out = np.asarray(decoder(features, changed))
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-6)
        assert np.abs(out[:, t + 1] - base[:, t + 1]).max() > 1e-3  # position t+1 saw it
    other = np.asarray(decoder(features + rng.normal(size=features.shape).astype(np.float32), ids))
    assert np.abs(other - base).max(axis=-1).min() > 1e-4  # every position sees the image
    # Output projection tied to the token embedding: no other (D, V) matrix.
    assert sorted(w.shape for w in decoder.weights if V in w.shape) == [(V, 32)]


# ---------------------------------------------------------------------------------------
# Likelihood scoring
# ---------------------------------------------------------------------------------------

PROMPTS = np.array([[START, 5, END, 0, 0, 0, 0, 0],
                    [START, 7, 8, 7, END, 0, 0, 0],
                    [START, 9, 10, 11, 12, 13, END, 0],
                    [START, 3, 3, END, 0, 0, 0, 0]], np.int32)


@pytest.mark.parametrize("head", ["bag_of_words", "transformer"])
def test_prompt_log_likelihood_matches_numpy_from_the_models_logits(head, monkeypatch):
    model = _model(head)
    images = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
    expected = np.zeros((3, len(PROMPTS)))
    for n in range(3):
        for p, prompt in enumerate(PROMPTS):
            if head == "bag_of_words":
                log_probs = _log_softmax(model({"images": images[n:n + 1]})[0])
                expected[n, p] = np.mean([log_probs[t] for t in prompt if t not in IGNORE])
            else:  # teacher forcing: position t - 1 predicts token t
                log_probs = _log_softmax(model({"images": images[n:n + 1],
                                                "token_ids": prompt[None]})[0])
                last = int(np.flatnonzero(prompt)[-1])
                expected[n, p] = np.mean([log_probs[t - 1, prompt[t]] for t in range(1, last + 1)])
    got = model.prompt_log_likelihood(images, PROMPTS)
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Chunked scoring (5 pairs at a time, last chunk padded) gives the same numbers.
    monkeypatch.setattr(captioning, "_SCORING_ELEMENTS", 5 * 7 * V)
    monkeypatch.setattr(captioning, "_IMAGE_CHUNK", 2)
    model._lm_scores_fn = None
    np.testing.assert_allclose(model.prompt_log_likelihood(images, PROMPTS), expected,
                               rtol=1e-5, atol=1e-5)


def test_zero_shot_by_likelihood_averages_templates():
    class Scores:  # prompt_log_likelihood of 1 image for 2 classes x 2 templates
        def prompt_log_likelihood(self, images, prompts):
            assert prompts.shape == (4, 3)
            return np.array([[-1.0, -5.0, -2.5, -2.5]])

    prompts = np.ones((2, 2, 3), np.int32)
    scores = zero_shot_by_likelihood(Scores(), np.zeros((1, 32, 32, 3)), prompts)
    # Means -3.0 and -2.5: class 1 (the best single template would pick class 0).
    np.testing.assert_array_equal(scores, [[-3.0, -2.5]])
    with pytest.raises(ValueError, match=r"`class_prompt_token_ids` must be 3-D .* Received: shape=\(2, 3\)"):
        zero_shot_by_likelihood(Scores(), np.zeros((1, 32, 32, 3)), prompts[0])


def test_bag_of_words_zero_shot_with_hand_set_head():
    # Head weights set so that image n's logits are exactly 10 on word 20 + n and 0
    # elsewhere: the answer and the scores are known without training.
    model = _model("bag_of_words")
    images = np.random.default_rng(5).normal(size=(3, 32, 32, 3)).astype(np.float32)
    features = np.asarray(model.visual(images), np.float64)  # (3, 16), rank 3
    wanted = np.zeros((3, V))
    wanted[np.arange(3), 20 + np.arange(3)] = 10.0
    kernel = np.linalg.pinv(features) @ wanted  # features @ kernel == wanted
    model.caption_head.dense.set_weights([kernel.astype(np.float32), np.zeros(V, np.float32)])
    np.testing.assert_allclose(model({"images": images}), wanted, atol=1e-4)
    # Class c: templates "[c]" and "x y [c]" (x, y = words 1, 2).
    prompts = np.zeros((3, 2, 6), np.int32)
    for c in range(3):
        prompts[c, 0, :3] = [START, 20 + c, END]
        prompts[c, 1, :5] = [START, 1, 2, 20 + c, END]
    scores = zero_shot_by_likelihood(model, images, prompts)
    log_z = math.log(V - 1 + math.exp(10.0))
    hit, miss = 10.0 - log_z, -log_z
    # Template 1 scores the class word alone; template 2 the mean with two 0-logit words.
    expected = np.where(np.eye(3, dtype=bool), (hit + (2 * miss + hit) / 3) / 2, miss)
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    np.testing.assert_array_equal(scores.argmax(axis=1), [0, 1, 2])


def test_caption_lm_zero_shot_with_hand_set_decoder():
    # A one-block decoder whose weights make the answer and the scores known by hand.
    # Width 32; class word c (id 20 + c) is embedded as a * H_c, H_c a zero-mean +-1
    # Hadamard row (orthogonal rows); every other token embeds to 0; positional
    # embedding 0. The image projection maps image n's features to a * H_n. Attention:
    # q = k = 0 (uniform over the visible positions), v = identity, output M * identity;
    # the MLP's output projection is 0. After a LayerNorm a * H_c becomes H_c and 0
    # stays 0, and the tied output gives logit_v = ln_final(h) . embedding_v, so:
    # - position 0 (start token; sees the image and the start token): h = M/2 H_n,
    #   logits 32 a = 8 on word n, 0 elsewhere;
    # - position 1 (word c; sees image, start, word): h = a H_c + M (H_n + H_c) / 3:
    #   for c = n again 8 on word n; for c != n, with r = 1 + 3 a / M, logits
    #   8 r / sqrt(r^2 + 1) on word c and 8 / sqrt(r^2 + 1) on word n.
    # The prompt "[start] word_c [end]" scores the mean of log p(word_c) at position 0
    # and log p(end) (logit 0) at position 1.
    a, m = 0.25, 100.0
    model = _model("transformer", decoder_num_layers=1)
    decoder, block = model.caption_head, model.caption_head.resblocks[0]
    images = np.random.default_rng(11).normal(size=(3, 32, 32, 3)).astype(np.float32)
    hadamard = np.array([[1.0]])
    while len(hadamard) < 32:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    rows = hadamard[1:4]  # (3, 32), zero-mean, orthogonal
    features = np.asarray(model.visual(images), np.float64)  # (3, 16)
    decoder.image_projection.set_weights([(np.linalg.pinv(features) @ (a * rows)).astype(np.float32),
                                          np.zeros(32, np.float32)])
    embeddings = np.zeros((V, 32), np.float32)
    embeddings[20:23] = a * rows
    decoder.token_embedding.embeddings.assign(embeddings)
    decoder.positional_embedding.assign(np.zeros((9, 32), np.float32))
    qkv = np.zeros((32, 96), np.float32)
    qkv[:, 64:] = np.eye(32)
    block.attn.qkv.set_weights([qkv, np.zeros(96, np.float32)])
    block.attn.out_proj.set_weights([m * np.eye(32, dtype=np.float32), np.zeros(32, np.float32)])
    block.c_proj.set_weights([np.zeros((128, 32), np.float32), np.zeros(32, np.float32)])

    prompts = np.zeros((3, 1, 4), np.int32)
    prompts[:, 0, :3] = [[START, 20 + c, END] for c in range(3)]
    logits = np.asarray(model({"images": images, "token_ids": prompts[np.arange(3), 0]}))
    expected_first = np.zeros((3, V))
    expected_first[np.arange(3), 20 + np.arange(3)] = 8.0
    np.testing.assert_allclose(logits[:, 0], expected_first, atol=1e-3)

    log_z = math.log(V - 1 + math.exp(8.0))
    r = 1 + 3 * a / m
    hit, other = 8 * r / math.sqrt(r * r + 1), 8 / math.sqrt(r * r + 1)
    right = (8.0 - log_z - log_z) / 2
    wrong = (-log_z - math.log(V - 2 + math.exp(hit) + math.exp(other))) / 2
    scores = zero_shot_by_likelihood(model, images, prompts)
    np.testing.assert_allclose(scores, np.where(np.eye(3, dtype=bool), right, wrong), atol=2e-3)
    np.testing.assert_array_equal(scores.argmax(axis=1), [0, 1, 2])


def _class_images(rng, per_class):
    """Three classes of 32 px images: red, green or blue squares on noise."""
    images, labels = [], []
    for c in range(3):
        for _ in range(per_class):
            x = rng.normal(0, 0.3, size=(32, 32, 3))
            x[4:28, 4:28, c] += 2.0
            images.append(x)
            labels.append(c)
    return np.asarray(images, np.float32), np.asarray(labels)


@pytest.mark.parametrize("head", ["bag_of_words", "transformer"])
def test_trained_model_zero_shot_recovers_the_caption_classes(head):
    # Each class is always captioned with its word in one of two templates, "a photo of
    # <word_c>" (ids 1 2 3 30+c) or "<word_c> 4" (alternating over images); once trained
    # the model predicts the class word, and zero-shot by likelihood over the
    # two templates' class prompts is right on every image, including unseen ones.
    # (Prompts unlike any training caption would score by noise: the LM was never
    # trained on them.)
    rng = np.random.default_rng(6)
    images, labels = _class_images(rng, 4)
    captions = np.zeros((12, 8), np.int32)
    for i, c in enumerate(labels):
        captions[i, :6 if i % 2 else 4] = ([START, 1, 2, 3, 30 + c, END] if i % 2
                                           else [START, 30 + c, 4, END])
    model = _model(head, seed=6)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    batch = {"images": images, "token_ids": captions}
    # The language model first learns the captions' fixed words (a plateau near 0.46, the
    # class word still at chance) and only then the image: 150 steps pass on 6 of 6
    # seeds tried (40 steps on 3 of 5); bag-of-words needs 40 (5 of 5, margins > 1).
    steps = 150 if head == "transformer" else 40
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(steps), epochs=1, verbose=0)
    assert 0.0 < history.history["loss"][0]
    if head == "transformer":  # greedy next token at the class-word position
        logits = np.asarray(model({"images": images, "token_ids": captions}))
        np.testing.assert_array_equal(logits[1::2, 3].argmax(-1), 30 + labels[1::2])
        np.testing.assert_array_equal(logits[0::2, 0, 30:33].argmax(-1), labels[0::2])
    else:
        logits = np.asarray(model({"images": images}))
        for i, c in enumerate(labels):
            assert logits[i, 30 + c] == logits[i, 30:33].max()
    prompts = np.zeros((3, 2, 8), np.int32)  # the two templates
    for c in range(3):
        prompts[c, 0, :4] = [START, 30 + c, 4, END]
        prompts[c, 1, :6] = [START, 1, 2, 3, 30 + c, END]
    test_images, test_labels = _class_images(np.random.default_rng(7), 3)
    for x, y in [(images, labels), (test_images, test_labels)]:
        predicted = zero_shot_by_likelihood(model, x, prompts).argmax(axis=1)
        assert np.mean(predicted == y) == 1.0


# ---------------------------------------------------------------------------------------
# Training step, config, precision, errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["bag_of_words", "transformer"])
def test_train_step_decreases_the_loss_and_reports_it(head):
    rng = np.random.default_rng(8)
    batch = {"images": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
             "token_ids": _captions(rng, 4, 8, pad_from=[8, 5, 6, 7])}
    model = _model(head, seed=8)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = float(model.compute_caption_loss(batch))
    losses, logs = [], []
    for _ in range(5):
        losses.append(float(model.compute_caption_loss(batch)))  # the loss the step sees
        logs.append(float(model.train_step(batch)["loss"]))
    after = float(model.compute_caption_loss(batch))
    assert after < 0.7 * before
    assert losses == sorted(losses, reverse=True)  # down at every step
    assert [m.name for m in model.metrics] == ["loss"]
    # train_step reports the running mean of its losses.
    np.testing.assert_allclose(logs, np.cumsum(losses) / np.arange(1, 6), rtol=1e-5)
    # fit's history is the running mean of the same per-step losses (not Keras' 0.0):
    # a twin model stepped by hand gives the three losses fit sees.
    twin = _model(head, seed=8)
    twin.compile(optimizer=keras.optimizers.Adam(1e-2))
    by_hand = [float(twin.compute_caption_loss(batch))]
    for _ in range(2):
        twin.train_step(batch)
        by_hand.append(float(twin.compute_caption_loss(batch)))
    fresh = _model(head, seed=8)
    fresh.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = fresh.fit(tf.data.Dataset.from_tensors(batch).repeat(3), epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(np.mean(by_hand), rel=1e-4)
    evaluated = model.evaluate(tf.data.Dataset.from_tensors(batch), verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(float(model.compute_caption_loss(batch)), rel=1e-5)


def test_docstring_examples_run():
    results = doctest.testmod(captioning, extraglobs={"keras": keras})
    assert results.attempted >= 8 and results.failed == 0


@pytest.mark.parametrize("head", ["bag_of_words", "transformer"])
def test_config_round_trip_gives_identical_outputs(head, tmp_path):
    model = _model(head, seed=9, activation="gelu", layer_norm_epsilon=1e-6,
                   decoder_hidden_dim=16, decoder_num_layers=2, decoder_num_heads=4,
                   start_token_id=60, end_token_id=61, name="captioner")
    config = model.get_config()
    clone = CaptionPredictionModel.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    rng = np.random.default_rng(9)
    inputs = {"images": rng.normal(size=(2, 32, 32, 3)).astype(np.float32),
              "token_ids": _captions(rng, 2, 8, pad_from=[8, 5])}
    np.testing.assert_array_equal(np.asarray(clone(inputs)), np.asarray(model(inputs)))
    serialized = keras.saving.serialize_keras_object(model)
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
    model.save(tmp_path / "model.keras")  # the whole model, as a user saves it
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(np.asarray(loaded(inputs)), np.asarray(model(inputs)))
    head_layer = BagOfWordsPredictionHead(vocabulary_size=V, name="h")
    assert BagOfWordsPredictionHead.from_config(head_layer.get_config()).get_config() == \
        head_layer.get_config()


@pytest.mark.parametrize("head", ["bag_of_words", "transformer"])
def test_mixed_bfloat16_keeps_losses_and_scores_in_float32(head):
    rng = np.random.default_rng(10)
    batch = {"images": rng.normal(size=(3, 32, 32, 3)).astype(np.float32),
             "token_ids": _captions(rng, 3, 8, pad_from=[8, 5, 6])}
    full = _model(head, seed=10)
    mixed = _model(head, seed=10, dtype="mixed_bfloat16")
    mixed.set_weights(full.get_weights())
    assert mixed(batch).dtype == "bfloat16"
    loss, reference = mixed.compute_caption_loss(batch), full.compute_caption_loss(batch)
    assert loss.dtype == "float32"
    assert float(loss) == pytest.approx(float(reference), rel=2e-2)
    scores = mixed.prompt_log_likelihood(batch["images"], PROMPTS)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, full.prompt_log_likelihood(batch["images"], PROMPTS),
                               rtol=2e-2, atol=2e-2)


def test_errors_are_keras_style():
    with pytest.raises(ValueError, match=r"`head` must be one of \('bag_of_words', 'transformer'\)\. "
                                         r"Received: head='lstm'"):
        _model("lstm")
    with pytest.raises(ValueError, match=r"`end_token_id` must be in \[0, vocabulary_size\) .* "
                                         r"Received: end_token_id=49407, vocabulary_size=64"):
        _model("transformer", start_token_id=1, end_token_id=49407)
    model = _model("transformer")
    images = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match=r"rows must start with start_token_id=62\. "
                                         r"Received: row 1 starts with 5"):
        model.prompt_log_likelihood(images, [[START, 5, END], [5, 6, END]])
    with pytest.raises(ValueError, match=r"Every prompt must have a token after the start token\. "
                                         r"Received: row 0 = \[62, 0, 0\]"):
        model.prompt_log_likelihood(images, [[START, 0, 0]])
    with pytest.raises(ValueError, match=r"Every prompt must have a word token\. "
                                         r"Received: row 0 = \[62, 63, 0\]"):
        _model("bag_of_words").prompt_log_likelihood(images, [[START, END, 0]])
    with pytest.raises(ValueError, match=r"`vocabulary_size` must be a positive int\. "
                                         r"Received: vocabulary_size=0"):
        bag_of_words_targets([[1, 2]], 0)
    with pytest.raises(ValueError, match="do not pass `loss`"):
        model.compile(optimizer="adam", loss="mse")
