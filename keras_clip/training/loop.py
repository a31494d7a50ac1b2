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
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_clip.models.clip import CLIP
from keras_clip.training.checkpointing import CheckpointKeeper
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


def _prepare_demo_data(model_dir, config):
    """Generates the demo TFRecords once per model_dir (atomic rename; safe for workers)."""
    from keras_clip import demo_data

    target = os.path.join(model_dir, "demo_data")
    if not os.path.isdir(target):
        scratch = f"{target}.tmp-{os.getpid()}"
        demo_data.write_demo_dataset(scratch, num_train=config.demo_examples,
                                     num_val=max(config.demo_examples // 10, 200), seed=config.seed)
        try:
            os.rename(scratch, target)
        except OSError:  # another worker finished first
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _resolve_data(spec, split, model_dir, config):
    """Maps `demo` to the generated shards of `split`; other specs pass through."""
    if spec != "demo":
        return spec
    folder = _prepare_demo_data(model_dir, config)
    return os.path.join(folder, f"{split}-*.tfrecord")


def count_records(spec, image_root=""):
    """Number of training examples (images) behind a data spec."""
    if spec.startswith("tfds:"):
        import tensorflow_datasets as tfds

        name, _, split = spec[len("tfds:"):].partition("/")
        return tfds.builder(name).info.splits[split or "train"].num_examples
    if spec.endswith((".csv", ".tsv")):
        import csv

        delimiter = "\t" if spec.endswith(".tsv") else ","
        with open(spec, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
        key = "image" if rows and "image" in rows[0] else list(rows[0])[0]
        return len({row[key] for row in rows})
    files = tf.io.gfile.glob(spec)
    if not files:
        raise FileNotFoundError(f"No files match the data pattern {spec!r}")
    return int(sum(1 for _ in tf.data.TFRecordDataset(files)))


def make_dataset(spec, *, image_size, context_length, batch_size, training, seed=0,
                 image_root="", shuffle_buffer=2000, input_context=None, skip_records=0,
                 counters=None, repeat=False):
    """A batched dataset of `{"images", "token_ids"}` from any supported data spec."""
    from keras_clip.data import pipeline

    common = dict(
        image_size=image_size, context_length=context_length, batch_size=batch_size,
        training=training, seed=seed, shuffle_buffer=shuffle_buffer,
        input_context=input_context, skip_records=skip_records, counters=counters,
        repeat=repeat,
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

    images, captions = pipeline.load_image_caption_pairs(spec, image_root=image_root,
                                                         max_images=max_images)
    texts = [c for caps in captions for c in caps]
    owner = np.array([i for i, caps in enumerate(captions) for _ in caps])
    result = retrieval.evaluate_retrieval(model, images, texts, owner)
    result["num_images"], result["num_captions"] = len(images), len(texts)
    return result


def evaluate_demo_zero_shot(model, model_dir):
    """Zero-shot top-1 on the demo's held-out classes (never seen paired in training)."""
    from keras_clip import demo_data
    from keras_clip.zero_shot import ZeroShotClassifier

    images, labels, class_names, templates = demo_data.read_demo_zero_shot_split(
        os.path.join(model_dir, "demo_data")
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

    Trackers are reset before each step, so the returned values are this step's
    global-batch figures (aggregated over replicas in cross-replica context).
    """

    @tf.function
    def train_function(iterator):
        for tracker in model.metrics:
            tracker.reset_state()
        strategy.run(model.train_step, args=(next(iterator),))
        return {tracker.name: tracker.result() for tracker in model.metrics}

    return train_function


def run(config=None, strategy=None, step_callback=None):
    """Trains a CLIP as configured; returns the summary dict (also written as JSON).

    Args:
        config: `TrainConfig` (defaults: the demo run).
        strategy: a `tf.distribute.Strategy`; default: the default (one device).
        step_callback: optional `fn(step, logs)` called after each step (tests).

    Returns:
        dict with steps, samples per second, skipped records, final metrics,
        validation retrieval recall and (demo data) zero-shot accuracy.
    """
    config = (config or TrainConfig()).validate()
    strategy = strategy or tf.distribute.get_strategy()
    is_chief, worker_id = _role(strategy)
    keras.utils.set_random_seed(config.seed)
    os.makedirs(config.model_dir, exist_ok=True)
    if is_chief:
        with open(os.path.join(config.model_dir, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=2)
    logging.info("Training config: %s", dataclasses.asdict(config))

    train_spec = _resolve_data(config.train_data, "train", config.model_dir, config)
    val_spec = _resolve_data(config.val_data, "val", config.model_dir, config) if config.val_data else ""
    num_examples = count_records(train_spec, config.image_root)
    steps_per_epoch = max(num_examples // config.global_batch_size, 1)
    total_steps = config.steps or steps_per_epoch * config.epochs
    logging.info("%d training examples, %d steps per epoch, %d steps in all",
                 num_examples, steps_per_epoch, total_steps)

    with strategy.scope():
        model, optimizer = build_model_and_optimizer(config, total_steps)
        global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    logits_shapes = []  # what each replica's step scores: (local rows, global columns)
    model.logits_hook = lambda logits: logits_shapes.append(logits.shape.as_list())
    counts = model.count_params_by_tower()
    logging.info("Parameters: visual %s, text %s, total %s", f"{counts['visual']:,}",
                 f"{counts['text']:,}", f"{counts['total']:,}")

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, global_step=global_step)
    keeper = CheckpointKeeper(checkpoint, os.path.join(config.model_dir, "checkpoints"),
                              is_chief=is_chief, worker_id=worker_id)
    restored = keeper.restore_latest()
    start_step = int(global_step.numpy())
    if restored:
        logging.info("Resuming at step %d from %s", start_step, restored)

    from keras_clip.data.pipeline import PipelineCounters

    counters = PipelineCounters()
    train_function = make_train_function(model, strategy)
    writer = tf.summary.create_file_writer(os.path.join(config.model_dir, "logs")) if is_chief else None
    step, history, train_seconds, deadline_hit = start_step, [], 0.0, False
    first_step_seconds = 0.0  # tracing (and XLA compilation) happen in the first step
    start_time = time.time()
    # One repeating dataset for the whole run (building one traces the decoding and
    # tokenizing graphs: seconds per rebuild); a resumed run skips the records the
    # finished steps consumed, before any parsing.
    def dataset_fn(input_context):
        per_replica = input_context.get_per_replica_batch_size(config.global_batch_size)
        replicas_per_pipeline = max(
            input_context.num_replicas_in_sync // input_context.num_input_pipelines, 1)
        return make_dataset(
            train_spec, image_size=model.image_size, context_length=model.context_length,
            batch_size=config.global_batch_size, training=True, seed=config.seed,
            image_root=config.image_root, shuffle_buffer=config.shuffle_buffer,
            input_context=input_context, repeat=True,
            skip_records=start_step * per_replica * replicas_per_pipeline, counters=counters,
        )

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    while step < total_steps and not deadline_hit:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        epoch_steps = min(steps_per_epoch - step_in_epoch, total_steps - step)
        progbar = keras.utils.Progbar(epoch_steps, verbose=1 if is_chief else 0,
                                      stateful_metrics=list(model._trackers))
        if is_chief:
            print(f"Epoch {epoch + 1}/{-(-total_steps // steps_per_epoch)}")
        for _ in range(epoch_steps):
            tic = time.time()
            logs = {k: float(v) for k, v in train_function(iterator).items()}
            if step == start_step:
                first_step_seconds = time.time() - tic
            else:
                train_seconds += time.time() - tic
            step += 1
            global_step.assign(step)
            history.append(logs["loss"])
            progbar.update(step - epoch * steps_per_epoch - step_in_epoch, list(logs.items()))
            if step_callback is not None:
                step_callback(step, logs)
            if writer is not None and (step % config.log_every == 0 or step == total_steps):
                with writer.as_default(step=step):
                    for name, value in logs.items():
                        tf.summary.scalar(name, value)
            if step % config.checkpoint_every == 0 or step == total_steps:
                keeper.save(step)
            if config.max_train_seconds and time.time() - start_time > config.max_train_seconds:
                keeper.save(step)
                deadline_hit = True
                break

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
        model.save_to_preset(os.path.join(config.model_dir, "preset"))
        if val_spec:
            summary["val_retrieval"] = evaluate_retrieval(model, val_spec, config.image_root)
        if config.train_data == "demo":
            summary["demo_zero_shot"] = evaluate_demo_zero_shot(model, config.model_dir)
        with open(os.path.join(config.model_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        logging.info("Summary: %s", {k: v for k, v in summary.items() if k != "loss_history"})
    return summary
