r"""No regularisation, dropout, L2 or augmentation: the Fashion-MNIST CNN.

Run (3 seeds; `:smoke` runs it in miniature):

  python -m experiments.ablate \
      --config=configs/ablations/regularization_fashion_mnist.py \
      --workdir=workdirs/ablations/regularization_fashion_mnist

The README's CNN (conv 32, conv 64, dense 128; 421,642 parameters) trained
on the first 6,000 training images (`train[:10%]`) for 40 epochs, so that it
overfits, and tested on all 10,000 test images, with one regulariser per
cell: none; dropout 0.5 before the head; L2 (loss.l2 = 5e-4, added to the
loss); augmentation (random crops after 2 pixels of padding, and mirroring).

Published direction: each reduces overfitting and raises test accuracy over
the unregularised network when data are scarce (dropout: Srivastava et al.
2014; augmentation: Krizhevsky et al. 2012; weight decay: Krogh & Hertz
1992), augmentation usually most. The table's paired differences against
'reg-none' say which of them this budget resolves.

Budget: 40 epochs of the 6,000 images, 1,875 steps of 128. Measured (seeds
0-2, the 2-core machine, otherwise quiet): 19 min end to end. Test accuracy
none 88.08 +- 0.18% (test loss 0.622: overfitted), L2 88.16 +- 0.22%
(+0.08, paired p = 0.013), dropout 88.97 +- 0.05% (+0.89, p = 0.003),
augmentation 89.41 +- 0.14% (+1.32, p = 0.003): every regulariser helps and
augmentation most, the published direction. At 12 epochs the unregularised
network had not yet overfitted (test loss 0.362) and dropout and
augmentation cost accuracy instead (-1.1 and -0.9 points).
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
      'checkpoint.save_every_steps': 250,
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
  c.budget.value = 40.0
  c.metrics = (('eval/accuracy', 'higher'), ('eval/loss', 'lower'))
  c.plot.x = ''  # Every cell has the same model: bars only.
  return base.apply_variant(c, arg, 'regularization_fashion_mnist')
