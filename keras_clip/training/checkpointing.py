"""Periodic checkpoints written by the chief only, with fallback on an unreadable latest one.

All file access goes through `tf.io.gfile`, so `model_dir` may be any TensorFlow
filesystem (`gs://`, `s3://` with the plugin, `ram://`, local).
"""
import json
import re

import tensorflow as tf
from absl import logging

# The `tf.train.Checkpoint` attribute holding the run's fingerprint (a JSON string).
FINGERPRINT_KEY = "fingerprint"
_FINGERPRINT_TENSOR = f"{FINGERPRINT_KEY}/.ATTRIBUTES/VARIABLE_VALUE"



class CheckpointMismatchError(ValueError):
    """A readable checkpoint in `model_dir` belongs to a run with other settings."""


def _checkpoint_number(prefix):
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


def _canonical(fingerprint):
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def fingerprint_differences(stored, current):
    """`[(field, stored value, current value)]` of the fields that differ, sorted."""
    stored, current = _canonical(stored), _canonical(current)
    missing = object()
    return [
        (name, stored.get(name, missing), current.get(name, missing))
        for name in sorted(set(stored) | set(current))
        if stored.get(name, missing) != current.get(name, missing)
    ]


def _show(value):
    return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else json.dumps(value)


class CheckpointKeeper:
    """Saves and restores `tf.train.Checkpoint`s of model, optimizer and data position.

    Every worker must call `save` (variables may need collectives to be read under
    `MultiWorkerMirroredStrategy`); only the chief's copy lands in `directory`, other
    workers write to a scratch folder that is deleted right away, so they never
    clobber the chief's files.

    With `fingerprint` (a JSON-serialisable dict of everything that must not change
    across a resume: architecture, precision, global batch size, data, seed, ...),
    the dict is saved inside every checkpoint, and `restore_latest` compares it
    before restoring anything: a checkpoint whose fingerprint differs (or that has
    none) raises `CheckpointMismatchError` naming each differing field with its
    stored and current value. Nothing is deleted then: the run stops before it
    saves.

    `restore_latest` falls back from newest to oldest only over *unreadable*
    checkpoints (killed mid-write, truncated or missing data file: some tensor
    cannot be read back); any other restore error is raised as
    `CheckpointMismatchError`. A checkpoint counts
    as complete once its `.index` file exists, which TensorFlow writes last.

    Args:
        checkpoint: the `tf.train.Checkpoint` to save/restore.
        directory: checkpoint folder (any `tf.io.gfile` path).
        is_chief: bool.
        worker_id: int, names the scratch folder of non-chief workers.
        max_to_keep: int, checkpoints kept on disk.
        fingerprint: optional dict; see above. The checkpoint must not already
            have an attribute named `fingerprint`.
    """

    def __init__(self, checkpoint, directory, is_chief=True, worker_id=0, max_to_keep=3, fingerprint=None):
        self.checkpoint = checkpoint
        self.directory = directory
        self.is_chief = is_chief
        self.worker_id = worker_id
        self.fingerprint = None if fingerprint is None else _canonical(fingerprint)
        if self.fingerprint is not None:
            with tf.init_scope(), tf.device("/cpu:0"):
                self._fingerprint_variable = tf.Variable(
                    json.dumps(self.fingerprint, sort_keys=True), trainable=False, name=FINGERPRINT_KEY)
            setattr(checkpoint, FINGERPRINT_KEY, self._fingerprint_variable)
        target = directory if is_chief else f"{directory.rstrip('/')}/.worker{worker_id}_scratch"
        self.manager = tf.train.CheckpointManager(checkpoint, target, max_to_keep=max_to_keep)

    def save(self, step):
        path = self.manager.save(checkpoint_number=step)
        if not self.is_chief:
            try:
                tf.io.gfile.rmtree(self.manager.directory)
            except tf.errors.OpError:
                pass
        else:
            logging.info("Saved checkpoint %s", path)
        return path

    def candidates(self):
        """Complete checkpoint prefixes in `directory`, newest first."""
        pattern = f"{self.directory.rstrip('/')}/ckpt-*.index"
        prefixes = [p[: -len(".index")] for p in tf.io.gfile.glob(pattern)]
        return sorted(prefixes, key=_checkpoint_number, reverse=True)

    def _check_fingerprint(self, prefix):
        """Raises `CheckpointMismatchError` if `prefix` was written by another kind of run."""
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)  # load_checkpoint mistakes ram:// prefixes for folders
        if not reader.has_tensor(_FINGERPRINT_TENSOR):
            raise CheckpointMismatchError(
                f"Checkpoint {prefix} has no run fingerprint (written by an older keras_clip or "
                "another program), so it cannot be checked that resuming from it is exact. Use a new "
                "`model_dir`, or move its checkpoints away to start afresh; nothing was deleted."
            )
        stored = reader.get_tensor(_FINGERPRINT_TENSOR)
        stored = json.loads(stored.decode("utf-8") if isinstance(stored, bytes) else stored)
        differences = fingerprint_differences(stored, self.fingerprint)
        if differences:
            lines = "\n".join(f"  {name}: checkpoint {_show(old)} != this run {_show(new)}"
                              for name, old, new in differences)
            raise CheckpointMismatchError(
                f"Checkpoint {prefix} was written by a run with other settings, so this run cannot "
                f"resume from it:\n{lines}\nRerun with the checkpoint's settings, or use a new "
                "`model_dir`; nothing was deleted."
            )

    def restore_latest(self):
        """Restores the newest readable checkpoint; returns its prefix or None.

        Raises:
            CheckpointMismatchError: the newest readable checkpoint belongs to a run
                with another fingerprint, or does not fit the model and optimizer.
        """
        for prefix in self.candidates():
            try:
                if self.fingerprint is not None:
                    self._check_fingerprint(prefix)
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - classified below
                damage = _unreadable(prefix)
                if damage is None:  # every tensor reads: the checkpoint is fine, the run differs
                    raise CheckpointMismatchError(
                        f"Checkpoint {prefix} is readable but does not fit this run's model and "
                        f"optimizer ({type(e).__name__}: {e}). Use a new `model_dir`; nothing was deleted."
                    ) from e
                logging.warning("Checkpoint %s is unreadable (%s); trying the previous one", prefix, damage)
                continue
            logging.info("Restored checkpoint %s", prefix)
            return prefix
        return None


def _unreadable(prefix):
    """Why the checkpoint at `prefix` cannot be read (a string), or None if every tensor reads.

    Truncated or missing data files raise different errors depending on where the
    damage is (`DataLossError`, `NotFoundError`, even `IndexError`), so the test is
    reading every tensor rather than the type of the restore error.
    """
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)  # load_checkpoint mistakes ram:// prefixes for folders
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - any failure to read is damage
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
