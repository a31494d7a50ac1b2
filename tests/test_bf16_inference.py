"""bf16 inference: `CLIP.with_dtype` / `from_preset(dtype=...)` and the bf16 export.

References: the float32 model (bf16 embeddings within cosine 0.999 of it on photos
and captions), the float32 weights rounded to bf16 by numpy-side casting, and the
in-process bf16 model (for the exported SavedModel).
"""
import io

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip.export import saved_model as export_lib
from keras_clip import CLIP
from keras_clip.layers.fast_ops import dense_rows, layer_norm
from tests import harness

NUM_PHOTOS = 16


def _model():
    """A 64 px, 2-layer ViT CLIP with realistic (perturbed, non-initial) weights."""
    keras.utils.set_random_seed(0)
    return harness.perturb_weights(CLIP(**harness.SMALL_VIT), seed=0)


def _photos(size):
    crops = harness.photo_crops(NUM_PHOTOS, size=(size, size), seed=1)
    return np.stack([harness.normalise(np.asarray(c)) for c in crops])


def _jpeg_bytes(count):
    out = []
    for image in harness.photo_crops(count, size=(80, 96), seed=2):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def _cosines(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_with_dtype_rounds_tower_weights_to_bfloat16_and_keeps_logit_scale_float32():
    model = _model()
    bf16 = model.with_dtype("bfloat16")
    assert bf16.dtype_policy.name == "bfloat16"
    for source, target in zip(model.weights, bf16.weights, strict=True):
        assert target.path == source.path
        expected = tf.cast(tf.cast(source.numpy(), tf.bfloat16), source.dtype).numpy()
        if "logit_scale" in source.path:
            assert target.dtype == "float32"
            np.testing.assert_array_equal(target.numpy(), source.numpy())
        elif target.dtype == "bfloat16":
            np.testing.assert_array_equal(target.numpy().astype(np.float32), expected)
    dtypes = {w.path: w.dtype for w in bf16.weights}
    assert sum(d == "bfloat16" for d in dtypes.values()) == len(dtypes) - 1, dtypes
    assert model.weights[0].dtype == "float32"  # the source is unchanged


def test_from_preset_bfloat16_equals_with_dtype(tmp_path):
    model = _model()
    model.save_to_preset(str(tmp_path))
    loaded = CLIP.from_preset(str(tmp_path), dtype="bfloat16")
    expected = model.with_dtype("bfloat16")
    for a, b in zip(loaded.weights, expected.weights, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_bfloat16_embeddings_within_cosine_0999_of_float32_on_photos_and_captions():
    model = _model()
    bf16 = model.with_dtype("bfloat16")
    images = _photos(model.image_size)
    tokens = model.tokenizer()(harness.captions(NUM_PHOTOS))
    image32 = model.encode_image(images).numpy()
    image16 = tf.cast(bf16.encode_image(images), tf.float32).numpy()
    text32 = model.encode_text(tokens).numpy()
    text16 = tf.cast(bf16.encode_text(tokens, trim=True), tf.float32).numpy()
    assert image16.shape == image32.shape == (NUM_PHOTOS, 64)
    assert _cosines(image16, image32).min() >= 0.999
    assert _cosines(text16, text32).min() >= 0.999
    # bf16 moves each photo less than the photos differ: each bf16 embedding's nearest
    # float32 embedding is its own photo's (random weights map photos close together).
    np.testing.assert_array_equal((image16 @ image32.T).argmax(1), np.arange(NUM_PHOTOS))


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_fused_block_matches_numpy_formula(activation):
    """The fused MatMul+BiasAdd(+Swish) layout, with QuickGELU's 1.702 folded into
    ln_2 and the biases, equals `x + attn(ln_1(x))`, `x + c_proj(act(c_fc(ln_2(x))))`
    written out in numpy (float64)."""
    from keras_clip.layers.residual_attention_block import ResidualAttentionBlock

    keras.utils.set_random_seed(1)
    block = ResidualAttentionBlock(32, 2, 128, activation=activation)
    block.build((None, 5, 32))
    rng = np.random.default_rng(0)
    for v in block.weights:
        v.assign(v.numpy() + 0.3 * rng.standard_normal(v.shape).astype(np.float32))
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    w = {v.path.split("/", 1)[1]: v.numpy().astype(np.float64) for v in block.weights}

    def ln(h, name):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * w[f"{name}/gamma"] + w[f"{name}/beta"]

    h = ln(x.astype(np.float64), "ln_1")
    qkv = h @ w["attn/qkv/kernel"] + w["attn/qkv/bias"]
    q, k, v = (t.reshape(3, 5, 2, 16).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1))
    scores = q @ k.transpose(0, 1, 3, 2) / 4.0
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = (probs @ v).transpose(0, 2, 1, 3).reshape(3, 5, 32)
    y = x + attn @ w["attn/out_proj/kernel"] + w["attn/out_proj/bias"]
    z = ln(y, "ln_2") @ w["c_fc/kernel"] + w["c_fc/bias"]
    if activation == "quick_gelu":
        act = z / (1 + np.exp(-1.702 * z))
    else:
        from scipy.special import erf

        act = 0.5 * z * (1 + erf(z / np.sqrt(2)))
    expected = y + act @ w["c_proj/kernel"] + w["c_proj/bias"]
    np.testing.assert_allclose(block(x, causal=True).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_fast_ops_match_keras_layers():
    keras.utils.set_random_seed(2)
    dense = keras.layers.Dense(24, bias_initializer="random_normal")
    norm = keras.layers.LayerNormalization(epsilon=1e-5, gamma_initializer="random_normal",
                                           beta_initializer="random_normal")
    dense.build((None, 16))
    norm.build((None, 16))
    x = np.random.default_rng(0).standard_normal((7, 16)).astype(np.float32)
    np.testing.assert_allclose(dense_rows(dense, x).numpy(), dense(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        dense_rows(dense, x, activation="swish", bias_scale=2.0).numpy(),
        tf.nn.silu(x @ dense.kernel.numpy() + 2.0 * dense.bias.numpy()).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer_norm(norm, x).numpy(), norm(x).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer_norm(norm, x, scale=1.702).numpy(), 1.702 * norm(x).numpy(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`activation` must be None, 'gelu' or 'swish'"):
        dense_rows(dense, x, activation="relu")


def test_bfloat16_export_stores_bf16_weights_and_matches_in_process_bf16_model(tmp_path):
    model = harness.perturb_weights(harness.tiny_clip(seed=0, vision_patch_size=16), seed=0)
    version_dir = export_lib.export_saved_model(model, str(tmp_path), 1, dtype="bfloat16")
    loaded = tf.saved_model.load(version_dir)
    dtypes = tf.train.load_checkpoint(f"{version_dir}/variables/variables").get_variable_to_dtype_map()
    floating = [d for d in dtypes.values() if d.is_floating]
    assert floating.count(tf.bfloat16) == len(model.weights) - 1, dtypes  # all but logit_scale
    photos = _jpeg_bytes(6)
    texts = harness.captions(6)
    image = loaded.signatures["encode_image"](image_bytes=tf.constant(photos))["image_embeddings"]
    text = loaded.signatures["encode_text"](texts=tf.constant(texts))["text_embeddings"]
    assert image.dtype == text.dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(image.numpy(), axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(text.numpy(), axis=-1), 1.0, atol=1e-6)

    bf16 = model.with_dtype("bfloat16")
    pixels = bf16.image_preprocessor()(tf.constant(photos))
    expected_image = tf.math.l2_normalize(
        tf.cast(bf16.encode_image(pixels, normalize=False), tf.float32), -1).numpy()
    expected_text = tf.math.l2_normalize(tf.cast(bf16.encode_text(
        bf16.tokenizer()(texts), normalize=False, trim=True), tf.float32), -1).numpy()
    # Same weights and ops; only oneDNN's fusion of the graph may round differently.
    np.testing.assert_allclose(image.numpy(), expected_image, atol=2e-2)
    np.testing.assert_allclose(text.numpy(), expected_text, atol=2e-2)
    assert _cosines(image.numpy(), expected_image).min() >= 0.999
    assert _cosines(text.numpy(), expected_text).min() >= 0.999
    # And the bf16 export is within bf16's error of the float32 model.
    assert _cosines(image.numpy(), model.encode_image(pixels).numpy()).min() >= 0.999


def test_export_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="`dtype` must be one of"):
        export_lib.export_saved_model(harness.tiny_clip(seed=0, vision_patch_size=16),
                                      str(tmp_path), 1, dtype="float8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_patchify_matmul_equals_patch_convolution(dtype):
    """`CLIPVisionTransformer.patchify` (one matmul) against Keras' `Conv2D` with the
    same kernel (stride = kernel size), the layer the checkpoints were made for."""
    model = harness.perturb_weights(CLIP(**harness.SMALL_VIT)).with_dtype(dtype)
    x = np.random.default_rng(0).standard_normal((3, 64, 64, 3)).astype(np.float32)
    conv = model.visual.conv1(x).numpy().astype(np.float32).reshape(3, 16, 128)
    patches = model.visual.patchify(x).numpy().astype(np.float32)
    tolerance = 1e-5 if dtype == "float32" else 2e-2  # bf16: summation order only
    np.testing.assert_allclose(patches, conv, atol=tolerance * np.abs(conv).max())
