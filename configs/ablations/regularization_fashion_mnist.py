r"""No regularisation, dropout, L2 or augmentation: the Fashion-MNIST CNN.

Run (3 seeds; `:smoke` runs it in miniature):

  python -m experiments.ablate \
      --config=configs/ablations/regularization_fashion_mnist.py \
      --workdir=workdirs/ablations/regularization_fashion_mnist

The README's CNN (conv 32, conv 64, dense 128; 421,642 parameters) trained
on the first 6,000 training images (`train[:10%]`) for 12 epochs, so that it
can overfit, and tested on all 10,000 test images, with one regulariser per
cell: none; dropout 0.5 before the head; L2 (loss.l2 = 5e-4, added to the
loss); augmentation (random crops after 2 pixels of padding, and mirroring).

Published direction: each reduces overfitting and raises test accuracy over
the unregularised network when data are scarce (dropout: Srivastava et al.
2014; augmentation: Krizhevsky et al. 2012; weight decay: Krogh & Hertz
1992), augmentation usually most. The table's paired differences against
'reg-none' say which of them this budget resolves.

Budget: 12 epochs of the 6,000 images, 563 steps of 128. Measured with
the `:smoke` variant at 40 steps on the 2-core machine with other jobs on it
(load ~5): 0.14-0.20 s per step; a cell's first seed spends 6-19 s on
compilation and the final evaluation, each later seed 5-9 s; about 20 min
for 4 cells x 3 seeds.
"""

from configs.ablations import base


def get_config(arg=None):
  c = base.get_config()
  c.base_config = 'configs/cnn_fashion_mnist.py'
  c.overrides = base.nested({
      'data.train_split': 'train[:10%]',
      'optimizer.warmup_steps': 50,
      **base.END_POINTS,
      'log_every_steps': 50,
      'checkpoint.save_every_steps': 100,
  })
  c.axes = (base.axis(
      'reg', {'model.dropout_rate': (0.0, 0.5, 0.0, 0.0),
              'loss.l2': (0.0, 0.0, 5e-4, 0.0),
              'data.augment.horizontal_flip': (False, False, False, True),
              'data.augment.crop_padding': (0, 0, 0, 2)},
      labels=('none', 'dropout', 'l2', 'augment')),)
  c.baseline = 'reg-none'
  c.num_seeds = 3
  c.budget.kind = 'epochs'
  c.budget.value = 12.0
  c.metrics = (('eval/accuracy', 'higher'), ('eval/loss', 'lower'))
  c.plot.x = ''  # Every cell has the same model: bars only.
  return base.apply_variant(c, arg, 'regularization_fashion_mnist')
