"""CLIP image tower, modified ResNet variant."""
import keras

from keras_clip.layers.attention_pool import AttentionPool2D
from keras_clip.layers.bottleneck import Bottleneck
from keras_clip.layers.initializers import torch_default_kernel


@keras.saving.register_keras_serializable(package="keras_clip")
class CLIPModifiedResNet(keras.layers.Layer):
    """The ResNet image tower of CLIP (paper section 2.4; OpenAI's `ModifiedResNet`).

    Differences from a torchvision ResNet, all reproduced here:
    - a stem of three 3x3 convolutions (the first with stride 2) followed by a 2x2
      average pool, instead of one 7x7 convolution and a max pool;
    - anti-aliased strided blocks: downsampling by an average pool before the last
      1x1 convolution of a bottleneck, and before the shortcut's 1x1 convolution;
    - attention pooling (`AttentionPool2D`) instead of global average pooling.

    Convolutions with PyTorch `padding=1` are written as explicit zero padding plus a
    "valid" convolution (Keras "same" pads asymmetrically at stride 2).

    Args:
        embed_dim: int. Width of the shared space (attention-pool output).
        image_size: int. Input resolution; a multiple of 32.
        num_layers: list of 4 ints, bottleneck blocks per stage (RN50: [3, 4, 6, 3]).
        hidden_dim: int. Base width (64 for RN50); the last stage has `32 * hidden_dim`
            channels.
        num_heads: int. Heads of the attention pool (`32 * hidden_dim / 64`).
        batch_norm_epsilon: float. 1e-5 as in PyTorch.

    Call arguments:
        images: float `(batch, image_size, image_size, 3)`, normalised, channels last.
        training: bool. BatchNorm mode.

    Returns:
        `(batch, embed_dim)` image features (not normalised).

    Example:
    >>> tower = CLIPModifiedResNet(embed_dim=32, image_size=64,
    ...     num_layers=[1, 1, 1, 1], hidden_dim=8, num_heads=4)
    >>> tower(keras.ops.zeros((2, 64, 64, 3))).shape
    (2, 32)
    """

    def __init__(
        self,
        embed_dim,
        image_size=224,
        num_layers=(3, 4, 6, 3),
        hidden_dim=64,
        num_heads=32,
        batch_norm_epsilon=1e-5,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_layers = [int(n) for n in num_layers]
        if len(num_layers) != 4 or min(num_layers) < 1:
            raise ValueError(
                "`num_layers` must be 4 positive block counts for a ResNet. "
                f"Received: num_layers={num_layers}"
            )
        if image_size % 32:
            raise ValueError(
                f"`image_size` must be a multiple of 32 for a ResNet. Received: image_size={image_size}"
            )
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.batch_norm_epsilon = batch_norm_epsilon

        dt = self.dtype_policy
        conv = lambda n, stride, name: keras.layers.Conv2D(  # noqa: E731
            n, 3, strides=stride, use_bias=False, kernel_initializer=torch_default_kernel(),
            name=name, dtype=dt,
        )
        bn = lambda name: keras.layers.BatchNormalization(  # noqa: E731
            epsilon=batch_norm_epsilon, momentum=0.9, name=name, dtype=dt
        )
        pad = lambda name: keras.layers.ZeroPadding2D(1, name=name, dtype=dt)  # noqa: E731
        self.stem = [
            (pad("pad1"), conv(hidden_dim // 2, 2, "conv1"), bn("bn1")),
            (pad("pad2"), conv(hidden_dim // 2, 1, "conv2"), bn("bn2")),
            (pad("pad3"), conv(hidden_dim, 1, "conv3"), bn("bn3")),
        ]
        self.stem_pool = keras.layers.AveragePooling2D(2, name="avgpool", dtype=dt)
        self.stages = []
        channels = hidden_dim
        for stage, blocks in enumerate(num_layers):
            filters = hidden_dim * 2**stage
            stage_blocks = []
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                stage_blocks.append(
                    Bottleneck(
                        filters, stride=stride, input_channels=channels,
                        batch_norm_epsilon=batch_norm_epsilon,
                        name=f"layer{stage + 1}_{b}", dtype=dt,
                    )
                )
                channels = filters * Bottleneck.expansion
            self.stages.append(stage_blocks)
        self.attnpool = AttentionPool2D(
            image_size // 32, hidden_dim * 32, num_heads, embed_dim, name="attnpool", dtype=dt
        )

    def build(self, input_shape):
        channels = 3
        for _, conv, bn in self.stem:
            conv.build((None, None, None, channels))
            channels = conv.filters
            bn.build((None, None, None, channels))
        for stage in self.stages:
            for block in stage:
                block.build((None, None, None, channels))
                channels = block.filters * Bottleneck.expansion
        self.attnpool.build((None, self.image_size // 32, self.image_size // 32, channels))

    def call(self, images, training=None):
        x = images
        for pad, conv, bn in self.stem:
            x = keras.activations.relu(bn(conv(pad(x)), training=training))
        x = self.stem_pool(x)  # (B, S/4, S/4, w)
        for stage in self.stages:
            for block in stage:
                x = block(x, training=training)  # last: (B, S/32, S/32, 32w)
        return self.attnpool(x)  # (B, E)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embed_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "image_size": self.image_size,
                "num_layers": list(self.num_layers),
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "batch_norm_epsilon": self.batch_norm_epsilon,
            }
        )
        return config
