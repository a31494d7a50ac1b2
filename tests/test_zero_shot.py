"""Zero-shot classification: parity with open_clip, classifier behaviour, shipped prompts."""
import csv

import keras
import numpy as np
import pytest

from keras_clip import CLIP
from keras_clip.zero_shot import ZeroShotClassifier, build_class_embeddings, fill_templates
from keras_clip.zero_shot_data import available_datasets, load_dataset_prompts
from tests import harness
from tests import reference_models as ref
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(open_clip_module, tmp_path_factory):
    """The same random-weight small ViT in open_clip and in keras_clip."""
    import torch

    reference = ref.open_clip_model(open_clip_module, ref.SMALL_VIT, seed=1)
    path = tmp_path_factory.mktemp("zero_shot") / "model.pt"
    torch.save(reference.state_dict(), path)
    return reference, CLIP.from_preset(str(path))


@pytest.fixture(scope="module")
def cifar_sample(cifar10_dir):
    """Two CIFAR-10 test images per class (paths, labels), in class order."""
    CIFAR10 = cifar10_dir
    with open(CIFAR10 / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = [r for label in range(10) for r in [x for x in rows if int(x["label"]) == label][:2]]
    return [CIFAR10 / r["path"] for r in picked], np.array([int(r["label"]) for r in picked])


def _reference_classifier(open_clip, reference, class_names, templates):
    """open_clip's `build_zero_shot_classifier`, transposed to (C, E)."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    weights = build_zero_shot_classifier(
        reference, open_clip.tokenize, class_names, templates, num_classes_per_batch=4
    )
    return weights.numpy().T


def test_class_embeddings_match_open_clip_build_zero_shot_classifier(models, open_clip_module):
    from keras_clip.preprocessing.tokenizer import tokenize

    reference, model = models
    class_names, templates = load_dataset_prompts("cifar10")
    templates = templates[:5]
    prompts = fill_templates(class_names, templates)
    np.testing.assert_array_equal(
        np.asarray(tokenize(prompts, model.context_length)),
        open_clip_module.tokenize(prompts).numpy(),
    )
    expected = _reference_classifier(open_clip_module, reference, class_names, templates)
    # A batch size that splits classes across batches must not change the result.
    embeddings = build_class_embeddings(model, class_names, templates, batch_size=7)
    assert embeddings.shape == (10, 64) and embeddings.dtype == np.float32
    assert np.max(np.abs(embeddings - expected)) <= TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_callable_templates_give_the_same_embeddings_as_format_strings(models):
    _, model = models
    strings = ["a photo of a {}.", "a drawing of the {}."]
    callables = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of the {c}."]
    np.testing.assert_array_equal(
        build_class_embeddings(model, ["cat", "dog", "ship"], strings),
        build_class_embeddings(model, ["cat", "dog", "ship"], callables),
    )


def test_ensembling_averages_normalised_prompt_embeddings(models):
    """Two templates: the class embedding is the renormalised mean of the two."""
    _, model = models
    one = build_class_embeddings(model, ["frog"], ["a photo of a {}."])[0]
    two = build_class_embeddings(model, ["frog"], ["a {} in a video game."])[0]
    both = build_class_embeddings(model, ["frog"], ["a photo of a {}.", "a {} in a video game."])[0]
    expected = (one + two) / np.linalg.norm(one + two)
    np.testing.assert_allclose(both, expected, atol=1e-6)


def test_classifier_on_cifar10_predicts_like_open_clip(models, open_clip_module, cifar_sample):
    import torch

    reference, model = models
    class_names, templates = load_dataset_prompts("cifar10")
    templates = templates[:3]
    paths, _ = cifar_sample

    weights = _reference_classifier(open_clip_module, reference, class_names, templates)
    pixels = np.stack([harness.pil_preprocess(p, 64) for p in paths])  # (20, 64, 64, 3)
    with torch.no_grad():
        features = reference.encode_image(
            torch.from_numpy(pixels).permute(0, 3, 1, 2), normalize=True
        ).numpy()
        scale = reference.logit_scale.exp().item()
    ref_logits = scale * features @ weights.T  # (20, 10)
    ref_probs = np.exp(ref_logits - ref_logits.max(1, keepdims=True))
    ref_probs /= ref_probs.sum(1, keepdims=True)

    classifier = ZeroShotClassifier(model, class_names, templates)
    encoded = [p.read_bytes() for p in paths]
    probs = np.asarray(classifier(np.array(encoded, dtype=object)))
    assert probs.shape == (20, 10)
    np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
    np.testing.assert_array_equal(classifier.predict_labels(encoded), ref_logits.argmax(1))
    # Preprocessed float input gives the same answer as encoded bytes.
    np.testing.assert_array_equal(
        classifier.predict_labels(pixels.astype("float32"), batch_size=8), ref_logits.argmax(1)
    )


def test_classifier_picks_the_class_whose_embedding_matches_the_image(models):
    """With the class embeddings set to images' own embeddings, image i is class i."""
    _, model = models
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 64, 64, 3)).astype("float32")
    own = np.asarray(model.encode_image(images))
    classifier = ZeroShotClassifier(model, ["a", "b", "c", "d"], class_embeddings=own)
    probs = np.asarray(classifier(images))
    np.testing.assert_array_equal(probs.argmax(1), [0, 1, 2, 3])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    logits = np.asarray(classifier.compute_logits(images))
    np.testing.assert_allclose(logits, float(model.logit_scale()) * own @ own.T, atol=1e-5)


def test_classifier_round_trips_through_keras_file_without_reencoding(models, tmp_path):
    _, model = models
    classifier = ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}.", "a {}."])
    assert not classifier.class_embeddings.trainable
    assert [w.name for w in classifier.non_trainable_weights].count("class_embeddings") == 1
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, ZeroShotClassifier)
    assert restored.class_names == ["cat", "dog"]
    assert restored.templates == ["a photo of a {}.", "a {}."]
    np.testing.assert_array_equal(
        np.asarray(restored.class_embeddings), np.asarray(classifier.class_embeddings)
    )
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(restored(images)), np.asarray(classifier(images)), atol=1e-6)


def test_bad_arguments_are_rejected_with_clear_messages(models):
    _, model = models
    with pytest.raises(ValueError, match="`class_names` must be a non-empty"):
        build_class_embeddings(model, [], ["a {}."])
    with pytest.raises(ValueError, match="must contain `{}`"):
        build_class_embeddings(model, ["cat"], ["a photo."])
    with pytest.raises(ValueError, match="`batch_size` must be positive"):
        build_class_embeddings(model, ["cat"], ["a {}."], batch_size=0)
    with pytest.raises(ValueError, match=r"must have shape \(2, 64\)"):
        ZeroShotClassifier(model, ["cat", "dog"], class_embeddings=np.zeros((3, 64)))


def test_shipped_prompts_match_openai_lists():
    assert set(available_datasets()) >= {
        "imagenet", "imagenet_simple", "cifar10", "cifar100", "mnist", "stl10", "food101",
        "oxford_pets", "flowers102", "dtd", "eurosat", "sun397", "caltech101",
    }
    classes, templates = load_dataset_prompts("imagenet")
    assert (len(classes), len(templates)) == (1000, 80)
    assert classes[:3] == ["tench", "goldfish", "great white shark"]
    assert classes[-1] == "toilet paper"
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    simple_classes, simple = load_dataset_prompts("imagenet_simple")
    assert simple_classes == classes and simple[0] == "itap of a {}." and len(simple) == 7

    cifar10, _ = load_dataset_prompts("cifar10")
    assert cifar10 == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck"]  # CIFAR-10's label order (batches.meta)
    expected_sizes = {"cifar10": (10, 18), "cifar100": (100, 18), "mnist": (10, 1),
                      "stl10": (10, 2), "food101": (101, 1), "oxford_pets": (37, 1),
                      "flowers102": (102, 1), "dtd": (47, 8), "eurosat": (10, 3),
                      "sun397": (397, 2), "caltech101": (102, 34)}
    for name, sizes in expected_sizes.items():
        classes, templates = load_dataset_prompts(name)
        assert (len(classes), len(templates)) == sizes, name
        assert len(set(classes)) == len(classes), name
        assert all(t.count("{}") == 1 for t in templates), name
    assert load_dataset_prompts("mnist") == ([str(d) for d in range(10)],
                                             ['a photo of the number: "{}".'])
    with pytest.raises(ValueError, match="`name` must be one of"):
        load_dataset_prompts("imagenet21k")


def test_shipped_class_names_follow_the_dataset_files(cifar10_dir, mnist_dir):
    assert load_dataset_prompts("cifar10")[0] == (cifar10_dir / "classes.txt").read_text().split()
    # MNIST's prompts use the digit; the folder's classes.txt spells it out, in label order.
    assert len((mnist_dir / "classes.txt").read_text().split()) == len(load_dataset_prompts("mnist")[0])
