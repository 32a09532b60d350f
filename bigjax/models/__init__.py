"""Model families, found by name in one explicit table.

`config.model.name` picks a class from `MODELS`; the rest of `config.model`
are that class's constructor arguments. Every model is called as
`model.apply(variables, x, train=...)` and returns logits.
"""

from bigjax.models import cnn
from bigjax.models import recurrent
from bigjax.models import transformer

# name -> flax.linen.Module class. Add new families here, nowhere else.
MODELS = {
    'cnn': cnn.CNN,
    'resnet': cnn.ResNet,
    'vit': transformer.ViT,
    'rnn': recurrent.RNNClassifier,
}
