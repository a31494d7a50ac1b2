"""Learned temperature of the contrastive logits, kept below a maximum by a constraint."""
import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_clip")
class MaxValue(keras.constraints.Constraint):
    """Clips a weight to at most `max_value` after every optimizer update."""

    def __init__(self, max_value):
        self.max_value = max_value

    def __call__(self, w):
        return ops.minimum(w, ops.cast(self.max_value, w.dtype))

    def get_config(self):
        return {"max_value": self.max_value}


@keras.saving.register_keras_serializable(package="keras_clip")
class LogitScale(keras.layers.Layer):
    """Holds `log(scale)`; returns `scale = exp(log_scale)`, which is at most `max_scale`.

    The paper initialises the temperature to 0.07 (scale 1/0.07) and clips the scale at
    100. Here the clip is a constraint on the weight (`log_scale <= log(max_scale)`),
    applied by the optimizer after each update, so no training loop has to remember it.
    The weight is kept in float32 under mixed precision.

    Args:
        initial_scale: float, initial value of the scale (1 / 0.07).
        max_scale: float, upper bound of the scale (100).

    Returns:
        A float32 scalar.
    """

    def __init__(self, initial_scale=1 / 0.07, max_scale=100.0, **kwargs):
        super().__init__(**kwargs)
        if initial_scale <= 0 or max_scale <= 0:
            raise ValueError(
                "`initial_scale` and `max_scale` must be positive. "
                f"Received: initial_scale={initial_scale}, max_scale={max_scale}"
            )
        self.initial_scale = initial_scale
        self.max_scale = max_scale

    def build(self, input_shape=None):
        self.log_scale = self.add_weight(
            name="log_scale",
            shape=(),
            initializer=keras.initializers.Constant(math.log(self.initial_scale)),
            constraint=MaxValue(math.log(self.max_scale)),
            dtype="float32",
        )

    def call(self, inputs=None):
        return ops.exp(ops.minimum(self.log_scale, math.log(self.max_scale)))

    def get_config(self):
        config = super().get_config()
        config.update({"initial_scale": self.initial_scale, "max_scale": self.max_scale})
        return config


@keras.saving.register_keras_serializable(package="keras_clip")
class LogitBias(keras.layers.Layer):
    """A learned scalar added to the sigmoid loss's logits (SigLIP; initialised to -10).

    With many more negatives than positives per row, a strongly negative start keeps
    the initial loss from being dominated by the negatives (Zhai et al., 2023, sec. 3.2).
    The weight is kept in float32 under mixed precision.

    Args:
        initial_bias: float, initial value (-10).

    Returns:
        A float32 scalar.
    """

    def __init__(self, initial_bias=-10.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_bias = initial_bias

    def build(self, input_shape=None):
        self.bias = self.add_weight(
            name="bias", shape=(), dtype="float32",
            initializer=keras.initializers.Constant(self.initial_bias),
        )

    def call(self, inputs=None):
        return ops.convert_to_tensor(self.bias)

    def get_config(self):
        config = super().get_config()
        config.update({"initial_bias": self.initial_bias})
        return config
