"""Experiment settings for a training run (kept apart from the model's config)."""
import dataclasses


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run. Every field has a default, so tests and the
    no-flag demo run need none.

    Attributes:
        preset: model preset name or path (`CLIP.from_preset`).
        train_data: training pairs: `demo` (generated), a TFRecord file pattern
            (img2dataset schema), a CSV/TSV of image path + caption (with
            `image_root`), or `tfds:NAME[/SPLIT]`.
        val_data: validation pairs in the same forms ("" for none; `demo` for the
            generated validation split).
        image_root: folder the CSV's image paths are relative to.
        global_batch_size: pairs per step across all replicas (negatives come from
            the whole global batch).
        epochs: passes over the training data; ignored when `steps` > 0.
        steps: total optimisation steps (overrides `epochs`).
        learning_rate: peak learning rate after warm-up.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW decoupled weight decay.
        decay_embeddings: also apply weight decay to the token and positional
            embeddings (open_clip's rule); off by default.
        clipnorm: gradient clipping norm (None: off).
        precision: `float32`, `mixed_bfloat16` or `mixed_float16` (loss scaling).
        jit_compile: `auto` (on where a GPU is present; XLA on CPU was measured
            slower), `true` or `false`.
        strategy: `one_device`, `mirrored` or `multiworker` (reads TF_CONFIG).
        model_dir: outputs: checkpoints, TensorBoard logs, config, final preset,
            summary JSON.
        seed: seed of weights init, shuffling and augmentation.
        checkpoint_every: steps between checkpoints.
        log_every: steps between TensorBoard/log lines.
        demo_examples: size of the generated demo training set.
        shuffle_buffer: records in the shuffle buffer.
        max_train_seconds: stop early (after a checkpoint) when exceeded; 0 = never.
            Measured on the chief's clock only; its decision is all-gathered
            with the next step, so every worker stops at the same step.
        time_collectives_steps: after training, time the step's all-gather and
            gradient all-reduce on their own this many times each
            (`keras_clip.training.collectives`); 0 = off.
        loss: `softmax` (CLIP) or `sigmoid` (SigLIP; recorded in the saved preset).
        lock_image, lock_text: freeze that tower (LiT): no gradients, no optimizer
            state, frozen batch-norm statistics (`CLIP.lock_towers`).
        unlocked_image_blocks, unlocked_text_blocks: leave the last N blocks (and the
            head) of a locked tower trainable.
        gradient_cache_chunks: 1, or K > 1 for gradient caching: each replica's
            batch is embedded and back-propagated in K chunks with the same update
            as the plain step (activation memory of one chunk, two forward passes).
        patch_dropout: FLIP patch dropout of the ViT image tower in training (0: off;
            recorded in the saved preset; inference unchanged).
        remat: rematerialise every transformer block in the backward pass (less
            activation memory, about one more forward pass of the blocks).
    """

    preset: str = "clip_vit_tiny"
    train_data: str = "demo"
    val_data: str = "demo"
    image_root: str = ""
    global_batch_size: int = 128
    epochs: int = 3
    steps: int = 0
    learning_rate: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clipnorm: float | None = None
    precision: str = "float32"
    jit_compile: str = "auto"
    strategy: str = "one_device"
    model_dir: str = "runs/demo"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    demo_examples: int = 8000
    shuffle_buffer: int = 2000
    max_train_seconds: float = 0.0
    time_collectives_steps: int = 0
    loss: str = "softmax"
    lock_image: bool = False
    lock_text: bool = False
    unlocked_image_blocks: int = 0
    unlocked_text_blocks: int = 0
    gradient_cache_chunks: int = 1
    patch_dropout: float = 0.0
    remat: bool = False

    def validate(self):
        if self.time_collectives_steps < 0:
            raise ValueError(f"`time_collectives_steps` must be >= 0. Received: {self.time_collectives_steps}")
        if self.global_batch_size <= 0:
            raise ValueError(f"`global_batch_size` must be positive. Received: {self.global_batch_size}")
        if self.precision not in ("float32", "mixed_bfloat16", "mixed_float16"):
            raise ValueError(
                "`precision` must be float32, mixed_bfloat16 or mixed_float16. "
                f"Received: precision={self.precision!r}"
            )
        if self.strategy not in ("one_device", "mirrored", "multiworker"):
            raise ValueError(
                "`strategy` must be one_device, mirrored or multiworker. "
                f"Received: strategy={self.strategy!r}"
            )
        if str(self.jit_compile).lower() not in ("auto", "true", "false"):
            raise ValueError(f"`jit_compile` must be auto, true or false. Received: {self.jit_compile!r}")
        if self.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"`loss` must be softmax or sigmoid. Received: loss={self.loss!r}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"`patch_dropout` must be in [0, 1). Received: patch_dropout={self.patch_dropout}")
        if self.gradient_cache_chunks < 1 or self.global_batch_size % self.gradient_cache_chunks:
            raise ValueError(
                "`gradient_cache_chunks` must be >= 1 and divide `global_batch_size`. "
                f"Received: gradient_cache_chunks={self.gradient_cache_chunks}, "
                f"global_batch_size={self.global_batch_size}"
            )
        for name, lock in (("unlocked_image_blocks", self.lock_image),
                           ("unlocked_text_blocks", self.lock_text)):
            if getattr(self, name) < 0 or (getattr(self, name) and not lock):
                raise ValueError(f"`{name}` must be >= 0 and needs its tower locked. "
                                 f"Received: {name}={getattr(self, name)}")
        return self
