"""Periodic checkpoints written by the chief only, with fallback on a bad latest one."""
import glob
import os
import re
import shutil

import tensorflow as tf
from absl import logging


def _checkpoint_number(prefix):
    match = re.search(r"-(\d+)$", prefix)
    return int(match.group(1)) if match else -1


class CheckpointKeeper:
    """Saves and restores `tf.train.Checkpoint`s of model, optimizer and data position.

    Every worker must call `save` (variables may need collectives to be read under
    `MultiWorkerMirroredStrategy`); only the chief's copy lands in `directory`, other
    workers write to a scratch folder that is deleted right away, so they never
    clobber the chief's files.

    `restore_latest` tries checkpoints from newest to oldest: a corrupt or partial
    latest checkpoint (killed mid-write, truncated file) falls back to the previous
    one. A checkpoint counts as complete once its `.index` file exists, which
    TensorFlow writes last.

    Args:
        checkpoint: the `tf.train.Checkpoint` to save/restore.
        directory: checkpoint folder.
        is_chief: bool.
        worker_id: int, names the scratch folder of non-chief workers.
        max_to_keep: int, checkpoints kept on disk.
    """

    def __init__(self, checkpoint, directory, is_chief=True, worker_id=0, max_to_keep=3):
        self.checkpoint = checkpoint
        self.directory = directory
        self.is_chief = is_chief
        self.worker_id = worker_id
        target = directory if is_chief else os.path.join(directory, f".worker{worker_id}_scratch")
        self.manager = tf.train.CheckpointManager(checkpoint, target, max_to_keep=max_to_keep)

    def save(self, step):
        path = self.manager.save(checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)
        else:
            logging.info("Saved checkpoint %s", path)
        return path

    def candidates(self):
        """Complete checkpoint prefixes in `directory`, newest first."""
        prefixes = [p[: -len(".index")] for p in glob.glob(os.path.join(self.directory, "ckpt-*.index"))]
        return sorted(prefixes, key=_checkpoint_number, reverse=True)

    def restore_latest(self):
        """Restores the newest readable checkpoint; returns its prefix or None."""
        for prefix in self.candidates():
            try:
                self.checkpoint.restore(prefix).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one"
                logging.warning("Checkpoint %s is unreadable (%s: %s); trying the previous one",
                                prefix, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            logging.info("Restored checkpoint %s", prefix)
            return prefix
        return None
