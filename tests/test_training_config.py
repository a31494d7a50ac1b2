"""`TrainConfig`: every field validated with a Keras-style message, help text in one place."""
import dataclasses

import pytest

from keras_clip.training.config import TrainConfig, help_text


def test_defaults_are_valid_and_validate_returns_the_config():
    config = TrainConfig()
    assert config.validate() is config


@pytest.mark.parametrize("overrides, message", [
    ({"checkpoint_every": 0}, "`checkpoint_every` must be an integer >= 1. Received: checkpoint_every=0"),
    ({"log_every": 0}, "`log_every` must be an integer >= 1. Received: log_every=0"),
    ({"log_every": -5}, "`log_every` must be an integer >= 1. Received: log_every=-5"),
    ({"global_batch_size": 0}, "`global_batch_size` must be an integer >= 1. Received: global_batch_size=0"),
    ({"global_batch_size": True}, "`global_batch_size` must be an integer >= 1. Received: global_batch_size=True"),
    ({"steps": -1}, "`steps` must be an integer >= 0. Received: steps=-1"),
    ({"epochs": 0}, "`epochs` must be an integer >= 1 (when `steps` is 0). Received: epochs=0"),
    ({"warmup_steps": 2.5}, "`warmup_steps` must be an integer >= 0. Received: warmup_steps=2.5"),
    ({"seed": -1}, "`seed` must be an integer >= 0. Received: seed=-1"),
    ({"demo_examples": 0}, "`demo_examples` must be an integer >= 1. Received: demo_examples=0"),
    ({"shuffle_buffer": 0}, "`shuffle_buffer` must be an integer >= 1. Received: shuffle_buffer=0"),
    ({"learning_rate": 0.0}, "`learning_rate` must be a positive number. Received: learning_rate=0.0"),
    ({"weight_decay": -0.1}, "`weight_decay` must be a number >= 0. Received: weight_decay=-0.1"),
    ({"max_train_seconds": -1.0}, "`max_train_seconds` must be a number >= 0. Received: max_train_seconds=-1.0"),
    ({"clipnorm": 0.0}, "`clipnorm` must be None or a positive number. Received: clipnorm=0.0"),
    ({"patch_dropout": 1.0}, "`patch_dropout` must be in [0, 1). Received: patch_dropout=1.0"),
    ({"precision": "float16"},
     "`precision` must be one of float32, mixed_bfloat16, mixed_float16. Received: precision='float16'"),
    ({"strategy": "tpu"}, "`strategy` must be one of one_device, mirrored, multiworker. Received: strategy='tpu'"),
    ({"loss": "hinge"}, "`loss` must be one of softmax, sigmoid. Received: loss='hinge'"),
    ({"jit_compile": "yes"}, "`jit_compile` must be one of auto, true, false. Received: jit_compile='yes'"),
    ({"remat": "false"}, "`remat` must be a bool. Received: remat='false'"),
    ({"preset": ""}, "`preset` must be a non-empty string. Received: preset=''"),
    ({"train_data": ""}, "`train_data` must be a non-empty string. Received: train_data=''"),
    ({"model_dir": None}, "`model_dir` must be a non-empty string. Received: model_dir=None"),
    ({"val_data": None}, "`val_data` must be a string. Received: val_data=None"),
    ({"gradient_cache_chunks": 0}, "`gradient_cache_chunks` must be an integer >= 1. Received: gradient_cache_chunks=0"),
    ({"gradient_cache_chunks": 3},
     "`gradient_cache_chunks` must divide `global_batch_size`. Received: gradient_cache_chunks=3, "
     "global_batch_size=128"),
    ({"unlocked_text_blocks": 1},
     "`unlocked_text_blocks` must be 0 unless its tower is locked (`lock_text`). Received: unlocked_text_blocks=1"),
    ({"unlocked_image_blocks": -1}, "`unlocked_image_blocks` must be an integer >= 0. Received: unlocked_image_blocks=-1"),
    ({"optimizer_recipe": "adam"},
     "`optimizer_recipe` must be one of paper, open_clip. Received: optimizer_recipe='adam'"),
    ({"beta_1": 1.0}, "`beta_1` must be None or a number in [0, 1). Received: beta_1=1.0"),
    ({"beta_2": -0.1}, "`beta_2` must be None or a number in [0, 1). Received: beta_2=-0.1"),
    ({"beta_2": "0.99"}, "`beta_2` must be None or a number in [0, 1). Received: beta_2='0.99'"),
    ({"epsilon": 0.0}, "`epsilon` must be None or a positive number. Received: epsilon=0.0"),
    ({"weight_decay_rule": "embeddings"},
     "`weight_decay_rule` must be one of auto, except_embeddings, all_matrices. "
     "Received: weight_decay_rule='embeddings'"),
])
def test_invalid_field_is_rejected_with_its_name_and_value(overrides, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**overrides).validate()
    assert str(error.value) == message


def test_valid_edge_values_pass():
    TrainConfig(steps=5, epochs=0, clipnorm=1.0, weight_decay=0.0, max_train_seconds=0.5,
                lock_image=True, unlocked_image_blocks=2, gradient_cache_chunks=4,
                jit_compile="TRUE", val_data="", optimizer_recipe="open_clip", beta_1=0.0,
                beta_2=0.999, epsilon=1e-8, weight_decay_rule="all_matrices").validate()


def test_every_field_has_its_help_text_once():
    fields = dataclasses.fields(TrainConfig)
    # 31 at 82f309b; the collectives probe moved to benchmarks/ (-1), optimizer recipe, betas,
    # epsilon and weight-decay rule replaced decay_embeddings (+4); text_architecture (+1);
    # group_captions (+1).
    assert len(fields) == 36
    for field in fields:
        assert help_text(field.name) == field.metadata["help"]
        assert len(help_text(field.name)) > 10, field.name
