"""Autoregressive decoding with a cache: greedy, beam search and sampling.

Every token model in `bigjax.models.MODELS` decodes the same way. Called with
`decode=True` and the 'cache' collection mutable, a model continues the
sequence its cache holds: a Transformer keeps each layer's keys and values
(and the encoder's, computed once), a recurrent model its carries. One new
token then costs one pass of one token through the layers, plus, for a
Transformer, the attention read over the cache.

  logits, cache = prefill(model, params, prompt, max_new_tokens=T)
  logits, cache = step(model, params, cache, tokens)       # tokens int [B]

`prefill` sizes the cache for the prompt and T new tokens (shapes from
`jax.eval_shape` of a decode call on that many tokens, values zeros) and
runs the whole prompt through it in one call. Both are plain functions (jit
them with the model static, e.g. `jax.jit(step, static_argnums=0)`).
`greedy`, `sample` and `beam_search` are jitted `lax.while_loop`s over
fixed [batch, T] buffers that stop early once every row has finished. The
cache's arrays are all batch-first, so beam search reorders any model's
cache with one gather per array.

Prompts, by the model's TASK:
  * 'language_model' ('transformer_lm', 'rnn_lm'): int [B, P] tokens. Rows
    of different lengths are right-padded, with `prompt_lengths` int [B]
    (each in 1..P); every row then continues after its own last token.
  * 'seq2seq' ('encoder_decoder', 'rnn_seq2seq'): {'src': int [B, S],
    optional 'src_valid': bool [B, S]}; other keys (a batch's 'tgt') are
    ignored. The target starts with BOS.

Generated tokens come back as int [B, T] ([B, beam, T] from beam search): a
row that emits `eos_id` keeps it and is PAD after it; eos_id=None never
stops early. Ids are those `bigjax.data` reserves: PAD 0, BOS 1, EOS 2.
Sampling draws step t's tokens with `jax.random.fold_in(rng, t)`, so the
same rng gives the same samples.
"""

from collections.abc import Mapping
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# The ids bigjax.data's tokenizers and synthetic tasks reserve.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_TASKS = ('language_model', 'seq2seq')


# ---- One decode call -------------------------------------------------------


def _task(model) -> str:
  task = getattr(type(model), 'TASK', None)
  if task not in _TASKS:
    raise ValueError(f'{type(model).__name__} does not decode; use a token '
                     'model: transformer_lm, rnn_lm, encoder_decoder or '
                     'rnn_seq2seq')
  return task


def _apply(model, params, cache, inputs, **kwargs):
  """One decode call: (logits [B, n, V], the updated cache)."""
  variables = {'params': params}
  if cache is not None:
    variables['cache'] = cache
  logits, state = model.apply(variables, inputs, train=False, decode=True,
                              mutable=['cache'], **kwargs)
  return logits, state['cache']


def _empty_cache(model, params, inputs):
  """Zeros shaped as the cache a decode call on `inputs` creates.

  The self-attention buffers take the length of `inputs`; nothing is
  computed (`jax.eval_shape`).
  """
  shapes = jax.eval_shape(lambda p: _apply(model, p, None, inputs)[1], params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _check_positions(model, needed: int) -> None:
  """Models with a max_len (learned positions) must not run past it."""
  max_len = getattr(model, 'max_len', None)
  if max_len is not None and needed > max_len:
    raise ValueError(f'decoding needs {needed} positions but the model has '
                     f'max_len={max_len}; ask for fewer new tokens or a '
                     'shorter prompt')


def prefill(model, params, prompt, *, max_new_tokens: int,
            prompt_lengths=None):
  """Runs the prompt into a fresh cache sized for max_new_tokens more tokens.

  Args:
    model: a token model (module doc).
    params: its 'params' collection (unboxed).
    prompt: int [B, P] (language models) or {'src', optional 'src_valid'}
      (seq2seq models); see the module doc.
    max_new_tokens: tokens that will be generated after the prompt.
    prompt_lengths: int [B] real tokens of each (right-padded) prompt row;
      language models only; None: all P.

  Returns:
    (logits [B, vocab] for the first new token, cache).
  """
  _check_positive('max_new_tokens', max_new_tokens)
  if _task(model) == 'seq2seq':
    if not isinstance(prompt, Mapping) or 'src' not in prompt:
      raise ValueError(f'{type(model).__name__} prompts are {{"src": int '
                       '[B, S], optional "src_valid"}')
    if prompt_lengths is not None:
      raise ValueError('prompt_lengths is for language models; seq2seq '
                       "prompts mark source padding with 'src_valid'")
    src = jnp.asarray(prompt['src'])
    source = {'src': src, 'src_valid': jnp.asarray(prompt.get(
        'src_valid', jnp.ones(src.shape, bool)), bool)}
    # BOS and the first max_new_tokens - 1 generated tokens are fed back.
    _check_positions(model, max_new_tokens)
    cache = _empty_cache(model, params, {
        **source, 'tgt': jnp.zeros((src.shape[0], max_new_tokens), jnp.int32)})
    bos = jnp.full((src.shape[0], 1), BOS_ID, jnp.int32)
    logits, cache = _apply(model, params, cache, {**source, 'tgt': bos})
    return logits[:, -1], cache

  if isinstance(prompt, Mapping) or jnp.ndim(prompt) != 2:
    raise ValueError(f'{type(model).__name__} prompts are int tokens [B, P]')
  tokens = jnp.asarray(prompt, jnp.int32)
  batch, length = tokens.shape
  _check_positions(model, length + max_new_tokens - 1)
  cache = _empty_cache(
      model, params,
      jnp.zeros((batch, length + max_new_tokens - 1), jnp.int32))
  if prompt_lengths is None:
    logits, cache = _apply(model, params, cache, tokens)
    return logits[:, -1], cache
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if lengths.shape != (batch,):
    raise ValueError(f'prompt_lengths has shape {lengths.shape}; the prompt '
                     f'needs ({batch},)')
  valid = jnp.arange(length) < lengths[:, None]
  logits, cache = _apply(model, params, cache, tokens, valid=valid)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  return last[:, 0], cache


def step(model, params, cache, tokens):
  """Feeds one token per row: int [B] -> (logits [B, vocab], cache)."""
  inputs = tokens[:, None]
  if _task(model) == 'seq2seq':
    inputs = {'tgt': inputs}
  logits, cache = _apply(model, params, cache, inputs)
  return logits[:, -1], cache


# ---- Greedy decoding and sampling ------------------------------------------


def _check_positive(name, value) -> None:
  if not isinstance(value, int) or value < 1:
    raise ValueError(f'{name}={value!r}; it must be a positive integer')


def _eos(eos_id: Optional[int]):
  """eos_id as a traced int32 (so changing it does not recompile); None
  becomes -1, which no token matches."""
  if eos_id is not None and (not isinstance(eos_id, (int, np.integer))
                             or eos_id < 0):
    raise ValueError(f'eos_id={eos_id!r}; it must be a token id >= 0 or None')
  return jnp.int32(-1 if eos_id is None else eos_id)


def filter_logits(logits, *, temperature=1.0, top_k=0, top_p=1.0):
  """logits [..., V] / temperature, -inf outside the top-k and the nucleus.

  top_k > 0 keeps the k largest (ties with the k-th too; k >= V keeps all);
  top_p < 1 then keeps the smallest set of most likely tokens whose
  probability reaches top_p (Holtzman et al. 2020): a token stays when the
  tokens ranked above it hold less than top_p, so the most likely token
  always stays. The arguments may be traced, so one compiled sampler serves
  every setting.
  """
  logits = logits / temperature
  # One sort serves both filters: ranks are positions in `ranked`.
  ranked = -jnp.sort(-logits, axis=-1)
  in_top_k = (top_k <= 0) | (jnp.arange(logits.shape[-1]) < top_k)
  ranked = jnp.where(in_top_k, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked, axis=-1)
  above = jnp.cumsum(probs, axis=-1) - probs
  # top_p = 1 keeps everything even where the float cumsum reaches 1 early.
  kept = in_top_k & ((above < top_p) | (top_p >= 1.0))
  cutoff = jnp.take_along_axis(
      ranked, jnp.sum(kept, axis=-1, keepdims=True) - 1, axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def _choose(logits, key, temperature, top_k, top_p):
  """Next tokens int [B] from logits [B, V]: argmax at temperature 0, else a
  draw. `lax.cond`s skip the draw when greedy and the sort when unfiltered,
  so greedy decoding pays nothing for sharing this code."""
  def draw(logits):
    filtered = lax.cond(
        (top_k > 0) | (top_p < 1.0),
        lambda l: filter_logits(l, temperature=temperature, top_k=top_k,
                                top_p=top_p),
        lambda l: l / temperature, logits)
    return jax.random.categorical(key, filtered).astype(jnp.int32)

  return lax.cond(temperature > 0, draw,
                  lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), logits)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def _generate(model, params, prompt, prompt_lengths, rng, temperature, top_k,
              top_p, eos_id, *, max_new_tokens):
  """Tokens [B, max_new_tokens]; step t draws with fold_in(rng, t)."""
  logits, cache = prefill(model, params, prompt, max_new_tokens=max_new_tokens,
                          prompt_lengths=prompt_lengths)
  batch = logits.shape[0]

  def pick(t, logits, finished):
    token = _choose(logits, jax.random.fold_in(rng, t), temperature, top_k,
                    top_p)
    # Finished rows still run (the batch moves together) but emit PAD.
    token = jnp.where(finished, PAD_ID, token)
    return token, finished | (token == eos_id)

  # Token 0 comes from the prompt's logits; each loop iteration feeds the
  # last token back, so no step runs for a token nobody reads.
  token, finished = pick(0, logits, jnp.zeros((batch,), bool))
  tokens = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)
  tokens = tokens.at[:, 0].set(token)

  def cond(state):
    t, _, _, _, finished = state
    return (t < max_new_tokens) & ~jnp.all(finished)

  def body(state):
    t, tokens, token, cache, finished = state
    logits, cache = step(model, params, cache, token)
    token, finished = pick(t, logits, finished)
    return t + 1, tokens.at[:, t].set(token), token, cache, finished

  return lax.while_loop(cond, body, (jnp.ones((), jnp.int32), tokens, token,
                                     cache, finished))[1]


def greedy(model, params, prompt, *, max_new_tokens: int,
           eos_id: Optional[int] = EOS_ID, prompt_lengths=None):
  """The most likely token at every step: int [B, max_new_tokens].

  Arguments as `prefill`; eos_id: the token that ends a row (None: none).
  The same compiled loop as `sample` (at temperature 0).
  """
  return sample(model, params, prompt, jax.random.key(0),
                max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos_id,
                prompt_lengths=prompt_lengths)


def sample(model, params, prompt, rng, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: Optional[int] = EOS_ID, prompt_lengths=None):
  """Tokens drawn from softmax(filter_logits(...)): int [B, max_new_tokens].

  Arguments as `prefill` and `filter_logits` (temperature 0: greedy; top_k
  0: no top-k filter; top_p 1: no nucleus); rng: a PRNG key, the same key
  giving the same tokens; eos_id: the token that ends a row (None: none).
  Compiled once per model, shapes and max_new_tokens: other settings do not
  recompile.
  """
  if not temperature >= 0:
    raise ValueError(f'temperature={temperature!r}; it must be >= 0 '
                     '(0: greedy)')
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f'top_k={top_k!r}; it must be an integer >= 0 (0: all '
                     'tokens)')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p!r}; it must be in (0, 1] (1: all tokens)')
  return _generate(model, params, prompt, prompt_lengths, rng,
                   jnp.float32(temperature), jnp.int32(top_k),
                   jnp.float32(top_p), _eos(eos_id),
                   max_new_tokens=max_new_tokens)


# ---- Beam search -----------------------------------------------------------


def gnmt_length_penalty(length, alpha):
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 at alpha = 0."""
  return ((5.0 + length) / 6.0) ** alpha


def _best(scores, sequences, k):
  """The k best (scores [B, n], sequences [B, n, T]), best first."""
  scores, index = lax.top_k(scores, k)
  return scores, jnp.take_along_axis(sequences, index[..., None], axis=1)


def beam_search(model, params, prompt, *, beam_size: int,
                max_new_tokens: int, length_penalty: float = 0.6,
                eos_id: Optional[int] = EOS_ID, prompt_lengths=None):
  """The beam_size best continuations of each prompt, best first.

  Each step extends every live beam by every token and ranks the 2 *
  beam_size best candidates by total log-probability. As in fairseq, a
  candidate ending in eos_id is finished when it ranks among the first
  beam_size (and dropped otherwise); the best beam_size of the others stay
  live. A finished sequence of n tokens (EOS included) scores
  log p / gnmt_length_penalty(n, length_penalty). A row stops once it holds
  beam_size finished sequences; rows still short of them at max_new_tokens
  take their live beams too, scored as if they ended there. So beam_size=1
  is greedy decoding, whatever the length penalty.

  Args:
    model, params, prompt, max_new_tokens, prompt_lengths: as `prefill`.
    beam_size: beams kept per row.
    length_penalty: GNMT's alpha; 0 ranks by log-probability alone, larger
      values favour longer sequences.
    eos_id: the token that ends a beam (None: beams run to max_new_tokens).
    Compiled once per model, shapes, beam_size and max_new_tokens.

  Returns:
    tokens int [B, beam_size, max_new_tokens] (PAD after EOS) and their
    scores float [B, beam_size], best first (-inf for slots no sequence
    filled: more beams than the vocabulary allows).
  """
  _check_positive('beam_size', beam_size)
  if not length_penalty >= 0:
    raise ValueError(f'length_penalty={length_penalty!r}; it must be >= 0')
  return _beam_search(model, params, prompt, prompt_lengths,
                      jnp.float32(length_penalty), _eos(eos_id),
                      beam_size=beam_size, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=('model', 'beam_size',
                                             'max_new_tokens'))
def _beam_search(model, params, prompt, prompt_lengths, alpha, eos_id, *,
                 beam_size, max_new_tokens):
  k, steps = beam_size, max_new_tokens
  logits, cache = prefill(model, params, prompt, max_new_tokens=steps,
                          prompt_lengths=prompt_lengths)
  batch, vocab = logits.shape
  # Every beam starts as a copy of its row; only the first is live, so the
  # first step does not pick the same token k times.
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
  logits = jnp.repeat(logits, k, axis=0)
  start = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)
  state = {
      'live_logp': jnp.broadcast_to(start, (batch, k)),
      'live': jnp.full((batch, k, steps), PAD_ID, jnp.int32),
      'finished_scores': jnp.full((batch, k), -jnp.inf),
      'finished': jnp.full((batch, k, steps), PAD_ID, jnp.int32),
      'cache': cache, 't': jnp.zeros((), jnp.int32)}

  def row_done(state):
    # A row is done when its last finished slot is filled.
    return state['finished_scores'][:, -1] > -jnp.inf

  def extend(state, logits):
    """One step: the live beams' logits [B * k, V] -> the next state."""
    t, done = state['t'], row_done(state)
    logp = (jax.nn.log_softmax(logits).reshape(batch, k, vocab)
            + state['live_logp'][..., None])
    cand_logp, index = lax.top_k(logp.reshape(batch, k * vocab), 2 * k)
    parent, token = index // vocab, index % vocab
    cand = jnp.take_along_axis(state['live'], parent[..., None], axis=1)
    cand = cand.at[:, :, t].set(token)
    ends = token == eos_id
    # Finished: EOS candidates among the first k, kept with the old ones.
    finishing = ends & (jnp.arange(2 * k) < k)
    scores = jnp.where(
        finishing, cand_logp / gnmt_length_penalty(t + 1, alpha), -jnp.inf)
    fin_scores, fin = _best(
        jnp.concatenate([state['finished_scores'], scores], 1),
        jnp.concatenate([state['finished'], cand], 1), k)
    # A done row keeps what it has: its result must not depend on how long
    # the other rows of the batch run.
    fin_scores = jnp.where(done[:, None], state['finished_scores'],
                           fin_scores)
    fin = jnp.where(done[:, None, None], state['finished'], fin)
    # Live: the best k candidates that did not end.
    live_logp, pick = lax.top_k(jnp.where(ends, -jnp.inf, cand_logp), k)
    parent = jnp.take_along_axis(parent, pick, axis=1)
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
    return {'live_logp': live_logp,
            'live': jnp.take_along_axis(cand, pick[..., None], axis=1),
            'finished_scores': fin_scores, 'finished': fin,
            'cache': jax.tree.map(lambda x: x[rows], state['cache']),
            't': t + 1}

  def cond(state):
    return (state['t'] < steps) & ~jnp.all(row_done(state))

  def body(state):
    tokens = state['live'][:, :, state['t'] - 1].reshape(-1)
    logits, cache = step(model, params, state['cache'], tokens)
    return extend({**state, 'cache': cache}, logits)

  state = lax.while_loop(cond, body, extend(state, logits))
  # Rows short of k finished sequences fill up with their live beams.
  live_scores = state['live_logp'] / gnmt_length_penalty(state['t'], alpha)
  live_scores = jnp.where(row_done(state)[:, None], -jnp.inf, live_scores)
  scores, tokens = _best(
      jnp.concatenate([state['finished_scores'], live_scores], 1),
      jnp.concatenate([state['finished'], state['live']], 1), k)
  return tokens, scores
