"""Predictive baselines of the CLIP paper (Figure 2): caption prediction from the image.

Two heads on keras_clip's ViT image tower, trained on the same `{"images", "token_ids"}`
batches as `CLIP`:

- bag-of-words prediction (`head="bag_of_words"`): the image embedding predicts the
  distribution of the caption's words (`BagOfWordsPredictionHead`,
  `bag_of_words_prediction_loss`);
- a transformer caption language model (`head="transformer"`): a small causal decoder
  predicts the caption token by token given the image (`CaptionDecoder`,
  `caption_lm_loss`).

Zero-shot classification scores each class prompt by its likelihood under the model
(`CaptionPredictionModel.prompt_log_likelihood`, `zero_shot_by_likelihood`), as the paper
evaluates its predictive baselines.
"""
import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_clip import distribute
from keras_clip.layers.fast_ops import layer_norm
from keras_clip.layers.residual_attention_block import residual_attention_blocks
from keras_clip.models.vision_transformer import CLIPVisionTransformer

HEADS = ("bag_of_words", "transformer")
# OpenAI's BPE ids of padding, <start_of_text> and <end_of_text> (`CLIPTokenizer`'s output).
PAD, SOT, EOT = 0, 49406, 49407
# Elements of the largest float32 tensor (`(rows, length, vocabulary)` logits) that
# prompt scoring builds at once: 2^24 floats = 64 MiB.
_SCORING_ELEMENTS = 2**24
_IMAGE_CHUNK = 256


# -----------------------------------------------------------------------------
# Targets and losses (float32 whatever the compute dtype)
# -----------------------------------------------------------------------------


def _word_mask(token_ids, ignore_ids):
    """`(B, L)` bool: the positions whose id is not in `ignore_ids`."""
    token_ids = ops.convert_to_tensor(token_ids)
    mask = ops.ones_like(token_ids, dtype="bool")
    for ignored in ignore_ids:
        mask = ops.logical_and(mask, ops.not_equal(token_ids, ignored))
    return mask


def bag_of_words_targets(token_ids, vocabulary_size, ignore_ids=(PAD, SOT, EOT)):
    """The caption's words as a distribution over the vocabulary.

    Each row is the count of every word token (an id not in `ignore_ids`) divided by
    the number of word tokens of that row; a repeated word counts each time. A row
    with no word token is all zeros. Ids outside `[0, vocabulary_size)` are not
    counted. Built by a scatter-add, never a `(B, L, V)` one-hot.

    Args:
        token_ids: int `(batch, length)`, as produced by `CLIPTokenizer`.
        vocabulary_size: int, the number of columns `V`.
        ignore_ids: ids that are not words (padding, start and end tokens).

    Returns:
        float32 `(batch, vocabulary_size)`.

    Example:
    >>> targets = bag_of_words_targets([[98, 5, 7, 5, 99, 0]], 100, ignore_ids=(0, 98, 99))
    >>> [round(float(targets[0, i]), 4) for i in (5, 7, 98)]
    [0.6667, 0.3333, 0.0]
    """
    if not isinstance(vocabulary_size, int) or vocabulary_size <= 0:
        raise ValueError(
            f"`vocabulary_size` must be a positive int. Received: vocabulary_size={vocabulary_size!r}")
    token_ids = ops.cast(ops.convert_to_tensor(token_ids), "int32")  # (B, L)
    words = ops.logical_and(
        _word_mask(token_ids, ignore_ids),
        ops.logical_and(token_ids >= 0, token_ids < vocabulary_size))  # (B, L)
    weights = ops.cast(words, "float32")  # (B, L)
    batch, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
    rows = ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None], (batch, length))
    columns = ops.where(words, token_ids, 0)
    indices = ops.stack([ops.reshape(rows, (-1,)), ops.reshape(columns, (-1,))], axis=1)
    counts = tf.scatter_nd(indices, ops.reshape(weights, (-1,)),
                           ops.stack([batch, vocabulary_size]))  # (B, V)
    totals = ops.sum(weights, axis=1, keepdims=True)  # (B, 1)
    return counts / ops.maximum(totals, 1.0)


def bag_of_words_prediction_loss(logits, token_ids, ignore_ids=(PAD, SOT, EOT)):
    """Cross-entropy between the caption's word distribution and the predicted one.

    `mean over rows with >= 1 word of -sum_v target[v] * log_softmax(logits)[v]`, with
    `target = bag_of_words_targets(token_ids, V, ignore_ids)`. Rows without a word
    token are left out of the mean (0.0 if no row has a word). The log-softmax and
    the loss are float32 whatever the logits' dtype.

    Args:
        logits: `(batch, V)` predicted word logits.
        token_ids: int `(batch, length)` captions.
        ignore_ids: ids that are not words.

    Returns:
        Scalar float32.

    Example:
    >>> round(float(bag_of_words_prediction_loss(keras.ops.zeros((1, 4)), [[1, 2, 0]],
    ...                                          ignore_ids=(0,))), 6)  # log(4)
    1.386294
    """
    logits = ops.cast(logits, "float32")  # (B, V)
    vocabulary_size = logits.shape[-1]
    if vocabulary_size is None:
        raise ValueError("`logits` must have a static last dimension (the vocabulary). "
                         f"Received: logits.shape={logits.shape}")
    targets = bag_of_words_targets(token_ids, int(vocabulary_size), ignore_ids)  # (B, V)
    per_row = -ops.sum(targets * ops.log_softmax(logits, axis=-1), axis=-1)  # (B,)
    has_words = ops.cast(ops.sum(targets, axis=-1) > 0, "float32")  # (B,)
    return ops.sum(per_row * has_words) / ops.maximum(ops.sum(has_words), 1.0)


def caption_lm_loss(logits, token_ids, pad_token_id=PAD):
    """Next-token cross-entropy of a caption language model.

    `logits[:, t]` predicts `token_ids[:, t + 1]`. The loss is the mean over all
    `(row, t)` with `token_ids[:, t + 1] != pad_token_id` of
    `-log_softmax(logits[:, t])[token_ids[:, t + 1]]` (the end token is a target; the
    start token, never predicted, is not). The last position predicts nothing. Float32
    whatever the logits' dtype; 0.0 if no position has a target.

    Args:
        logits: `(batch, length, V)`.
        token_ids: int `(batch, length)`.
        pad_token_id: int, the padding id (never a target).

    Returns:
        Scalar float32.

    Example:
    >>> round(float(caption_lm_loss(keras.ops.zeros((1, 3, 5)), [[4, 1, 0]])), 6)  # log(5)
    1.609438
    """
    logits = ops.cast(logits, "float32")[:, :-1]  # (B, L-1, V)
    targets = ops.cast(ops.convert_to_tensor(token_ids), "int32")[:, 1:]  # (B, L-1)
    mask = ops.cast(ops.not_equal(targets, pad_token_id), "float32")  # (B, L-1)
    picked = ops.take_along_axis(logits, ops.where(targets == pad_token_id, 0, targets)[..., None],
                                 axis=-1)[..., 0]  # (B, L-1)
    nll = ops.logsumexp(logits, axis=-1) - picked  # (B, L-1)
    return ops.sum(nll * mask) / ops.maximum(ops.sum(mask), 1.0)


# -----------------------------------------------------------------------------
# Heads
# -----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_clip")
class BagOfWordsPredictionHead(keras.layers.Layer):
    """Predicts a caption's words from the image embedding (Radford et al., 2021, Fig. 2).

    One `Dense(vocabulary_size)` with bias (Keras' default initialisers: Glorot-uniform
    kernel, zero bias) on the image features; train it with
    `bag_of_words_prediction_loss`. The paper gives no more detail than "predicting a
    bag-of-words encoding of the same text"; a linear softmax classifier over the
    vocabulary is the simplest such predictor.

    Args:
        vocabulary_size: int, 49,408 for OpenAI's BPE.

    Call arguments:
        image_features: `(batch, embed_dim)`.

    Returns:
        `(batch, vocabulary_size)` logits in the compute dtype.

    Example:
    >>> head = BagOfWordsPredictionHead(vocabulary_size=100)
    >>> tuple(head(keras.ops.zeros((2, 16))).shape)
    (2, 100)
    """

    def __init__(self, vocabulary_size=49408, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(vocabulary_size, int) or vocabulary_size <= 0:
            raise ValueError(
                "`vocabulary_size` must be a positive int. "
                f"Received: vocabulary_size={vocabulary_size!r}")
        self.vocabulary_size = vocabulary_size
        self.dense = keras.layers.Dense(vocabulary_size, name="dense", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, image_features):
        return self.dense(image_features)  # (B, V)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.vocabulary_size,)

    def get_config(self):
        config = super().get_config()
        config.update({"vocabulary_size": self.vocabulary_size})
        return config


@keras.saving.register_keras_serializable(package="keras_clip")
class CaptionDecoder(keras.layers.Layer):
    """A small causal transformer language model conditioned on the image.

    The image features are projected to `hidden_dim` (a Dense with bias) and put as a
    prefix position before the caption's token embeddings; a learned positional
    embedding covers the `context_length + 1` positions. keras_clip's
    `ResidualAttentionBlock`s (OpenAI's text-tower initialisation) run with a causal
    mask, so the output at token position `t` has seen the image and tokens `<= t` and
    predicts token `t + 1`. A final LayerNorm, then the output projection, which is
    TIED to the token embedding (`logits = h @ token_embedding^T`, no bias, as GPT-2):
    no extra `(hidden_dim, vocabulary_size)` matrix. The prefix position's own output
    is dropped. Under a mixed policy the residual stream is float32 (as
    `CLIPTextTransformer`) and the logits come out in the compute dtype; the losses
    cast them to float32.

    The paper's transformer language model baseline is not specified beyond "a
    transformer language model" predicting the caption; image conditioning through
    a prefix (rather than cross-attention) is this implementation's choice.

    Args:
        vocabulary_size: int, 49,408 for OpenAI's BPE.
        context_length: int, maximum caption tokens (77).
        hidden_dim: int, decoder width.
        num_layers: int, decoder depth.
        num_heads: int, attention heads; must divide `hidden_dim`.
        intermediate_dim: int, MLP width; `None`: `4 * hidden_dim`.
        activation: `"quick_gelu"` or `"gelu"`.
        layer_norm_epsilon: float, 1e-5 as in PyTorch.

    Call arguments:
        image_features: `(batch, image_dim)`.
        token_ids: int `(batch, length)`, `length <= context_length`.

    Returns:
        `(batch, length, vocabulary_size)` logits; position `t` predicts token `t + 1`.

    Example:
    >>> decoder = CaptionDecoder(vocabulary_size=100, context_length=8, hidden_dim=32,
    ...                          num_layers=1, num_heads=2)
    >>> tuple(decoder(keras.ops.zeros((2, 16)), keras.ops.ones((2, 8), "int32")).shape)
    (2, 8, 100)
    """

    def __init__(self, vocabulary_size=49408, context_length=77, hidden_dim=512, num_layers=2,
                 num_heads=8, intermediate_dim=None, activation="quick_gelu",
                 layer_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        for arg, value in [("vocabulary_size", vocabulary_size), ("context_length", context_length),
                           ("hidden_dim", hidden_dim), ("num_layers", num_layers),
                           ("num_heads", num_heads)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive int. Received: {arg}={value!r}")
        if intermediate_dim is not None and (not isinstance(intermediate_dim, int)
                                             or intermediate_dim <= 0):
            raise ValueError("`intermediate_dim` must be None or a positive int. "
                             f"Received: intermediate_dim={intermediate_dim!r}")
        self.vocabulary_size = vocabulary_size
        self.context_length = context_length
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        policy = self.dtype_policy
        mixed = policy.variable_dtype == "float32" and policy.compute_dtype != "float32"
        self.image_projection = keras.layers.Dense(hidden_dim, name="image_projection",
                                                   dtype=policy)
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="token_embedding", dtype="float32" if mixed else policy,
        )
        self.resblocks = residual_attention_blocks(
            hidden_dim, num_layers, num_heads, intermediate_dim or 4 * hidden_dim, activation,
            layer_norm_epsilon, dtype=policy,
        )
        self.ln_final = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="ln_final", dtype=policy)

    def build(self, image_features_shape, token_ids_shape=None):
        self.image_projection.build(image_features_shape)
        self.token_embedding.build(token_ids_shape or (None, self.context_length))
        self.positional_embedding = self.add_weight(
            name="positional_embedding", shape=(self.context_length + 1, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.01),
        )
        hidden_shape = (None, None, self.hidden_dim)
        for block in self.resblocks:
            block.build(hidden_shape)
        self.ln_final.build(hidden_shape)
        self.built = True

    def call(self, image_features, token_ids):
        token_ids = ops.convert_to_tensor(token_ids)
        static_length = token_ids.shape[1]
        if static_length is not None and static_length > self.context_length:
            raise ValueError(
                f"`token_ids` must have at most context_length={self.context_length} "
                f"positions. Received: token_ids.shape={token_ids.shape}")
        length = ops.shape(token_ids)[1]
        residual = self.variable_dtype  # float32 stream under mixed policies
        prefix = ops.cast(self.image_projection(image_features), residual)[:, None]  # (B, 1, D)
        tokens = ops.cast(self.token_embedding(token_ids), residual)  # (B, L, D)
        x = ops.concatenate([prefix, tokens], axis=1)  # (B, L+1, D)
        x = x + ops.cast(self.positional_embedding[: length + 1], residual)
        for block in self.resblocks:
            x = block(x, causal=True)  # (B, L+1, D)
        h = ops.cast(layer_norm(self.ln_final, x[:, 1:]), self.compute_dtype)  # (B, L, D)
        embeddings = ops.cast(self.token_embedding.embeddings, h.dtype)  # (V, D)
        return ops.einsum("bld,vd->blv", h, embeddings)  # (B, L, V)

    def compute_output_shape(self, image_features_shape, token_ids_shape):
        return tuple(token_ids_shape) + (self.vocabulary_size,)

    def get_config(self):
        config = super().get_config()
        config.update({
            "vocabulary_size": self.vocabulary_size, "context_length": self.context_length,
            "hidden_dim": self.hidden_dim, "num_layers": self.num_layers,
            "num_heads": self.num_heads, "intermediate_dim": self.intermediate_dim,
            "activation": self.activation, "layer_norm_epsilon": self.layer_norm_epsilon,
        })
        return config


# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_clip")
class CaptionPredictionModel(keras.Model):
    """An image tower that predicts its caption: the CLIP paper's predictive baselines.

    The image tower is keras_clip's `CLIPVisionTransformer`, built with the arguments
    `CLIP` passes for `vision_architecture="vit"` (MLP width `4 * vision_hidden_dim`,
    no patch dropout, named `visual`). On its (unnormalised) image embedding sits
    either
    - `head="bag_of_words"`: a `BagOfWordsPredictionHead`, trained with
      `bag_of_words_prediction_loss` (the caption's words, order ignored), or
    - `head="transformer"`: a `CaptionDecoder`, trained with `caption_lm_loss`
      (the caption token by token, given the image).

    `train_step` takes the same `{"images", "token_ids"}` batches as `CLIP.train_step`.
    Zero-shot classification scores each class prompt by `prompt_log_likelihood`.

    Args:
        head: `"bag_of_words"` or `"transformer"`.
        embed_dim: int, width of the image embedding.
        image_size: int, input resolution.
        vision_num_layers, vision_hidden_dim, vision_num_heads, vision_patch_size: int,
            the ViT's shape (as `CLIP`'s arguments of the same names).
        vocabulary_size: int, 49,408 for OpenAI's BPE.
        context_length: int, caption tokens (77).
        decoder_hidden_dim: int, the decoder's width; `None`: `vision_hidden_dim`.
            (Transformer head only.)
        decoder_num_layers: int, the decoder's depth.
        decoder_num_heads: int; `None`: `max(1, decoder_hidden_dim // 64)` (the
            paper's head width of 64).
        activation: `"quick_gelu"` or `"gelu"`, both towers.
        layer_norm_epsilon: float, 1e-5 as in PyTorch.
        start_token_id, end_token_id: int, the tokenizer's start and end ids
            (OpenAI's 49406 and 49407); not words for the bag-of-words head. Padding
            is id 0.

    Call arguments:
        inputs: dict with `images` `(B, S, S, 3)` and (transformer head) `token_ids`
            `(B, L)`.
        training: bool.

    Returns:
        bag_of_words: `(B, vocabulary_size)` word logits; transformer:
        `(B, L, vocabulary_size)` next-token logits. In the compute dtype.

    Example:
    >>> model = CaptionPredictionModel("bag_of_words", embed_dim=16, image_size=32,
    ...     vision_num_layers=1, vision_hidden_dim=16, vision_num_heads=2,
    ...     vision_patch_size=16, vocabulary_size=64, context_length=8,
    ...     start_token_id=62, end_token_id=63)
    >>> tuple(model({"images": keras.ops.zeros((2, 32, 32, 3))}).shape)
    (2, 64)
    >>> prompts = [[62, 5, 63, 0], [62, 7, 8, 63]]  # start, words, end, padding
    >>> model.prompt_log_likelihood(keras.ops.zeros((3, 32, 32, 3)), prompts).shape
    (3, 2)
    """

    def __init__(self, head, embed_dim, image_size, vision_num_layers, vision_hidden_dim,
                 vision_num_heads, vision_patch_size, vocabulary_size=49408, context_length=77,
                 decoder_hidden_dim=None, decoder_num_layers=2, decoder_num_heads=None,
                 activation="quick_gelu", layer_norm_epsilon=1e-5, start_token_id=SOT,
                 end_token_id=EOT, **kwargs):
        super().__init__(**kwargs)
        if head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS}. Received: head={head!r}")
        for arg, value in [("vocabulary_size", vocabulary_size), ("context_length", context_length)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive int. Received: {arg}={value!r}")
        if head == "transformer":
            for arg, value in [("start_token_id", start_token_id), ("end_token_id", end_token_id)]:
                if not 0 <= value < vocabulary_size:
                    raise ValueError(
                        f"`{arg}` must be in [0, vocabulary_size) for the transformer head "
                        f"(it is embedded and predicted). Received: {arg}={value}, "
                        f"vocabulary_size={vocabulary_size}")
        self.head = head
        # The image tower's kind, read by `keras_clip.training.create_optimizer` (Adam's
        # epsilon) as on a `CLIP`; always a ViT here.
        self.vision_architecture = "vit"
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.vision_num_layers = vision_num_layers
        self.vision_hidden_dim = vision_hidden_dim
        self.vision_num_heads = vision_num_heads
        self.vision_patch_size = vision_patch_size
        self.vocabulary_size = vocabulary_size
        self.context_length = context_length
        self.decoder_hidden_dim = decoder_hidden_dim
        self.decoder_num_layers = decoder_num_layers
        self.decoder_num_heads = decoder_num_heads
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.start_token_id = start_token_id
        self.end_token_id = end_token_id

        self.visual = CLIPVisionTransformer(
            embed_dim, image_size=image_size, patch_size=vision_patch_size,
            hidden_dim=vision_hidden_dim, num_layers=vision_num_layers,
            num_heads=vision_num_heads, intermediate_dim=4 * vision_hidden_dim,
            activation=activation, layer_norm_epsilon=layer_norm_epsilon,
            name="visual", dtype=self.dtype_policy,
        )
        if head == "bag_of_words":
            self.caption_head = BagOfWordsPredictionHead(
                vocabulary_size, name="caption_head", dtype=self.dtype_policy)
        else:
            hidden = decoder_hidden_dim or vision_hidden_dim
            self.caption_head = CaptionDecoder(
                vocabulary_size=vocabulary_size, context_length=context_length,
                hidden_dim=hidden, num_layers=decoder_num_layers,
                num_heads=decoder_num_heads or max(1, hidden // 64), activation=activation,
                layer_norm_epsilon=layer_norm_epsilon, name="caption_head",
                dtype=self.dtype_policy,
            )
        # Our own tracker: Keras' built-in one would report 0.0 (train_step never feeds it).
        self._caption_loss_tracker = keras.metrics.Mean(name="loss")
        self._lm_scores_fn = None
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        self.visual.build((None, self.image_size, self.image_size, 3))
        if self.head == "bag_of_words":
            self.caption_head.build((None, self.embed_dim))
        else:
            self.caption_head.build((None, self.embed_dim), (None, self.context_length))
        self.built = True

    @property
    def ignore_ids(self):
        """Ids that are not words: padding, start and end."""
        return (PAD, self.start_token_id, self.end_token_id)

    def encode_image(self, images, normalize=True, training=None):
        """Image embeddings `(B, embed_dim)` (unit-norm if `normalize`)."""
        features = self.visual(images, training=training)
        if not normalize:
            return features
        x = ops.cast(features, "float32")
        return ops.cast(x / ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), features.dtype)

    def call(self, inputs, training=False):
        features = self.visual(inputs["images"], training=training)  # (B, E)
        if self.head == "bag_of_words":
            return self.caption_head(features)  # (B, V)
        return self.caption_head(features, inputs["token_ids"])  # (B, L, V)

    # -- training -----------------------------------------------------------------
    def compile(self, optimizer="adamw", **kwargs):
        """Configures training. No Keras `loss`: the head's loss is built in.

        Args:
            optimizer: a Keras optimizer.
            **kwargs: passed to `keras.Model.compile` (`jit_compile` is forced off:
                the step trims captions to the batch's longest, a dynamic shape).
        """
        if "loss" in kwargs:
            raise ValueError(
                "CaptionPredictionModel computes its loss itself; do not pass `loss`. "
                f"Received: loss={kwargs['loss']!r}")
        kwargs["jit_compile"] = False
        super().compile(optimizer=optimizer, **kwargs)

    @property
    def metrics(self):
        return [self._caption_loss_tracker]

    def _trim(self, token_ids):
        """`token_ids` cut after the batch's last non-padding position (exact: causal)."""
        token_ids = ops.convert_to_tensor(token_ids)
        positions = ops.arange(1, ops.shape(token_ids)[1] + 1, dtype="int32")  # (L,)
        last = ops.max(ops.where(ops.not_equal(token_ids, PAD), positions[None], 0))
        return token_ids[:, : ops.maximum(last, 1)]

    def compute_caption_loss(self, data, training=False):
        """Scalar float32 loss of the head on a `{"images", "token_ids"}` batch."""
        images, token_ids = data["images"], data["token_ids"]
        if self.head == "bag_of_words":
            logits = self({"images": images}, training=training)  # (B, V)
            return bag_of_words_prediction_loss(logits, token_ids, self.ignore_ids)
        token_ids = self._trim(token_ids)
        logits = self({"images": images, "token_ids": token_ids}, training=training)  # (B, L, V)
        return caption_lm_loss(logits, token_ids, PAD)

    def train_step(self, data):
        """One optimisation step on a `{"images", "token_ids"}` batch (as `CLIP`).

        Under a distribution strategy the loss is divided by the number of replicas
        (the optimizer sums the replicas' gradients), so the update is that of the
        global batch's mean loss.

        Returns:
            `{"loss": running mean of the loss}`.
        """
        if isinstance(data, tuple):  # (x,) from Keras' data adapters
            data = data[0]
        _, num_replicas = distribute.replica_info()
        with tf.GradientTape() as tape:
            loss = self.compute_caption_loss(data, training=True)
            scaled = self.optimizer.scale_loss(loss / num_replicas)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        self._caption_loss_tracker.update_state(loss)
        return {"loss": self._caption_loss_tracker.result()}

    def test_step(self, data):
        if isinstance(data, tuple):
            data = data[0]
        self._caption_loss_tracker.update_state(self.compute_caption_loss(data))
        return {"loss": self._caption_loss_tracker.result()}

    # -- zero-shot scoring ----------------------------------------------------------
    def _image_features(self, images):
        images = ops.convert_to_tensor(images)
        chunks = [self.visual(images[i:i + _IMAGE_CHUNK], training=False)
                  for i in range(0, int(images.shape[0]), _IMAGE_CHUNK)]
        return ops.concatenate(chunks, axis=0)  # (N, E)

    def _check_prompts(self, prompt_token_ids):
        prompts = np.asarray(prompt_token_ids)
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
            raise ValueError("`prompt_token_ids` must be a 2-D int array (prompts, length). "
                             f"Received: shape={prompts.shape}, dtype={prompts.dtype}")
        if self.head == "transformer":
            bad = np.flatnonzero(prompts[:, 0] != self.start_token_id)
            if bad.size:
                raise ValueError(
                    f"`prompt_token_ids` rows must start with start_token_id="
                    f"{self.start_token_id}. Received: row {bad[0]} starts with "
                    f"{prompts[bad[0], 0]}")
            scored = np.sum(prompts[:, 1:] != PAD, axis=1)
            what = "token after the start token"
        else:
            scored = np.sum(np.isin(prompts, self.ignore_ids, invert=True), axis=1)
            what = "word token"
        empty = np.flatnonzero(scored == 0)
        if empty.size:
            raise ValueError(f"Every prompt must have a {what}. Received: row {empty[0]} = "
                             f"{prompts[empty[0]].tolist()}")
        # Trim to the longest prompt (exact: padding is never scored, the mask is causal).
        last = int(np.max(np.where(prompts != PAD, np.arange(1, prompts.shape[1] + 1), 0)))
        return prompts[:, :last].astype("int32")

    def prompt_log_likelihood(self, images, prompt_token_ids):
        """Mean per-token log-likelihood of each prompt given each image.

        bag_of_words: the mean over the prompt's word tokens (ids not padding, start
        or end; a repeated word counts each time) of `log_softmax(logits)[token]`.
        transformer: the mean over positions `t` from the first word through the end
        token (every non-padding position after the start token) of
        `log p(token_t | image, tokens < t)` under teacher forcing.
        Float32 log-softmax. A mean, not a sum, so that long class names are not
        penalised (a stated deviation: the paper does not say how it scores).

        Runs eagerly in chunks: at most ~2^24 logits at once, whatever `N`, `P` and the
        vocabulary.

        Args:
            images: `(N, S, S, 3)` preprocessed images.
            prompt_token_ids: int `(P, L)` tokenized prompts (start token first).

        Returns:
            numpy float32 `(N, P)`.
        """
        prompts = self._check_prompts(prompt_token_ids)  # (P, L')
        features = self._image_features(images)  # (N, E)
        if self.head == "bag_of_words":
            return self._bag_of_words_scores(features, prompts)
        return self._lm_scores(features, prompts)

    def _bag_of_words_scores(self, features, prompts):
        num_prompts, length = prompts.shape
        words = np.isin(prompts, self.ignore_ids, invert=True)
        weights = (words / words.sum(axis=1, keepdims=True)).astype("float32")  # (P, L)
        flat = np.where(words, prompts, 0).reshape(-1)  # (P*L,)
        out = []
        for i in range(0, int(features.shape[0]), _IMAGE_CHUNK):
            logits = ops.cast(self.caption_head(features[i:i + _IMAGE_CHUNK]), "float32")
            log_probs = ops.log_softmax(logits, axis=-1)  # (n, V)
            picked = ops.reshape(ops.take(log_probs, flat, axis=1), (-1, num_prompts, length))
            out.append(ops.convert_to_numpy(ops.sum(picked * weights[None], axis=-1)))  # (n, P)
        return np.concatenate(out, axis=0).astype(np.float32)

    def _lm_scores(self, features, prompts):
        if self._lm_scores_fn is None:
            def scores(image_features, token_ids):  # (R, E), (R, L) -> (R,)
                logits = ops.cast(self.caption_head(image_features, token_ids), "float32")[:, :-1]
                targets = token_ids[:, 1:]  # (R, L-1)
                picked = ops.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                log_p = picked - ops.logsumexp(logits, axis=-1)  # (R, L-1)
                mask = ops.cast(ops.not_equal(targets, PAD), "float32")
                return ops.sum(log_p * mask, axis=1) / ops.sum(mask, axis=1)
            self._lm_scores_fn = tf.function(scores, reduce_retracing=True)
        num_images, num_prompts = int(features.shape[0]), prompts.shape[0]
        total = num_images * num_prompts
        rows = max(1, min(total, _SCORING_ELEMENTS // (prompts.shape[1] * self.vocabulary_size)))
        prompts = ops.convert_to_tensor(prompts)
        out = []
        for start in range(0, total, rows):
            pairs = np.minimum(np.arange(start, start + rows), total - 1)  # last chunk padded
            got = self._lm_scores_fn(ops.take(features, pairs // num_prompts, axis=0),
                                     ops.take(prompts, pairs % num_prompts, axis=0))
            out.append(ops.convert_to_numpy(got)[: min(rows, total - start)])
        return np.concatenate(out).reshape(num_images, num_prompts).astype(np.float32)

    # -- config ---------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update({
            "head": self.head, "embed_dim": self.embed_dim, "image_size": self.image_size,
            "vision_num_layers": self.vision_num_layers,
            "vision_hidden_dim": self.vision_hidden_dim,
            "vision_num_heads": self.vision_num_heads,
            "vision_patch_size": self.vision_patch_size,
            "vocabulary_size": self.vocabulary_size, "context_length": self.context_length,
            "decoder_hidden_dim": self.decoder_hidden_dim,
            "decoder_num_layers": self.decoder_num_layers,
            "decoder_num_heads": self.decoder_num_heads, "activation": self.activation,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "start_token_id": self.start_token_id, "end_token_id": self.end_token_id,
        })
        return config


def zero_shot_by_likelihood(model, images, class_prompt_token_ids):
    """Zero-shot class scores of a predictive model: the likelihood of each class's prompts.

    Args:
        model: a `CaptionPredictionModel` (anything with `prompt_log_likelihood`).
        images: `(N, S, S, 3)` preprocessed images.
        class_prompt_token_ids: int `(C, T, L)`: C classes x T templates, tokenized.

    Returns:
        numpy float32 `(N, C)`: for each image and class, the mean over the T templates
        of `model.prompt_log_likelihood`. `argmax` over classes is the prediction.
    """
    prompts = np.asarray(class_prompt_token_ids)
    if prompts.ndim != 3:
        raise ValueError("`class_prompt_token_ids` must be 3-D (classes, templates, length). "
                         f"Received: shape={prompts.shape}")
    num_classes, num_templates, length = prompts.shape
    scores = np.asarray(model.prompt_log_likelihood(images, prompts.reshape(-1, length)),
                        np.float32)  # (N, C*T)
    return scores.reshape(-1, num_classes, num_templates).mean(axis=-1)
