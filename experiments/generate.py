r"""Generates from a trained language or seq2seq model.

  python -m experiments.generate --workdir=workdirs/transformer_shakespeare \
      --prompt="ROMEO:" --max_len=300 --method=sample --temperature=0.8 \
      [--top_k=0 --top_p=1.0 --num_samples=1 --seed=0]
  python -m experiments.generate --workdir=... --method=beam --beam_size=4
  python -m experiments.generate --workdir=workdirs/seq2seq_addition \
      --prompt="12345+678=" --max_len=8 --method=greedy

Reads the run's config.json, tokenizer and newest verified checkpoint, and
prints each continuation (one per sample, or per beam, best first). The same
--seed gives the same samples. The function is `bigjax.generate.generate`.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from bigjax import generate  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from experiments import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run.',
                               required=True)
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue (language '
                              'models) or the source (seq2seq, e.g. 12+34=).')
_MAX_LEN = flags.DEFINE_integer('max_len', 200, 'Tokens to generate at most.')
_METHOD = flags.DEFINE_enum('method', 'sample', generate.METHODS,
                            'Decoding method.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0,
                                  'Sampling temperature (0: greedy).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely '
                              'tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass (1: all).')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 4, 'Beams (--method=beam).')
_LENGTH_PENALTY = flags.DEFINE_float(
    'length_penalty', 0.6, "GNMT's alpha for beam search (0: none).")
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples to draw.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.log_own_info_only()
  try:
    texts = generate.generate(
        _WORKDIR.value, _PROMPT.value, max_len=_MAX_LEN.value,
        method=_METHOD.value, temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value, top_p=_TOP_P.value, beam_size=_BEAM_SIZE.value,
        length_penalty=_LENGTH_PENALTY.value,
        num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
  except (UserError, ValueError) as e:
    cli.fail(str(e))
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f'--- {i + 1} ---')
    print(_PROMPT.value + text if '=' not in _PROMPT.value else text)


if __name__ == '__main__':
  app.run(main)
