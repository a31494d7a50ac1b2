"""Bag-of-words text encoder: the CLIP paper's contrastive baseline text tower."""
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPBagOfWordsEncoder(keras.layers.Layer):
    """A text encoder that ignores word order (Radford et al., 2021, Figure 2).

    `features = mean_{t: token_ids[t] != pad_token_id} token_embedding[token_ids[t]]
    @ text_projection`: the mean of the token embeddings over the non-padding tokens,
    then a linear projection (no bias) to `embed_dim`. It replaces the text
    transformer for the paper's "bag-of-words contrastive" model. The start and
    end tokens are non-padding tokens and are averaged like any word. A row of
    padding only gives zeros. Under a mixed policy the lookup and the mean are
    float32 and the projection runs in the compute dtype.

    Deviation from the paper: the paper does not specify its bag-of-words encoder
    beyond "a bag-of-words encoding of the same text"; this one is the simplest such
    encoder (as in the paper's predecessor, ConVIRT-style bag-of-words baselines).

    Args:
        embed_dim: int, width of the shared image-text space.
        vocabulary_size: int, 49,408 for OpenAI's BPE.
        context_length: int, maximum tokens per text (only checked against inputs'
            static length; kept so the tower has the transformer's interface).
        hidden_dim: int, token-embedding width.
        pad_token_id: int, the id that marks padding (0 for OpenAI's tokenizer).

    Call arguments:
        token_ids: int tensor `(batch, length)`.
        trim: ignored (accepted for the text transformer's interface; the mean
            does not depend on trailing padding).

    Returns:
        `(batch, embed_dim)` text features (not normalised).

    Example:
    >>> tower = CLIPBagOfWordsEncoder(embed_dim=8, vocabulary_size=100, context_length=6,
    ...                               hidden_dim=16)
    >>> tower(keras.ops.convert_to_tensor([[98, 5, 99, 0, 0, 0]])).shape
    (1, 8)
    """

    def __init__(self, embed_dim, vocabulary_size=49408, context_length=77, hidden_dim=512,
                 pad_token_id=0, **kwargs):
        super().__init__(**kwargs)
        for arg, value in [("embed_dim", embed_dim), ("vocabulary_size", vocabulary_size),
                           ("context_length", context_length), ("hidden_dim", hidden_dim)]:
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{arg}` must be a positive int. Received: {arg}={value!r}")
        self.embed_dim = embed_dim
        self.vocabulary_size = vocabulary_size
        self.context_length = context_length
        self.hidden_dim = hidden_dim
        self.pad_token_id = pad_token_id
        self.remat = False  # the transformer's training switch; nothing to recompute here
        # Under a mixed policy the lookup and the mean stay float32 (as the transformer's
        # residual stream); only the projection runs in the compute dtype.
        policy = self.dtype_policy
        mixed = policy.variable_dtype == "float32" and policy.compute_dtype != "float32"
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="token_embedding", dtype="float32" if mixed else policy,
        )

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.text_projection = self.add_weight(
            name="text_projection", shape=(self.hidden_dim, self.embed_dim),
            initializer=keras.initializers.RandomNormal(stddev=self.hidden_dim**-0.5),
        )
        self.built = True

    def call(self, token_ids, trim=False):
        del trim
        embeddings = self.token_embedding(token_ids)  # (B, L, H)
        mask = ops.cast(ops.not_equal(token_ids, self.pad_token_id), embeddings.dtype)  # (B, L)
        total = ops.sum(embeddings * mask[:, :, None], axis=1)  # (B, H)
        count = ops.maximum(ops.sum(mask, axis=1, keepdims=True), 1.0)  # (B, 1)
        mean = ops.cast(total / count, self.compute_dtype)  # (B, H)
        return ops.matmul(mean, ops.cast(self.text_projection, self.compute_dtype))  # (B, E)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"embed_dim": self.embed_dim, "vocabulary_size": self.vocabulary_size,
                       "context_length": self.context_length, "hidden_dim": self.hidden_dim,
                       "pad_token_id": self.pad_token_id})
        return config
