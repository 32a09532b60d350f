r"""A character-level LSTM language model on Shakespeare, beside the Transformer.

Run:

  python -m experiments.train --config=configs/lstm_shakespeare.py \
      --workdir=workdirs/lstm_shakespeare

Variants, after a colon: `configs/lstm_shakespeare.py:smoke` trains for a
few steps on small batches (for tests).

The same data, tokenizer, context, batch, optimiser and step budget as
configs/transformer_shakespeare.py, with one LSTM layer of 220 units (input
embedding 220, tied output embedding): 0.41M parameters, the Transformer's
count, so the two families compare at equal size.
"""

from configs import base
from configs import transformer_shakespeare


def get_config(arg=None):
  c = transformer_shakespeare.get_config()
  with c.unlocked():
    c.model = type(c.model)({
        'name': 'rnn_lm', 'vocab_size': 88, 'cell': 'lstm',
        'hidden_size': 220, 'num_layers': 1, 'embedding_dim': None,
        'tie_embeddings': True, 'dropout_rate': 0.0})
  return base.apply_variant(c, arg, 'lstm_shakespeare')
