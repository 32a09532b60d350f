"""Model families, found by name in one explicit table.

`config.model.name` picks a class from `MODELS`; the rest of `config.model`
are that class's constructor arguments. Every model is called as
`model.apply(variables, x, train=...)` and returns logits. Token models read
int32 tokens [batch, length] ('transformer_lm', 'rnn_lm') or {'src', 'tgt',
'src_valid', 'tgt_valid'} ('encoder_decoder', 'rnn_seq2seq'), return
[batch, length, vocab_size], and decode with a cache (`bigjax.decoding`).
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
    'transformer_lm': transformer.DecoderLM,
    'lm_classifier': transformer.DecoderClassifier,
    'encoder_decoder': transformer.EncoderDecoder,
    'rnn_lm': recurrent.RNNLM,
    'rnn_seq2seq': recurrent.RNNSeq2Seq,
}
