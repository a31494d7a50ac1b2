"""`python -m keras_clip.experiments objectives`: the paper's Figure 2 at toy scale.

The images-needed ratio is checked against hand computations and `np.interp`; one
CLI run on the demo data (two objectives, tiny models, a few steps) is checked
against the schedule and against zero-shot recomputed in numpy from the saved
final weights.
"""
import json

import numpy as np
import pytest

from keras_clip.experiments import common, objectives
from keras_clip.preprocessing.config import PreprocessingConfig
from keras_clip.preprocessing.tokenizer import tokenize

IMAGES = [0, 100, 200, 300]


# ---------------------------------------------------------------------------------
# Interpolation
# ---------------------------------------------------------------------------------


def test_images_to_reach_interpolates_the_first_crossing():
    # 0.4 lies between 0.3 (100 images) and 0.5 (200): 100 + 0.1 / 0.2 * 100 = 150.
    assert objectives.images_to_reach(IMAGES, [0.1, 0.3, 0.5, 0.6], 0.4) == pytest.approx(150.0)
    # Not monotone: the first crossing (0.1 -> 0.5) counts, not the later one.
    assert objectives.images_to_reach(IMAGES, [0.1, 0.5, 0.3, 0.6], 0.4) == pytest.approx(
        np.interp(0.4, [0.1, 0.5], [0, 100]))  # 75
    assert objectives.images_to_reach(IMAGES, [0.1, 0.5, 0.3, 0.6], 0.4) == pytest.approx(75.0)
    assert objectives.images_to_reach(IMAGES, [0.1, 0.3, 0.5, 0.6], 0.6) == 300.0  # hits a point
    assert objectives.images_to_reach(IMAGES, [0.45, 0.3, 0.5, 0.6], 0.4) == 0.0  # first point
    assert objectives.images_to_reach(IMAGES, [0.1, 0.3, 0.5, 0.6], 0.61) is None
    with pytest.raises(ValueError, match="`images` must be increasing"):
        objectives.images_to_reach([0, 100, 100], [0.1, 0.2, 0.3], 0.2)


def test_images_to_reach_matches_np_interp_on_increasing_curves():
    rng = np.random.default_rng(0)
    for _ in range(50):
        images = np.cumsum(rng.integers(1, 500, size=8)).astype(float)
        accuracies = np.sort(rng.random(8))
        accuracies += np.arange(8) * 1e-6  # strictly increasing: np.interp's inverse exists
        target = rng.uniform(accuracies[0], accuracies[-1])
        assert objectives.images_to_reach(images, accuracies, target) == pytest.approx(
            np.interp(target, accuracies, images), rel=1e-9)


def test_images_needed_ratio_by_hand():
    fast, slow = [0.1, 0.4, 0.6, 0.7], [0.1, 0.2, 0.35, 0.5]
    result = objectives.images_needed_ratio(IMAGES, fast, slow)
    # The slow curve's best, 0.5, first at 300 images; the fast one reaches 0.5 at
    # 100 + (0.5 - 0.4) / (0.6 - 0.4) * 100 = 150 images: 2x.
    assert result["target"] == 0.5
    assert result["slow_images"] == pytest.approx(300.0)
    assert result["fast_images"] == pytest.approx(150.0)
    assert result["ratio"] == pytest.approx(2.0)
    assert result["reason"] is None
    assert result["ratio"] == pytest.approx(300.0 / np.interp(0.5, fast, IMAGES))


def test_images_needed_ratio_is_none_when_the_fast_curve_never_gets_there():
    result = objectives.images_needed_ratio(IMAGES, [0.1, 0.2, 0.3, 0.3], [0.1, 0.3, 0.4, 0.35])
    assert result["ratio"] is None and result["fast_images"] is None
    assert result["slow_images"] == pytest.approx(200.0)
    assert result["reason"] == ("the faster objective never reaches the slower one's best "
                                "accuracy 0.4000 (its own best: 0.3000)")
    # A slow curve that never improves on its first point has no "images needed".
    flat = objectives.images_needed_ratio(IMAGES, [0.1, 0.4, 0.6, 0.7], [0.3, 0.2, 0.1, 0.3])
    assert flat["ratio"] is None
    assert flat["reason"] == ("the slower objective's best accuracy 0.3000 is at its first "
                              "evaluation (it never improved)")


def test_compare_objectives_takes_the_papers_pairs_that_ran():
    curves = {
        "bag_of_words_contrastive": {"images": IMAGES, "accuracy": [0.1, 0.4, 0.6, 0.7]},
        "bag_of_words_prediction": {"images": IMAGES, "accuracy": [0.1, 0.2, 0.35, 0.5]},
        "caption_lm": {"images": IMAGES, "accuracy": [0.1, 0.15, 0.2, 0.25]},
    }
    comparisons = objectives.compare_objectives(curves)
    assert [(c["faster"], c["slower"], c["paper_ratio"]) for c in comparisons] == [
        ("bag_of_words_contrastive", "bag_of_words_prediction", 4.0),
        ("bag_of_words_contrastive", "caption_lm", 12.0)]
    assert comparisons[0]["ratio"] == pytest.approx(2.0)
    # caption_lm's best 0.25 at 300 images; the contrastive curve reaches it at
    # 0 + (0.25 - 0.1) / (0.4 - 0.1) * 100 = 50 images: 6x.
    assert comparisons[1]["ratio"] == pytest.approx(300.0 / 50.0)


# ---------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------

TINY = ["--width=32", "--embed_dim=32", "--vision_layers=1", "--text_layers=1", "--heads=2",
        "--context_length=16", "--image_size=32", "--patch_size=8"]
RUN_OBJECTIVES = ("bag_of_words_contrastive", "bag_of_words_prediction")


def _main(argv_flags, name="objectives"):
    from keras_clip.experiments import __main__ as cli

    cli.FLAGS(["experiments", *argv_flags])
    try:
        cli.main(["experiments", name])
    finally:
        cli.FLAGS.unparse_flags()


def test_cli_rejects_an_unknown_objective(tmp_path):
    with pytest.raises(ValueError, match=r"`objectives` must be a non-empty subset of "
                       r"transformer_contrastive, bag_of_words_contrastive, "
                       r"bag_of_words_prediction, caption_lm\. Received: "
                       r"objectives=\['caption_lm', 'captioning'\]"):
        _main(["--objectives=caption_lm,captioning", f"--output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()  # rejected before any data was written
    with pytest.raises(ValueError, match="`eval_every` must be a multiple of `batch_size`"):
        _main(["--eval_every=100", "--batch_size=64", f"--output_dir={tmp_path / 'out'}"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output = tmp_path_factory.mktemp("objectives")
    _main([f"--objectives={','.join(RUN_OBJECTIVES)}", "--dataset=demo", f"--output_dir={output}",
           "--images=96", "--eval_every=32", "--batch_size=16", "--max_examples=36",
           "--demo_examples=64", "--warmup_steps=1", *TINY])
    return output, json.loads((output / "objectives_demo.json").read_text())


def test_run_follows_the_schedule(run):
    output, results = run
    assert list(results["objectives"]) == list(RUN_OBJECTIVES)
    assert results["schedule"]["steps"] == 6 and results["schedule"]["batch_size"] == 16
    digests = set()
    for objective in RUN_OBJECTIVES:
        entry = results["objectives"][objective]
        curve = entry["curve"]
        assert curve["images"] == [0, 32, 64, 96]  # 0 and every eval_every images
        assert curve["step"] == [0, 2, 4, 6]
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
        assert entry["final_accuracy"] == curve["accuracy"][-1]
        assert entry["best_accuracy"] == max(curve["accuracy"])
        assert len(entry["loss_history"]) == 6 and np.all(np.isfinite(entry["loss_history"]))
        assert entry["model_config"]["vision_hidden_dim"] == 32
        assert entry["model_config"]["vision_num_layers"] == 1
        digests.add(entry["initial_image_tower_digest"])
    assert len(digests) == 1  # both objectives started from the same image tower
    assert results["objectives"]["bag_of_words_contrastive"]["model_class"] == "CLIP"
    assert results["objectives"]["bag_of_words_prediction"]["model_class"] == \
        "CaptionPredictionModel"
    (comparison,) = results["comparisons"]
    curves = {o: results["objectives"][o]["curve"] for o in RUN_OBJECTIVES}
    expected = objectives.images_needed_ratio(
        curves["bag_of_words_contrastive"]["images"],
        curves["bag_of_words_contrastive"]["accuracy"],
        curves["bag_of_words_prediction"]["accuracy"])
    assert {k: comparison[k] for k in expected} == expected
    assert comparison["paper_ratio"] == 4.0
    markdown = (output / "objectives_demo.md").read_text()
    for images in (0, 32, 64, 96):
        assert f"\n| {images} | " in markdown
    assert (output / "objectives_demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _numpy_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_final_accuracy_matches_numpy_zero_shot_from_saved_weights(run):
    from keras_clip import CLIP
    from keras_clip.models.captioning import CaptionPredictionModel

    _, results = run
    evaluation = results["evaluation"]
    dataset, templates = common.demo_dataset(36)
    assert evaluation["labels"] == dataset.labels.tolist() == [i % 12 for i in range(36)]
    assert evaluation["templates"] == templates
    images = np.concatenate([np.asarray(PreprocessingConfig(image_size=32, context_length=16)
                                        .image_preprocessor()(np.asarray(batch, object)))
                             for batch, _ in dataset.batches(64)])
    prompts = [t.format(c) for c in dataset.class_names for t in templates]  # class-major
    token_ids = np.asarray(tokenize(prompts, 16))  # (C*T, 16)
    labels = dataset.labels

    # Contrastive: cosine with the normalised mean of normalised prompt embeddings.
    entry = results["objectives"]["bag_of_words_contrastive"]
    model = CLIP(**entry["model_config"])
    model.load_weights(entry["weights"])
    image_features = np.asarray(model.encode_image(images, normalize=False), np.float64)
    image_features /= np.linalg.norm(image_features, axis=1, keepdims=True)
    text = np.asarray(model.encode_text(token_ids, normalize=False), np.float64)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    classes = text.reshape(12, len(templates), -1).mean(axis=1)
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    predictions = np.argmax(image_features @ classes.T, axis=1)
    assert predictions.tolist() == entry["final_predictions"]
    assert entry["final_accuracy"] == pytest.approx(np.mean(predictions == labels), abs=1e-12)

    # Bag-of-words prediction: mean log-probability of each prompt's words, averaged
    # over templates.
    entry = results["objectives"]["bag_of_words_prediction"]
    model = CaptionPredictionModel(**entry["model_config"])
    model.load_weights(entry["weights"])
    log_probs = _numpy_log_softmax(model({"images": images}))  # (N, V)
    words = ~np.isin(token_ids, (0, 49406, 49407))
    scores = np.stack([log_probs[:, ids[mask]].mean(axis=1)
                       for ids, mask in zip(token_ids, words)], axis=1)  # (N, C*T)
    scores = scores.reshape(len(images), 12, len(templates)).mean(axis=2)
    predictions = np.argmax(scores, axis=1)
    assert predictions.tolist() == entry["final_predictions"]
    assert entry["final_accuracy"] == pytest.approx(np.mean(predictions == labels), abs=1e-12)
