r"""ALBERT's cross-layer parameter sharing on the Shakespeare character LM.

Run (3 seeds; `:smoke` runs it in miniature):

  python -m experiments.ablate --config=configs/ablations/albert_sharing.py \
      --workdir=workdirs/ablations/albert_sharing

Reproduces the direction of ALBERT's sharing ablation (Lan et al. 2020,
Table 4): one 6-layer character decoder (d_model 64, 4 heads, feed-forward
256, 64 characters of context) trained with its layers sharing nothing,
everything ('all': one block applied 6 times, as ALBERT and the Universal
Transformer), only the attention sub-layers, or only the feed-forward ones.
Reported: validation bits per character on the held-out plays against the
stored (unique) parameters; the effective (applied) parameters are the same
305,664 in every cell.

Published direction: sharing cuts the stored parameters several-fold and
costs some quality; sharing attention costs little, sharing the
feed-forward layers costs most of the drop (ALBERT-base, E=768, average
over five tasks: not-shared 82.3, shared-attention 81.6, shared-FFN 79.5,
all-shared 79.8). Here the stored parameters are 305,664 (none), 55,744
(all), 221,824 (attention) and 139,584 (ffn).

Budget: 500 steps of 32 x 64 characters per seed (a quarter of an epoch,
the same in every cell). Measured (seeds 0-2, the 2-core machine with the
test suite and a benchmark sharing it): 24.5 min end to end; bits per
character none 2.930 +- 0.049, ffn 3.010 +- 0.056 (+0.080, paired p =
0.066), attention 3.041 +- 0.082 (+0.112, p = 0.005), all 3.145 +- 0.069
(+0.215, p = 0.004). Sharing costs quality and sharing everything costs
most, as published; attention vs ffn is not resolved (3.041 vs 3.010,
paired p = 0.39), so ALBERT's 'the FFN costs more' is not reproduced at
this size and budget. At 170 steps (3.73 bits/char, barely past unigram
statistics) the same cells ranked ffn ~ none < attention < all. Checkpoints
every 100 steps, so a killed ablation resumes close to where it stopped.
"""

from configs.ablations import base

MODES = ('none', 'all', 'attention', 'ffn')


def get_config(arg=None):
  c = base.get_config()
  c.base_config = 'configs/transformer_shakespeare.py'
  c.overrides = base.nested({
      **base.SMALL_CHAR_LM,
      'model.num_layers': 6,
      'optimizer.warmup_steps': 20,
      **base.END_POINTS,
      'log_every_steps': 25,
      'checkpoint.save_every_steps': 100,
  })
  c.axes = (base.axis('sharing', {'model.cross_layer_sharing': MODES}),)
  c.baseline = 'sharing-none'
  c.num_seeds = 3
  c.budget.kind = 'steps'
  c.budget.value = 500.0
  c.metrics = base.LM_METRICS
  c.plot.x = 'unique_parameters'
  c.plot.log_x = True
  return base.apply_variant(c, arg, 'albert_sharing')
