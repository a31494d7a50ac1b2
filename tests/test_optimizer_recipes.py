"""Optimizer recipes and flags: the AdamW that `build_model_and_optimizer` creates has the
recipe's (or the flags') betas and epsilon, and decays exactly the rule's tensors."""
import numpy as np
import pytest
import tensorflow as tf

from keras_clip import CLIP
from keras_clip.training.config import TrainConfig
from keras_clip.training.loop import build_model_and_optimizer
from keras_clip.training.optimizer import create_optimizer, resolve_recipe
from tests import harness

LR, WD = 0.1, 0.5


def _decayed_paths(model, optimizer):
    """Paths of the variables a zero-gradient step shrinks by `1 - lr * wd` (measured)."""
    variables = model.trainable_variables
    before = [np.asarray(v) for v in variables]
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    decayed = set()
    for variable, old in zip(variables, before):
        new = np.asarray(variable)
        if not np.array_equal(new, old):
            np.testing.assert_allclose(new, old * (1 - LR * WD), rtol=1e-5, atol=1e-7)
            decayed.add(variable.path.split("/", 1)[1])
    return decayed


def _build(tmp_path, **overrides):
    CLIP(**harness.TINY_VIT).save_to_preset(str(tmp_path / "tiny"))
    config = TrainConfig(preset=str(tmp_path / "tiny"), learning_rate=LR, warmup_steps=0,
                         weight_decay=WD, **overrides).validate()
    # No warm-up and a cosine 10^9 steps long: the first steps' rate is LR (to 1e-17).
    return build_model_and_optimizer(config, total_steps=10**9)


# Every matrix of TINY_VIT (1 block per tower); the embeddings are the last three.
_MATRICES = {
    "visual/conv1/kernel", "visual/proj",
    "visual/resblocks_0/attn/qkv/kernel", "visual/resblocks_0/attn/out_proj/kernel",
    "visual/resblocks_0/c_fc/kernel", "visual/resblocks_0/c_proj/kernel",
    "text/resblocks_0/attn/qkv/kernel", "text/resblocks_0/attn/out_proj/kernel",
    "text/resblocks_0/c_fc/kernel", "text/resblocks_0/c_proj/kernel", "text/text_projection",
}
_EMBEDDINGS = {"visual/positional_embedding", "text/token_embedding/embeddings",
               "text/positional_embedding"}


@pytest.mark.parametrize("overrides, betas, epsilon, decayed", [
    ({}, (0.9, 0.98), 1e-6, _MATRICES),
    ({"optimizer_recipe": "open_clip"}, (0.9, 0.999), 1e-8, _MATRICES | _EMBEDDINGS),
    ({"optimizer_recipe": "open_clip", "weight_decay_rule": "except_embeddings"},
     (0.9, 0.999), 1e-8, _MATRICES),
    ({"weight_decay_rule": "all_matrices", "beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-7},
     (0.8, 0.95), 1e-7, _MATRICES | _EMBEDDINGS),
])
def test_recipe_and_flags_set_adam_and_the_decayed_tensors(tmp_path, overrides, betas, epsilon, decayed):
    model, optimizer = _build(tmp_path, **overrides)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (*betas, epsilon)
    assert _decayed_paths(model, optimizer) == decayed


def test_adam_update_uses_the_recipes_betas_and_epsilon(tmp_path):
    """Two steps of AdamW against Keras' update formula (decoupled decay, bias correction)."""
    model, optimizer = _build(tmp_path, optimizer_recipe="open_clip")
    variable = next(v for v in model.trainable_variables if v.path.endswith("visual/proj"))
    rng = np.random.default_rng(0)
    w = np.asarray(variable, np.float64)
    m = v = np.zeros_like(w)
    for t in (1, 2):
        g = rng.normal(size=w.shape) * 10.0 ** -(3 * t)  # gradient scales where epsilon matters
        optimizer.apply([tf.constant(g, tf.float32)], [variable])
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w * (1 - LR * WD)
        # Keras' Adam adds epsilon to the uncorrected sqrt(v) (Kingma & Ba's "epsilon hat"
        # form): epsilon / sqrt(1 - beta_2^t) in torch's form, where it is added to sqrt(v_hat).
        w = w - LR * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-8)
        # float32 rounding: <2e-6; epsilon 1e-6 instead of 1e-8 would move weights by ~3e-3.
        np.testing.assert_allclose(np.asarray(variable), w, rtol=2e-5, atol=5e-6)


def test_resnet_keeps_the_papers_epsilon_and_explicit_values_win():
    model = CLIP.from_preset("clip_rn_tiny")
    assert create_optimizer(model, 1e-3).epsilon == 1e-8
    assert create_optimizer(model, 1e-3, recipe="open_clip", epsilon=1e-6).epsilon == 1e-6
    assert resolve_recipe("paper") == {"beta_1": 0.9, "beta_2": 0.98, "epsilon": 1e-6,
                                       "weight_decay_rule": "except_embeddings"}


@pytest.mark.parametrize("kwargs, message", [
    ({"recipe": "sgd"}, "`recipe` must be one of paper, open_clip. Received: recipe='sgd'"),
    ({"weight_decay_rule": "none"},
     "`weight_decay_rule` must be one of except_embeddings, all_matrices. Received: weight_decay_rule='none'"),
])
def test_unknown_recipe_or_rule_is_rejected(kwargs, message):
    with pytest.raises(ValueError) as error:
        resolve_recipe(**kwargs)
    assert str(error.value) == message
