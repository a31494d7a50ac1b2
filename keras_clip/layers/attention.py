"""Multi-head self-attention with a packed query/key/value projection."""
import math

import keras
import tensorflow as tf
from keras import ops

from keras_clip.layers.fast_ops import dense_rows
from keras_clip.layers.initializers import torch_default_kernel


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPAttention(keras.layers.Layer):
    """Multi-head self-attention laid out like PyTorch's `nn.MultiheadAttention`.

    Queries, keys and values come from one packed projection (`qkv`, kernel
    `(hidden_dim, 3 * hidden_dim)`, in q, k, v order), as in OpenAI's checkpoints
    (`in_proj_weight`), so weights convert by a transpose. Under bf16 compute the
    scores `q k^T` are computed from float32 q and k, scaled by `head_dim^-0.5` and
    soft-maxed in float32, as PyTorch's CPU attention does under autocast (the
    reference scales the queries before the product: the same up to rounding). The projections
    run as fused oneDNN `MatMul+BiasAdd` on `(batch * length, hidden_dim)` rows
    (`keras_clip.layers.fast_ops`).

    Args:
        hidden_dim: int. Width of the input and output.
        num_heads: int. Number of heads; must divide `hidden_dim`.
        kernel_initializer: initializer of the packed projection (default
            `glorot_uniform`, PyTorch's `xavier_uniform_` on `in_proj_weight`).
        output_kernel_initializer: initializer of the output projection (default
            `None`: PyTorch's `nn.Linear` default). Both biases start at zero, as in
            `nn.MultiheadAttention`.

    Call arguments:
        x: float tensor `(batch, length, hidden_dim)`.
        causal: bool. If True, position i attends only to positions <= i.

    Returns:
        Tensor `(batch, length, hidden_dim)`.

    Example:
    >>> layer = CLIPAttention(hidden_dim=64, num_heads=2)
    >>> layer(keras.ops.ones((1, 5, 64)), causal=True).shape
    (1, 5, 64)
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        kernel_initializer="glorot_uniform",
        output_kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_heads <= 0:
            raise ValueError(f"`num_heads` must be positive. Received: num_heads={num_heads}")
        if hidden_dim % num_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_heads`. "
                f"Received: hidden_dim={hidden_dim}, num_heads={num_heads}"
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.output_kernel_initializer = keras.initializers.get(
            output_kernel_initializer or torch_default_kernel()
        )
        self.qkv = keras.layers.Dense(
            3 * hidden_dim,
            kernel_initializer=self.kernel_initializer,
            name="qkv",
            dtype=self.dtype_policy,
        )
        self.out_proj = keras.layers.Dense(
            hidden_dim,
            kernel_initializer=self.output_kernel_initializer,
            name="out_proj",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.out_proj.build(tuple(input_shape[:-1]) + (self.hidden_dim,))

    def call(self, x, causal=False):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        rows = ops.reshape(x, (-1, self.hidden_dim))  # (B*T, D)
        # One fused MatMul+BiasAdd (oneDNN), then one transpose puts q, k, v each in
        # (B, H, T, Dh), the layout batched matmuls take without further copies.
        # Unstacking, not slicing: the gradient of an unstack is a stack, while that
        # of a strided slice (StridedSliceGrad) took ~150 ms of a 900 ms clip_vit_tiny
        # training step on CPU.
        qkv = ops.reshape(dense_rows(self.qkv, rows),
                          (batch, length, 3, self.num_heads, self.head_dim))
        q, k, v = tf.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)))  # (B, H, T, Dh) each
        # Scores from float32 q and k, soft-maxed in float32: a bf16 product rounds every
        # score before the softmax (PyTorch's CPU attention keeps them in float32). The
        # product is ~T / (12 D) of a block's FLOPs.
        scores = tf.matmul(ops.cast(q, "float32"), ops.cast(k, "float32"), transpose_b=True)  # (B, H, T, T)
        scores = scores * (1.0 / math.sqrt(self.head_dim))
        if causal:
            positions = ops.arange(length)
            allowed = positions[None, :] <= positions[:, None]  # (T, T)
            scores = ops.where(allowed[None, None], scores, -1e9)
        probs = ops.cast(tf.nn.softmax(scores, axis=-1), v.dtype)
        out = ops.transpose(tf.matmul(probs, v), (0, 2, 1, 3))  # (B, T, H, Dh)
        out = dense_rows(self.out_proj, ops.reshape(out, (-1, self.hidden_dim)))  # (B*T, D)
        return ops.reshape(out, (batch, length, self.hidden_dim))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "output_kernel_initializer": keras.initializers.serialize(
                    self.output_kernel_initializer
                ),
            }
        )
        return config
