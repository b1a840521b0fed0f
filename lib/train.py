"""The training loop shared by the 2D and the 3D network.

Each step draws one batch per modality (independent shuffles: the data are unpaired),
runs both through the network as one concatenated batch (shared kernels see both, each
modality's BN sees its own half), and makes one Adam update on the UMMKD objective
(lib/losses.py). Checkpoints, TensorBoard summaries, a text log and a JSON-lines log (for
the figures) are written under OUTPUT_PATH; a run restarted on the same OUTPUT_PATH with
the same configuration resumes from its latest checkpoint at its step.

The loop keeps the step count in Python and reads the device only where it logs, validates
or checkpoints (``reads_at``): between those reads a GPU runs ahead of the host. A failed
step (a non-finite loss; fp16 without a workable loss scale) is recorded on the device by
the step itself and raised at the next read (``check_health``), before anything is saved.

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
import os
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from lib import interrupt, losses, validation
from lib.distribute import first_replica, is_chief, local_results, worker
from lib.layers import MODALITIES, conv_kernels
from lib.optim import FusedAdam
from lib.run_dir import LOG_FILE, latest_checkpoint, trim_log
from lib.runtime import get_logger, launch_tensorboard
from lib.settings import kd_weight


def model_variables(model) -> dict:
    """Every variable of the model (BN statistics too), keyed by position, for checkpoints.

    tf.train.Checkpoint(model=keras_model) does not follow layers kept in Python lists and
    dicts under Keras 3 (the networks keep their units that way), so it would save none of
    their variables; positions are stable where auto-generated layer names are not.
    """
    return {f"{i:04d}": v for i, v in enumerate(model.variables)}


# fp16: how often one step may halve the loss scale and try again (2^256 spans float32).
MAX_SCALE_HALVINGS = 256


class TrainingError(RuntimeError):
    """Training cannot go on (for example a NaN loss); the message names the step."""


POLY_POWER = 0.9  # nnU-Net's exponent


def learning_rate_schedule(config: dict):
    """The learning rate as a function of the optimizer's step t (LR_SCHEDULE):

    * "poly": LEARNING_RATE x (1 - t / NUM_STEPS)^0.9, 0 from NUM_STEPS on (nnU-Net's
      polynomial decay): the curve follows the run's length, so NUM_STEPS alone sets it;
    * "step": LEARNING_RATE x LR_DECAY^floor(t / LR_DECAY_STEPS) (the original's staircase;
      the paper presets).
    """
    if config["LR_SCHEDULE"] == "poly":
        return keras.optimizers.schedules.PolynomialDecay(
            config["LEARNING_RATE"], max(int(config["NUM_STEPS"]), 1), 0.0, power=POLY_POWER)
    return keras.optimizers.schedules.ExponentialDecay(
        config["LEARNING_RATE"], config["LR_DECAY_STEPS"], config["LR_DECAY"], staircase=True)


def make_optimizer(config: dict, model) -> keras.optimizers.Optimizer:
    optimizer = FusedAdam(learning_rate_schedule(config), epsilon=config["ADAM_EPSILON"])
    if keras.mixed_precision.dtype_policy().name == "mixed_float16":  # fp16, or auto on 7.x
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Create the slot variables now so that a checkpoint restores them immediately.
    optimizer.build(model.trainable_variables)
    return optimizer


class Trainer:
    """Owns the model, optimizer, checkpoints and the compiled training step.

    ``strategy``: the tf.distribute strategy the model was built under (its scope);
    None means TensorFlow's default strategy (one device). ``validator``: a
    lib.validation.VolumeValidator run every VALIDATE_EVERY steps; the checkpoint of its best
    score is kept in checkpoints/best (every worker validates and saves, as for the latest).
    """

    def __init__(self, config: dict, model, output_path: str, logger=None, strategy=None,
                 validator=None):
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
        self.saved_at = time.monotonic()  # the time of the last checkpoint (or the start)
        save_dir = self.checkpoint_dir
        if not self.chief:
            task_type, task_id = worker(self.strategy)
            self._scratch = save_dir = tempfile.mkdtemp(prefix=f"ummkd-{task_type}{task_id}-")
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, save_dir,
            max_to_keep=config["KEEP_CHECKPOINTS"], checkpoint_name="model")
        self.validator = validator
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, validation.best_dir(save_dir), max_to_keep=1,
            checkpoint_name="model")
        # resume keeps the best: its score is the one to beat (every worker reads the
        # chief's record, so all decide alike whether to save)
        self.best = validation.read_best(self.checkpoint_dir)
        self.loss_kwargs = dict(
            n_class=self.n_class, miu_dice=config["MIU_SEG_DICE"], miu_ce=config["MIU_SEG_CE"],
            miu_kd=kd_weight(config),
            miu_l2=config["MIU_SEG_L2_NORM"], temperature=config["KD_TEMPERATURE"],
            kd_classes=config["KD_CLASSES"])
        self.loss_scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        # The first step that failed, set by the compiled step and read by the host only
        # where the loop reads anything (check_health): [step, kind] (kind 1: the loss was
        # not finite; 2: fp16 gradients stayed non-finite through MAX_SCALE_HALVINGS
        # halvings of the loss scale), [-1, 0] while all is well; and its loss.
        self.failure = tf.Variable([-1, 0], dtype=tf.int64, trainable=False)
        self.failure_loss = tf.Variable(0.0, dtype=tf.float32, trainable=False)
        self.traces = 0
        # XLA compiles the whole step, the update fused in (one device only: lib.config)
        self.train_step = tf.function(self._train_step, reduce_retracing=True,
                                      jit_compile=bool(config["XLA"]) or None)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)

    @property
    def step(self) -> int:
        """The optimizer's step, read from the device (a host sync: not inside the loop)."""
        return int(self.optimizer.iterations.numpy())

    # ------------------------------------------------------------------ compiled steps
    def _forward(self, images: dict, labels: dict, training: bool):
        labels = {m: tf.cast(labels[m], tf.int32) for m in labels}  # uint8 in transit
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
            scaled = self.optimizer.scale_loss(total) if self.loss_scaled else total
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
        """One optimizer step on a global batch; returns the terms (global values, the same
        on every replica) as device tensors. With fp16, an update the loss scaler skips
        (non-finite gradients: it halves the scale) is tried again on the same batch, so
        each call takes exactly one step, or records a failure in ``self.failure``."""
        self.traces += 1  # Python side effect: counts traces, not steps
        before = tf.identity(self.optimizer.iterations)

        def attempt():
            return first_replica(self.strategy, self.strategy.run(
                self._replica_train_step, args=(images, labels)))

        terms = attempt()
        if self.loss_scaled:
            def skipped(tries, terms):
                return ((tries < MAX_SCALE_HALVINGS) & tf.math.is_finite(terms["total"])
                        & tf.equal(self.optimizer.iterations, before))

            _, terms = tf.while_loop(skipped, lambda tries, _: (tries + 1, attempt()),
                                     (tf.constant(1), terms))
        self._note_failure(terms["total"], before)
        return terms

    def _note_failure(self, total, before):
        """Record the first failed step in self.failure (inside the compiled step)."""
        total = tf.cast(total, tf.float32)
        kind = tf.where(tf.math.is_finite(total), tf.constant(0, tf.int64),
                        tf.constant(1, tf.int64))
        if self.loss_scaled:
            stuck = tf.equal(self.optimizer.iterations, before)
            kind = tf.where(stuck & tf.equal(kind, 0), tf.constant(2, tf.int64), kind)
        first = (self.failure[0] < 0) & (kind > 0)
        step = tf.cast(before, tf.int64) + 1
        self.failure.assign(tf.where(first, tf.stack([step, kind]), self.failure))
        self.failure_loss.assign(tf.where(first, total, self.failure_loss))

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
        prefix = prefix or latest_checkpoint(self.checkpoint_dir)
        if prefix:
            self.checkpoint.restore(prefix).assert_existing_objects_matched()
            self.logger.info(f"resumed from {prefix} at step {self.step}")
        return self.step

    def save(self, step: int | None = None) -> str:
        """Write a checkpoint of ``step`` (default: read from the device) (every worker must
        call this); returns the chief's path."""
        path = self.manager.save(checkpoint_number=self.step if step is None else step)
        self.saved_at = time.monotonic()
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
                    images, labels = self.next_batch(train_iter, first_batch, step)
                    first_batch = None
                    terms = self.train_step(images, labels)
                    step += 1  # the step counter lives here: nothing is read per step
                    if self.reads_at(step, num_steps):
                        last = self.check_health(terms)
                        self.log_and_validate(step, num_steps, terms, images, labels,
                                              val_iter, writers, log_file)
                        bar.set_postfix(loss=f"{last:.3f}")
                        if self.validation_due(step, num_steps):
                            self.validate_volumes(step, writers["val"], log_file)
                        if self.checkpoint_due(step) and step < num_steps:
                            self.save(step)
                    bar.update(1)
                    interrupt.check()  # Ctrl-C acts here, between steps
            path = self.save(step)
        except KeyboardInterrupt:
            bar.close()
            self.check_health()  # a failed step is reported, never saved
            self.logger.info(f"interrupted at step {step}: writing a checkpoint")
            self.save(step)
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

    def next_batch(self, train_iter, first_batch=None, step: int = 0):
        """``first_batch`` if given, else the next training batch; a data error met in the
        input pipeline (after ``step``) becomes a TrainingError naming the file."""
        if first_batch is not None:
            return first_batch
        try:
            return next(train_iter)
        except tf.errors.OpError as err:
            raise TrainingError(_data_error(err, step)) from None

    def reads_at(self, step: int, num_steps: int) -> bool:
        """Whether the loop reads from the device after ``step``: at the summaries
        (SUMMARY_STEP), the validation (DISPLAY_STEP), the checkpoints (CHECKPOINT_SPACE)
        and the last step. Between them the host only queues steps, so a GPU runs ahead."""
        c = self.config
        return (step == num_steps or step % c["SUMMARY_STEP"] == 0
                or step % c["DISPLAY_STEP"] == 0 or step % c["CHECKPOINT_SPACE"] == 0
                or self.validation_due(step, num_steps))

    def validation_due(self, step: int, num_steps: int) -> bool:
        """Validation on the volumes every VALIDATE_EVERY steps and at the last step."""
        return self.validator is not None and (
            step % self.config["VALIDATE_EVERY"] == 0 or step == num_steps)

    def validate_volumes(self, step: int, writer, log_file) -> dict:
        """Segment the validation volumes with the current weights; log the Dice of every
        class (log, TensorBoard "volumes/dice/<modality>/<class>", JSON-lines log) and keep
        this step's checkpoint in checkpoints/best if its score beats the best so far."""
        result = self.validator()
        value, dice = result["score"], result["dice"]
        record = {"step": step, "volumes/score": value}
        with writer.as_default(step=step):
            tf.summary.scalar("volumes/score", value)
            for m, d in dice.items():
                for name, x in zip(self.class_names, d):
                    tf.summary.scalar(f"volumes/dice/{m}/{name}", float(x))
                    record[f"volumes/{m}/{name}"] = float(x)
        improved = self.best is None or value > self.best["score"]
        path = self.best_manager.save(checkpoint_number=step) if improved else None
        if improved:
            self.best = {"step": step, "score": value}
            if self.chief:
                validation.write_best(self.checkpoint_dir, step, value, dice,
                                      self.class_names, path)
        if self.chief:
            self.logger.info(f"step {step}: validation volumes score {value:.4f} ("
                             + "; ".join(f"{m} " + " ".join(f"{n} {x:.3f}" for n, x in
                                                             zip(self.class_names, d))
                                         for m, d in dice.items())
                             + (", the best so far: kept" if improved else
                                f"; best {self.best['score']:.4f} at step "
                                f"{self.best['step']}") + ")")
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        return result

    def checkpoint_due(self, step: int) -> bool:
        """Every CHECKPOINT_SPACE steps; with CHECKPOINT_MINUTES, only once that long has
        passed since the last checkpoint (a fast GPU would otherwise spend much of its
        time writing them). Multi-worker runs keep to the steps: every worker must save at
        the same ones, and their clocks differ."""
        if step % self.config["CHECKPOINT_SPACE"]:
            return False
        minutes = self.config["CHECKPOINT_MINUTES"]
        if minutes <= 0 or self.config["DISTRIBUTE"] == "multi_worker":
            return True
        return time.monotonic() - self.saved_at >= 60.0 * minutes

    def check_health(self, terms: dict | None = None) -> float | None:
        """Raise TrainingError if a step since the last read failed (the loss was not
        finite, or fp16 could not find a loss scale); else return the total loss of
        ``terms``. Checkpoints are written only after this check, so those on disk are
        from steps before the failure."""
        step, kind = (int(v) for v in self.failure.numpy())
        if kind == 1:
            raise TrainingError(f"step {step}: the loss is {float(self.failure_loss.numpy())};"
                                f" stopped. Checkpoints written before this step are intact "
                                f"in {self.manager.directory}")
        if kind == 2:
            raise TrainingError(f"step {step}: the fp16 gradients stayed non-finite through "
                                f"{MAX_SCALE_HALVINGS} halvings of the loss scale; stopped "
                                f"(try PRECISION=bf16 or fp32). Checkpoints written before "
                                f"this step are intact in {self.manager.directory}")
        return None if terms is None else float(terms["total"])

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
