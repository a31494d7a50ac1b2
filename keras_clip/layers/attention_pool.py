"""Attention pooling that replaces global average pooling in CLIP's ResNets."""
import math

import keras
from keras import ops

from keras_clip.layers.initializers import torch_default_bias


@keras.saving.register_keras_serializable(package="keras_clip")
class AttentionPool2D(keras.layers.Layer):
    """Single-query multi-head attention over a feature map (OpenAI's `AttentionPool2d`).

    The query is the mean of the spatial features; keys and values are the mean
    followed by every spatial feature; all get a learned positional embedding.
    Separate q, k, v projections (with bias) and an output projection to `embed_dim`.
    (OpenAI's `output_dim`; a saved config with `output_dim` still loads.)

    Args:
        spatial_dim: int. Side of the square input feature map (image_size // 32).
        hidden_dim: int. Channels of the feature map.
        num_heads: int. Attention heads.
        embed_dim: int. Width of the output (the CLIP `embed_dim`).

    Call arguments:
        x: `(batch, spatial_dim, spatial_dim, hidden_dim)`.

    Returns:
        `(batch, embed_dim)`.
    """

    def __init__(self, spatial_dim, hidden_dim, num_heads, embed_dim, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        self.spatial_dim = spatial_dim
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.head_dim = hidden_dim // num_heads
        std = hidden_dim**-0.5
        # Weights as OpenAI's `initialize_parameters`, biases as `nn.Linear`'s default.
        def dense(units, name):
            return keras.layers.Dense(
                units, kernel_initializer=keras.initializers.RandomNormal(stddev=std),
                bias_initializer=torch_default_bias(hidden_dim), name=name, dtype=self.dtype_policy,
            )

        self.q_proj = dense(hidden_dim, "q_proj")
        self.k_proj = dense(hidden_dim, "k_proj")
        self.v_proj = dense(hidden_dim, "v_proj")
        self.c_proj = dense(embed_dim, "c_proj")

    def build(self, input_shape):
        self.positional_embedding = self.add_weight(
            name="positional_embedding",
            shape=(self.spatial_dim**2 + 1, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=self.hidden_dim**-0.5),
        )
        for dense in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            dense.build((None, self.hidden_dim))

    def call(self, x):
        batch = ops.shape(x)[0]
        x = ops.reshape(x, (batch, self.spatial_dim**2, self.hidden_dim))  # (B, HW, C)
        x = ops.concatenate([ops.mean(x, axis=1, keepdims=True), x], axis=1)  # (B, HW+1, C)
        x = x + ops.cast(self.positional_embedding, x.dtype)
        split = lambda t: ops.reshape(t, (batch, -1, self.num_heads, self.head_dim))  # noqa: E731
        q = split(self.q_proj(x[:, :1])) * ops.cast(1 / math.sqrt(self.head_dim), x.dtype)  # (B, 1, H, Dh)
        k = split(self.k_proj(x))  # (B, HW+1, H, Dh)
        v = split(self.v_proj(x))
        scores = ops.cast(ops.einsum("bqhd,bkhd->bhqk", q, k), "float32")  # (B, H, 1, HW+1)
        probs = ops.cast(ops.softmax(scores, axis=-1), v.dtype)
        out = ops.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, 1, H, Dh)
        out = ops.reshape(out, (batch, self.hidden_dim))
        return self.c_proj(out)  # (B, embed_dim)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "spatial_dim": self.spatial_dim,
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "embed_dim": self.embed_dim,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "output_dim" in config:  # the name up to issue 12
            config["embed_dim"] = config.pop("output_dim")
        return super().from_config(config)
