"""Cross-replica helpers used inside a replica context (e.g. in `train_step`)."""
import tensorflow as tf


def replica_info():
    """`(replica_id, num_replicas)` of the current replica context ((0, 1) outside one)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: not inside strategy.run
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def gather_with_gradient(x):
    """Concatenates `x` from every replica along axis 0, in replica order.

    `ReplicaContext.all_gather` defines a gradient: each replica receives the sum over
    replicas of the gradients flowing into its own slice. With one replica it is the
    identity (no collective op in the graph).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    gathered = context.all_gather(x, axis=0)
    if x.shape[0] is not None:  # equal local batches: the global batch is static too
        gathered.set_shape([x.shape[0] * context.num_replicas_in_sync] + x.shape[1:].as_list())
    return gathered
