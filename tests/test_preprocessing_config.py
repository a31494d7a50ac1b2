"""Presets carry their preprocessing: save -> load -> training input -> export agree.

A preset with non-default statistics, image size and context length is saved and
loaded; the trainer's own input function (`loop.make_train_dataset_fn`) then yields
images equal to the numpy formula with the preset's mean/std, token ids of the
preset's context length, and the SavedModel export's `encode_image` on raw JPEG
bytes equals the in-memory model on those statistics. Older presets (no block, or
the four keys written before the block was read) load with OpenAI's values.
"""
import dataclasses
import json
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_clip import CLIP
from keras_clip.data import shards
from keras_clip.data.spec import DataSpec
from keras_clip.export import saved_model as export_lib
from keras_clip.preprocessing.config import PreprocessingConfig
from keras_clip.preprocessing.image_preprocessor import OPENAI_MEAN, OPENAI_STD, CLIPImagePreprocessor
from keras_clip.preprocessing.tokenizer import tokenize
from keras_clip.training import loop
from tests.harness import SMALL_VIT, encode, normalise, sample_photo, tiny_clip

MEAN = (0.25, 0.5, 0.75)
STD = (0.125, 0.2, 0.3)
IMAGE_SIZE = 48  # TINY_VIT: 32
CONTEXT_LENGTH = 12  # TINY_VIT: 16
COLOUR = (200, 100, 30)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    model = tiny_clip(image_size=IMAGE_SIZE, vision_patch_size=16, context_length=CONTEXT_LENGTH)
    model.preprocessor_config = PreprocessingConfig.for_model(model, mean=MEAN, std=STD, max_text_bytes=100)
    folder = tmp_path_factory.mktemp("preset") / "custom"
    model.save_to_preset(str(folder))
    return folder


def _rewrite_block(source, target, block):
    """A copy of the preset `source` whose `preprocessing` block is `block` (None: absent)."""
    import shutil

    shutil.copytree(source, target)
    with open(target / "config.json") as f:
        meta = json.load(f)
    if block is None:
        del meta["preprocessing"]
    else:
        meta["preprocessing"] = block
    with open(target / "config.json", "w") as f:
        json.dump(meta, f)
    return target


def test_save_writes_and_load_reads_the_block(preset):
    with open(preset / "config.json") as f:
        block = json.load(f)["preprocessing"]
    assert block["mean"] == list(MEAN) and block["std"] == list(STD)
    assert (block["image_size"], block["context_length"], block["interpolation"]) == (IMAGE_SIZE, CONTEXT_LENGTH,
                                                                                       "bicubic")
    loaded = CLIP.from_preset(str(preset))
    config = loaded.preprocessor_config
    assert (config.mean, config.std, config.max_text_bytes) == (MEAN, STD, 100)
    assert (config.image_size, config.context_length) == (IMAGE_SIZE, CONTEXT_LENGTH)
    layer = loaded.image_preprocessor()
    assert (layer.mean, layer.std, layer.image_size) == (MEAN, STD, IMAGE_SIZE)
    assert loaded.tokenizer().context_length == CONTEXT_LENGTH
    # Carried through a dtype change and a second save.
    assert loaded.with_dtype("bfloat16").preprocessor_config == config


def test_training_input_uses_the_preset_statistics(preset, tmp_path):
    loaded = CLIP.from_preset(str(preset))
    # One colour: every crop and resize of it is that colour, so the training
    # pipeline's output is exactly the normalisation formula.
    image = Image.new("RGB", (70, 90), COLOUR)
    captions = ["a red square", "an orange thing", "a brown box", "a square"]
    shards.write_shards(
        ((f"k{i}", encode(image, "PNG"), [caption]) for i, caption in enumerate(captions)),
        str(tmp_path), prefix="train")
    spec = DataSpec.parse(str(tmp_path / "train-*.tfrecord"))
    config = types.SimpleNamespace(global_batch_size=4, seed=0, shuffle_buffer=8)
    context = types.SimpleNamespace(config=config, train_spec=spec)
    state = types.SimpleNamespace(model=loaded, resume_positions=[0])
    dataset = loop.make_train_dataset_fn(context, state, counters=None)(tf.distribute.InputContext())
    batch = next(iter(dataset))
    expected = normalise(np.broadcast_to(np.array(COLOUR, np.uint8), (IMAGE_SIZE, IMAGE_SIZE, 3)), MEAN, STD)
    assert batch["images"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_allclose(batch["images"].numpy(), np.broadcast_to(expected, (4,) + expected.shape),
                               rtol=0, atol=1e-6)
    # Not OpenAI's statistics: the first channel differs by more than 1.
    assert abs(expected[0, 0, 0] - (200 / 255 - OPENAI_MEAN[0]) / OPENAI_STD[0]) > 1.0
    assert batch["token_ids"].shape == (4, CONTEXT_LENGTH)
    rows = {tuple(row) for row in tokenize(captions, CONTEXT_LENGTH).numpy()}
    assert {tuple(row) for row in batch["token_ids"].numpy()} == rows


def test_export_serves_the_preset_preprocessing(preset, tmp_path):
    loaded = CLIP.from_preset(str(preset))
    version_dir = export_lib.export_saved_model(loaded, str(tmp_path / "clip"), 1)
    served = tf.saved_model.load(version_dir)
    jpeg = encode(sample_photo().resize((64, 80)))
    outputs = served.signatures["encode_image"](image_bytes=tf.constant([jpeg]))["image_embeddings"].numpy()
    reference_layer = CLIPImagePreprocessor(image_size=IMAGE_SIZE, mean=MEAN, std=STD)
    expected = loaded.encode_image(reference_layer(tf.constant([jpeg]))).numpy()
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    openai_layer = CLIPImagePreprocessor(image_size=IMAGE_SIZE)
    other = loaded.encode_image(openai_layer(tf.constant([jpeg]))).numpy()
    assert np.abs(other - expected).max() > 1e-3  # the statistics matter
    texts = ["a photo of a woman in uniform", "a cat"]
    text_out = served.signatures["encode_text"](texts=tf.constant(texts))["text_embeddings"].numpy()
    np.testing.assert_allclose(
        text_out, loaded.encode_text(tokenize(texts, CONTEXT_LENGTH), trim=True).numpy(), rtol=0, atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than 100 UTF-8 bytes"):
        served.signatures["encode_text"](texts=tf.constant(["x" * 101]))


@pytest.mark.parametrize("block", [
    None,  # before the block existed
    {"image_size": IMAGE_SIZE, "max_image_pixels": 50_000_000, "context_length": CONTEXT_LENGTH,
     "vocabulary": "assets/bpe_simple_vocab_16e6.txt.gz"},  # the block as written up to 82f309b
], ids=["no_block", "old_block"])
def test_older_presets_load_with_todays_defaults(preset, tmp_path, block):
    folder = _rewrite_block(preset, tmp_path / "old", block)
    loaded = CLIP.from_preset(str(folder))
    assert loaded.preprocessor_config == PreprocessingConfig(image_size=IMAGE_SIZE, context_length=CONTEXT_LENGTH)
    assert (loaded.image_preprocessor().mean, loaded.image_preprocessor().std) == (OPENAI_MEAN, OPENAI_STD)


def test_load_time_overrides_win_over_the_block(preset):
    loaded = CLIP.from_preset(str(preset), max_image_pixels=5000)
    assert loaded.preprocessor_config.max_image_pixels == 5000
    assert loaded.image_preprocessor().max_pixels == 5000
    assert loaded.preprocessor_config.mean == MEAN


def test_invalid_blocks_are_refused_with_clear_messages(preset, tmp_path):
    folder = _rewrite_block(preset, tmp_path / "bad", {"interpolation": "bilinear"})
    with pytest.raises(ValueError, match=r"`interpolation` must be one of \('bicubic',\). "
                                         r"Received: interpolation='bilinear'"):
        CLIP.from_preset(str(folder))
    with pytest.raises(ValueError, match=r"Unknown keys in the preset's `preprocessing` block: \['colour'\]"):
        PreprocessingConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match=r"`std` must be 3 positive numbers \(R, G, B\). Received: std=\(1, 0, 1\)"):
        PreprocessingConfig(std=(1, 0, 1))
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"`preprocessor_config.image_size` must equal the model's image_size=32. "
                                         r"Received: image_size=224"):
        model.preprocessor_config = PreprocessingConfig()


def test_round_trips_through_open_clip_and_hf_folders(tmp_path):
    model = CLIP(**dict(SMALL_VIT, vision_num_layers=1, text_num_layers=1))  # widths the formats infer heads from
    model.preprocessor_config = dataclasses.replace(model.preprocessor_config, mean=MEAN, std=STD)
    for fmt in ("open_clip", "hf"):
        model.save_checkpoint(str(tmp_path / fmt), format=fmt)
        loaded = CLIP.from_preset(str(tmp_path / fmt))
        assert (loaded.preprocessor_config.mean, loaded.preprocessor_config.std) == (MEAN, STD), fmt


def test_reader_options_keep_the_callers_counters_and_take_the_preset(preset):
    from keras_clip.data.pipeline import PipelineCounters, ReaderOptions

    counters = PipelineCounters()
    loaded = CLIP.from_preset(str(preset))
    options = ReaderOptions.of(batch_size=4, counters=counters)
    derived = ReaderOptions.of(options, preprocessing=loaded.preprocessor_config, seed=3)
    assert derived.counters is counters and derived.seed == 3 and derived.batch_size == 4
    assert (derived.image_size, derived.context_length, derived.mean, derived.std) == (
        IMAGE_SIZE, CONTEXT_LENGTH, MEAN, STD)
    with pytest.raises(TypeError, match=r"Unknown reader options: \['colour'\]"):
        ReaderOptions.of(batch_size=4, colour=1)
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1. Received: batch_size=None"):
        ReaderOptions.of()
