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

Budget: 170 steps of 32 x 64 characters per seed (8% of an epoch: an early
point of training, the same in every cell). Measured with the `:smoke`
variant at 40 steps on the 2-core machine with other jobs on it (load
5-6): 0.46-0.60 s per step; a cell's first seed spends 42-62 s on
compilation and the final evaluation over the validation plays, each later
seed 21-39 s (its programs come from the compilation cache); about 25 min
for 4 cells x 3 seeds, about half that on a quiet machine. Checkpoints
every 50 steps, so a killed ablation resumes close to where it stopped.
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
      'checkpoint.save_every_steps': 50,
  })
  c.axes = (base.axis('sharing', {'model.cross_layer_sharing': MODES}),)
  c.baseline = 'sharing-none'
  c.num_seeds = 3
  c.budget.kind = 'steps'
  c.budget.value = 170.0
  c.metrics = base.LM_METRICS
  c.plot.x = 'unique_parameters'
  c.plot.log_x = True
  return base.apply_variant(c, arg, 'albert_sharing')
