"""Contrastive versus predictive objectives (the CLIP paper's Figure 2).

Four models with the same image tower (a small ViT, identical initial weights),
trained on the same batches (keras_clip's data pipeline with one seed: same
images, captions and crops in the same order), with the same batch size,
optimizer recipe (`keras_clip.training.create_optimizer`, the paper's AdamW) and
learning-rate schedule (`WarmupCosineDecay`, warm-up then cosine to 0), for the
same number of images:

- `transformer_contrastive`: `keras_clip.CLIP` (transformer text tower), what
  keras_clip trains; `CLIP.train_step`.
- `bag_of_words_contrastive`: `CLIP(text_architecture="bag_of_words")` (mean
  token embedding, then a projection); `CLIP.train_step`.
- `bag_of_words_prediction`: `CaptionPredictionModel(head="bag_of_words")`: the
  image embedding predicts the caption's word distribution (softmax over the
  vocabulary, cross-entropy with the normalised word counts).
- `caption_lm`: `CaptionPredictionModel(head="transformer")`: a small causal
  transformer decoder, conditioned on the image embedding as a prefix position,
  predicts the caption token by token.

Every `eval_every` images each model is scored by zero-shot top-1 on held-out
classes with the dataset's templates: the contrastive models with keras_clip's
zero-shot code (`build_class_embeddings`: prompt ensembling in embedding space,
cosine similarity); the predictive ones as the paper does, by the likelihood of
each class's prompts under the model (`zero_shot_by_likelihood`: mean per-token
log-likelihood, averaged over templates). `images_needed_ratio` then reads off,
for each pair of the paper's figure, how many more images the slower objective
needed: the images it needed to reach its best accuracy divided by the images
the faster one needed to reach that accuracy (curves interpolated linearly
between evaluation points).

Datasets: `demo` trains on the generated demo captions (written once into
`<cache_dir>/demo_train_<N>_<seed>`) and evaluates on the demo's 12 held-out
colour-shape classes with `DEMO_TEMPLATES`; `flickr8k` trains on the Flickr8k
train split of `<data_dir>/flickr8k/captions.tsv` (the table reader grouped by
image, one of each image's 5 captions drawn per pass, as the trainer's
`--group_captions=true`; its figures were made so) and evaluates on CIFAR-10 test
images (`<data_dir>/cifar10_test`) with the 18 CIFAR-10 templates.

Budget. Measured on this 2-core machine (batch 64, median of 10 steps, `nice -n 19`,
load average about 5 from other jobs), seconds per step, demo / Flickr8k:
transformer_contrastive 0.120 / 0.325, bag_of_words_contrastive 0.093 / 0.220,
bag_of_words_prediction 0.160 / 0.330, caption_lm 1.371 / 2.609 (Flickr8k's reader
decodes 224 px JPEGs; the caption LM pays a 49,408-way softmax at every position).
A caption-LM evaluation costs about 3 ms per image-prompt pair (26 s for 240 demo images
x 36 prompts); the others take under a second. Defaults (`DEFAULT_BUDGETS`,
`DEFAULT_TOWER`): demo 20,480 images per objective (320 steps), evaluated every 2,560 on
240 images: 320 x 1.74 s + 9 x 27 s + ~90 s set-up = about 15 minutes for all four;
flickr8k 24,576 images (384 steps), evaluated every 6,144 on 200 CIFAR-10 images:
384 x 3.5 s + 5 x ~115 s + ~100 s = about 34 minutes. Measured with these defaults
(same machine, same load): demo 13 min 59 s, flickr8k 24 min 15 s.

Deviations from the paper: a ViT of a few layers at 32-64 px instead of a
ResNet-50 at 224 px, thousands instead of hundreds of millions of images, one
seed; predictive zero-shot scores a prompt by its mean (not summed) per-token
log-likelihood (the paper does not say which), so class names of different
token lengths compete fairly.
"""
import dataclasses
import hashlib
import os
import time

import numpy as np
from absl import logging

from keras_clip.experiments import common

OBJECTIVES = ("transformer_contrastive", "bag_of_words_contrastive", "bag_of_words_prediction",
              "caption_lm")
CONTRASTIVE = {"transformer_contrastive": "transformer",
               "bag_of_words_contrastive": "bag_of_words"}
PREDICTIVE = {"bag_of_words_prediction": "bag_of_words", "caption_lm": "transformer"}
# (faster, slower) in the paper's Figure 2, and the paper's ratio of images needed where it
# gives one (4x: bag-of-words contrastive vs prediction; 4x * 3x = 12x vs the transformer
# language model; the paper has no transformer-contrastive line in that figure).
COMPARISONS = (("bag_of_words_contrastive", "bag_of_words_prediction", 4.0),
               ("bag_of_words_contrastive", "caption_lm", 12.0),
               ("transformer_contrastive", "caption_lm", None))
DATASETS = ("demo", "flickr8k")
DEFAULT_EVAL_EXAMPLES = {"demo": 240, "flickr8k": 200}
# The shared tower (`TowerConfig` fields; smaller than training/run.py's clip_vit_tiny so
# that the caption decoder's 49,408-way softmax fits the budget) and, per dataset, the
# images per objective and the evaluation interval. Learning rate, warm-up, weight decay
# and optimizer recipe are `TrainConfig`'s (training/run.py's), the batch the CLI's 64.
DEFAULT_TOWER = dict(image_size=32, patch_size=8, vision_layers=2, width=128, heads=4,
                     text_layers=2, embed_dim=128, context_length=32)
DEFAULT_BUDGETS = {
    "demo": {"images": 20480, "eval_every": 2560},
    "flickr8k": {"images": 24576, "eval_every": 6144},
}


# ----------------------------------------------------------------------------------
# Images needed to reach an accuracy (pure functions)
# ----------------------------------------------------------------------------------


def images_to_reach(images, accuracies, target):
    """Images processed when a curve first reaches `target` accuracy.

    Linear interpolation between the two evaluation points around the first
    crossing: with `a[i-1] < target <= a[i]`,
    `images[i-1] + (target - a[i-1]) / (a[i] - a[i-1]) * (images[i] - images[i-1])`.

    Args:
        images: increasing numbers, images processed at each evaluation.
        accuracies: the accuracy at each of them.
        target: float.

    Returns:
        float, or None when no evaluation point reaches `target`.
    """
    images = [float(x) for x in images]
    accuracies = [float(a) for a in accuracies]
    if len(images) != len(accuracies) or not images \
            or any(b <= a for a, b in zip(images, images[1:])):
        raise ValueError("`images` must be increasing, one per accuracy. "
                         f"Received: images={images}, accuracies={accuracies}")
    for i, accuracy in enumerate(accuracies):
        if accuracy >= target:
            if i == 0:
                return images[0]
            previous = accuracies[i - 1]
            fraction = (target - previous) / (accuracy - previous)
            return images[i - 1] + fraction * (images[i] - images[i - 1])
    return None


def images_needed_ratio(images, fast_accuracies, slow_accuracies):
    """How many times more images the slow curve needed for its best accuracy.

    `ratio = images_to_reach(slow, max(slow)) / images_to_reach(fast, max(slow))`
    (both curves evaluated at the same `images`).

    Returns:
        dict: `ratio` (float or None), `target` (the slow curve's best accuracy),
        `slow_images`, `fast_images` (floats or None) and `reason` (None, or why
        there is no ratio: the fast curve never reaches the target, or the slow
        curve's best is its first point, so it never improved).
    """
    target = float(max(slow_accuracies))
    slow_images = images_to_reach(images, slow_accuracies, target)
    fast_images = images_to_reach(images, fast_accuracies, target)
    result = {"ratio": None, "target": target, "slow_images": slow_images,
              "fast_images": fast_images, "reason": None}
    if fast_images is None:
        result["reason"] = (f"the faster objective never reaches the slower one's best accuracy "
                            f"{target:.4f} (its own best: {max(fast_accuracies):.4f})")
    elif slow_images == float(images[0]):
        result["reason"] = (f"the slower objective's best accuracy {target:.4f} is at its first "
                            "evaluation (it never improved)")
    elif fast_images == 0.0:
        result["reason"] = "the faster objective reaches the target at 0 images"
    else:
        result["ratio"] = slow_images / fast_images
    return result


def compare_objectives(curves):
    """`images_needed_ratio` for every pair of `COMPARISONS` whose two curves ran.

    Args:
        curves: dict objective -> `{"images": [...], "accuracy": [...]}` (same images).

    Returns:
        list of dicts: `faster`, `slower`, `paper_ratio` and `images_needed_ratio`'s.
    """
    comparisons = []
    for fast, slow, paper_ratio in COMPARISONS:
        if fast in curves and slow in curves:
            if list(curves[fast]["images"]) != list(curves[slow]["images"]):
                raise ValueError(f"{fast} and {slow} were evaluated at different image counts.")
            entry = {"faster": fast, "slower": slow, "paper_ratio": paper_ratio}
            entry.update(images_needed_ratio(curves[fast]["images"], curves[fast]["accuracy"],
                                             curves[slow]["accuracy"]))
            comparisons.append(entry)
    return comparisons


# ----------------------------------------------------------------------------------
# Models, data and evaluation
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """The shared image tower and the text side's size (all four objectives).

    The ViT: `image_size` px, `patch_size` patches, `vision_layers` blocks of width
    `width` with `heads` heads, projected to `embed_dim`. The text side (transformer
    text tower, bag-of-words encoder width, caption decoder) has width `width`,
    `text_layers` blocks and `heads` heads, over `context_length` tokens.
    """

    embed_dim: int = 128
    image_size: int = 32
    patch_size: int = 8
    vision_layers: int = 2
    width: int = 128
    heads: int = 4
    text_layers: int = 2
    context_length: int = 32

    def vision_kwargs(self):
        return dict(embed_dim=self.embed_dim, image_size=self.image_size,
                    vision_num_layers=self.vision_layers, vision_hidden_dim=self.width,
                    vision_num_heads=self.heads, vision_patch_size=self.patch_size,
                    context_length=self.context_length)

    def preprocessing(self):
        from keras_clip.preprocessing.config import PreprocessingConfig

        return PreprocessingConfig(image_size=self.image_size, context_length=self.context_length)


def build_model(objective, tower, seed=0):
    """The model of one objective (random weights drawn after seeding with `seed`)."""
    import keras

    keras.utils.set_random_seed(seed)
    if objective in CONTRASTIVE:
        from keras_clip import CLIP

        return CLIP(**tower.vision_kwargs(), vision_architecture="vit",
                    text_hidden_dim=tower.width, text_num_layers=tower.text_layers,
                    text_num_heads=tower.heads, text_architecture=CONTRASTIVE[objective])
    from keras_clip.models.captioning import CaptionPredictionModel

    return CaptionPredictionModel(head=PREDICTIVE[objective], **tower.vision_kwargs(),
                                  decoder_hidden_dim=tower.width,
                                  decoder_num_layers=tower.text_layers,
                                  decoder_num_heads=tower.heads)


def weights_digest(layer):
    """sha256 (16 hex digits) of a layer's weights, in order."""
    digest = hashlib.sha256()
    for weight in layer.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class EvaluationSet:
    """Zero-shot evaluation data, preprocessed once for every model.

    Attributes:
        name: the dataset's name.
        pixels: float32 `(N, S, S, 3)`, preprocessed as the models' tower expects.
        labels: int64 `(N,)`.
        class_names: C str.
        templates: T templates.
        prompt_token_ids: int32 `(C, T, L)`: template t filled with class c.
    """

    name: str
    pixels: np.ndarray
    labels: np.ndarray
    class_names: list
    templates: list
    prompt_token_ids: np.ndarray


def evaluation_set(dataset, templates, tower, batch_size=64):
    """Preprocesses a `LabelledImages` once and tokenizes its prompts (class-major)."""
    import tensorflow as tf

    from keras_clip.preprocessing.tokenizer import tokenize
    from keras_clip.zero_shot import fill_templates

    preprocessor = tower.preprocessing().image_preprocessor()
    chunks = []
    for images, _ in dataset.batches(batch_size):
        if isinstance(images, (list, tuple)):
            images = tf.constant(list(images), dtype=tf.string)
        chunks.append(np.asarray(preprocessor(tf.convert_to_tensor(images)), np.float32))
    prompts = fill_templates(dataset.class_names, templates)  # c * T + t
    token_ids = np.asarray(tokenize(prompts, tower.context_length), np.int32)
    return EvaluationSet(dataset.name, np.concatenate(chunks), dataset.labels,
                         list(dataset.class_names), list(templates),
                         token_ids.reshape(len(dataset.class_names), len(templates), -1))


def zero_shot_scores(model, objective, data, batch_size=64):
    """Class scores `(N, C)` of every evaluation image under one objective's model.

    Contrastive: cosine similarity with the ensembled prompt embeddings
    (`build_class_embeddings`, `encode_images`). Predictive: `zero_shot_by_likelihood`
    (mean per-token log-likelihood of each prompt, averaged over templates).
    """
    if objective in CONTRASTIVE:
        from keras_clip.evaluation.retrieval import encode_images
        from keras_clip.evaluation.zero_shot_eval import zero_shot_scores as cosine_scores
        from keras_clip.zero_shot import build_class_embeddings

        class_embeddings = build_class_embeddings(model, data.class_names, data.templates)
        return cosine_scores(encode_images(model, data.pixels, batch_size), class_embeddings)
    from keras_clip.models.captioning import zero_shot_by_likelihood

    return np.concatenate([
        np.asarray(zero_shot_by_likelihood(model, data.pixels[i:i + batch_size],
                                           data.prompt_token_ids), np.float32)
        for i in range(0, len(data.pixels), batch_size)])


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The optimisation shared by every objective (defaults: `TrainConfig`'s).

    `images` per objective in steps of `batch_size`; evaluated at 0 and every
    `eval_every` images (and at the end).
    """

    images: int
    batch_size: int
    eval_every: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    optimizer_recipe: str = "paper"
    shuffle_buffer: int = 2000
    seed: int = 0

    @property
    def steps(self):
        return self.images // self.batch_size

    def validate(self):
        def fail(name, requirement):
            raise ValueError(f"`{name}` must be {requirement}. "
                             f"Received: {name}={getattr(self, name)!r}")

        for name in ("images", "batch_size", "eval_every", "shuffle_buffer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "a positive integer")
        if self.eval_every % self.batch_size:
            raise ValueError("`eval_every` must be a multiple of `batch_size`. Received: "
                             f"eval_every={self.eval_every}, batch_size={self.batch_size}")
        if self.images % self.eval_every:
            raise ValueError("`images` must be a multiple of `eval_every`. Received: "
                             f"images={self.images}, eval_every={self.eval_every}")
        if not self.learning_rate > 0:
            fail("learning_rate", "positive")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("`warmup_steps` and `weight_decay` must be >= 0. Received: "
                             f"warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay}")
        return self


def train_and_evaluate(objective, tower, schedule, train_spec, table_fields, data,
                       initial_visual_weights=None, eval_batch_size=64, weights_path=None):
    """Trains one objective's model on the shared stream; zero-shot every `eval_every`.

    Args:
        objective: one of `OBJECTIVES`.
        tower: `TowerConfig`.
        schedule: `Schedule`.
        train_spec: `keras_clip.data.spec.DataSpec` of the training pairs.
        table_fields: extra reader arguments (a table's `split_column`/`split`).
        data: `EvaluationSet`.
        initial_visual_weights: optional list of arrays: the image tower starts from
            them (so every objective starts from the same tower).
        eval_batch_size: images per evaluation forward pass.
        weights_path: optional `.weights.h5` path for the final weights.

    Returns:
        `(model, result dict)`.
    """
    import tensorflow as tf

    from keras_clip.training import WarmupCosineDecay, create_optimizer

    model = build_model(objective, tower, schedule.seed)
    if initial_visual_weights is not None:
        model.visual.set_weights(initial_visual_weights)
    initial_digest = weights_digest(model.visual)
    lr_schedule = WarmupCosineDecay(schedule.learning_rate, schedule.warmup_steps, schedule.steps)
    optimizer = create_optimizer(model, lr_schedule, weight_decay=schedule.weight_decay,
                                 recipe=schedule.optimizer_recipe)
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    dataset = train_spec.dataset(
        preprocessing=tower.preprocessing(), batch_size=schedule.batch_size, training=True,
        seed=schedule.seed, shuffle_buffer=schedule.shuffle_buffer, repeat=True, **table_fields)
    iterator = iter(dataset)

    @tf.function
    def train_function(batch):
        for tracker in model.metrics:  # each step's own loss, not a running mean
            tracker.reset_state()
        return model.train_step(batch)["loss"]

    curve = {"images": [], "step": [], "accuracy": [], "eval_seconds": []}
    scores = None

    def evaluate(step):
        nonlocal scores
        tic = time.perf_counter()
        scores = zero_shot_scores(model, objective, data, eval_batch_size)
        accuracy = float(np.mean(np.argmax(scores, axis=1) == data.labels))
        curve["images"].append(step * schedule.batch_size)
        curve["step"].append(step)
        curve["accuracy"].append(accuracy)
        curve["eval_seconds"].append(time.perf_counter() - tic)
        logging.info("%s: %d images, zero-shot top-1 %.4f (%.1f s)", objective,
                     step * schedule.batch_size, accuracy, curve["eval_seconds"][-1])

    evaluate(0)
    losses, step_seconds = [], []
    eval_steps = schedule.eval_every // schedule.batch_size
    for step in range(1, schedule.steps + 1):
        tic = time.perf_counter()
        losses.append(float(train_function(next(iterator))))
        step_seconds.append(time.perf_counter() - tic)
        if step % eval_steps == 0:
            evaluate(step)
    if weights_path:
        os.makedirs(os.path.dirname(os.path.abspath(weights_path)), exist_ok=True)
        model.save_weights(weights_path)
    predictions = np.argmax(scores, axis=1)
    steady = step_seconds[1:] or step_seconds
    result = {
        "model_class": type(model).__name__,
        "model_config": {k: v for k, v in model.get_config().items()
                         if k not in ("name", "trainable", "dtype")},
        "parameters": int(model.count_params()),
        "image_tower_parameters": int(model.visual.count_params()),
        "initial_image_tower_digest": initial_digest,
        "curve": curve,
        "final_accuracy": curve["accuracy"][-1],
        "best_accuracy": max(curve["accuracy"]),
        "final_predictions": predictions.tolist(),
        "loss_history": losses,
        "first_step_seconds": step_seconds[0] if step_seconds else None,
        "median_step_seconds": float(np.median(steady)) if steady else None,
        "train_seconds": float(np.sum(step_seconds)),
        "eval_seconds": float(np.sum(curve["eval_seconds"])),
        "weights": weights_path,
    }
    logging.info("%s: final zero-shot top-1 %.4f, %d steps (median %.3f s/step)", objective,
                 result["final_accuracy"], len(losses), result["median_step_seconds"] or 0.0)
    return model, result


# ----------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------


def demo_training_spec(cache_dir, num_examples, seed=0):
    """The demo training pairs as TFRecords under `cache_dir` (written once)."""
    import tensorflow as tf

    from keras_clip import demo_data
    from keras_clip.data.shards import write_shards
    from keras_clip.data.spec import DataSpec

    folder = os.path.join(cache_dir, f"demo_train_{num_examples}_{seed}")
    marker = os.path.join(folder, "_COMPLETE")
    if not os.path.isfile(marker):
        if tf.io.gfile.exists(folder):
            tf.io.gfile.rmtree(folder)
        write_shards(demo_data.generate_demo_examples(num_examples, seed=seed, split="train"),
                     folder, prefix="train", examples_per_shard=5000)
        with open(marker, "w"):
            pass
    return DataSpec.parse("demo").demo_split(folder, "train"), {}


def flickr8k_training_spec(data_dir):
    """The Flickr8k train split of `<data_dir>/flickr8k/captions.tsv` (the table
    reader with rows grouped by image, one caption drawn per pass: the trainer's
    `--group_captions=true`)."""
    from keras_clip.data.spec import DataSpec

    flickr = os.path.join(data_dir, "flickr8k")
    spec = DataSpec.parse(os.path.join(flickr, "captions.tsv"),
                          image_root=os.path.join(flickr, "images"))
    return spec, {"split_column": "split", "split": "train"}


def default_budget(dataset, batch_size=64, images=None, eval_every=None, learning_rate=None,
                   warmup_steps=None, weight_decay=None, demo_examples=None, seed=0,
                   **tower_fields):
    """`(TowerConfig, Schedule, demo_examples)`: `DEFAULT_BUDGETS[dataset]` and
    `TrainConfig`'s optimisation defaults, with every argument that is not None
    overriding them (`tower_fields`: `TowerConfig` fields)."""
    from keras_clip.training import TrainConfig

    if dataset not in DATASETS:
        raise ValueError(f"`dataset` must be one of {', '.join(DATASETS)} for the objectives "
                         f"experiment. Received: dataset={dataset!r}")
    budget, train_defaults = DEFAULT_BUDGETS[dataset], TrainConfig()

    def pick(value, default):
        return default if value is None else value

    tower = TowerConfig(**dict(DEFAULT_TOWER, **{k: v for k, v in tower_fields.items()
                                                  if v is not None}))
    schedule = Schedule(
        images=pick(images, budget["images"]), batch_size=batch_size,
        eval_every=pick(eval_every, budget["eval_every"]),
        learning_rate=pick(learning_rate, train_defaults.learning_rate),
        warmup_steps=pick(warmup_steps, train_defaults.warmup_steps),
        weight_decay=pick(weight_decay, train_defaults.weight_decay),
        optimizer_recipe=train_defaults.optimizer_recipe,
        shuffle_buffer=train_defaults.shuffle_buffer, seed=seed).validate()
    return tower, schedule, pick(demo_examples, train_defaults.demo_examples)


def validate_objectives(objectives):
    """The objectives as a tuple, in `OBJECTIVES` order; raises for an unknown one."""
    objectives = list(objectives)
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ValueError(f"`objectives` must be a non-empty subset of {', '.join(OBJECTIVES)}. "
                         f"Received: objectives={objectives}")
    return tuple(o for o in OBJECTIVES if o in objectives)


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------


def _format_ratio(entry):
    if entry["ratio"] is None:
        return f"none: {entry['reason']}"
    return f"{entry['ratio']:.2f}x"


def markdown(results):
    """The curves as a table (accuracy per evaluation point) and the ratios."""
    objectives = list(results["objectives"])
    first = results["objectives"][objectives[0]]["curve"]
    lines = [f"Zero-shot top-1 (%) on {results['evaluation']['dataset']} "
             f"({results['evaluation']['num_images']} images, "
             f"{results['evaluation']['num_classes']} classes, "
             f"{results['evaluation']['num_templates']} templates; chance "
             f"{100.0 / results['evaluation']['num_classes']:.1f}%) against training images "
             f"({results['training']['dataset']}, batch {results['schedule']['batch_size']}).",
             "", "| images | " + " | ".join(objectives) + " |",
             "|---:|" + "---:|" * len(objectives)]
    for i, images in enumerate(first["images"]):
        lines.append(f"| {images} | " + " | ".join(
            f"{100 * results['objectives'][o]['curve']['accuracy'][i]:.1f}" for o in objectives)
            + " |")
    lines.append("| **final** | " + " | ".join(
        f"**{100 * results['objectives'][o]['final_accuracy']:.1f}**" for o in objectives) + " |")
    lines += ["", "| objective | parameters | median s/step | train s | eval s |",
              "|---|---:|---:|---:|---:|"]
    for o in objectives:
        entry = results["objectives"][o]
        lines.append(f"| {o} | {entry['parameters']:,} | {entry['median_step_seconds'] or 0:.3f} "
                     f"| {entry['train_seconds']:.0f} | {entry['eval_seconds']:.0f} |")
    if results["comparisons"]:
        lines += ["", "Images needed to reach the same accuracy (slower objective's images to "
                  "reach its best accuracy / faster objective's images to reach it):", "",
                  "| faster | slower | target top-1 (%) | slower's images | faster's images "
                  "| ratio | paper |", "|---|---|---:|---:|---:|---|---:|"]
        for entry in results["comparisons"]:
            paper = f"{entry['paper_ratio']:.0f}x" if entry["paper_ratio"] else "-"
            slow = "-" if entry["slow_images"] is None else f"{entry['slow_images']:.0f}"
            fast = "-" if entry["fast_images"] is None else f"{entry['fast_images']:.0f}"
            lines.append(f"| {entry['faster']} | {entry['slower']} | {100 * entry['target']:.1f} "
                         f"| {slow} | {fast} | {_format_ratio(entry)} | {paper} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Left: zero-shot accuracy against images; right: the images-needed ratios."""
    plt = common.pyplot()
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 2))
    for objective, entry in results["objectives"].items():
        curves.plot(entry["curve"]["images"], [100 * a for a in entry["curve"]["accuracy"]],
                    marker="o", markersize=3, label=objective)
    chance = 100.0 / results["evaluation"]["num_classes"]
    curves.axhline(chance, color="gray", linestyle=":", label="chance")
    curves.set_xlabel("training images processed")
    curves.set_ylabel("zero-shot top-1 (%)")
    curves.set_title(f"Zero-shot {results['evaluation']['dataset']}")
    curves.legend(fontsize=8)
    labels = [f"{e['faster']}\nvs {e['slower']}" for e in results["comparisons"]]
    values = [e["ratio"] or 0.0 for e in results["comparisons"]]
    positions = np.arange(len(labels))
    bars.barh(positions, values, height=0.35, label="measured")
    papers = [e["paper_ratio"] or 0.0 for e in results["comparisons"]]
    bars.barh(positions + 0.35, papers, height=0.35, label="paper")
    for y, entry in zip(positions, results["comparisons"]):
        if entry["ratio"] is None:
            bars.text(0.1, y, "no ratio (see table)", va="center", fontsize=7)
    bars.set_yticks(positions + 0.175, labels=labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("x more images for the same accuracy")
    bars.set_title("Images needed (slower / faster)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------


def run(dataset="demo", objectives=OBJECTIVES, output_dir="docs/experiments", tag=None,
        data_dir="../shared/data", cache_dir=None, max_examples=None, tower=None,
        schedule=None, demo_examples=None, eval_batch_size=64, seed=0, make_plot=True,
        save_weights=True):
    """Trains every objective, writes `objectives_<tag>.json`, `.md` and `.png`.

    Args:
        dataset: `"demo"` or `"flickr8k"` (see the module docstring).
        objectives: subset of `OBJECTIVES`.
        output_dir: where the JSON, Markdown and PNG go.
        tag: file-name tag (default: `demo` or `flickr8k_cifar10`).
        data_dir: folder holding `flickr8k/` and `cifar10_test/` (flickr8k only).
        cache_dir: demo training data and final weights (default
            `<output_dir>/embedding_cache`, git-ignored).
        max_examples: zero-shot evaluation images (default `DEFAULT_EVAL_EXAMPLES`).
        tower, schedule, demo_examples: `TowerConfig`, `Schedule` and the size of the
            generated demo training set; each None takes `default_budget(dataset)`'s.
        eval_batch_size: images per evaluation forward pass.
        seed: evaluation subset seed (the training seed is `schedule.seed`).
        make_plot: write the PNG.
        save_weights: save each objective's final weights to
            `<cache_dir>/objectives_<tag>/<objective>.weights.h5`.

    Returns:
        The results dict (also written as JSON).
    """
    objectives = validate_objectives(objectives)
    if dataset not in DATASETS:
        raise ValueError(f"`dataset` must be one of {', '.join(DATASETS)} for the objectives "
                         f"experiment. Received: dataset={dataset!r}")
    default_tower, default_schedule, default_examples = default_budget(dataset)
    tower = tower or default_tower
    schedule = (schedule or default_schedule).validate()
    demo_examples = demo_examples or default_examples
    cache_dir = cache_dir or os.path.join(output_dir, "embedding_cache")
    max_examples = max_examples or DEFAULT_EVAL_EXAMPLES[dataset]
    if dataset == "demo":
        train_spec, table_fields = demo_training_spec(cache_dir, demo_examples, schedule.seed)
        evaluation, templates = common.load_dataset(common.DEMO, None, max_examples, seed)
        training_name = (f"demo ({demo_examples} generated training images, held-out classes "
                         "excluded)")
    else:
        train_spec, table_fields = flickr8k_training_spec(data_dir)
        evaluation, templates = common.load_dataset(os.path.join(data_dir, "cifar10_test"),
                                                    "cifar10", max_examples, seed)
        training_name = "Flickr8k train split (6,000 images, 5 captions each)"
    tag = tag or ("demo" if dataset == "demo" else "flickr8k_cifar10")
    data = evaluation_set(evaluation, templates, tower, eval_batch_size)
    logging.info("Objectives %s on %s: %d steps of %d, zero-shot on %d %s images every %d",
                 objectives, dataset, schedule.steps, schedule.batch_size, len(data.labels),
                 data.name, schedule.eval_every)
    # Every objective starts from this one freshly drawn image tower.
    initial_visual = build_model(OBJECTIVES[0], tower, schedule.seed).visual.get_weights()
    results = {
        "experiment": "objectives",
        "dataset_spec": dataset,
        "training": {"dataset": training_name, "spec": train_spec.text, **table_fields},
        "evaluation": {"dataset": data.name, "num_images": int(len(data.labels)),
                       "num_classes": len(data.class_names), "num_templates": len(templates),
                       "class_names": data.class_names, "templates": data.templates,
                       "labels": data.labels.tolist(), "seed": seed},
        "tower": dataclasses.asdict(tower),
        "schedule": dict(dataclasses.asdict(schedule), steps=schedule.steps),
        "objectives": {},
    }
    for objective in objectives:
        weights_path = (os.path.join(cache_dir, f"objectives_{tag}", f"{objective}.weights.h5")
                        if save_weights else None)
        _, results["objectives"][objective] = train_and_evaluate(
            objective, tower, schedule, train_spec, table_fields, data, initial_visual,
            eval_batch_size, weights_path)
    results["comparisons"] = compare_objectives(
        {o: results["objectives"][o]["curve"] for o in objectives})
    return common.write_outputs(results, output_dir, f"objectives_{tag}", markdown,
                                plot if make_plot else None)

