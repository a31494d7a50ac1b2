"""CLIP text tower: causal transformer pooled at the end-of-text token."""
import keras
from keras import ops

from keras_clip.layers.fast_ops import layer_norm
from keras_clip.layers.residual_attention_block import residual_attention_blocks


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPTextTransformer(keras.layers.Layer):
    """The text tower of CLIP (Radford et al., 2021, section 2.4).

    Token embedding + learned positional embedding, `num_layers` pre-LayerNorm
    residual blocks with a causal mask, a final LayerNorm, the feature at the
    end-of-text token, and a linear projection (no bias) to `embed_dim`.

    Under a mixed policy (float32 weights, bf16 compute) the residual stream, from the
    token-embedding lookup to `ln_final`, is float32 and only the blocks' branches run in
    bf16, as open_clip's text tower under torch autocast; the tower's output is in the
    compute dtype.

    Deviation from OpenAI's reference: the end-of-text position is found by its id
    (`end_token_id`), not by `argmax` over ids (identical for OpenAI's tokenizer, where
    the end token has the largest id, but also right for other vocabularies). A row
    without an end token is pooled at its last non-padding token.

    Args:
        embed_dim: int. Width of the shared image-text space.
        vocabulary_size: int. 49,408 for OpenAI's BPE.
        context_length: int. Number of positions (77).
        hidden_dim: int. Transformer width.
        num_layers: int. Transformer depth.
        num_heads: int. Attention heads (hidden_dim / 64 in the paper).
        intermediate_dim: int. MLP width (4 * hidden_dim).
        activation: `"quick_gelu"` or `"gelu"`.
        layer_norm_epsilon: float. 1e-5 as in PyTorch.
        end_token_id: int. Id of the end-of-text token (49407).

    Call arguments:
        token_ids: int tensor `(batch, length)`, length <= context_length.
        trim: bool. Drop positions after the longest sequence's end token before the
            transformer. The mask is causal, so the pooled features are unchanged; it
            saves compute for short texts. Needs dynamic shapes, so leave it off under
            XLA.

    Returns:
        `(batch, embed_dim)` text features (not normalised).

    Example:
    >>> tower = CLIPTextTransformer(embed_dim=32, vocabulary_size=100,
    ...     context_length=8, hidden_dim=64, num_layers=1, num_heads=2,
    ...     intermediate_dim=256, end_token_id=99)
    >>> tower(keras.ops.convert_to_tensor([[98, 5, 99, 0, 0, 0, 0, 0]])).shape
    (1, 32)
    """

    def __init__(
        self,
        embed_dim,
        vocabulary_size=49408,
        context_length=77,
        hidden_dim=512,
        num_layers=12,
        num_heads=8,
        intermediate_dim=2048,
        activation="quick_gelu",
        layer_norm_epsilon=1e-5,
        end_token_id=49407,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Training setting, not config: `CLIP.compile(remat=True)` sets it.
        self.remat = False
        for arg, value in [
            ("embed_dim", embed_dim), ("vocabulary_size", vocabulary_size),
            ("context_length", context_length), ("hidden_dim", hidden_dim),
            ("num_layers", num_layers),
        ]:
            if value <= 0:
                raise ValueError(f"`{arg}` must be positive. Received: {arg}={value}")
        self.embed_dim = embed_dim
        self.vocabulary_size = vocabulary_size
        self.context_length = context_length
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.end_token_id = end_token_id

        normal = keras.initializers.RandomNormal
        # Under a mixed policy (float32 variables, bf16 compute) the lookup returns float32:
        # the residual stream starts in float32 (see `call`).
        policy = self.dtype_policy
        mixed = policy.variable_dtype == "float32" and policy.compute_dtype != "float32"
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, embeddings_initializer=normal(stddev=0.02),
            name="token_embedding", dtype="float32" if mixed else self.dtype_policy,
        )
        self.resblocks = residual_attention_blocks(
            hidden_dim, num_layers, num_heads, intermediate_dim, activation,
            layer_norm_epsilon, dtype=self.dtype_policy,
        )
        self.ln_final = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="ln_final", dtype=self.dtype_policy
        )

    def build(self, input_shape):
        self.token_embedding.build(input_shape)
        self.positional_embedding = self.add_weight(
            name="positional_embedding",
            shape=(self.context_length, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.01),
        )
        hidden_shape = (None, None, self.hidden_dim)
        for block in self.resblocks:
            block.build(hidden_shape)
        self.ln_final.build(hidden_shape)
        self.text_projection = self.add_weight(
            name="text_projection",
            shape=(self.hidden_dim, self.embed_dim),
            initializer=keras.initializers.RandomNormal(stddev=self.hidden_dim**-0.5),
        )

    def end_token_positions(self, token_ids):
        """Index of the end token in each row, else of the last non-padding token."""
        is_end = ops.cast(ops.equal(token_ids, self.end_token_id), "int32")
        has_end = ops.max(is_end, axis=-1) > 0
        last_token = ops.sum(ops.cast(ops.not_equal(token_ids, 0), "int32"), axis=-1) - 1
        return ops.where(has_end, ops.argmax(is_end, axis=-1), ops.maximum(last_token, 0))

    def call(self, token_ids, trim=False):
        token_ids = ops.convert_to_tensor(token_ids)
        positions = self.end_token_positions(token_ids)  # (B,)
        if trim:
            token_ids = token_ids[:, : ops.max(positions) + 1]
        length = ops.shape(token_ids)[1]
        # The residual stream in the variable dtype: float32 under mixed policies, as
        # open_clip's text tower under torch autocast (embedding lookups and additions are
        # not autocast there); bf16 rounding of each block's output into a bf16 stream
        # made keras_clip's mixed_bfloat16 gradients noisier than open_clip's.
        # (The positional embedding and ln_final's gain and bias are read in the compute
        # dtype: Keras autocasts a mixed layer's own variables inside its call.)
        residual = self.variable_dtype
        x = ops.cast(self.token_embedding(token_ids), residual)  # (B, T, D)
        x = x + ops.cast(self.positional_embedding[:length], residual)
        for block in self.resblocks:
            if self.remat:  # keep only the block's input; recompute the rest in backward
                x = keras.remat(lambda h, block=block: block(h, causal=True))(x)
            else:
                x = block(x, causal=True)  # (B, T, D)
        pooled = ops.take_along_axis(x, positions[:, None, None], axis=1)[:, 0]  # (B, D)
        pooled = ops.cast(layer_norm(self.ln_final, pooled), self.compute_dtype)  # per-token: same as before pooling
        return ops.matmul(pooled, ops.cast(self.text_projection, pooled.dtype))  # (B, E)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "vocabulary_size": self.vocabulary_size,
                "context_length": self.context_length,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "activation": self.activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "end_token_id": self.end_token_id,
            }
        )
        return config
