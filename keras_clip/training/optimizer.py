"""The paper's optimisation: AdamW with decoupled weight decay, warm-up + cosine decay."""
import math

import keras
from keras import ops

# Adam settings from the paper (Radford et al., 2021, Table 19/20): beta2 = 0.98 and
# epsilon 1e-6 for ViTs (1e-8 for ResNets).
VIT_BETAS = (0.9, 0.98)
VIT_EPSILON = 1e-6
RESNET_EPSILON = 1e-8


@keras.saving.register_keras_serializable(package="keras_clip")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak_learning_rate`, then cosine decay to `final_learning_rate`.

    Args:
        peak_learning_rate: float. Rate reached at the end of warm-up.
        warmup_steps: int. Steps of linear warm-up (step s has rate peak * (s+1) / warmup).
        total_steps: int. Step at which the cosine reaches `final_learning_rate`.
        final_learning_rate: float. Floor of the decay (0 in the paper).
    """

    def __init__(self, peak_learning_rate, warmup_steps, total_steps, final_learning_rate=0.0):
        if total_steps <= 0 or warmup_steps < 0:
            raise ValueError(
                "`total_steps` must be positive and `warmup_steps` non-negative. "
                f"Received: total_steps={total_steps}, warmup_steps={warmup_steps}"
            )
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_learning_rate = final_learning_rate

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warm = self.peak_learning_rate * (step + 1.0) / warmup
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        cosine = self.final_learning_rate + 0.5 * (self.peak_learning_rate - self.final_learning_rate) * (
            1.0 + ops.cos(math.pi * progress)
        )
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_learning_rate": self.final_learning_rate,
        }


def is_weight_decayed(variable, decay_embeddings=False):
    """Whether AdamW's decoupled weight decay applies to `variable`.

    Never decayed: gains and biases (every variable with fewer than 2 dimensions,
    which also covers BatchNorm/LayerNorm parameters and the class embedding) and
    the temperature, as in the paper and open_clip. By default the token and
    positional embeddings are not decayed either; `decay_embeddings=True` decays
    them, which is open_clip's rule (it excludes only tensors with fewer than 2
    dimensions, norms, biases and the logit scale) and the paper's wording ("all
    weights that are not gains or biases").
    """
    path = variable.path
    if len(variable.shape) < 2 or "log_scale" in path:
        return False
    return decay_embeddings or "embedding" not in path


def create_optimizer(
    model,
    learning_rate,
    weight_decay=0.2,
    beta_1=VIT_BETAS[0],
    beta_2=VIT_BETAS[1],
    epsilon=None,
    clipnorm=None,
    decay_embeddings=False,
):
    """AdamW over `model` with the paper's defaults and weight-decay exclusions.

    Args:
        model: the `CLIP` whose variables decide the exclusions.
        learning_rate: float or schedule (e.g. `WarmupCosineDecay`).
        weight_decay: float. Decoupled weight decay (0.2 in the paper's ViT runs).
        beta_1, beta_2: Adam betas (0.9, 0.98).
        epsilon: Adam epsilon; default 1e-6 for ViTs, 1e-8 for ResNets.
        clipnorm: optional float, clip each gradient tensor to this norm.
        decay_embeddings: bool. Also decay the token and positional embeddings
            (open_clip's rule); see `is_weight_decayed`.

    Returns:
        A `keras.optimizers.AdamW`.
    """
    if epsilon is None:
        epsilon = VIT_EPSILON if model.vision_architecture == "vit" else RESNET_EPSILON
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        clipnorm=clipnorm,
    )
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables
                  if not is_weight_decayed(v, decay_embeddings=decay_embeddings)]
    )
    return optimizer
