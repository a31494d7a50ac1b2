"""The optimisation: AdamW with decoupled weight decay (named recipes: the paper's, open_clip's),
warm-up + cosine decay."""
import math

import keras
from absl import logging
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


# Named optimizer recipes: Adam's betas and epsilon and which tensors are weight-decayed.
# `epsilon=None`: the paper's per-architecture value (1e-6 for ViTs, 1e-8 for ResNets).
RECIPES = {
    # Radford et al. (2021): betas 0.9/0.98, epsilon 1e-6 (ViT) / 1e-8 (ResNet); gains,
    # biases, embeddings and the temperature not decayed (keras_clip's long-standing default).
    "paper": {"beta_1": VIT_BETAS[0], "beta_2": VIT_BETAS[1], "epsilon": None,
              "weight_decay_rule": "except_embeddings"},
    # open_clip_train's defaults for every model: torch's AdamW betas and epsilon, and
    # every tensor of 2 or more dimensions decayed (embeddings included).
    "open_clip": {"beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8,
                  "weight_decay_rule": "all_matrices"},
}
# Which trainable tensors AdamW's decoupled weight decay applies to (see `is_weight_decayed`).
WEIGHT_DECAY_RULES = ("except_embeddings", "all_matrices")


def resolve_recipe(recipe="paper", beta_1=None, beta_2=None, epsilon=None, weight_decay_rule=None,
                   vision_architecture="vit"):
    """The optimizer settings of `recipe`, with every argument that is not None overriding it.

    Returns:
        dict with `beta_1`, `beta_2`, `epsilon` (floats) and `weight_decay_rule`.

    Raises:
        ValueError: an unknown recipe or weight-decay rule.
    """
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {', '.join(RECIPES)}. Received: recipe={recipe!r}")
    settings = dict(RECIPES[recipe])
    for name, value in (("beta_1", beta_1), ("beta_2", beta_2), ("epsilon", epsilon),
                        ("weight_decay_rule", weight_decay_rule)):
        if value is not None:
            settings[name] = value
    if settings["weight_decay_rule"] not in WEIGHT_DECAY_RULES:
        raise ValueError(f"`weight_decay_rule` must be one of {', '.join(WEIGHT_DECAY_RULES)}. "
                         f"Received: weight_decay_rule={settings['weight_decay_rule']!r}")
    if settings["epsilon"] is None:
        settings["epsilon"] = VIT_EPSILON if vision_architecture == "vit" else RESNET_EPSILON
    return settings


def is_weight_decayed(variable, decay_embeddings=False, rule=None):
    """Whether AdamW's decoupled weight decay applies to `variable`.

    Never decayed: gains and biases (every variable with fewer than 2 dimensions,
    which also covers BatchNorm/LayerNorm parameters and the class embedding) and
    the temperature, as in the paper and open_clip. `rule`:

    - `"except_embeddings"` (the `"paper"` recipe's, keras_clip's default): the token
      and positional embeddings are not decayed either;
    - `"all_matrices"` (open_clip's rule, and the paper's wording "all weights that
      are not gains or biases"): they are.

    `decay_embeddings=True` is the older spelling of `rule="all_matrices"` (used
    when `rule` is None).
    """
    if rule is None:
        rule = "all_matrices" if decay_embeddings else "except_embeddings"
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"`rule` must be one of {', '.join(WEIGHT_DECAY_RULES)}. Received: rule={rule!r}")
    path = variable.path
    if len(variable.shape) < 2 or "log_scale" in path:
        return False
    return rule == "all_matrices" or "embedding" not in path


def create_optimizer(
    model,
    learning_rate,
    weight_decay=0.2,
    beta_1=None,
    beta_2=None,
    epsilon=None,
    clipnorm=None,
    decay_embeddings=None,
    recipe="paper",
    weight_decay_rule=None,
):
    """AdamW over `model` with a named recipe's settings and weight-decay exclusions.

    Args:
        model: the `CLIP` whose variables decide the exclusions.
        learning_rate: float or schedule (e.g. `WarmupCosineDecay`).
        weight_decay: float. Decoupled weight decay (0.2 in the paper's ViT runs).
        beta_1, beta_2, epsilon: Adam's settings; None: the recipe's (`"paper"`:
            0.9, 0.98, and 1e-6 for ViTs / 1e-8 for ResNets; `"open_clip"`: 0.9,
            0.999, 1e-8).
        clipnorm: optional float, clip each gradient tensor to this norm.
        decay_embeddings: None, or bool: the older spelling of `weight_decay_rule`
            (True: `"all_matrices"`, False: `"except_embeddings"`).
        recipe: `"paper"` or `"open_clip"` (see `RECIPES`).
        weight_decay_rule: None (the recipe's), `"except_embeddings"` or
            `"all_matrices"`; see `is_weight_decayed`.

    Returns:
        A `keras.optimizers.AdamW`.
    """
    if weight_decay_rule is None and decay_embeddings is not None:
        weight_decay_rule = "all_matrices" if decay_embeddings else "except_embeddings"
    settings = resolve_recipe(recipe, beta_1, beta_2, epsilon, weight_decay_rule,
                              vision_architecture=model.vision_architecture)
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        beta_1=settings["beta_1"],
        beta_2=settings["beta_2"],
        epsilon=settings["epsilon"],
        clipnorm=clipnorm,
    )
    excluded = [v for v in model.trainable_variables
                if not is_weight_decayed(v, rule=settings["weight_decay_rule"])]
    optimizer.exclude_from_weight_decay(var_list=excluded)
    logging.info("AdamW (recipe %s): %s, weight decay %s on %d of %d trainable tensors", recipe,
                 settings, weight_decay, len(model.trainable_variables) - len(excluded),
                 len(model.trainable_variables))
    return optimizer
