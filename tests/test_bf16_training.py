"""mixed_bfloat16 keeps in float32 what torch autocast keeps in float32 (issue 14).

Two pieces of keras_clip's bf16 step rounded more than open_clip's under
`torch.autocast("cpu", torch.bfloat16)`:

* the text tower's residual stream: open_clip adds the float32 token and positional
  embeddings and each block's branch output in float32 (embedding lookups and additions
  are not autocast), keras_clip added them in bf16;
* the attention scores `q k^T`: PyTorch's CPU attention accumulates them in float32 and
  soft-maxes them unrounded, keras_clip rounded the product to bf16 first.

* the normalised features and the logits: keras_clip rounded both to bf16; they are
  now float32 from the normalisation to the loss (open_clip multiplies bf16 features).

Each test below fails on the code before the fix (figures in the test's docstring).
"""
import math

import keras
import numpy as np
import tensorflow as tf

from keras_clip import CLIP
from keras_clip.layers.attention import CLIPAttention

# 6 text blocks (the depth) at width 64; a 1-block image tower.
TEXT_DEEP = dict(embed_dim=32, image_size=32, vision_patch_size=8, vision_num_layers=1,
                 vision_hidden_dim=32, vision_num_heads=2, context_length=16, vocabulary_size=500,
                 end_token_id=499, text_hidden_dim=64, text_num_layers=6, text_num_heads=2,
                 activation="gelu")
OFFSET = 4.0  # a common component of every token embedding (LayerNorm removes it)


def _batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 499, size=(n, 16))
    for i in range(n):
        tokens[i, 4 + i % 10] = 499
        tokens[i, 5 + i % 10:] = 0
    return {"images": rng.normal(size=(n, 32, 32, 3)).astype("float32"), "token_ids": tokens.astype("int32")}


def _pair(seed=0):
    """The same weights under float32 and mixed_bfloat16; token embeddings offset by OFFSET."""
    keras.utils.set_random_seed(seed)
    reference = CLIP(**TEXT_DEEP)
    embeddings = reference.text.token_embedding.embeddings
    embeddings.assign(embeddings.numpy() + OFFSET)
    mixed = CLIP(**TEXT_DEEP, dtype="mixed_bfloat16")
    mixed.set_weights([w.numpy() for w in reference.weights])
    return reference, mixed


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_text_residual_stream_is_float32_under_mixed_bfloat16():
    """Token embeddings with a common offset of 4 (bf16 spacing there: 1/32, more than
    the embeddings' own spread of 0.02): in a float32 residual stream each token's
    embedding and the blocks' outputs survive it, in a bf16 one they are rounded away.
    Relative error of the text features against float32: 0.57 before the fix, 0.009
    after (the branches' own bf16 rounding)."""
    reference, mixed = _pair()
    tokens = _batch()["token_ids"]
    expected = reference.encode_text(tokens)
    actual = mixed.encode_text(tokens)
    assert actual.dtype == tf.bfloat16  # the tower's output stays in the compute dtype
    assert _relative(actual, expected) < 0.02


def test_mixed_bfloat16_steps_track_float32_steps():
    """Three AdamW steps on fixed batches from the same weights (token embeddings offset
    as above): the mixed_bfloat16 losses and text-tower weights track the float32 ones.
    Before the fix: largest loss gap 0.25, and the two runs' text weights 1.20 times
    float32's own move apart; after: 0.010 and 0.09."""
    reference, mixed = _pair()
    initial = {v.path.split("/", 1)[1]: v.numpy() for v in reference.trainable_variables}
    losses, weights = {}, {}
    for name, model in (("float32", reference), ("mixed_bfloat16", mixed)):
        model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=0.1))
        losses[name] = [float(model.train_step(_batch(seed=s))["loss"]) for s in range(3)]
        weights[name] = {v.path.split("/", 1)[1]: v.numpy() for v in model.trainable_variables}
    gap = max(abs(a - b) for a, b in zip(losses["mixed_bfloat16"], losses["float32"]))
    text = [k for k in initial if k.startswith("text/")]
    apart = math.sqrt(sum(np.sum((weights["mixed_bfloat16"][k] - weights["float32"][k]) ** 2) for k in text))
    moved = math.sqrt(sum(np.sum((weights["float32"][k] - initial[k]) ** 2) for k in text))
    assert gap < 0.05, losses
    assert apart / moved < 0.3


def test_attention_scores_are_not_rounded_to_bf16():
    """q = k = 8 + d and v = d (identity projections, v's bias -8), each head's d a
    shuffled mix of five 1s, five -1s and six 0s: every score q_i . k_j = 1024 + d_i . d_j
    is an integer, exact in float32, but a multiple of 8 in bf16 (2 after the 1/sqrt(16)
    scale), which erases the d_i . d_j part (standard deviation 0.8 after the scale).
    Numpy reference: float64 softmax attention. Relative error: 0.15 before the fix,
    0.002 after (bf16 probabilities and output)."""
    hidden, heads, length = 32, 2, 8
    head_dim = hidden // heads
    layer = CLIPAttention(hidden, heads, dtype="mixed_bfloat16")
    layer.build((1, length, hidden))
    eye = np.eye(hidden, dtype=np.float32)
    layer.qkv.kernel.assign(np.concatenate([eye, eye, eye], axis=1))
    layer.qkv.bias.assign(np.concatenate([np.zeros(2 * hidden), np.full(hidden, -8.0)]).astype(np.float32))
    layer.out_proj.kernel.assign(eye)
    layer.out_proj.bias.assign(np.zeros(hidden, np.float32))
    rng = np.random.default_rng(0)
    pattern = np.array([1] * 5 + [-1] * 5 + [0] * 6, np.float32)
    d = np.stack([np.concatenate([rng.permutation(pattern) for _ in range(heads)]) for _ in range(length)])
    x = (8.0 + d)[None]  # (1, T, D), exact in bf16
    actual = np.asarray(tf.cast(layer(x, causal=True), tf.float32))

    q = x.reshape(1, length, heads, head_dim).transpose(0, 2, 1, 3).astype(np.float64)  # (1, H, T, Dh)
    v = q - 8.0
    scores = q @ q.transpose(0, 1, 3, 2) / math.sqrt(head_dim)  # (1, H, T, T)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = (probs @ v).transpose(0, 2, 1, 3).reshape(1, length, hidden)
    assert _relative(actual, expected) < 0.02


def test_training_features_and_logits_are_float32_under_mixed_bfloat16():
    """The step's unit features are the towers' bf16 outputs normalised in float32 (numpy
    formula), and the logits are float32 products of them. Before the fix both were bf16:
    largest errors 1e-3 (features) and 0.035 (logits); after: 4e-8 and 4e-7."""
    _, mixed = _pair()
    data = _batch()
    image, text = mixed._encode_pair(tf.constant(data["images"]), tf.constant(data["token_ids"]), True)
    assert image.dtype == text.dtype == tf.float32
    raw_image = np.asarray(tf.cast(mixed.encode_image(data["images"], normalize=False), tf.float32), np.float64)
    raw_text = np.asarray(tf.cast(mixed.encode_text(data["token_ids"], normalize=False), tf.float32), np.float64)
    unit_image = raw_image / np.linalg.norm(raw_image, axis=1, keepdims=True)
    unit_text = raw_text / np.linalg.norm(raw_text, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(image), unit_image, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(text), unit_text, rtol=0, atol=1e-6)
    from keras_clip import losses

    out = losses.clip_loss(image, text, image, text, mixed.logit_scale())
    scale = float(mixed.logit_scale())
    np.testing.assert_allclose(np.asarray(out["logits_per_image"]), scale * unit_image @ unit_text.T,
                               rtol=0, atol=1e-4)
