"""Adam with one fused update kernel per variable.

Keras 3's Adam updates each variable with about ten separate elementwise ops (each a full
pass over the 39 million weights of the 2D network); TensorFlow's ResourceApplyAdam does the
same update in one pass, with a kernel on every device (CPU and GPU alike).
The formula is Keras' own (epsilon outside the square root, bias correction folded into the
learning rate), and the slot variables are Keras', so checkpoints are unchanged.
"""
from __future__ import annotations

import keras
import tensorflow as tf


class FusedAdam(keras.optimizers.Adam):
    """keras.optimizers.Adam whose update_step is tf.raw_ops.ResourceApplyAdam."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        handle = lambda v: v.value.handle if isinstance(v, keras.Variable) else v.handle
        tf.raw_ops.ResourceApplyAdam(
            var=handle(variable), m=handle(self._momentums[index]),
            v=handle(self._velocities[index]), beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))
