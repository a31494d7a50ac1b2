"""CLIP image tower, Vision Transformer variant."""
import keras
import tensorflow as tf
from keras import ops

from keras_clip.layers.initializers import torch_default_kernel
from keras_clip.layers.residual_attention_block import residual_attention_blocks


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPVisionTransformer(keras.layers.Layer):
    """ViT image tower of CLIP (Dosovitskiy et al., 2020, with CLIP's changes).

    Initialised as the reference: the class token, positional embedding and projection
    from `N(0, hidden_dim^-1)`, everything else with PyTorch's defaults (OpenAI's and
    open_clip's ViTs have no init of their own).

    Patchify convolution without bias, a class token, learned positional embedding,
    an extra LayerNorm before the transformer (`ln_pre`, CLIP's one change to ViT),
    pre-LayerNorm blocks, `ln_post` on the class token and a projection without bias.

    Args:
        embed_dim: int. Width of the shared space.
        image_size: int. Input resolution (square).
        patch_size: int. Patch side; must divide `image_size`.
        hidden_dim: int. Transformer width.
        num_layers: int. Depth.
        num_heads: int. Heads (hidden_dim / 64 in the paper).
        intermediate_dim: int. MLP width (4 * hidden_dim).
        activation: `"quick_gelu"` or `"gelu"`.
        layer_norm_epsilon: float. 1e-5 as in PyTorch.
        patch_dropout: float in [0, 1). FLIP (Li et al., 2023): during training only,
            each image keeps a random `int(num_patches * (1 - patch_dropout))` of its
            patch tokens (at least 1; the class token always), chosen after the
            positional embedding is added, so shapes stay static (XLA). Inference
            is unchanged. 0: off.

    Call arguments:
        images: float `(batch, image_size, image_size, 3)`, normalised, channels last.
        training: bool. Patch dropout applies only when True.
        seed: optional int32 `(2,)` tensor: draw the kept patches with
            `tf.random.stateless_uniform` from it (the same seed keeps the same
            patches, as gradient caching's two passes need); None: stateful random.

    Returns:
        `(batch, embed_dim)` image features (not normalised).

    Example:
    >>> tower = CLIPVisionTransformer(embed_dim=32, image_size=32, patch_size=16,
    ...     hidden_dim=64, num_layers=1, num_heads=2, intermediate_dim=256)
    >>> tower(keras.ops.zeros((2, 32, 32, 3))).shape
    (2, 32)
    """

    def __init__(
        self,
        embed_dim,
        image_size=224,
        patch_size=32,
        hidden_dim=768,
        num_layers=12,
        num_heads=12,
        intermediate_dim=3072,
        activation="quick_gelu",
        layer_norm_epsilon=1e-5,
        patch_dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # Training setting, not config: `CLIP.compile(remat=True)` sets it.
        self.remat = False
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(
                f"`patch_dropout` must be in [0, 1). Received: patch_dropout={patch_dropout}"
            )
        if patch_size <= 0 or image_size % patch_size:
            raise ValueError(
                "`patch_size` must be positive and divide `image_size`. "
                f"Received: image_size={image_size}, patch_size={patch_size}"
            )
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.layer_norm_epsilon = layer_norm_epsilon
        self.grid_size = image_size // patch_size
        self.patch_dropout = patch_dropout
        num_patches = self.grid_size**2
        self.num_kept_patches = max(1, int(num_patches * (1.0 - patch_dropout)))

        self.conv1 = keras.layers.Conv2D(
            hidden_dim, patch_size, strides=patch_size, use_bias=False, name="conv1",
            kernel_initializer=torch_default_kernel(), dtype=self.dtype_policy,
        )
        self.ln_pre = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="ln_pre", dtype=self.dtype_policy
        )
        self.resblocks = residual_attention_blocks(
            hidden_dim, num_layers, num_heads, intermediate_dim, activation,
            layer_norm_epsilon, dtype=self.dtype_policy, openai_init=False,
        )
        self.ln_post = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, name="ln_post", dtype=self.dtype_policy
        )

    def build(self, input_shape):
        self.conv1.build((None, self.image_size, self.image_size, 3))
        scale = self.hidden_dim**-0.5
        self.class_embedding = self.add_weight(
            name="class_embedding", shape=(self.hidden_dim,),
            initializer=keras.initializers.RandomNormal(stddev=scale),
        )
        self.positional_embedding = self.add_weight(
            name="positional_embedding", shape=(self.grid_size**2 + 1, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=scale),
        )
        hidden_shape = (None, self.grid_size**2 + 1, self.hidden_dim)
        self.ln_pre.build(hidden_shape)
        for block in self.resblocks:
            block.build(hidden_shape)
        self.ln_post.build((None, self.hidden_dim))
        self.proj = self.add_weight(
            name="proj", shape=(self.hidden_dim, self.embed_dim),
            initializer=keras.initializers.RandomNormal(stddev=scale),
        )

    def patch_keep_indices(self, batch, seed=None):
        """`(batch, num_kept_patches)` int32 indices of the kept patches, ascending.

        A uniformly random subset per image: the top-k of i.i.d. uniform scores.
        """
        shape = (batch, self.grid_size**2)
        scores = (tf.random.uniform(shape) if seed is None
                  else tf.random.stateless_uniform(shape, seed, alg="philox"))  # (B, P); XLA too
        return tf.sort(tf.math.top_k(scores, self.num_kept_patches).indices, axis=-1)  # (B, K)

    def patchify(self, images):
        """`conv1(images)` as one matmul: `(B, S, S, 3)` -> `(B, g*g, D)`.

        The patch convolution (stride = kernel size) is a matmul of the flattened
        patches `(B*g*g, p*p*3)` with the kernel reshaped to `(p*p*3, D)` (Keras' kernel
        is `(p, p, 3, D)`, flattened in the same row, column, channel order). oneDNN's
        bf16 convolution took 15% of ViT-B/32's image encoding for 3% of its FLOPs.
        """
        g, p = self.grid_size, self.patch_size
        batch = ops.shape(images)[0]
        x = ops.cast(images, self.compute_dtype)
        x = ops.reshape(x, (batch, g, p, g, p, 3))
        x = ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, p * p * 3))  # (B*g*g, p*p*3)
        kernel = ops.reshape(ops.cast(self.conv1.kernel, x.dtype), (p * p * 3, self.hidden_dim))
        return ops.reshape(tf.matmul(x, kernel), (batch, g * g, self.hidden_dim))  # (B, g*g, D)

    def call(self, images, training=None, seed=None):
        x = self.patchify(images)  # (B, g*g, D)
        batch = ops.shape(x)[0]
        cls = ops.broadcast_to(
            ops.cast(self.class_embedding, x.dtype), (batch, 1, self.hidden_dim)
        )
        x = ops.concatenate([cls, x], axis=1)  # (B, g*g+1, D)
        x = x + ops.cast(self.positional_embedding, x.dtype)
        if training and self.patch_dropout > 0:
            kept = tf.gather(x[:, 1:], self.patch_keep_indices(batch, seed), batch_dims=1)  # (B, K, D)
            x = ops.concatenate([x[:, :1], kept], axis=1)  # (B, K+1, D)
        x = self.ln_pre(x)
        for block in self.resblocks:
            if self.remat:  # keep only the block's input; recompute the rest in backward
                x = keras.remat(lambda h, block=block: block(h))(x)
            else:
                x = block(x)
        x = self.ln_post(x[:, 0])  # (B, D)
        return ops.matmul(x, ops.cast(self.proj, x.dtype))  # (B, E)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "activation": self.activation,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "patch_dropout": self.patch_dropout,
            }
        )
        return config
