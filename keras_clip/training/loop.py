"""The trainer: `run()` trains a CLIP from a `TrainConfig`, under any strategy.

A run is five stages, each a function a test can call on its own, and `run()`
calls them in this order:

1. `set_up(config, strategy)` -> `RunContext`: validated config, cluster role,
   seed, output folder, parsed data specs (the demo data written).
2. `plan_data(context)` -> `DataPlan`: records behind the training data (counted
   once, split across workers), steps per epoch, total steps.
3. `build_and_restore(context, plan)` -> `TrainState`: model, optimizer and
   checkpoint in the strategy's scope, restored from the newest checkpoint.
4. `train_loop(context, plan, state)` -> `LoopResult`: the steps, logging,
   checkpoint policy and the chief's stop vote.
5. `finalize(context, plan, state, result)` -> summary dict: preset, evaluations,
   `summary.json`.

The step itself is `CLIP.train_step`; the loop only feeds it. It runs
`strategy.run(model.train_step, ...)` inside a `tf.function` over
`strategy.distribute_datasets_from_function` rather than `model.fit`, because
Keras 3's `fit` crashes under `MultiWorkerMirroredStrategy` (in
`_maybe_symbolic_build`); one loop then serves every strategy.

There is one step counter: the optimizer's `iterations` (checkpointed with the
optimizer; `TrainState.global_step` reads it). It drives the learning-rate
schedule, the step count, logging and checkpoint names. With float16 loss
scaling a step whose gradients overflow applies no update and is not counted;
its batch is consumed all the same (the data positions record it).
"""
import dataclasses
import json
import os
import re
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_clip.data.spec import TFRECORD, DataSpec, count_file_records
from keras_clip.models.clip import CLIP
from keras_clip.training.checkpointing import CheckpointKeeper
from keras_clip.training.checkpointing import CheckpointMismatchError  # noqa: F401 (re-export)
from keras_clip.training.config import TrainConfig
from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer

# ----------------------------------------------------------------------------------
# Files and cluster role
# ----------------------------------------------------------------------------------


def _join(base, *parts):
    """`os.path.join` that also keeps `gs://`, `s3://` and `ram://` paths intact."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


def _write_text(path, text):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


def _role(strategy):
    """`(is_chief, worker_id)` from the strategy's cluster resolver (chief if none)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
    worker_id = task_id + (1 if has_chief and task_type == "worker" else 0)
    return is_chief, worker_id


def _num_workers(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 1
    spec = resolver.cluster_spec().as_dict()
    return len(spec.get("chief", [])) + len(spec.get("worker", []))


def _jit_enabled(setting):
    setting = str(setting).lower()
    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return setting == "true"


# ----------------------------------------------------------------------------------
# 1. Set-up
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RunContext:
    """What every stage reads: the config, where this process stands, the data.

    Attributes:
        config: the validated `TrainConfig`.
        strategy: the `tf.distribute.Strategy`.
        is_chief: bool, this process writes the outputs.
        worker_id: int.
        train_spec: `DataSpec` of the training data (demo: the generated files).
        val_spec: `DataSpec` of the validation data, or None.
    """

    config: TrainConfig
    strategy: object
    is_chief: bool
    worker_id: int
    train_spec: DataSpec
    val_spec: DataSpec | None


_DEMO_COMPLETE = "_COMPLETE"


def _prepare_demo_data(model_dir, config):
    """Generates the demo TFRecords once per model_dir (safe for concurrent workers).

    Written beside the target and renamed into place where the filesystem can
    rename folders (local disks); elsewhere (`gs://`, `ram://`) the files are
    copied in. `_COMPLETE` marks a finished folder.
    """
    from keras_clip import demo_data

    target = _join(model_dir, "demo_data")
    if tf.io.gfile.exists(_join(target, _DEMO_COMPLETE)):
        return target
    scratch = f"{target}.tmp-{os.getpid()}"
    demo_data.write_demo_dataset(scratch, num_train=config.demo_examples,
                                 num_val=max(config.demo_examples // 10, 200), seed=config.seed)
    try:
        tf.io.gfile.rename(scratch, target)
    except (tf.errors.OpError, OSError):  # exists (another worker, an older run) or no folder rename
        tf.io.gfile.makedirs(target)
        for name in tf.io.gfile.listdir(scratch):
            tf.io.gfile.copy(_join(scratch, name), _join(target, name), overwrite=True)
        tf.io.gfile.rmtree(scratch)
    _write_text(_join(target, _DEMO_COMPLETE), "")
    return target


def _resolve_spec(text, split, config):
    """The parsed spec of a data string; `demo` becomes the generated files of `split`.
    `config.group_captions` applies to the training data (validation always groups)."""
    group_by_image = not (split == "train" and config.reads_table_by_row())
    spec = DataSpec.parse(text, image_root=config.image_root, group_by_image=group_by_image)
    if spec.kind == "demo":
        spec = spec.demo_split(_prepare_demo_data(config.model_dir, config), split)
    return spec


def set_up(config=None, strategy=None):
    """Stage 1: validates the config, seeds, makes `model_dir`, parses the data specs.

    Args:
        config: `TrainConfig` (default: the demo run).
        strategy: a `tf.distribute.Strategy` (default: the current one).

    Returns:
        `RunContext`.
    """
    config = (config or TrainConfig()).validate()
    strategy = strategy or tf.distribute.get_strategy()
    is_chief, worker_id = _role(strategy)
    keras.utils.set_random_seed(config.seed)
    tf.io.gfile.makedirs(config.model_dir)
    logging.info("Training config: %s", dataclasses.asdict(config))
    train_spec = _resolve_spec(config.train_data, "train", config)
    val_spec = _resolve_spec(config.val_data, "val", config) if config.val_data else None
    return RunContext(config, strategy, is_chief, worker_id, train_spec, val_spec)


# ----------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class DataPlan:
    """How much training the data holds.

    Attributes:
        num_examples: records behind the training data (`DataSpec.count_records`).
        problems: what could not be read while counting (see `RecordCount`).
        steps_per_epoch: int >= 1.
        total_steps: int, `config.steps` or `steps_per_epoch * config.epochs`.
    """

    num_examples: int
    problems: dict
    steps_per_epoch: int
    total_steps: int


def count_training_records(spec, strategy):
    """`RecordCount` of `spec`; TFRecord files are counted once across a multi-worker
    cluster (replica `r` of `R` reads the files `r::R`, the per-file counts are
    summed across workers), so every worker gets the same figures without each
    reading every file."""
    if spec.kind != TFRECORD or _num_workers(strategy) == 1:
        return spec.count_records()
    from keras_clip.data.spec import RecordCount, _damage

    files = spec.files()
    num_replicas = strategy.num_replicas_in_sync

    def local_counts(value_context):
        readable, damaged = count_file_records(
            files, value_context.replica_id_in_sync_group, num_replicas)
        counts = np.zeros([2, len(files)], np.float64)  # (readable, damaged) per file
        for index, path in enumerate(files):
            if path in readable:
                counts[:, index] = readable[path], float(damaged[path])
        return tf.constant(counts)

    per_replica = strategy.experimental_distribute_values_from_function(local_counts)
    totals = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
    readable = {path: int(totals[0, i]) for i, path in enumerate(files)}
    damaged = {path: bool(totals[1, i]) for i, path in enumerate(files)}
    return RecordCount(sum(readable.values()), _damage(readable, damaged))


def plan_data(context):
    """Stage 2: counts the training records and derives the step counts.

    Raises:
        ValueError: the training data holds no record.
    """
    config = context.config
    count = count_training_records(context.train_spec, context.strategy)
    if count.records == 0:
        raise ValueError(f"`train_data` holds no records. Received: train_data={context.train_spec.text!r} "
                         f"(problems: {count.problems or 'none'})")
    steps_per_epoch = max(count.records // config.global_batch_size, 1)
    total_steps = config.steps or steps_per_epoch * config.epochs
    logging.info("%d training examples, %d steps per epoch, %d steps in all",
                 count.records, steps_per_epoch, total_steps)
    return DataPlan(count.records, count.problems, steps_per_epoch, total_steps)


# ----------------------------------------------------------------------------------
# 3. Model and restore
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """The model and everything a checkpoint holds.

    Attributes:
        model: the compiled `CLIP`.
        optimizer: its optimizer.
        global_step: the optimizer's `iterations` (a property): steps done.
        data_positions: int64 variable `(num_replicas,)`, records each replica's
            pipeline consumed (checkpointed).
        keeper: the `CheckpointKeeper`.
        start_step: int, `global_step` after the restore.
        resume_positions: list of int, `data_positions` after the restore.
    """

    model: CLIP
    optimizer: object
    data_positions: tf.Variable
    keeper: CheckpointKeeper
    start_step: int
    resume_positions: list

    @property
    def global_step(self):
        """Steps done: the optimizer's `iterations` variable (the one step counter)."""
        return self.optimizer.iterations


def build_model_and_optimizer(config, total_steps):
    """The CLIP and its AdamW, created in the current strategy scope."""
    overrides = {"loss": "sigmoid"} if config.loss == "sigmoid" else {}
    if config.patch_dropout:
        overrides["vision_patch_dropout"] = config.patch_dropout
    if config.text_architecture != "transformer":
        overrides["text_architecture"] = config.text_architecture
    model = CLIP.from_preset(config.preset, dtype=config.precision, **overrides)
    if config.lock_image or config.lock_text:  # before the optimizer sees the variables
        model.lock_towers(config.lock_image, config.lock_text,
                          config.unlocked_image_blocks, config.unlocked_text_blocks)
    schedule = WarmupCosineDecay(config.learning_rate, config.warmup_steps, total_steps)
    optimizer = create_optimizer(
        model, schedule, weight_decay=config.weight_decay, clipnorm=config.clipnorm,
        recipe=config.optimizer_recipe, beta_1=config.beta_1, beta_2=config.beta_2,
        epsilon=config.epsilon,
        weight_decay_rule=None if config.weight_decay_rule == "auto" else config.weight_decay_rule)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=_jit_enabled(config.jit_compile),
                  gradient_cache_chunks=config.gradient_cache_chunks, remat=config.remat)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def run_fingerprint(config, model, num_replicas):
    """What a checkpoint must match for this run to resume from it exactly.

    Architecture (the model's config without its name and dtype), precision,
    global batch size, number of replicas, training data, its image root, its
    caption grouping, seed and shuffle buffer. Learning rate, schedule, step count and
    checkpoint/log frequencies may change across a resume.
    """
    fingerprint = {f"model.{name}": value for name, value in model.get_config().items()
                   if name not in ("name", "dtype", "trainable")}
    fingerprint.update(
        precision=config.precision, global_batch_size=config.global_batch_size,
        num_replicas=num_replicas, train_data=config.train_data, image_root=config.image_root,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer,
    )
    if config.train_data == "demo":
        fingerprint["demo_examples"] = config.demo_examples
    if config.reads_table_by_row():  # only then, so that grouped checkpoints still match
        fingerprint["group_captions"] = False
    return fingerprint


def build_and_restore(context, plan):
    """Stage 3: model, optimizer and checkpoint in the strategy's scope, restored from
    the newest readable checkpoint of `model_dir` (the chief then writes
    `train_config.json`).

    Raises:
        CheckpointMismatchError: the checkpoint's fingerprint differs, before
            anything is written.
    """
    config, strategy = context.config, context.strategy
    num_replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model, optimizer = build_model_and_optimizer(config, plan.total_steps)
        # Per replica: records of its pipeline consumed so far, drops included.
        data_positions = tf.Variable(tf.zeros([num_replicas], tf.int64), trainable=False,
                                     name="data_positions")
    counts = model.count_params_by_tower()
    logging.info("Parameters: visual %s, text %s, total %s", f"{counts['visual']:,}",
                 f"{counts['text']:,}", f"{counts['total']:,}")

    # Checkpoints written before the step counter was the optimizer's also hold a
    # `global_step`; restoring ignores it (it always equalled `iterations`).
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, data_positions=data_positions)
    keeper = CheckpointKeeper(checkpoint, _join(config.model_dir, "checkpoints"),
                              is_chief=context.is_chief, worker_id=context.worker_id,
                              fingerprint=run_fingerprint(config, model, num_replicas))
    restored = keeper.restore_latest()  # raises on a mismatch, before anything is written
    start_step = int(optimizer.iterations.numpy())
    resume_positions = [int(p) for p in data_positions.numpy()]
    if restored:
        logging.info("Resuming at step %d from %s (records consumed per replica: %s)",
                     start_step, restored, resume_positions)
    if context.is_chief:
        tf.io.gfile.makedirs(config.model_dir)
        _write_text(_join(config.model_dir, "train_config.json"),
                    json.dumps(dataclasses.asdict(config), indent=2))
    return TrainState(model, optimizer, data_positions, keeper, start_step, resume_positions)


# ----------------------------------------------------------------------------------
# 4. The loop
# ----------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
    """What the loop did.

    Attributes:
        steps: int, `global_step` at the end.
        loss_history: list of float, the loss of each step of this process.
        final_logs: dict of the last step's metrics (empty if no step ran).
        first_step_seconds: float, the first step (tracing and compilation).
        train_seconds: float, the steps after the first.
        counters: the pipeline's `PipelineCounters`.
        stopped_early: bool, the chief's `max_train_seconds` passed.
    """

    steps: int
    loss_history: list
    final_logs: dict
    first_step_seconds: float
    train_seconds: float
    counters: object
    stopped_early: bool


def make_train_function(model, strategy):
    """A `tf.function` running one `CLIP.train_step` per replica on the next batch.

    Called as `train_function(iterator, stop_flag)` with `stop_flag` a scalar
    int64 tensor (this worker's vote to stop, only the chief's is non-zero).
    Trackers are reset before each step, so the returned metrics are this step's
    global-batch figures (aggregated over replicas in cross-replica context).

    Returns:
        `(metrics, control)`: dict of scalars, and int64 `(num_replicas, 2)`
        all-gathered across workers: per replica, the position in its pipeline's
        record stream after this batch (the `skip_records` that resumes exactly
        after it, drops included) and the stop flag. Every worker gets the same
        `control`, so every worker takes the same decision at the same step.
    """

    # Without AutoGraph: the step uses TensorFlow control flow explicitly, and
    # converting it (and everything it calls) took seconds of every run's start.
    @tf.function(autograph=False)
    def train_function(iterator, stop_flag):
        for tracker in model.metrics:
            tracker.reset_state()

        def replica_step(data):
            data = dict(data)
            positions = data.pop("positions")  # (b,)
            model.train_step(data)
            return tf.stack([tf.reduce_max(positions) + 1, tf.cast(stop_flag, tf.int64)])[tf.newaxis]  # (1, 2)

        control = strategy.gather(strategy.run(replica_step, args=(next(iterator),)), axis=0)  # (R, 2)
        return {tracker.name: tracker.result() for tracker in model.metrics}, control

    return train_function


def make_train_dataset_fn(context, state, counters):
    """`dataset_fn(input_context)` for `distribute_datasets_from_function`: one
    repeating dataset for the whole run (building one traces the decoding and
    tokenizing graphs: seconds per rebuild); a resumed run skips exactly the
    records its pipeline had consumed (bad ones included), before any parsing."""
    config, model = context.config, state.model

    def dataset_fn(input_context):
        replicas_per_pipeline = max(
            input_context.num_replicas_in_sync // input_context.num_input_pipelines, 1)
        first = input_context.input_pipeline_id * replicas_per_pipeline
        return context.train_spec.dataset(
            preprocessing=model.preprocessor_config,  # the preset's sizes, statistics and limit
            batch_size=config.global_batch_size, training=True, seed=config.seed,
            shuffle_buffer=config.shuffle_buffer, input_context=input_context, repeat=True,
            return_positions=True, counters=counters,
            skip_records=max(state.resume_positions[first:first + replicas_per_pipeline]),
        )

    return dataset_fn


def _empty_stream_error(error, spec, counters):
    """The `ValueError` for the pipeline's "no usable record" assertion, or None."""
    from keras_clip.data.pipeline import EMPTY_STREAM_ERROR

    message = getattr(error, "message", str(error))
    if EMPTY_STREAM_ERROR not in message:
        return None
    match = re.search(re.escape(EMPTY_STREAM_ERROR) + r"[^\]]*", message)
    detail = match.group(0) if match else message
    return ValueError(f"`train_data` yields no usable example: {detail} (train_data={spec!r}, "
                      f"counts: {counters.as_dict()})")


def train_loop(context, plan, state, step_callback=None):
    """Stage 4: runs the steps from `state.start_step` to `plan.total_steps`.

    Logs each step to a Keras progress bar (chief) and TensorBoard every
    `log_every` steps, checkpoints every `checkpoint_every` steps, at the end and
    when the chief's `max_train_seconds` passed (every worker stops at the same
    step).

    Args:
        step_callback: optional `fn(step, logs)` called after each step (tests).

    Returns:
        `LoopResult`.

    Raises:
        ValueError: a whole pass over the training data yields no usable example.
    """
    from keras_clip.data.pipeline import PipelineCounters

    config, strategy, model = context.config, context.strategy, state.model
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    counters = PipelineCounters()
    train_function = make_train_function(model, strategy)
    writer = (tf.summary.create_file_writer(_join(config.model_dir, "logs"))
              if context.is_chief else None)
    step, history, logs, train_seconds, deadline_hit = state.start_step, [], {}, 0.0, False
    first_step_seconds = 0.0  # tracing (and XLA compilation) happen in the first step
    start_time = time.monotonic()
    iterator = iter(strategy.distribute_datasets_from_function(
        make_train_dataset_fn(context, state, counters)))
    metric_names = [metric.name for metric in model.metrics]
    stop_vote = False  # the chief's decision to stop; every worker follows it
    while step < total_steps and not deadline_hit:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        epoch_steps = min(steps_per_epoch - step_in_epoch, total_steps - step)
        progbar = keras.utils.Progbar(epoch_steps, verbose=1 if context.is_chief else 0,
                                      stateful_metrics=metric_names)
        if context.is_chief:
            logging.info("Epoch %d/%d", epoch + 1, -(-total_steps // steps_per_epoch))
        for _ in range(epoch_steps):
            tic = time.time()
            try:
                metrics, control = train_function(iterator, tf.constant(int(stop_vote), tf.int64))
            except tf.errors.InvalidArgumentError as e:
                error = _empty_stream_error(e, context.train_spec.text, counters)
                if error is None:
                    raise
                raise error from None
            logs = {k: float(v) for k, v in metrics.items()}
            control = control.numpy()
            if step == state.start_step:
                first_step_seconds = time.time() - tic
            else:
                train_seconds += time.time() - tic
            step = int(state.global_step.numpy())  # +1, unless loss scaling skipped the update
            state.data_positions.assign(control[:, 0])
            history.append(logs["loss"])
            progbar.update(step - epoch * steps_per_epoch - step_in_epoch, list(logs.items()))
            if step_callback is not None:
                step_callback(step, logs)
            if writer is not None and (step % config.log_every == 0 or step == total_steps):
                with writer.as_default(step=step):
                    for name, value in logs.items():
                        tf.summary.scalar(name, value)
            deadline_hit = bool(control[:, 1].any())  # the chief's vote, seen by all at this step
            if step % config.checkpoint_every == 0 or step == total_steps or deadline_hit:
                state.keeper.save(step)
            if deadline_hit:
                logging.info("Stopped early at step %d: the chief's max_train_seconds=%s passed",
                             step, config.max_train_seconds)
                break
            # Only the chief's clock decides; its vote travels with the next step.
            if context.is_chief and config.max_train_seconds:
                stop_vote = time.monotonic() - start_time > config.max_train_seconds
    logging.info("Training ended at step %d (worker %d)", step, context.worker_id)
    return LoopResult(step, history, logs if step > state.start_step else {},
                      first_step_seconds, train_seconds, counters, deadline_hit)


# ----------------------------------------------------------------------------------
# 5. Finalize
# ----------------------------------------------------------------------------------


def evaluate_retrieval(model, spec, image_root="", max_images=1000):
    """Recall@1/5/10 both ways on image-caption data (every caption of each image).

    Args:
        spec: a `DataSpec`, or a data string read with `image_root`.
    """
    from keras_clip.evaluation import retrieval

    spec = DataSpec.parse(spec, image_root=image_root)
    problems = {}
    images, captions = spec.image_caption_pairs(max_images=max_images, problems=problems)
    if not images:
        raise ValueError(f"No usable image-caption pair in the validation data {spec.text!r} ({problems}).")
    texts = [c for caps in captions for c in caps]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps])
    result = retrieval.evaluate_retrieval(model, images, texts, owner)
    result["num_images"], result["num_captions"] = len(images), len(texts)
    result.update(problems)
    return result


def evaluate_demo_zero_shot(model, model_dir):
    """Zero-shot top-1 on the demo's held-out classes (never seen paired in training)."""
    from keras_clip import demo_data
    from keras_clip.zero_shot import ZeroShotClassifier

    images, labels, class_names, templates = demo_data.read_demo_zero_shot_split(
        _join(model_dir, "demo_data")
    )
    classifier = ZeroShotClassifier(model, class_names, templates=templates)
    predictions = np.concatenate([
        np.argmax(np.asarray(classifier(tf.constant(images[i:i + 256]))), axis=-1)
        for i in range(0, len(images), 256)
    ])
    accuracy = float(np.mean(predictions == np.asarray(labels)))
    return {"top1": accuracy, "chance": 1.0 / len(class_names), "num_images": len(images),
            "num_classes": len(class_names)}


def _save_preset(model, preset_dir):
    """`save_to_preset` to any `tf.io.gfile` path (written locally, then copied)."""
    if "://" not in preset_dir:
        model.save_to_preset(preset_dir)
        return
    with tempfile.TemporaryDirectory() as local:
        model.save_to_preset(local)
        for folder, _, names in os.walk(local):
            relative = os.path.relpath(folder, local)
            target = preset_dir if relative == "." else _join(preset_dir, *relative.split(os.sep))
            tf.io.gfile.makedirs(target)
            for name in names:
                tf.io.gfile.copy(os.path.join(folder, name), _join(target, name), overwrite=True)


def _record_evaluation(summary, name, evaluate):
    """`summary[name] = evaluate()`; a failure is logged and kept in `summary["evaluation_errors"]`.

    Runs after the preset is saved: a broken validation set must not lose the run.
    """
    try:
        summary[name] = evaluate()
    except Exception as e:  # noqa: BLE001 - whatever fails, the trained model is already saved
        logging.exception("Evaluation %s failed; the preset is saved, the run goes on", name)
        summary.setdefault("evaluation_errors", {})[name] = f"{type(e).__name__}: {e}"




def per_replica_logits_shape(config, strategy, result, state):
    """`[local rows, global columns]` of the logit matrix each replica's step scores
    (its share of the global batch against every replica's embeddings; gradient
    caching scores the whole local batch at once), or None when this process ran no
    step."""
    if result.steps == state.start_step:
        return None
    return [config.global_batch_size // strategy.num_replicas_in_sync, config.global_batch_size]


def finalize(context, plan, state, result):
    """Stage 5: the summary; on the chief also the preset, the evaluations and
    `summary.json` (an evaluation that fails is recorded, not raised).

    Returns:
        the summary dict.
    """
    config, strategy, model = context.config, context.strategy, state.model
    step, start_step = result.steps, state.start_step
    summary = {
        "steps": step,
        "resumed_from_step": start_step,
        "global_batch_size": config.global_batch_size,
        "num_replicas": strategy.num_replicas_in_sync,
        "first_step_seconds": round(result.first_step_seconds, 2),
        "train_seconds": round(result.train_seconds, 2),  # steps after the first
        "samples_per_second": round(
            max(step - start_step - 1, 0) * config.global_batch_size
            / max(result.train_seconds, 1e-9), 2),
        "skipped_records": result.counters.as_dict(),
        "data_problems": plan.problems,
        "records_consumed": [int(p) for p in state.data_positions.numpy()],
        "final_metrics": dict(result.final_logs),
        "loss_history": result.loss_history,
        "per_replica_logits_shape": per_replica_logits_shape(config, strategy, result, state),
        "stopped_early": result.stopped_early,
    }
    if context.is_chief:
        _save_preset(model, _join(config.model_dir, "preset"))
        if context.val_spec is not None:
            _record_evaluation(summary, "val_retrieval",
                               lambda: evaluate_retrieval(model, context.val_spec))
        if config.train_data == "demo":
            _record_evaluation(summary, "demo_zero_shot",
                               lambda: evaluate_demo_zero_shot(model, config.model_dir))
        _write_text(_join(config.model_dir, "summary.json"), json.dumps(summary, indent=2))
        logging.info("Summary: %s", {k: v for k, v in summary.items() if k != "loss_history"})
    return summary


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------


def run(config=None, strategy=None, step_callback=None):
    """Trains a CLIP as configured; returns the summary dict (also written as JSON).

    Calls the five stages in order: `set_up`, `plan_data`, `build_and_restore`,
    `train_loop`, `finalize`.

    All files go through `tf.io.gfile`, so `model_dir` may be a bucket. A rerun in
    the same `model_dir` resumes from the newest readable checkpoint, exactly
    (data position included), if the checkpoint's fingerprint (`run_fingerprint`)
    matches; otherwise it raises `CheckpointMismatchError` naming the differing
    fields, before anything is written.

    Args:
        config: `TrainConfig` (defaults: the demo run).
        strategy: a `tf.distribute.Strategy`; default: the default (one device).
        step_callback: optional `fn(step, logs)` called after each step (tests).

    Returns:
        dict with steps, samples per second, skipped records, final metrics,
        validation retrieval recall and (demo data) zero-shot accuracy.

    Raises:
        CheckpointMismatchError: see above.
        ValueError: the config is invalid, the training data holds no record, or
            a whole pass over it yields no usable example.
    """
    context = set_up(config, strategy)
    plan = plan_data(context)
    state = build_and_restore(context, plan)
    result = train_loop(context, plan, state, step_callback)
    return finalize(context, plan, state, result)
