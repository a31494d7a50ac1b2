"""Activations used by CLIP towers.

OpenAI's checkpoints were trained with QuickGELU (``x * sigmoid(1.702 x)``); LAION /
open_clip checkpoints mostly use exact (erf) GELU, which is PyTorch's ``nn.GELU()``
default.
"""
import keras
from keras import ops

ACTIVATIONS = ("quick_gelu", "gelu")


@keras.saving.register_keras_serializable(package="keras_clip")
def quick_gelu(x):
    """QuickGELU, ``x * sigmoid(1.702 * x)``, as in OpenAI's CLIP."""
    return x * ops.sigmoid(1.702 * x)


@keras.saving.register_keras_serializable(package="keras_clip")
def exact_gelu(x):
    """GELU with the erf formulation (PyTorch ``nn.GELU()`` default)."""
    return keras.activations.gelu(x, approximate=False)


def get_activation(name):
    """Returns the activation function called `name` (`"quick_gelu"` or `"gelu"`)."""
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return exact_gelu
    raise ValueError(f"`activation` must be one of {ACTIVATIONS}. Received: activation={name!r}")
