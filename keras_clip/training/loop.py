"""`run()`: contrastive training of a CLIP from a `TrainConfig`, under any strategy.

The step itself is `CLIP.train_step`; this module only feeds it. It runs
`strategy.run(model.train_step, ...)` inside a `tf.function` over
`strategy.distribute_datasets_from_function` rather than `model.fit`, because
Keras 3's `fit` crashes under `MultiWorkerMirroredStrategy` (in
`_maybe_symbolic_build`); one loop then serves every strategy.
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

from keras_clip.models.clip import CLIP
from keras_clip.training.checkpointing import CheckpointKeeper
from keras_clip.training.checkpointing import CheckpointMismatchError  # noqa: F401 (re-export)
from keras_clip.training.config import TrainConfig
from keras_clip.training.optimizer import WarmupCosineDecay, create_optimizer

# ----------------------------------------------------------------------------------
# Cluster role
# ----------------------------------------------------------------------------------


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


def _jit_enabled(setting):
    setting = str(setting).lower()
    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return setting == "true"


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------


def _join(base, *parts):
    """`os.path.join` that also keeps `gs://`, `s3://` and `ram://` paths intact."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


def _write_text(path, text):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(text)


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


def _resolve_data(spec, split, model_dir, config):
    """Maps `demo` to the generated shards of `split`; other specs pass through."""
    if spec != "demo":
        return spec
    folder = _prepare_demo_data(model_dir, config)
    return _join(folder, f"{split}-*.tfrecord")


def inspect_records(spec, image_root=""):
    """`(count, problems)`: training examples (images) behind a data spec, and what
    could not be read while counting (truncated TFRecord files, CSV rows with
    invalid UTF-8) as a dict (empty when all is well)."""
    problems = {}
    if spec.startswith("tfds:"):
        import tensorflow_datasets as tfds

        name, _, split = spec[len("tfds:"):].partition("/")
        return tfds.builder(name).info.splits[split or "train"].num_examples, problems
    if spec.endswith((".csv", ".tsv")):
        from keras_clip.data import shards

        records, counts = shards.read_caption_table(spec)
        for name in ("empty_captions", "invalid_utf8_rows"):
            if counts.get(name):
                problems[name] = counts[name]
        return len(records), problems
    files = tf.io.gfile.glob(spec)
    if not files:
        raise FileNotFoundError(f"No files match the data pattern {spec!r}")
    total, truncated = 0, {}
    for path in sorted(files):
        count = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                count += 1
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
            truncated[path] = count
            logging.warning("%s is damaged after %d records (%s); the rest of it is skipped.",
                            path, count, type(e).__name__)
        total += count
    if truncated:
        problems["damaged_files"] = truncated  # path -> records readable before the damage
    return total, problems


def count_records(spec, image_root=""):
    """Number of training examples (images) behind a data spec."""
    return inspect_records(spec, image_root)[0]


def make_dataset(spec, *, image_size, context_length, batch_size, training, seed=0,
                 image_root="", shuffle_buffer=2000, input_context=None, skip_records=0,
                 counters=None, repeat=False, return_positions=False):
    """A batched dataset of `{"images", "token_ids"}` from any supported data spec."""
    from keras_clip.data import pipeline

    common = dict(
        image_size=image_size, context_length=context_length, batch_size=batch_size,
        training=training, seed=seed, shuffle_buffer=shuffle_buffer,
        input_context=input_context, skip_records=skip_records, counters=counters,
        repeat=repeat, return_positions=return_positions,
    )
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition("/")
        return pipeline.tfds_dataset(name, split=split or "train", data_dir=image_root or None, **common)
    if spec.endswith((".csv", ".tsv")):
        return pipeline.csv_dataset(spec, image_root, **common)
    return pipeline.tfrecord_dataset(spec, **common)


# ----------------------------------------------------------------------------------
# Evaluation at the end of a run
# ----------------------------------------------------------------------------------


def evaluate_retrieval(model, spec, image_root="", max_images=1000):
    """Recall@1/5/10 both ways on image-caption data (every caption of each image)."""
    from keras_clip.data import pipeline
    from keras_clip.evaluation import retrieval

    problems = {}
    images, captions = pipeline.load_image_caption_pairs(spec, image_root=image_root,
                                                         max_images=max_images, problems=problems)
    if not images:
        raise ValueError(f"No usable image-caption pair in the validation data {spec!r} ({problems}).")
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


# ----------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------


def build_model_and_optimizer(config, total_steps):
    """The CLIP and its AdamW, created in the current strategy scope."""
    overrides = {"loss": "sigmoid"} if config.loss == "sigmoid" else {}
    if config.patch_dropout:
        overrides["vision_patch_dropout"] = config.patch_dropout
    model = CLIP.from_preset(config.preset, dtype=config.precision, **overrides)
    if config.lock_image or config.lock_text:  # before the optimizer sees the variables
        model.lock_towers(config.lock_image, config.lock_text,
                          config.unlocked_image_blocks, config.unlocked_text_blocks)
    schedule = WarmupCosineDecay(config.learning_rate, config.warmup_steps, total_steps)
    optimizer = create_optimizer(model, schedule, weight_decay=config.weight_decay,
                                 clipnorm=config.clipnorm, decay_embeddings=config.decay_embeddings)
    if config.precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, jit_compile=_jit_enabled(config.jit_compile),
                  gradient_cache_chunks=config.gradient_cache_chunks, remat=config.remat)
    optimizer.build(model.trainable_variables)
    return model, optimizer


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

    @tf.function
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


def run_fingerprint(config, model, num_replicas):
    """What a checkpoint must match for this run to resume from it exactly.

    Architecture (the model's config without its name and dtype), precision,
    global batch size, number of replicas, training data, its image root,
    seed and shuffle buffer. Learning rate, schedule, step count and
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
    return fingerprint


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


def run(config=None, strategy=None, step_callback=None):
    """Trains a CLIP as configured; returns the summary dict (also written as JSON).

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
        ValueError: the training data holds no record, or a whole pass over it
            yields no usable example.
    """
    config = (config or TrainConfig()).validate()
    strategy = strategy or tf.distribute.get_strategy()
    is_chief, worker_id = _role(strategy)
    keras.utils.set_random_seed(config.seed)
    tf.io.gfile.makedirs(config.model_dir)
    logging.info("Training config: %s", dataclasses.asdict(config))

    train_spec = _resolve_data(config.train_data, "train", config.model_dir, config)
    val_spec = _resolve_data(config.val_data, "val", config.model_dir, config) if config.val_data else ""
    num_examples, data_problems = inspect_records(train_spec, config.image_root)
    if num_examples == 0:
        raise ValueError(f"`train_data` holds no records. Received: train_data={train_spec!r} "
                         f"(problems: {data_problems or 'none'})")
    steps_per_epoch = max(num_examples // config.global_batch_size, 1)
    total_steps = config.steps or steps_per_epoch * config.epochs
    logging.info("%d training examples, %d steps per epoch, %d steps in all",
                 num_examples, steps_per_epoch, total_steps)

    num_replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model, optimizer = build_model_and_optimizer(config, total_steps)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        # Per replica: records of its pipeline consumed so far, drops included.
        data_positions = tf.Variable(tf.zeros([num_replicas], tf.int64), trainable=False,
                                     name="data_positions")
    logits_shapes = []  # what each replica's step scores: (local rows, global columns)
    model.logits_hook = lambda logits: logits_shapes.append(logits.shape.as_list())
    counts = model.count_params_by_tower()
    logging.info("Parameters: visual %s, text %s, total %s", f"{counts['visual']:,}",
                 f"{counts['text']:,}", f"{counts['total']:,}")

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step,
                                     data_positions=data_positions)
    keeper = CheckpointKeeper(checkpoint, _join(config.model_dir, "checkpoints"),
                              is_chief=is_chief, worker_id=worker_id,
                              fingerprint=run_fingerprint(config, model, num_replicas))
    restored = keeper.restore_latest()  # raises on a mismatch, before anything is written
    start_step = int(global_step.numpy())
    resume_positions = [int(p) for p in data_positions.numpy()]
    if restored:
        logging.info("Resuming at step %d from %s (records consumed per replica: %s)",
                     start_step, restored, resume_positions)
    if is_chief:
        _write_text(_join(config.model_dir, "train_config.json"),
                    json.dumps(dataclasses.asdict(config), indent=2))

    from keras_clip.data.pipeline import PipelineCounters

    counters = PipelineCounters()
    train_function = make_train_function(model, strategy)
    writer = tf.summary.create_file_writer(_join(config.model_dir, "logs")) if is_chief else None
    step, history, train_seconds, deadline_hit = start_step, [], 0.0, False
    first_step_seconds = 0.0  # tracing (and XLA compilation) happen in the first step
    start_time = time.monotonic()
    # One repeating dataset for the whole run (building one traces the decoding and
    # tokenizing graphs: seconds per rebuild); a resumed run skips exactly the
    # records its pipeline had consumed (bad ones included), before any parsing.
    def dataset_fn(input_context):
        replicas_per_pipeline = max(
            input_context.num_replicas_in_sync // input_context.num_input_pipelines, 1)
        first = input_context.input_pipeline_id * replicas_per_pipeline
        return make_dataset(
            train_spec, image_size=model.image_size, context_length=model.context_length,
            batch_size=config.global_batch_size, training=True, seed=config.seed,
            image_root=config.image_root, shuffle_buffer=config.shuffle_buffer,
            input_context=input_context, repeat=True, return_positions=True,
            skip_records=max(resume_positions[first:first + replicas_per_pipeline]), counters=counters,
        )

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    stop_vote = False  # the chief's decision to stop; every worker follows it
    while step < total_steps and not deadline_hit:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        epoch_steps = min(steps_per_epoch - step_in_epoch, total_steps - step)
        progbar = keras.utils.Progbar(epoch_steps, verbose=1 if is_chief else 0,
                                      stateful_metrics=list(model._trackers))
        if is_chief:
            print(f"Epoch {epoch + 1}/{-(-total_steps // steps_per_epoch)}")
        for _ in range(epoch_steps):
            tic = time.time()
            try:
                metrics, control = train_function(iterator, tf.constant(int(stop_vote), tf.int64))
            except tf.errors.InvalidArgumentError as e:
                error = _empty_stream_error(e, train_spec, counters)
                if error is None:
                    raise
                raise error from None
            logs = {k: float(v) for k, v in metrics.items()}
            control = control.numpy()
            if step == start_step:
                first_step_seconds = time.time() - tic
            else:
                train_seconds += time.time() - tic
            step += 1
            global_step.assign(step)
            data_positions.assign(control[:, 0])
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
                keeper.save(step)
            if deadline_hit:
                logging.info("Stopped early at step %d: the chief's max_train_seconds=%s passed",
                             step, config.max_train_seconds)
                break
            # Only the chief's clock decides; its vote travels with the next step.
            if is_chief and config.max_train_seconds:
                stop_vote = time.monotonic() - start_time > config.max_train_seconds
    logging.info("Training ended at step %d (worker %d)", step, worker_id)

    summary = {
        "steps": step,
        "resumed_from_step": start_step,
        "global_batch_size": config.global_batch_size,
        "num_replicas": strategy.num_replicas_in_sync,
        "first_step_seconds": round(first_step_seconds, 2),
        "train_seconds": round(train_seconds, 2),  # steps after the first
        "samples_per_second": round(
            max(step - start_step - 1, 0) * config.global_batch_size / max(train_seconds, 1e-9), 2),
        "skipped_records": counters.as_dict(),
        "data_problems": data_problems,
        "records_consumed": [int(p) for p in data_positions.numpy()],
        "final_metrics": {k: float(v) for k, v in (logs.items() if step > start_step else [])},
        "loss_history": history,
        "per_replica_logits_shape": logits_shapes[0] if logits_shapes else None,
        "stopped_early": deadline_hit,
    }
    if config.time_collectives_steps > 0:  # every worker: the collectives must match
        from keras_clip.training.collectives import time_collectives

        summary["collectives"] = time_collectives(model, strategy, config.global_batch_size,
                                                  steps=config.time_collectives_steps)
        logging.info("Collectives alone (ms/step): %s", summary["collectives"])
    if is_chief:
        _save_preset(model, _join(config.model_dir, "preset"))
        if val_spec:
            _record_evaluation(summary, "val_retrieval",
                               lambda: evaluate_retrieval(model, val_spec, config.image_root))
        if config.train_data == "demo":
            _record_evaluation(summary, "demo_zero_shot",
                               lambda: evaluate_demo_zero_shot(model, config.model_dir))
        _write_text(_join(config.model_dir, "summary.json"), json.dumps(summary, indent=2))
        logging.info("Summary: %s", {k: v for k, v in summary.items() if k != "loss_history"})
    return summary
