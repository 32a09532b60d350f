r"""Tied vs untied input and output embeddings on the Shakespeare character LM.

Run (3 seeds; `:smoke` runs it in miniature):

  python -m experiments.ablate --config=configs/ablations/tied_embeddings.py \
      --workdir=workdirs/ablations/tied_embeddings

The README's character Transformer (2 layers of width 128, 4 heads,
feed-forward 512, RoPE) with 64 characters of context, its logits computed
through the input embedding's transpose ('tied') or through a separate
output matrix ('untied', 88 x 128 = 11,264 more parameters). Reported:
validation bits per character on the held-out plays.

Published direction (Press & Wolf 2017; Inan et al. 2017): tying removes a
vocabulary-sized matrix and lowers the perplexity of word-level language
models (Penn Treebank, large vocabularies). With a vocabulary of 88
characters the embedding is under 3% of this model, so expect a small
effect, if any.

Budget: 400 steps of 32 x 64 characters per seed. Measured on the 2-core
machine with other jobs on it: 0.34 s per step alone (load ~7), 0.54-0.59
s with a test run beside it (the `:smoke` variant at 40 steps); a cell's
first seed spends 65-75 s on compilation and the final evaluation, each
later seed about 30 s; 18-27 min for 2 cells x 3 seeds.
"""

from configs.ablations import base


def get_config(arg=None):
  c = base.get_config()
  c.base_config = 'configs/transformer_shakespeare.py'
  c.overrides = base.nested({
      'data.seq_len': 64,
      'model.max_len': 64,
      **base.END_POINTS,
      'log_every_steps': 50,
      'checkpoint.save_every_steps': 100,
  })
  c.axes = (base.axis('embeddings', {'model.tie_embeddings': (True, False)},
                      labels=('tied', 'untied')),)
  c.baseline = 'embeddings-tied'
  c.num_seeds = 3
  c.budget.kind = 'steps'
  c.budget.value = 400.0
  c.metrics = base.LM_METRICS
  c.plot.x = 'unique_parameters'
  return base.apply_variant(c, arg, 'tied_embeddings')
