"""Model families, found by name in one explicit table.

`config.model.name` picks a class from `MODELS`; the rest of `config.model`
are that class's constructor arguments. Every model is called as
`model.apply(variables, x, train=...)` and returns logits.
"""

from bigjax.models import cnn

# name -> flax.linen.Module class. Add new families here, nowhere else.
MODELS = {
    'cnn': cnn.CNN,
}
