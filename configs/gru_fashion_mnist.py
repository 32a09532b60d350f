r"""A GRU reading Fashion-MNIST row by row: 28 steps of 28 features.

Run:

  python -m experiments.train --config=configs/gru_fashion_mnist.py \
      --workdir=workdirs/gru_fashion_mnist

Variants, after a colon: `configs/gru_fashion_mnist.py:smoke` trains for a
few steps on small batches (for tests). Override any key on the command line,
e.g. `--config.model.hidden_size=256 --config.num_epochs=5`.

The GRU counterpart of configs/lstm_fashion_mnist.py with the same recipe
and length (one layer of 128 units, Adam 2e-3 with warmup and cosine,
clipping at norm 1, 20 epochs), so the two cells compare on equal terms.
Its training step is ~1.15x faster than the LSTM's (3 gates to the LSTM's
4 and no cell state, but autodiff's backward where the LSTM's is written
out, bigjax/models/fused_lstm.py): ~2,000-2,300 examples/s in the train
loop here, ~7-9 minutes.
"""

from configs import base
from configs import lstm_fashion_mnist


def get_config(arg=None):
  c = lstm_fashion_mnist.get_config()
  c.model.cell = 'gru'
  return base.apply_variant(c, arg, 'gru_fashion_mnist')
