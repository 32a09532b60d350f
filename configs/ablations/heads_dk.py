r"""Attention heads and key size on the Shakespeare character LM.

Run (3 seeds; `:smoke` runs it in miniature):

  python -m experiments.ablate --config=configs/ablations/heads_dk.py \
      --workdir=workdirs/ablations/heads_dk

Reproduces the direction of "Attention Is All You Need" (Vaswani et al.
2017), Table 3 rows (A) and (B), on a 2-layer character decoder (d_model 64,
feed-forward 256, 64 characters of context):
  (A) the number of heads at constant computation, head_dim = d_model / heads:
      1 head of 64, 4 of 16 (the baseline), 16 of 4;
  (B) a smaller key size at 4 heads: head_dim 8.
Here `head_dim` sizes queries, keys and values alike (the paper's (B) shrinks
d_k only), so (B) also halves the attention's value width and its
parameters. Reported: validation bits per character on the held-out plays.

Published direction (EN-DE dev set, d_model 512): one head is 0.9 BLEU worse
than the best setting (24.9 vs 25.8) and quality drops again with too many
heads (32 heads of 16: 25.4); reducing d_k hurts (d_k 16: 25.1 BLEU, 5.16
perplexity vs 25.8 and 4.92 at 64).

Budget: 400 steps of 32 x 64 characters per seed. Measured with the
`:smoke` variant at 40 steps on the 2-core machine with other jobs on it
(load ~6): 0.16 s per step with 4 heads of 16, 0.20 with one head of 64,
0.30 with 16 heads of 4 (many small attention maps cost more than a few
large ones on CPU); a cell's first seed spends 41-51 s on compilation and
the final evaluation, each later seed 10-20 s; about 22 min for 4 cells x 3
seeds.
"""

from configs.ablations import base


def get_config(arg=None):
  c = base.get_config()
  c.base_config = 'configs/transformer_shakespeare.py'
  c.overrides = base.nested({
      **base.SMALL_CHAR_LM,
      'model.num_layers': 2,
      'optimizer.warmup_steps': 40,
      **base.END_POINTS,
      'log_every_steps': 25,
      'checkpoint.save_every_steps': 50,
  })
  c.axes = (base.axis(
      'heads', {'model.num_heads': (1, 4, 16, 4),
                'model.head_dim': (64, 16, 4, 8)},
      labels=('h1_dk64', 'h4_dk16', 'h16_dk4', 'h4_dk8')),)
  c.baseline = 'heads-h4_dk16'
  c.num_seeds = 3
  c.budget.kind = 'steps'
  c.budget.value = 400.0
  c.metrics = base.LM_METRICS
  c.plot.x = 'model.head_dim'
  c.plot.log_x = True
  return base.apply_variant(c, arg, 'heads_dk')
