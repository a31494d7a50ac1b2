"""Experiment settings for a training run (kept apart from the model's config).

Each field's help text is written once, beside it (`dataclasses.field(metadata=
{"help": ...})`); `training/run.py` turns every field into a flag with that help.
"""
import dataclasses
import numbers

from keras_clip.data.spec import TABLE_SUFFIXES

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("one_device", "mirrored", "multiworker")
JIT_SETTINGS = ("auto", "true", "false")
LOSSES = ("softmax", "sigmoid")
TEXT_ARCHITECTURES = ("transformer", "bag_of_words")  # keras_clip.models.clip's
OPTIMIZER_RECIPES = ("paper", "open_clip")  # keras_clip.training.optimizer.RECIPES
WEIGHT_DECAY_RULES = ("auto", "except_embeddings", "all_matrices")


def _field(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


def help_text(name):
    """The help text of a `TrainConfig` field (also its flag's help)."""
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run. Every field has a default, so tests and the
    no-flag demo run need none; each field's meaning is its `help` (see the
    definitions below, or `python training/run.py --help`).

    `validate()` checks every field and returns the config; `keras_clip.training.run`
    calls it first.
    """

    preset: str = _field("clip_vit_tiny", "Model preset name or path (`CLIP.from_preset`).")
    train_data: str = _field(
        "demo", "Training pairs: demo (generated) | TFRecord pattern (img2dataset schema) | "
        "CSV/TSV of image path + caption (with --image_root) | tfds:NAME[/SPLIT].")
    val_data: str = _field("demo", "Validation data in the same forms ('' for none; demo: the "
                                   "generated validation split).")
    image_root: str = _field("", "Folder of the CSV's image paths (or TFDS data_dir).")
    group_captions: bool | None = _field(
        None, "How a CSV/TSV training table becomes records. Unset (default) or false: one "
        "record per row, so a pass sees every image-caption pair once, as open_clip's "
        "CsvDataset reads a table (tables are shuffled whole, so a table sorted by image is "
        "fine); true: one record per image with all its captions, one drawn per pass. "
        "Other data is read as stored (false then is an error; `shards.convert_csv("
        "group_by_image=...)` chooses for TFRecords).")
    global_batch_size: int = _field(128, "Pairs per step across all replicas (negatives come "
                                         "from the whole global batch).")
    epochs: int = _field(3, "Passes over the training data (ignored if --steps > 0).")
    steps: int = _field(0, "Total optimisation steps (overrides --epochs when > 0).")
    learning_rate: float = _field(1e-3, "Peak learning rate after warm-up.")
    warmup_steps: int = _field(30, "Linear warm-up steps.")
    weight_decay: float = _field(0.1, "AdamW decoupled weight decay.")
    optimizer_recipe: str = _field(
        "paper", "AdamW settings by name: paper (betas 0.9/0.98, epsilon 1e-6 for ViTs and 1e-8 "
        "for ResNets, embeddings not decayed) | open_clip (open_clip_train's defaults: betas "
        "0.9/0.999, epsilon 1e-8, every matrix decayed, embeddings included). --beta_1, "
        "--beta_2, --epsilon and --weight_decay_rule override single settings.")
    beta_1: float | None = _field(None, "Adam's beta_1 (unset: the recipe's, 0.9).")
    beta_2: float | None = _field(None, "Adam's beta_2 (unset: the recipe's, 0.98 paper / 0.999 "
                                        "open_clip).")
    epsilon: float | None = _field(None, "Adam's epsilon (unset: the recipe's; paper: 1e-6 ViT, "
                                         "1e-8 ResNet; open_clip: 1e-8).")
    weight_decay_rule: str = _field(
        "auto", "Tensors weight-decayed: auto (the recipe's) | except_embeddings (matrices but not "
        "the token/positional embeddings; the paper recipe) | all_matrices (every tensor of 2+ "
        "dimensions, open_clip's rule). Gains, biases and the temperature never are.")
    clipnorm: float | None = _field(None, "Gradient clipping norm (unset: off).")
    precision: str = _field("float32", "float32 | mixed_bfloat16 | mixed_float16 (loss scaling).")
    jit_compile: str = _field("auto", "auto | true | false (XLA for the towers; auto: on where "
                                      "a GPU is present, XLA on CPU was measured slower).")
    strategy: str = _field("one_device", "one_device | mirrored | multiworker (TF_CONFIG).")
    model_dir: str = _field("runs/demo", "Output folder (checkpoints, logs, preset, "
                                         "summary.json); may be a bucket.")
    seed: int = _field(0, "Random seed (weights init, shuffling, augmentation).")
    checkpoint_every: int = _field(100, "Steps between checkpoints.")
    log_every: int = _field(10, "Steps between TensorBoard points.")
    demo_examples: int = _field(8000, "Size of the generated demo training set.")
    shuffle_buffer: int = _field(2000, "Shuffle buffer (records) of TFRecord and TFDS data; "
                                       "CSV/TSV tables are shuffled whole (as indices).")
    max_train_seconds: float = _field(
        0.0, "Stop (with a checkpoint) after this many seconds on the chief's clock (every "
        "worker stops at the same step); 0: never.")
    loss: str = _field("softmax", "softmax (CLIP) | sigmoid (SigLIP: learned temperature and "
                                  "bias, init 10 and -10; recorded in the saved preset).")
    lock_image: bool = _field(False, "Freeze the image tower (LiT): no gradients, no optimizer "
                                     "state, frozen BN.")
    lock_text: bool = _field(False, "Freeze the text tower.")
    unlocked_image_blocks: int = _field(0, "With --lock_image: leave the last N image blocks "
                                           "and the head trainable.")
    unlocked_text_blocks: int = _field(0, "With --lock_text: leave the last N text blocks and "
                                          "the head trainable.")
    gradient_cache_chunks: int = _field(
        1, "Gradient caching: compute each replica's batch in K chunks (activation memory of "
        "one chunk, same update as K=1, ~2 forward passes).")
    patch_dropout: float = _field(0.0, "FLIP: fraction of image patch tokens dropped in "
                                       "training (ViT; 0: off; recorded in the saved preset).")
    text_architecture: str = _field(
        "transformer", "transformer (CLIP's text tower) | bag_of_words (mean token embedding, "
        "then a projection: the paper's Figure 2 baseline; recorded in the saved preset).")
    remat: bool = _field(False, "Recompute each transformer block in the backward pass (less "
                                "memory, same gradients).")

    def validate(self):
        """Checks every field; returns `self`.

        Raises:
            ValueError: naming the first invalid field, Keras-style
                ("`arg` must be ...; Received: arg=...").
        """
        def fail(name, requirement):
            raise ValueError(f"`{name}` must be {requirement}. "
                             f"Received: {name}={getattr(self, name)!r}")

        def is_int(value):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def is_number(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        for name in ("preset", "train_data", "model_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, "a non-empty string")
        for name in ("val_data", "image_root"):
            if not isinstance(getattr(self, name), str):
                fail(name, "a string")
        for name, minimum in (("global_batch_size", 1), ("steps", 0), ("warmup_steps", 0),
                              ("seed", 0), ("checkpoint_every", 1), ("log_every", 1),
                              ("demo_examples", 1), ("shuffle_buffer", 1),
                              ("unlocked_image_blocks", 0),
                              ("unlocked_text_blocks", 0), ("gradient_cache_chunks", 1)):
            if not is_int(getattr(self, name)) or getattr(self, name) < minimum:
                fail(name, f"an integer >= {minimum}")
        if not is_int(self.epochs) or self.epochs < (0 if self.steps else 1):
            fail("epochs", "an integer >= 1 (when `steps` is 0)")
        if not is_number(self.learning_rate) or not self.learning_rate > 0:
            fail("learning_rate", "a positive number")
        for name in ("weight_decay", "max_train_seconds"):
            if not is_number(getattr(self, name)) or not getattr(self, name) >= 0:
                fail(name, "a number >= 0")
        if self.clipnorm is not None and (not is_number(self.clipnorm) or not self.clipnorm > 0):
            fail("clipnorm", "None or a positive number")
        if not is_number(self.patch_dropout) or not 0.0 <= self.patch_dropout < 1.0:
            fail("patch_dropout", "in [0, 1)")
        for name in ("beta_1", "beta_2"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not 0.0 <= value < 1.0):
                fail(name, "None or a number in [0, 1)")
        if self.epsilon is not None and (not is_number(self.epsilon) or not self.epsilon > 0):
            fail("epsilon", "None or a positive number")
        for name in ("lock_image", "lock_text", "remat"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")
        if self.group_captions is not None and not isinstance(self.group_captions, bool):
            fail("group_captions", "None or a bool")
        for name, choices in (("precision", PRECISIONS), ("strategy", STRATEGIES),
                              ("loss", LOSSES), ("optimizer_recipe", OPTIMIZER_RECIPES),
                              ("text_architecture", TEXT_ARCHITECTURES),
                              ("weight_decay_rule", WEIGHT_DECAY_RULES)):
            if getattr(self, name) not in choices:
                fail(name, "one of " + ", ".join(choices))
        if str(self.jit_compile).lower() not in JIT_SETTINGS:
            fail("jit_compile", "one of " + ", ".join(JIT_SETTINGS))
        if self.global_batch_size % self.gradient_cache_chunks:
            raise ValueError(
                "`gradient_cache_chunks` must divide `global_batch_size`. "
                f"Received: gradient_cache_chunks={self.gradient_cache_chunks}, "
                f"global_batch_size={self.global_batch_size}"
            )
        if self.group_captions is False and not self.train_data.endswith(TABLE_SUFFIXES):
            raise ValueError(
                "`group_captions=False` reads a CSV/TSV table one row per record; other "
                "training data is read as written (convert a table with "
                "`shards.convert_csv(..., group_by_image=False)` for one TFRecord per pair). "
                f"Received: train_data={self.train_data!r}"
            )
        for name, lock in (("unlocked_image_blocks", self.lock_image),
                           ("unlocked_text_blocks", self.lock_text)):
            if getattr(self, name) and not lock:
                fail(name, f"0 unless its tower is locked (`lock_{name.split('_')[1]}`)")
        return self

    def reads_table_by_row(self):
        """Whether training reads a CSV/TSV table one record per row (image-caption
        pair): `group_captions` unset or false on a table."""
        return self.train_data.endswith(TABLE_SUFFIXES) and not self.group_captions
