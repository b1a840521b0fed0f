"""Several devices and several machines with tf.distribute, and losses over the global batch.

DISTRIBUTE chooses the strategy:

* None: TensorFlow's default strategy (one device). Every function below still works: the
  all-reduce of one replica is the identity, so the single-device path is the same code.
* "mirrored": tf.distribute.MirroredStrategy over all local GPUs; on a machine without
  GPUs, over CPU_DEVICES logical CPU devices (for testing the distributed code on a CPU).
* "multi_worker": tf.distribute.MultiWorkerMirroredStrategy; the cluster and this
  process's place in it come from the TF_CONFIG environment variable.

BATCH_SIZE stays the global batch per modality: each of the R replicas gets BATCH_SIZE / R
examples of each modality (tf.distribute splits every global batch).

The UMMKD losses are ratios of sums over the whole batch (Dice, class weights, class-wise
mean logits). A replica that took the ratios of its own sums would compute another loss, so
the losses take their sums through ``global_sum``: the value is the all-reduced (global)
sum, and the gradient flows only through the replica's own part. Since the optimizer sums
the replicas' gradients (Keras 3 all-reduces them with SUM under tf.distribute; checked in
tests/test_distribute.py), the sum of the per-replica gradients of L(global sums) is the
exact gradient of the single-device loss: dL/dtheta = sum_r dL/dS * ds_r/dtheta.

TensorFlow is imported inside the functions: ``tf_config`` serves lib.config.validate,
which runs before TensorFlow is imported (lib/cli.py), so that a bad setting is reported
at once.
"""
from __future__ import annotations

import json
import os

from lib.config import ConfigError

# ---------------------------------------------------------------------- settings
def tf_config(required: bool = False) -> dict | None:
    """The parsed TF_CONFIG environment variable (cluster and task), checked for shape."""
    text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        if required:
            raise ConfigError("DISTRIBUTE: multi_worker needs the TF_CONFIG environment "
                              "variable (cluster and task of this worker; see README)")
        return None
    try:
        value = json.loads(text)
        cluster, task = value["cluster"], value["task"]
        hosts = cluster[task["type"]]
        index = int(task["index"])
        if not 0 <= index < len(hosts):
            raise IndexError(f"task index {index} of {len(hosts)} {task['type']} host(s)")
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError(f"DISTRIBUTE: TF_CONFIG is not a valid cluster description "
                          f"({type(err).__name__}: {err})") from None
    return value


# ---------------------------------------------------------------------- strategies
def make_strategy(config: dict):
    """The tf.distribute strategy of DISTRIBUTE; call before TensorFlow uses any device.

    Logical CPU devices can only be configured before TensorFlow initialises its devices,
    hence before the first tensor is made.
    """
    import tensorflow as tf

    kind = config["DISTRIBUTE"]
    if kind is None:
        strategy = tf.distribute.get_strategy()
    elif kind == "mirrored":
        devices, reduce = None, None  # all GPUs, NCCL all-reduce
        if not tf.config.list_physical_devices("GPU"):
            devices = [d.name for d in cpu_devices(config["CPU_DEVICES"])]
            # Logical CPU devices share memory: reducing on one of them is a few adds. The
            # default for CPUs (collective ops) gave the two replicas' collectives of the
            # 3D network's synchronised BN different instance keys (shape mismatch).
            reduce = tf.distribute.ReductionToOneDevice()
        strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=reduce)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    replicas = strategy.num_replicas_in_sync
    if config["BATCH_SIZE"] % replicas:
        raise ConfigError(f"BATCH_SIZE: {config['BATCH_SIZE']} (global, per modality) is not "
                          f"divisible by the {replicas} replicas of DISTRIBUTE={kind}")
    return strategy


def cpu_devices(count: int) -> list:
    """Split the CPU into ``count`` logical devices (0 or 1: leave it whole); returns them."""
    import tensorflow as tf

    if count > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        current = tf.config.get_logical_device_configuration(cpu) or []
        if len(current) != count:
            try:
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
            except RuntimeError:
                raise ConfigError(f"CPU_DEVICES: cannot split the CPU into {count} devices "
                                  "after TensorFlow has initialised them (set it in a new "
                                  "process)") from None
    return tf.config.list_logical_devices("CPU")[:max(count, 1)]


def worker(strategy) -> tuple[str | None, int]:
    """(task type, task index) of this process in a multi-worker cluster, else (None, 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy) -> bool:
    """True for the process that writes checkpoints, logs and results.

    That is the "chief" task when the cluster has one, else worker 0; a process that is not
    part of a cluster is its own chief.
    """
    task_type, task_id = worker(strategy)
    if task_type is None or task_type == "chief":
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def distribute_dataset(strategy, dataset, device: str | None = None):
    """A dataset of global batches -> per-replica batches of BATCH_SIZE / replicas.

    Every worker builds the same (seeded, step-keyed) stream and keeps its own part of each
    global batch (sharding by data, not files: the training files are drawn at random, not
    listed once), so every global batch is the one a single device would see. The
    distributed dataset copies each replica's part to its device ahead of the step;
    ``device`` (one device, lib.runtime.input_device) does the same for a one-GPU run.
    """
    import tensorflow as tf

    if device is not None:
        return dataset.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=2))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def local_results(strategy, value):
    """Concatenate this process's per-replica parts of a batch-shaped value along axis 0."""
    import tensorflow as tf

    parts = strategy.experimental_local_results(value)
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


def first_replica(strategy, structure):
    """This process's first replica's copy of values that are the same on every replica."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0],
                                 structure)


# ---------------------------------------------------------------------- losses
def num_replicas() -> int:
    """Replicas of the current replica context (1 outside any strategy)."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else int(ctx.num_replicas_in_sync)


def global_sum(x):
    """Sum of ``x`` over all replicas, with the gradient of this replica's own ``x``.

    S_r = s_r + stop_gradient(S - s_r): the value is the global S = sum_r s_r on every
    replica, the gradient is ds_r/dtheta, and the optimizer's sum over replicas makes it
    dS/dtheta. One replica (or no strategy): returns ``x`` itself.
    """
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x
    total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(x))
    return x + tf.stop_gradient(total - x)


def replicated(x):
    """A term every replica computes in full (a function of the shared weights only).

    Its per-replica gradients would add up R times over; x / R + stop_gradient(x - x / R)
    keeps the value and makes their sum the gradient of x once.
    """
    import tensorflow as tf

    n = num_replicas()
    if n == 1:
        return x
    return x / n + tf.stop_gradient(x - x / n)
