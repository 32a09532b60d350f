"""Generating from a trained run: its config, tokenizer and newest checkpoint.

`experiments/generate.py` is the command line; `generate` is the function.
A language model continues a text prompt; a seq2seq model answers a source
such as '123+45=' (digits and the task's symbols, one character each).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
import numpy as np

from bigjax import decoding
from bigjax import train
from bigjax.data import synthetic
from bigjax.errors import UserError
from bigjax.models import MODELS

METHODS = ('greedy', 'sample', 'beam')


def load_run(workdir: str):
  """(config, experiment, params) of the run in `workdir`, newest checkpoint.

  The parameters are restored replicated over all local devices, whatever
  mesh trained them.
  """
  path = os.path.join(workdir, train.CONFIG_FILE)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no run ({path} is missing); pass the '
                    '--workdir of a trained run')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  config.num_seeds = config.get('num_seeds', 1)  # Absent before seeds stacked.
  config.sharding_preset, config.sharding_rules = 'data_parallel', ()
  model_cls = MODELS.get(config.model.get('name'))
  if getattr(model_cls, 'TASK', None) not in ('language_model', 'seq2seq'):
    raise UserError(f'{workdir} trained a {config.model.get("name")!r} model, '
                    'which does not generate; use a language or seq2seq model '
                    'run')
  try:
    exp, state, _ = train.load_state(config, workdir, require_checkpoint=True)
  except AttributeError as e:  # A key the code reads is not in the file.
    raise UserError(f'{path} has no config key {e} (written by an older '
                    'bigjax); add it to the file or retrain') from None
  seeds = train.seeds_of(config)
  if seeds.stacked:
    logging.info('%s trained seeds %d..%d together; generating with seed %d',
                 workdir, seeds.first, seeds.values[-1], seeds.first)
  return config, exp, seeds.first_of(state.params)


def _encode_prompt(config, exp, prompt: str):
  """The model's prompt for `prompt`, and a function from ids back to text."""
  if config.task == 'language_model':
    tokenizer = exp.task.tokenizer
    ids = np.concatenate([[decoding.BOS_ID], tokenizer.encode(prompt)])
    return jnp.asarray(ids[None], jnp.int32), tokenizer.decode
  task = config.data.synthetic
  symbols = {str(d): synthetic.FIRST_SYMBOL + d
             for d in range(min(task.num_symbols, 10))}
  symbols['+'] = synthetic.plus_id(task.num_symbols)
  symbols['='] = synthetic.equals_id(task.num_symbols)
  names = {v: k for k, v in symbols.items()}
  unknown = sorted(set(prompt) - set(symbols))
  if unknown:
    raise UserError(f'prompt characters {unknown} are not symbols of the '
                    f'{task.task!r} task; use {"".join(sorted(symbols))}')
  padded = task.task == 'addition' and task.get('zero_pad', False)
  if padded:
    prompt = _zero_pad_operands(prompt, task.max_length)
  src = jnp.asarray([[symbols[ch] for ch in prompt]], jnp.int32)

  def decode(ids):
    text = ''.join(names.get(int(i), '') for i in ids
                   if int(i) > decoding.EOS_ID)
    # A zero-padded sum is shown as a number: 013023 -> 13023.
    return (text.lstrip('0') or text[-1:]) if padded else text
  return {'src': src}, decode


def _zero_pad_operands(prompt: str, digits: int) -> str:
  """'123+45=' -> '00123+00045=' for a run trained on zero-padded operands
  (`config.data.synthetic.zero_pad`) of `digits` digits."""
  body = prompt[:-1] if prompt.endswith('=') else prompt
  operands = body.split('+')
  if len(operands) != 2 or not all(op.isdigit() for op in operands):
    raise UserError(f'prompt {prompt!r} is not an addition like 123+45=')
  if max(map(len, operands)) > digits:
    raise UserError(f'prompt {prompt!r} has an operand of more than {digits} '
                    'digits, the most this run was trained on')
  return '+'.join(op.zfill(digits) for op in operands) + '='


def generate(workdir: str, prompt: str, *, max_len: int, method: str,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             beam_size: int = 4, length_penalty: float = 0.6,
             num_samples: int = 1, seed: int = 0) -> list[str]:
  """Continuations of `prompt` by the run in `workdir` (text, one per sample
  or beam, best beam first)."""
  if method not in METHODS:
    raise UserError(f'--method={method!r} is not one of {", ".join(METHODS)}')
  config, exp, params = load_run(workdir)
  inputs, decode = _encode_prompt(config, exp, prompt)
  if method == 'beam':
    tokens, _ = decoding.beam_search(
        exp.model, params, inputs, beam_size=beam_size,
        max_new_tokens=max_len, length_penalty=length_penalty)
    rows = np.asarray(tokens)[0]
  else:
    repeat = num_samples if method == 'sample' else 1
    inputs = jax.tree.map(lambda x: jnp.repeat(x, repeat, axis=0), inputs)
    if method == 'greedy':
      tokens = decoding.greedy(exp.model, params, inputs,
                               max_new_tokens=max_len)
    else:
      tokens = decoding.sample(
          exp.model, params, inputs, jax.random.key(seed),
          max_new_tokens=max_len, temperature=temperature, top_k=top_k,
          top_p=top_p)
    rows = np.asarray(tokens)
  return [decode(row) for row in rows]
