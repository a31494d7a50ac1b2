"""CLIP.train_step, the loss, the optimizer and the schedule against numpy references."""
import json
import math
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_clip import CLIP, losses
from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer, is_weight_decayed
from tests import harness

SCRIPTS = pathlib.Path(__file__).parent / "scripts"
TINY = harness.TINY_VIT_SMALL_VOCAB


_normalised = harness.unit_rows


def _numpy_clip_loss(image, text, scale):
    logits = scale * image @ text.T
    def ce(z):  # rows: softmax cross-entropy with the diagonal as targets
        z = z - z.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))
    return 0.5 * (ce(logits) + ce(logits.T))


_batch = harness.small_vocab_batch


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    image, text = _normalised(rng, 16, 24), _normalised(rng, 16, 24)
    out = losses.clip_loss(image, text, image, text, 1 / 0.07)
    np.testing.assert_allclose(float(out["loss"]), _numpy_clip_loss(image, text, 1 / 0.07), rtol=1e-5)
    np.testing.assert_allclose(
        float(out["image_to_text_accuracy"]), np.mean(np.argmax(image @ text.T, 1) == np.arange(16)))


def test_local_rows_with_offset_average_to_global_loss():
    rng = np.random.default_rng(1)
    image, text = _normalised(rng, 12, 8), _normalised(rng, 12, 8)
    halves = [
        float(losses.clip_loss(image[s:s + 6], text[s:s + 6], image, text, 20.0, label_offset=s)["loss"])
        for s in (0, 6)
    ]
    np.testing.assert_allclose(np.mean(halves), _numpy_clip_loss(image, text, 20.0), rtol=1e-5)


def test_two_replicas_match_one_replica_holding_the_global_batch():
    two_layers = {"vision_num_layers": 2, "text_num_layers": 2}
    modes = [{"replicas": 1, "model": two_layers}, {"replicas": 2, "model": two_layers}]
    result = subprocess.run([sys.executable, str(SCRIPTS / "step_equivalence.py"), json.dumps(modes)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = json.loads(result.stdout.strip().splitlines()[-1])["modes"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    assert two["max_grad"] > 1e-2  # the step really moved the weights
    assert two["max_grad_diff"] <= 1e-5
    # Global negatives: each of 2 replicas scores its 4 rows against all 8 columns.
    assert one["logits_shapes"] == [[8, 8]]
    assert two["logits_shapes"] == [[4, 8], [4, 8]]


def test_fit_history_reports_the_true_loss():
    model = CLIP(**TINY)
    data = _batch(16)
    expected = []
    for start in (0, 8):
        image = np.asarray(model.encode_image(data["images"][start:start + 8]))
        text = np.asarray(model.encode_text(data["token_ids"][start:start + 8]))
        expected.append(_numpy_clip_loss(image, text, float(model.logit_scale())))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    history = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(8), epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(np.mean(expected), rel=1e-5)
    assert history.history["temperature"][0] == pytest.approx(0.07, rel=1e-5)
    assert set(history.history) == {"loss", "image_to_text_accuracy", "text_to_image_accuracy",
                                    "temperature", "learning_rate"}


def test_jit_compiled_towers_give_the_same_step():
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(3)
        model = CLIP(**TINY)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), jit_compile=jit)
        logs = model.train_step(_batch(8))
        results.append((float(logs["loss"]), [np.asarray(v) for v in model.trainable_variables]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_training_step_trims_texts_without_changing_loss_or_gradients():
    # Without XLA the step runs the text tower only up to the batch's longest text
    # (here 7 of 12 positions); the causal mask makes that exact.
    keras.utils.set_random_seed(4)
    model = CLIP(**TINY)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), jit_compile=False)
    data = _batch(8)
    tokens = data["token_ids"].copy()
    for i in range(8):
        tokens[i, 2 + i % 5] = 499
        tokens[i, 3 + i % 5:] = 0
    data["token_ids"] = tokens
    seen_lengths = []
    block = model.text.resblocks[0]
    original_call = block.call
    block.call = lambda x, **kw: (seen_lengths.append(x.shape[1]), original_call(x, **kw))[1]
    with tf.GradientTape() as tape:
        loss = model._contrastive_step(data, training=True)[0]["loss"]
    gradients = tape.gradient(loss, model.trainable_variables)
    block.call = original_call
    assert seen_lengths == [7]
    with tf.GradientTape() as tape:
        image = model.encode_image(data["images"], training=True)
        text = model.encode_text(data["token_ids"], trim=False)
        reference = losses.clip_loss(image, text, image, text, model.logit_scale())["loss"]
    expected = tape.gradient(reference, model.trainable_variables)
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    # float32 sums over 7 and over 12 positions round differently: on an AVX-512 CPU
    # without AMX one positional-embedding entry of size 0.07 differed by 1.7e-6.
    for variable, got, want in zip(model.trainable_variables, gradients, expected):
        np.testing.assert_allclose(tf.convert_to_tensor(got), tf.convert_to_tensor(want),
                                   rtol=1e-5, atol=1e-5, err_msg=variable.path)


def test_temperature_stays_at_most_100_during_training():
    model = CLIP(**dict(TINY, initial_logit_scale=99.0))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=50.0))
    for _ in range(3):
        model.train_step(_batch(8))
        assert float(model.logit_scale.log_scale) <= math.log(100.0) + 1e-6
    assert float(model.logit_scale()) <= 100.0 + 1e-4


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_skips_gains_biases_embeddings_and_temperature(decay_embeddings):
    model = CLIP.from_preset("clip_rn_tiny")
    optimizer = create_optimizer(model, learning_rate=0.1, weight_decay=0.5,
                                 decay_embeddings=decay_embeddings)
    variables = model.trainable_variables
    before = [np.asarray(v) for v in variables]
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    decayed = set()
    for variable, old in zip(variables, before):
        new = np.asarray(variable)
        if not np.array_equal(new, old):  # decoupled decay: w <- w * (1 - lr * wd)
            np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5), rtol=1e-5, atol=1e-7)
            decayed.add(variable.path)
    expected = {v.path for v in variables if is_weight_decayed(v, decay_embeddings=decay_embeddings)}
    assert decayed == expected
    excluded = {v.path.rsplit("/", 1)[-1] for v in variables if v.path not in decayed}
    embeddings = {"embeddings", "positional_embedding"}
    assert excluded == {"gamma", "beta", "bias", "log_scale"} | (set() if decay_embeddings else embeddings)
    assert optimizer.beta_2 == 0.98 and optimizer.epsilon == 1e-8  # ResNet epsilon


def test_warmup_cosine_schedule_matches_formula():
    schedule = WarmupCosineDecay(1e-3, warmup_steps=10, total_steps=110)
    for step in (0, 4, 9, 10, 35, 60, 109, 200):
        if step < 10:
            expected = 1e-3 * (step + 1) / 10
        else:
            expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * min((step - 10) / 100, 1.0)))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    restored = WarmupCosineDecay.from_config(schedule.get_config())
    assert float(restored(35)) == float(schedule(35))


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step_matches_float32_loss(precision, tmp_path):
    from keras_clip.training.config import TrainConfig
    from keras_clip.training.loop import build_model_and_optimizer

    CLIP(**TINY).save_to_preset(str(tmp_path / "tiny"))
    losses_by_precision = {}
    for policy in ("float32", precision):
        config = TrainConfig(preset=str(tmp_path / "tiny"), precision=policy, learning_rate=1e-4,
                             warmup_steps=1)
        model, optimizer = build_model_and_optimizer(config, total_steps=10)
        if policy == "mixed_float16":
            assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        logs = model.train_step(_batch(8))
        losses_by_precision[policy] = float(logs["loss"])
        assert all(np.all(np.isfinite(np.asarray(v, "float32"))) for v in model.trainable_variables)
    assert losses_by_precision[precision] == pytest.approx(losses_by_precision["float32"], rel=2e-2)
