"""Bottleneck residual block of CLIP's modified ResNet."""
import keras

from keras_clip.layers.initializers import torch_default_kernel


@keras.saving.register_keras_serializable(package="keras_clip")
class Bottleneck(keras.layers.Layer):
    """ResNet bottleneck (expansion 4) with anti-aliased striding (OpenAI's `Bottleneck`).

    1x1 conv, 3x3 conv (padding 1), then, when `stride > 1`, an average pool of size
    `stride` before the final 1x1 conv (instead of a strided conv). The shortcut, when
    shapes change, is average pool + 1x1 conv + BatchNorm. Every conv has no bias and is
    followed by BatchNorm (epsilon 1e-5 as in PyTorch).

    Args:
        filters: int. Bottleneck width; output has `4 * filters` channels.
        stride: int. Spatial downsampling factor.
        input_channels: int. Channels of the input (decides whether a shortcut
            projection is needed).
        batch_norm_epsilon: float.

    Call arguments:
        x: `(batch, H, W, input_channels)`.
        training: bool, BatchNorm mode.

    Returns:
        `(batch, H / stride, W / stride, 4 * filters)`.
    """

    expansion = 4

    def __init__(self, filters, stride=1, input_channels=None, batch_norm_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.stride = stride
        self.input_channels = input_channels
        self.batch_norm_epsilon = batch_norm_epsilon
        out_channels = filters * self.expansion
        conv = lambda n, k, name: keras.layers.Conv2D(  # noqa: E731
            n, k, use_bias=False, kernel_initializer=torch_default_kernel(), name=name,
            dtype=self.dtype_policy,
        )
        bn = lambda name, gamma="ones": keras.layers.BatchNormalization(  # noqa: E731
            epsilon=batch_norm_epsilon, momentum=0.9, gamma_initializer=gamma, name=name,
            dtype=self.dtype_policy,
        )
        self.conv1, self.bn1 = conv(filters, 1, "conv1"), bn("bn1")
        self.pad2 = keras.layers.ZeroPadding2D(1, dtype=self.dtype_policy, name="pad2")
        self.conv2, self.bn2 = conv(filters, 3, "conv2"), bn("bn2")
        self.avgpool = (
            keras.layers.AveragePooling2D(stride, name="avgpool", dtype=self.dtype_policy)
            if stride > 1 else None
        )
        # Zero gain on the residual branch's last BatchNorm: each block starts as the
        # identity (OpenAI's `initialize_parameters`).
        self.conv3, self.bn3 = conv(out_channels, 1, "conv3"), bn("bn3", gamma="zeros")
        self.has_downsample = stride > 1 or input_channels != out_channels
        if self.has_downsample:
            self.downsample_pool = (
                keras.layers.AveragePooling2D(stride, name="downsample_pool", dtype=self.dtype_policy)
                if stride > 1 else None
            )
            self.downsample_conv = conv(out_channels, 1, "downsample_conv")
            self.downsample_bn = bn("downsample_bn")

    def build(self, input_shape):
        shape = lambda c: (None, None, None, c)  # noqa: E731
        out_channels = self.filters * self.expansion
        self.conv1.build(shape(input_shape[-1]))
        self.bn1.build(shape(self.filters))
        self.conv2.build(shape(self.filters))
        self.bn2.build(shape(self.filters))
        self.conv3.build(shape(self.filters))
        self.bn3.build(shape(out_channels))
        if self.has_downsample:
            self.downsample_conv.build(shape(input_shape[-1]))
            self.downsample_bn.build(shape(out_channels))

    def call(self, x, training=None):
        relu = keras.activations.relu
        out = relu(self.bn1(self.conv1(x), training=training))  # (B, H, W, f)
        out = relu(self.bn2(self.conv2(self.pad2(out)), training=training))  # (B, H, W, f)
        if self.avgpool is not None:
            out = self.avgpool(out)  # (B, H/s, W/s, f)
        out = self.bn3(self.conv3(out), training=training)  # (B, H/s, W/s, 4f)
        identity = x
        if self.has_downsample:
            if self.downsample_pool is not None:
                identity = self.downsample_pool(identity)
            identity = self.downsample_bn(self.downsample_conv(identity), training=training)
        return relu(out + identity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "stride": self.stride,
                "input_channels": self.input_channels,
                "batch_norm_epsilon": self.batch_norm_epsilon,
            }
        )
        return config
