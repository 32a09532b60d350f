r"""The seeds' CNN on Fashion-MNIST: conv3x3(32)-pool-conv3x3(64)-pool-dense(128)-dense(10).

Run (the README's default experiment):

  python -m experiments.train --config=configs/cnn_fashion_mnist.py \
      --workdir=workdirs/cnn_fashion_mnist

Variants, after a colon: `configs/cnn_fashion_mnist.py:smoke` trains for a
few steps on small batches (for tests). Override any key on the command line,
e.g. `--config.optimizer.learning_rate=0.01 --config.num_epochs=5`.

Reference point: the published 2-layer CNN baseline on Fashion-MNIST is 91.6%
test accuracy. This recipe (Adam, warmup + cosine, dropout 0.3, flips) is
sized to reach it within 10 minutes of training on 2 CPU cores.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.data.name = 'fashion_mnist_local'
  c.data.augment.horizontal_flip = True
  c.data.augment.crop_padding = 0

  c.model.name = 'cnn'
  c.model.num_classes = 10
  c.model.features = (32, 64)
  c.model.kernel_size = 3
  c.model.dense_features = 128
  c.model.dropout_rate = 0.3
  c.model.pooling = 'max'

  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = 'warmup_cosine'
  c.optimizer.warmup_steps = 200

  c.batch_size = 128
  c.num_epochs = 12.0
  c.eval_every_steps = 1000
  c.log_every_steps = 100
  c.checkpoint.save_every_steps = 1000

  return base.apply_variant(c, arg, 'cnn_fashion_mnist')
