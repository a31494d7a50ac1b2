"""Bag-of-words text encoder: numpy reference, order invariance, config, CLIP training."""
import keras
import numpy as np
import pytest

from keras_clip import CLIP
from keras_clip.models.text_bag_of_words import CLIPBagOfWordsEncoder
from keras_clip.training.config import TrainConfig
from tests import harness


def _numpy_bag_of_words(token_ids, embedding, projection, pad=0):
    """Per row: mean of the embedding rows of the non-pad ids, times the projection."""
    out = []
    for row in token_ids:
        words = [embedding[t] for t in row if t != pad]
        mean = np.mean(words, axis=0) if words else np.zeros(embedding.shape[1])
        out.append(mean @ projection)
    return np.array(out)


def _tokens(rng, n, length, vocabulary, pad=0):
    ids = rng.integers(1, vocabulary, size=(n, length))
    for i in range(n):
        ids[i, 1 + i % (length - 1):] = pad  # 1 .. length-1 real tokens, then padding
    return ids.astype("int32")


def test_matches_numpy_reference_and_ignores_padding():
    keras.utils.set_random_seed(0)
    layer = CLIPBagOfWordsEncoder(embed_dim=6, vocabulary_size=50, context_length=9,
                                  hidden_dim=10)
    ids = _tokens(np.random.default_rng(0), 7, 9, 50)
    ids[6] = 0  # a row of padding only gives zeros
    out = np.asarray(layer(ids))
    embedding = np.asarray(layer.token_embedding.embeddings, np.float64)
    projection = np.asarray(layer.text_projection, np.float64)
    np.testing.assert_allclose(out, _numpy_bag_of_words(ids, embedding, projection),
                               rtol=1e-5, atol=1e-6)
    assert np.all(out[6] == 0.0)
    # Word order does not matter; trailing padding does not either.
    shuffled = ids.copy()
    shuffled[3, :4] = shuffled[3, :4][::-1]
    np.testing.assert_allclose(np.asarray(layer(shuffled))[3], out[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer(ids[:, :5]))[:4], out[:4], rtol=1e-5, atol=1e-6)


def test_mixed_bfloat16_keeps_the_mean_in_float32():
    ids = _tokens(np.random.default_rng(2), 6, 9, 50)
    keras.utils.set_random_seed(0)
    full = CLIPBagOfWordsEncoder(embed_dim=6, vocabulary_size=50, context_length=9, hidden_dim=10)
    full.build(ids.shape)
    mixed = CLIPBagOfWordsEncoder(embed_dim=6, vocabulary_size=50, context_length=9,
                                  hidden_dim=10, dtype="mixed_bfloat16")
    mixed.build(ids.shape)
    mixed.set_weights(full.get_weights())
    assert mixed.token_embedding.compute_dtype == "float32"
    out = mixed(ids)
    assert out.dtype == "bfloat16"
    # Reference: float32 mean, rounded to bf16, times the bf16-rounded projection.
    embedding = np.asarray(full.token_embedding.embeddings, np.float32)
    projection = np.asarray(full.text_projection, np.float32)
    to_bf16 = lambda x: keras.ops.convert_to_numpy(keras.ops.cast(
        keras.ops.cast(x, "bfloat16"), "float32")).astype(np.float64)
    means = _numpy_bag_of_words(ids, embedding, np.eye(10))
    expected = to_bf16(means.astype(np.float32)) @ to_bf16(projection)
    got = keras.ops.convert_to_numpy(keras.ops.cast(out, "float32"))
    scale = np.abs(expected).max()
    # Only the output's own bf16 rounding (8 bits) separates them.
    np.testing.assert_allclose(got, expected, atol=scale * 2.0 ** -7)


def test_round_trips_every_argument():
    layer = CLIPBagOfWordsEncoder(embed_dim=5, vocabulary_size=40, context_length=7,
                                  hidden_dim=3, pad_token_id=39, name="bow")
    ids = _tokens(np.random.default_rng(1), 4, 7, 39, pad=39)
    expected = np.asarray(layer(ids))
    clone = CLIPBagOfWordsEncoder.from_config(layer.get_config())
    clone.build(ids.shape)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    assert (clone.pad_token_id, clone.hidden_dim, clone.context_length) == (39, 3, 7)
    np.testing.assert_array_equal(np.asarray(clone(ids)), expected)
    embedding = np.asarray(layer.token_embedding.embeddings, np.float64)
    np.testing.assert_allclose(expected, _numpy_bag_of_words(
        ids, embedding, np.asarray(layer.text_projection, np.float64), pad=39), rtol=1e-5,
        atol=1e-6)
    with pytest.raises(ValueError, match="`hidden_dim` must be a positive int"):
        CLIPBagOfWordsEncoder(embed_dim=5, hidden_dim=0)


def _numpy_clip_loss(image, text, scale):
    logits = scale * image @ text.T

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))
    return 0.5 * (ce(logits) + ce(logits.T))


def test_clip_with_bag_of_words_text_trains_contrastively(tmp_path):
    keras.utils.set_random_seed(0)
    model = CLIP(**dict(harness.TINY_VIT_SMALL_VOCAB, text_architecture="bag_of_words"))
    assert isinstance(model.text, CLIPBagOfWordsEncoder)
    # Embedding, projection, and the logit scale (counted with the text tower).
    assert model.count_params_by_tower()["text"] == 500 * 64 + 64 * 32 + 1
    batch = harness.small_vocab_batch(8)
    tokens = batch["token_ids"]
    embedding = np.asarray(model.text.token_embedding.embeddings, np.float64)
    projection = np.asarray(model.text.text_projection, np.float64)
    reference = _numpy_bag_of_words(tokens, embedding, projection)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(model.encode_text(tokens)), reference, rtol=1e-5,
                               atol=1e-6)
    image = np.asarray(model.encode_image(batch["images"]), np.float64)
    expected_loss = _numpy_clip_loss(image, reference, float(model.logit_scale()))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), jit_compile=False)
    logs = model.train_step(batch)
    assert float(logs["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    after = np.asarray(model.text.token_embedding.embeddings, np.float64)
    used = np.unique(tokens[tokens != 0])
    unused = np.setdiff1d(np.arange(500), used)
    assert np.abs(after[used] - embedding[used]).max() > 0  # the words in the batch moved
    np.testing.assert_array_equal(after[unused], embedding[unused])  # no other word did
    # The architecture is part of the config, and the training config can select it.
    config = model.get_config()
    assert config["text_architecture"] == "bag_of_words"
    assert isinstance(CLIP.from_config(config).text, CLIPBagOfWordsEncoder)
    model.save_to_preset(str(tmp_path / "preset"))
    reloaded = CLIP.from_preset(str(tmp_path / "preset"))
    assert isinstance(reloaded.text, CLIPBagOfWordsEncoder)
    np.testing.assert_array_equal(np.asarray(reloaded.encode_text(tokens)),
                                  np.asarray(model.encode_text(tokens)))
    for format in ("open_clip", "openai", "hf", "keras_hub"):  # no place for this tower
        with pytest.raises(ValueError, match=f"The {format} format holds a transformer text "
                                             "tower only.*text_architecture='bag_of_words'"):
            model.save_checkpoint(str(tmp_path / format), format)
    assert TrainConfig(text_architecture="bag_of_words").validate().text_architecture \
        == "bag_of_words"
    with pytest.raises(ValueError, match="`text_architecture` must be one of transformer, "
                                         "bag_of_words. Received: text_architecture='bow'"):
        TrainConfig(text_architecture="bow").validate()
    with pytest.raises(ValueError, match=r"`text_architecture` must be one of \('transformer', "
                                         r"'bag_of_words'\)"):
        CLIP(**dict(harness.TINY_VIT, text_architecture="bow"))
