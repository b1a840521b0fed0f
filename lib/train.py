"""The training loop shared by the 2D and the 3D network.

Each step draws one batch per modality (independent shuffles: the data are unpaired),
runs both through the network as one concatenated batch (shared kernels see both, each
modality's BN sees its own half), and makes one Adam update on the UMMKD objective
(lib/losses.py). Checkpoints, TensorBoard summaries, a text log and a JSON-lines log (for
the figures) are written under OUTPUT_PATH; a run restarted on the same OUTPUT_PATH with
the same configuration resumes from its latest checkpoint at its step.

The network only has to follow the calling convention of lib/layers.py:
``model(x, modalities=("mr", "ct"), training=True) -> logits``.

Under a tf.distribute strategy (lib/distribute.py) the step runs once per replica on its
part of the global batch; the losses are those of the global batch (lib/losses.py) and the
optimizer sums the replicas' gradients. Only the chief writes checkpoints, logs and
summaries into OUTPUT_PATH; the other workers of a multi-worker run save their checkpoints
(which every worker must do, TensorFlow may need them all for it) into a temporary folder
that is deleted at the end. Without a strategy, TensorFlow's default one runs the same code.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from lib import interrupt, losses
from lib.distribute import first_replica, is_chief, local_results, worker
from lib.layers import MODALITIES, conv_kernels
from lib.optim import FusedAdam
from lib.run_dir import LOG_FILE, trim_log
from lib.runtime import get_logger, launch_tensorboard
from lib.settings import kd_weight


def model_variables(model) -> dict:
    """Every variable of the model (BN statistics too), keyed by position, for checkpoints.

    tf.train.Checkpoint(model=keras_model) does not follow layers kept in Python lists and
    dicts under Keras 3 (the networks keep their units that way), so it would save none of
    their variables; positions are stable where auto-generated layer names are not.
    """
    return {f"{i:04d}": v for i, v in enumerate(model.variables)}


class TrainingError(RuntimeError):
    """Training cannot go on (for example a NaN loss); the message names the step."""


def learning_rate_schedule(config: dict):
    """LEARNING_RATE multiplied by LR_DECAY every LR_DECAY_STEPS steps (staircase)."""
    return keras.optimizers.schedules.ExponentialDecay(
        config["LEARNING_RATE"], config["LR_DECAY_STEPS"], config["LR_DECAY"], staircase=True)


def make_optimizer(config: dict, model) -> keras.optimizers.Optimizer:
    optimizer = FusedAdam(learning_rate_schedule(config), epsilon=config["ADAM_EPSILON"])
    if config["PRECISION"] == "fp16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Create the slot variables now so that a checkpoint restores them immediately.
    optimizer.build(model.trainable_variables)
    return optimizer


class Trainer:
    """Owns the model, optimizer, checkpoints and the compiled training step.

    ``strategy``: the tf.distribute strategy the model was built under (its scope);
    None means TensorFlow's default strategy (one device).
    """

    def __init__(self, config: dict, model, output_path: str, logger=None, strategy=None):
        self.config = config
        self.model = model
        self.output_path = output_path
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        self.logger = logger or get_logger(output_path if self.chief else None)
        self.n_class = config["N_CLASS"]
        self.modalities = MODALITIES
        self.class_names = list(config["CLASS_NAMES"])
        with self.strategy.scope():  # slot variables mirrored like the model's
            self.optimizer = make_optimizer(config, model)
        self.kernels = conv_kernels(model)
        self.checkpoint = tf.train.Checkpoint(model=model_variables(model),
                                              optimizer=self.optimizer)
        self.checkpoint_dir = os.path.join(output_path, "checkpoints")
        self._scratch = None
        save_dir = self.checkpoint_dir
        if not self.chief:
            task_type, task_id = worker(self.strategy)
            self._scratch = save_dir = tempfile.mkdtemp(prefix=f"ummkd-{task_type}{task_id}-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, save_dir,
            max_to_keep=config["KEEP_CHECKPOINTS"], checkpoint_name="model")
        self.loss_kwargs = dict(
            n_class=self.n_class, miu_dice=config["MIU_SEG_DICE"], miu_ce=config["MIU_SEG_CE"],
            miu_kd=kd_weight(config),
            miu_l2=config["MIU_SEG_L2_NORM"], temperature=config["KD_TEMPERATURE"],
            kd_classes=config["KD_CLASSES"])
        self.traces = 0
        self.train_step = tf.function(self._train_step, reduce_retracing=True,
                                      jit_compile=bool(config["XLA"]) or None)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    # ------------------------------------------------------------------ compiled steps
    def _forward(self, images: dict, labels: dict, training: bool):
        x = tf.concat([images[m] for m in self.modalities], axis=0)
        logits = self.model(x, modalities=self.modalities, training=training)
        parts = tf.split(logits, len(self.modalities), axis=0)
        logits = dict(zip(self.modalities, parts))
        total, terms = losses.total_loss(logits, labels, self.kernels, **self.loss_kwargs)
        return total, terms, logits

    def replica_gradients(self, images: dict, labels: dict):
        """(gradients, terms) of one replica's part of the batch (in a replica context).

        The terms are those of the global batch; the gradients add up over the replicas to
        the global batch's gradients (lib/distribute.py). With fp16 they are loss-scaled.
        """
        with tf.GradientTape() as tape:
            total, terms, _ = self._forward(images, labels, training=True)
            scaled = (self.optimizer.scale_loss(total)
                      if hasattr(self.optimizer, "scale_loss") else total)
        grads = tape.gradient(scaled, self.model.trainable_variables)
        # The BN rows are gathered, so their gradients come as IndexedSlices; dense they
        # are tiny ([modalities, C]) and all-reduce as one tensor instead of an all-gather.
        return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                for g in grads], terms

    def _replica_train_step(self, images: dict, labels: dict):
        grads, terms = self.replica_gradients(images, labels)
        # Under tf.distribute the Keras optimizer all-reduces the gradients with SUM.
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return terms

    def _train_step(self, images, labels):
        self.traces += 1  # Python side effect: counts traces, not steps
        terms = self.strategy.run(self._replica_train_step, args=(images, labels))
        return first_replica(self.strategy, terms)  # global values: the same on every replica

    def _replica_eval_step(self, images: dict, labels: dict):
        _, terms, logits = self._forward(images, labels, training=False)
        preds = {m: tf.argmax(logits[m], axis=-1, output_type=tf.int32) for m in logits}
        return terms, preds

    def _eval_step(self, images, labels):
        terms, preds = self.strategy.run(self._replica_eval_step, args=(images, labels))
        return first_replica(self.strategy, terms), preds

    # ------------------------------------------------------------------ checkpoints
    def restore(self, prefix: str | None = None) -> int:
        """Restore ``prefix`` or the latest checkpoint of this run; returns the step.

        Every worker restores the chief's checkpoint (OUTPUT_PATH must be on a file system
        they all see), so all replicas start from the same weights.
        """
        prefix = prefix or tf.train.latest_checkpoint(self.checkpoint_dir)
        if prefix:
            self.checkpoint.restore(prefix).assert_existing_objects_matched()
            self.logger.info(f"resumed from {prefix} at step {self.step}")
        return self.step

    def save(self) -> str:
        """Write a checkpoint (every worker must call this); returns the chief's path."""
        path = self.manager.save(checkpoint_number=self.step)
        if not self.chief:
            return os.path.join(self.checkpoint_dir, os.path.basename(path))
        self.logger.info(f"checkpoint {path}")
        return path

    def close(self) -> None:
        """Delete a non-chief worker's temporary checkpoints."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # ------------------------------------------------------------------ the loop
    def fit(self, train_data, val_data=None, num_steps: int | None = None,
            first_batch=None) -> str | None:
        """Train until NUM_STEPS; ``train_data``/``val_data`` yield ({m: x}, {m: y}) pairs.

        ``first_batch``: a batch already taken from ``train_data`` (to check the data before
        anything is written); it is used for the first step. Returns the last checkpoint.
        """
        num_steps = self.config["NUM_STEPS"] if num_steps is None else num_steps
        start = self.step
        if start >= num_steps:
            self.logger.info(f"already trained to step {start} (NUM_STEPS={num_steps})")
            return self.manager.latest_checkpoint
        self.logger.info(f"training steps {start}..{num_steps} of {type(self.model).__name__}")
        train_iter = iter(train_data)
        val_iter = iter(val_data) if val_data is not None else None
        writers, tb = self._open_writers()
        bar = _progress(start, num_steps, self.config["PROGRESS"] and self.chief)
        t0, last, step = time.time(), None, start
        try:
            with self._open_log(start) as log_file, interrupt.deferred():
                while step < num_steps:
                    images, labels = self.next_batch(train_iter, first_batch)
                    first_batch = None
                    taken, total, terms = self.take_step(images, labels, step)
                    if taken is None:  # fp16 skipped the update: the step is taken again
                        interrupt.check()
                        continue
                    step = taken
                    self.log_and_validate(step, num_steps, terms, images, labels, val_iter,
                                          writers, log_file)
                    if step % self.config["CHECKPOINT_SPACE"] == 0 and step < num_steps:
                        self.save()
                    bar.update(1)
                    bar.set_postfix(loss=f"{total:.3f}")
                    last = total
                    interrupt.check()  # Ctrl-C acts here, between steps
            path = self.save()
        except KeyboardInterrupt:
            bar.close()
            self.logger.info(f"interrupted at step {self.step}: writing a checkpoint")
            self.save()
            raise
        finally:
            bar.close()
            for w in writers.values():
                w.close()
            if tb is not None:
                tb.terminate()
            self.close()
        self.logger.info(f"trained {num_steps - start} steps in {time.time() - t0:.0f} s, "
                         f"last loss {last:.4f}, traces of the step function: {self.traces}")
        return path

    # ------------------------------------------------------------------ fit's steps
    def _open_writers(self):
        """({"train", "val"}: summary writers; no-op writers off the chief), TensorBoard
        process or None (TENSORBOARD_PORT)."""
        if not self.chief:
            return {k: tf.summary.create_noop_writer() for k in ("train", "val")}, None
        logs = os.path.join(self.output_path, "logs")
        writers = {k: tf.summary.create_file_writer(os.path.join(logs, k))
                   for k in ("train", "val")}
        port = self.config["TENSORBOARD_PORT"]
        return writers, (launch_tensorboard(logs, port, self.logger) if port else None)

    def _open_log(self, start: int):
        """The JSON-lines log opened for appending (the chief's; others write nothing),
        after dropping the lines of steps after the restored ``start``."""
        if not self.chief:
            return contextlib.nullcontext(_NoLog())
        log_path = os.path.join(self.output_path, LOG_FILE)
        if start > 0:
            dropped = trim_log(log_path, start)
            if dropped:
                self.logger.info(f"{LOG_FILE}: dropped {dropped} line(s) of steps after the "
                                 f"restored step {start}; they are trained again")
        return open(log_path, "a", encoding="utf-8")

    def next_batch(self, train_iter, first_batch=None):
        """``first_batch`` if given, else the next training batch; a data error met in the
        input pipeline becomes a TrainingError naming the file."""
        if first_batch is not None:
            return first_batch
        try:
            return next(train_iter)
        except tf.errors.OpError as err:
            raise TrainingError(_data_error(err, self.step)) from None

    def take_step(self, images: dict, labels: dict, before: int):
        """One training step after step ``before``: (step, total loss, terms), or (None,
        total, terms) when the fp16 loss scaler met non-finite gradients and skipped the
        update (it lowers its scale; the step is taken again and not logged). A non-finite
        loss stops training with a TrainingError; the checkpoints written before stay
        intact.

        The loss and the step are read to the host once per step, to catch divergence at
        the step it happens."""
        terms = self.train_step(images, labels)
        step, total = self.step, float(terms["total"])
        if not math.isfinite(total):
            raise TrainingError(f"step {step}: the loss is {total}; stopped. Checkpoints "
                                f"written before this step are intact in "
                                f"{self.manager.directory}")
        return (None if step == before else step), total, terms

    def log_and_validate(self, step: int, num_steps: int, terms: dict, images, labels,
                         val_iter, writers: dict, log_file) -> None:
        """Scalar summaries every SUMMARY_STEP steps; a validation batch and image
        summaries every DISPLAY_STEP steps; both at the last step; one JSON line for each
        step that logged anything."""
        last = step == num_steps
        record = None
        if step % self.config["SUMMARY_STEP"] == 0 or last:
            record = self._summaries(writers["train"], step, terms, "train")
        if val_iter is not None and (step % self.config["DISPLAY_STEP"] == 0 or last):
            v_images, v_labels = next(val_iter)
            v_terms, v_preds = self.eval_step(v_images, v_labels)
            v_record = self._summaries(writers["val"], step, v_terms, "val")
            if self.chief:
                self._image_summaries(writers["train"], step, images, labels,
                                      self.eval_step(images, labels)[1], "train")
            else:  # the same collective ops as the chief, nothing written
                self.eval_step(images, labels)
            self._image_summaries(writers["val"], step, v_images, v_labels, v_preds, "val")
            record = {**(record or {"step": step}), **v_record}
            if self.chief:
                self.logger.info(_format_record(record))
        if record is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def _summaries(self, writer, step: int, terms: dict, split: str) -> dict:
        record = {"step": step}
        with writer.as_default(step=step):
            for key, value in terms.items():
                if key.endswith("batch_dice"):
                    m = key.split("_")[0]
                    dice = value.numpy()
                    for c, name in enumerate(self.class_names, start=1):
                        tf.summary.scalar(f"dice/{m}/{name}", dice[c])
                    record[f"{split}/{m}_dice_mean"] = float(np.mean(dice[1:]))
                    tf.summary.scalar(f"dice/{m}/mean_foreground", np.mean(dice[1:]))
                else:
                    tf.summary.scalar(f"loss/{key}", value)
                    if split == "train":
                        record[f"loss/{key}"] = float(value)
            if split == "train":
                lr = float(self.optimizer.learning_rate)
                tf.summary.scalar("learning_rate", lr)
                record["lr"] = lr
        return record

    def _image_summaries(self, writer, step, images, labels, preds, split):
        # This process's replicas' parts of the batch (all of it on one machine).
        images, labels, preds = (
            {m: local_results(self.strategy, v[m]) for m in v} for v in (images, labels, preds))
        with writer.as_default(step=step):
            for m in self.modalities:
                tf.summary.image(f"{m}/image", _middle_slice_image(images[m]), step,
                                 max_outputs=2)
                tf.summary.image(f"{m}/ground_truth", _label_image(labels[m], self.n_class),
                                 step, max_outputs=2)
                tf.summary.image(f"{m}/prediction", _label_image(preds[m], self.n_class),
                                 step, max_outputs=2)


# ---------------------------------------------------------------------- helpers
class _NoLog:
    """The JSON-lines log of a worker that is not the chief: writes nothing."""

    def write(self, text):
        pass

    def flush(self):
        pass


def first_batch(dataset):
    """(iterator, its first batch), or TrainingError naming a bad record."""
    iterator = iter(dataset)
    try:
        return iterator, next(iterator)
    except tf.errors.OpError as err:
        raise TrainingError(_data_error(err, 0)) from None


def _data_error(err, step: int) -> str:
    from lib.data import bad_record_message

    where = bad_record_message(err)
    if where:
        return f"step {step}: bad training record {where}"
    first = err.message.strip().splitlines()[0] if err.message else type(err).__name__
    return (f"step {step}: reading the training data failed ({first}); run with "
            "--check_data=true to find the bad file")


def _progress(start, total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, dynamic_ncols=True,
                mininterval=1.0, desc="train")


def _format_record(record: dict) -> str:
    keys = [k for k in record if k != "step"]
    return f"step {record['step']}: " + ", ".join(f"{k}={record[k]:.4f}" for k in keys)


def _middle(x):
    """[B, H, W(, D)] -> [B, H, W]: the middle depth slice of 3D inputs."""
    return x[..., x.shape[-1] // 2] if x.shape.rank == 4 else x


def _middle_slice_image(images):
    """Input batch -> [B, H, W, 1] in [0, 1]: the middle of the 3 slices (2D) or depth (3D)."""
    x = tf.cast(images, tf.float32)
    x = x[..., 0] if x.shape[-1] == 1 else x[..., x.shape[-1] // 2]
    x = _middle(x)
    lo = tf.reduce_min(x, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(x, axis=[1, 2], keepdims=True)
    return ((x - lo) / (hi - lo + 1e-6))[..., None]


_PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]],
                    np.float32) / 255.0


def _label_image(labels, n_class):
    """[B, H, W(, D)] class ids -> [B, H, W, 3] colours; ids outside the classes grey."""
    palette = np.concatenate([np.resize(_PALETTE, (max(n_class, 1), 3)), [[0.5] * 3]])
    labels = _middle(tf.cast(labels, tf.int32))
    inside = (labels >= 0) & (labels < n_class)
    return tf.gather(tf.constant(palette, tf.float32), tf.where(inside, labels, n_class))
