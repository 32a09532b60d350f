"""Decoding: the cache reproduces the full model, and greedy, beam search and
sampling do what they promise; the recurrent token models and their tables.

Models are tiny and their parameters random N(0, 0.3^2) draws of the shapes
`jax.eval_shape(model.init)` gives; everything that runs is jitted.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import decoding
from bigjax.models import MODELS
from bigjax.models import attention
from bigjax.models import param_counts
from bigjax.models import recurrent
from bigjax.models import transformer as tr

V, B, T = 24, 2, 9  # Vocabulary, batch, sequence length.
PROMPT = 4


def _random_params(model, inputs, *, seed=0, scale=0.3):
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.PRNGKey(0), inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype),
      nn.unbox(shapes['params']))


@functools.lru_cache(maxsize=None)
def _apply(model):
  """model.apply in eval mode, jitted once per model."""
  return jax.jit(functools.partial(model.apply, train=False))


def _tokens(seed=0, shape=(B, T)):
  # Ids from 3 on: no PAD, BOS or EOS inside the sequences.
  return jnp.asarray(np.random.default_rng(seed).integers(3, V, shape),
                     jnp.int32)


_transformer = dict(vocab_size=V, d_model=16, num_layers=2, num_heads=4,
                    mlp_dim=32, max_len=16)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens'))
def _cached_logits(model, params, prompt, fed, *, max_new_tokens,
                   prompt_lengths=None):
  """[1 + steps, B, V]: `decoding.prefill`'s logits, then `decoding.step`'s
  for each row of fed (int [steps, B]); one program, compiled once."""
  logits, cache = decoding.prefill(model, params, prompt,
                                   max_new_tokens=max_new_tokens,
                                   prompt_lengths=prompt_lengths)

  def feed(cache, tokens):
    logits, cache = decoding.step(model, params, cache, tokens)
    return cache, logits

  return jnp.concatenate([logits[None],
                          jax.lax.scan(feed, cache, fed)[1]])


def _growing_prefix_logits(model, params, inputs, lengths, *, steps):
  """The reference: [steps, B, V], step i's logits from the full model
  re-run on each row's first lengths + i tokens, at the last of them.

  The rest of the row is masked as padding ('valid' / 'tgt_valid'), so
  every prefix runs through one compiled program.
  """
  tokens = inputs['tgt'] if isinstance(inputs, dict) else inputs
  out = []
  for i in range(steps):
    n = lengths + i
    valid = jnp.arange(tokens.shape[1]) < n[:, None]
    if isinstance(inputs, dict):
      logits = _apply(model)({'params': params},
                             {**inputs, 'tgt_valid': valid})
    else:
      logits = _apply(model)({'params': params}, tokens, valid=valid)
    out.append(logits[jnp.arange(tokens.shape[0]), n - 1])
  return jnp.stack(out)


# ---- The cache reproduces the full model -----------------------------------

# Between them: tied and untied, learned, RoPE and (below, in the
# encoder-decoder) sinusoidal positions, every cross_layer_sharing, GQA and
# MQA, the chunked kernel, ALBERT factorisation, remat and step encodings.
LANGUAGE_MODELS = {
    'tied_learned_attention_sharing': tr.DecoderLM(
        **_transformer, cross_layer_sharing='attention',
        attention_kernel='chunked', embedding_dim=8, remat='full'),
    'untied_rope_all_sharing': tr.DecoderLM(
        **_transformer, positional='rope', num_kv_heads=2,
        cross_layer_sharing='all', step_encoding=True, tie_embeddings=False),
    # LSTM carries are covered by the seq2seq models below.
    'rnn_gru_shared_layers_tied': recurrent.RNNLM(
        vocab_size=V, cell='gru', hidden_size=12, num_layers=2,
        cross_layer_sharing='all', embedding_dim=8, tie_embeddings=True),
}


@pytest.mark.parametrize('name', sorted(LANGUAGE_MODELS))
def test_cached_language_model_logits_equal_rerunning_the_growing_prefix(
    name):
  """A ragged prompt (row 1 two tokens shorter) prefilled in one call, then
  one token per step: every step's logits are those of the full model re-run
  on the prefix so far."""
  model = LANGUAGE_MODELS[name]
  tokens = _tokens()
  params = _random_params(model, tokens)
  lengths = jnp.array([PROMPT, PROMPT - 2])
  steps = T - PROMPT + 1
  # Step i feeds each row's token lengths + i - 1.
  fed = tokens[jnp.arange(B), lengths + jnp.arange(steps - 1)[:, None]]
  cached = _cached_logits(model, params, tokens[:, :PROMPT], fed,
                          max_new_tokens=steps + 1, prompt_lengths=lengths)
  np.testing.assert_allclose(
      cached, _growing_prefix_logits(model, params, tokens, lengths,
                                     steps=steps), atol=1e-5)


SEQ2SEQ_MODELS = {
    'encoder_decoder_sinusoidal_mqa_ffn_sharing': tr.EncoderDecoder(
        **_transformer, positional='sinusoidal', num_kv_heads=1,
        cross_layer_sharing='ffn', tie_embeddings=False),
    'rnn_lstm_additive': recurrent.RNNSeq2Seq(vocab_size=V, hidden_size=12,
                                              num_layers=2,
                                              attention='additive'),
    'rnn_gru_dot_tied': recurrent.RNNSeq2Seq(
        vocab_size=V, cell='gru', hidden_size=12, embedding_dim=8,
        attention='dot', tie_embeddings=True),
}


@pytest.mark.parametrize('name', sorted(SEQ2SEQ_MODELS))
def test_cached_seq2seq_logits_equal_rerunning_the_growing_prefix(name):
  """The source is encoded once; each target step's logits are those of the
  full model re-run on the source and the target so far."""
  model = SEQ2SEQ_MODELS[name]
  src = _tokens(2, (B, 6))
  src_valid = jnp.array([[True] * 4 + [False] * 2, [True] * 6])
  tgt = _tokens(3).at[:, 0].set(decoding.BOS_ID)
  inputs = {'src': src, 'src_valid': src_valid, 'tgt': tgt}
  params = _random_params(model, inputs)
  cached = _cached_logits(model, params, {'src': src, 'src_valid': src_valid},
                          tgt[:, 1:].T, max_new_tokens=T)
  np.testing.assert_allclose(
      cached, _growing_prefix_logits(model, params, inputs,
                                     jnp.ones((B,), jnp.int32), steps=T),
      atol=1e-5)


def test_cache_is_batch_first_and_holds_the_source_once():
  """Every cache array leads with the batch (beam search reorders it); each
  decoder layer has its own; steps need no source."""
  model = SEQ2SEQ_MODELS['encoder_decoder_sinusoidal_mqa_ffn_sharing']
  prompt = {'src': _tokens(2, (B, 6))}
  params = _random_params(model, {**prompt, 'tgt': _tokens()})
  cache = jax.eval_shape(functools.partial(
      decoding.prefill, model, max_new_tokens=5), params, prompt)[1]
  assert set(cache['decoder']) == {'layer0', 'layer1'}
  layer = cache['decoder']['layer1']
  # Keys [batch, kv_heads, head_dim, length], values [..., length, head_dim].
  assert layer['self_attention']['cached_key'].shape == (B, 1, 4, 5)
  assert layer['self_attention']['cached_value'].shape == (B, 1, 5, 4)
  assert layer['cross_attention']['cached_key'].shape == (B, 1, 4, 6)
  assert {k: v.shape for k, v in cache.items() if k != 'decoder'} == {
      'slot': (B,), 'length': (B,), 'key_valid': (B, 5)}
  assert all(x.shape[0] == B for x in jax.tree.leaves(cache))


# ---- Greedy, beam search and sampling --------------------------------------


def _lm_and_params(seed=0):
  """A one-layer LM (compiles fastest) for the generation loops."""
  model = tr.DecoderLM(**{**_transformer, 'num_layers': 1})
  return model, _random_params(model, _tokens(), seed=seed, scale=0.5)


# Ragged prompts for the generation loops; every test below that decodes
# them with max_new_tokens=8 shares one compiled greedy/sampling loop.
PROMPTS, PROMPT_LENGTHS = _tokens(4, (4, PROMPT)), jnp.array([4, 2, 3, 4])


def test_beam_size_one_equals_greedy():
  model, params = _lm_and_params()
  prompt, lengths = PROMPTS, PROMPT_LENGTHS
  run = functools.partial(decoding.greedy, model, params, prompt,
                          max_new_tokens=8, prompt_lengths=lengths)
  # A token greedy emits mid-row plays EOS, so rows end early.
  eos = int(run(eos_id=None)[0, 4])
  greedy = run(eos_id=eos)
  assert np.any(greedy[:, -1] == decoding.PAD_ID)
  for alpha in (0.0, 1.0):
    beams, scores = decoding.beam_search(
        model, params, prompt, beam_size=1, max_new_tokens=8,
        length_penalty=alpha, eos_id=eos, prompt_lengths=lengths)
    np.testing.assert_array_equal(beams[:, 0], greedy)
    assert np.all(np.isfinite(scores))


def test_beam_scores_are_the_models_log_probabilities():
  """Beams reorder the cache (carries and attention memory) every step; if
  a row's cache were mixed up, its score would not be the teacher-forced
  log-probability of its tokens."""
  model = SEQ2SEQ_MODELS['rnn_gru_dot_tied']  # Its full apply is compiled.
  source = {'src': _tokens(5, (B, 6)),
            'src_valid': jnp.array([[True] * 4 + [False] * 2, [True] * 6])}
  params = _random_params(model, {**source, 'tgt': _tokens()}, scale=0.8)
  beams, scores = decoding.beam_search(model, params, source, beam_size=3,
                                       max_new_tokens=5, eos_id=None,
                                       length_penalty=0.0)
  assert np.all(np.diff(scores, axis=1) <= 0)  # Best first.
  assert len({tuple(b) for b in np.asarray(beams[0])}) == 3
  for k in range(3):
    # BOS and the beam, padded to the compiled length T.
    tgt = jnp.zeros((B, T), jnp.int32).at[:, 0].set(decoding.BOS_ID)
    tgt = tgt.at[:, 1:6].set(beams[:, k])
    logits = _apply(model)({'params': params}, {
        **source, 'tgt': tgt,
        'tgt_valid': jnp.broadcast_to(jnp.arange(T) < 6, (B, T))})
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :5]),
                               beams[:, k, :, None], axis=2)
    np.testing.assert_allclose(logp.sum((1, 2)), scores[:, k], rtol=1e-5)


# A bigram language model built by hand: an Elman RNN whose state is the
# one-hot previous token, so p(next | prefix) = BIGRAM[previous token].
PAD, BOS, EOS, A, B_, C, X, Y, Z = range(9)


def _bigram_lm(table):
  """RNNLM parameters with softmax(logits at t) = table[tokens[t]]."""
  vocab = table.shape[0]
  model = recurrent.RNNLM(vocab_size=vocab, cell='elman', hidden_size=vocab,
                          embedding_dim=vocab)
  sharp = 10.0  # tanh(10 * one_hot) is one_hot * tanh(10).
  kernel = np.concatenate([np.zeros((vocab, vocab)), sharp * np.eye(vocab)])
  params = {
      'embed': {'embedding': np.eye(vocab)},
      'rnn': {'layer0': {'forward': {'cell': {'kernel': kernel,
                                              'bias': np.zeros(vocab)}}}},
      'logits': {'kernel': np.log(table) / np.tanh(sharp)}}
  return model, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _table(rows):
  """[9, 9] next-token probabilities: the given rows, uniform elsewhere,
  every entry at least 1e-6 (so log p is finite)."""
  table = np.full((9, 9), 1.0)
  for token, probs in rows.items():
    table[token] = 0.0
    for nxt, p in probs.items():
      table[token, nxt] = p
  table += 1e-6
  return table / table.sum(1, keepdims=True)


def _log_prob(table, sequence):
  tokens = [BOS] + list(sequence)
  return sum(np.log(table[a, b]) for a, b in zip(tokens, tokens[1:]))


def test_beam_search_finds_the_sequence_greedy_misses():
  # Greedy takes A (0.55) and then spreads over X/Y/Z (0.34 at best):
  # 0.19. B (0.45) is followed by C almost surely: 0.45.
  table = _table({BOS: {A: 0.55, B_: 0.45}, A: {X: 0.34, Y: 0.33, Z: 0.33},
                  B_: {C: 1.0}, X: {EOS: 1.0}, Y: {EOS: 1.0}, Z: {EOS: 1.0},
                  C: {EOS: 1.0}})
  model, params = _bigram_lm(table)
  prompt = jnp.full((1, 1), BOS, jnp.int32)
  greedy = decoding.greedy(model, params, prompt, max_new_tokens=6)
  np.testing.assert_array_equal(greedy[0], [A, X, EOS, PAD, PAD, PAD])
  # (Beam size and length as in the next test: one compilation for both.)
  beams, scores = decoding.beam_search(model, params, prompt, beam_size=3,
                                       max_new_tokens=6, length_penalty=0.0)
  np.testing.assert_array_equal(beams[0, :2], [[B_, C, EOS, PAD, PAD, PAD],
                                               [A, X, EOS, PAD, PAD, PAD]])
  np.testing.assert_allclose(scores[0, :2], [_log_prob(table, [B_, C, EOS]),
                                             _log_prob(table, [A, X, EOS])],
                             rtol=1e-5)


def test_eos_ends_a_beam_and_the_length_penalty_ranks_lengths():
  # Complete sequences: [EOS] 0.4, [A, EOS] 0.27, [A, B, EOS] 0.33.
  table = _table({BOS: {A: 0.6, EOS: 0.4}, A: {EOS: 0.45, B_: 0.55},
                  B_: {EOS: 1.0}})
  model, params = _bigram_lm(table)
  prompt = jnp.full((1, 1), BOS, jnp.int32)
  complete = [[EOS], [A, EOS], [A, B_, EOS]]

  for alpha, order in ((0.0, [0, 2, 1]), (1.0, [2, 0, 1])):
    beams, scores = decoding.beam_search(model, params, prompt, beam_size=3,
                                         max_new_tokens=6,
                                         length_penalty=alpha)
    for beam, i in enumerate(order):
      sequence = complete[i]
      want = sequence + [PAD] * (6 - len(sequence))  # Ended by its EOS.
      np.testing.assert_array_equal(beams[0, beam], want)
      np.testing.assert_allclose(
          scores[0, beam], _log_prob(table, sequence)
          / decoding.gnmt_length_penalty(len(sequence), alpha), rtol=1e-5)


def test_sampling_with_greedy_settings_equals_greedy():
  model, params = _lm_and_params()
  greedy = decoding.greedy(model, params, PROMPTS, max_new_tokens=8,
                           prompt_lengths=PROMPT_LENGTHS)
  rng = jax.random.key(0)
  for settings in ({'top_k': 1}, {'temperature': 0.0}, {'temperature': 1e-4},
                   {'top_p': 1e-6}, {'top_k': 1, 'temperature': 2.0}):
    tokens = decoding.sample(model, params, PROMPTS, rng, max_new_tokens=8,
                             prompt_lengths=PROMPT_LENGTHS, **settings)
    np.testing.assert_array_equal(tokens, greedy, err_msg=str(settings))


def test_sampling_is_reproducible_under_a_seed():
  model, params = _lm_and_params()
  draw = lambda seed: decoding.sample(  # noqa: E731
      model, params, PROMPTS, jax.random.key(seed), max_new_tokens=8,
      temperature=1.5, prompt_lengths=PROMPT_LENGTHS)
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.array_equal(draw(1), draw(2))


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
  probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
  logits = jnp.log(jnp.asarray(probs))
  def kept(**kw):
    return np.isfinite(decoding.filter_logits(logits, **kw))
  np.testing.assert_array_equal(kept(top_k=2), [0, 1, 0, 1, 0])
  # 0.4 + 0.3 = 0.7 < 0.75, so the nucleus needs 0.15 too.
  np.testing.assert_array_equal(kept(top_p=0.75), [0, 1, 0, 1, 1])
  np.testing.assert_array_equal(kept(top_p=0.7), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(kept(top_p=0.01), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(kept(top_k=4, top_p=0.9), [0, 1, 1, 1, 1])
  np.testing.assert_allclose(
      jax.nn.softmax(decoding.filter_logits(logits, temperature=0.5)),
      probs ** 2 / np.sum(probs ** 2), rtol=1e-5)


def test_sample_frequencies_follow_the_softmax():
  """4000 first tokens after BOS from the hand-built bigram model: each
  token's frequency is within 4.5 standard errors of its probability under
  the tempered, filtered softmax."""
  table = _table({BOS: dict(enumerate(
      [0.02, 0.03, 0.05, 0.3, 0.2, 0.15, 0.1, 0.1, 0.05]))})
  model, params = _bigram_lm(table)
  n = 4000
  prompt = jnp.full((n, 1), BOS, jnp.int32)
  for seed, settings in enumerate(({'temperature': 0.7},
                                   {'temperature': 1.3, 'top_k': 4},
                                   {'top_p': 0.7})):
    tokens = decoding.sample(model, params, prompt, jax.random.key(seed),
                             max_new_tokens=1, **settings)
    want = np.asarray(jax.nn.softmax(decoding.filter_logits(
        jnp.log(table[BOS]), **settings)))
    got = np.bincount(np.asarray(tokens[:, 0]), minlength=9) / n
    np.testing.assert_array_less(np.abs(got - want),
                                 4.5 * np.sqrt(want * (1 - want) / n) + 1e-9,
                                 err_msg=str(settings))


@pytest.mark.parametrize('call, message', [
    (lambda m, p, x: decoding.greedy(m, p, x, max_new_tokens=0),
     'max_new_tokens=0'),
    (lambda m, p, x: decoding.greedy(m, p, x, max_new_tokens=40),
     'max_len=16'),
    (lambda m, p, x: decoding.beam_search(m, p, x, beam_size=0,
                                          max_new_tokens=3), 'beam_size=0'),
    (lambda m, p, x: decoding.beam_search(m, p, x, beam_size=2,
                                          max_new_tokens=3,
                                          length_penalty=-1.0),
     'length_penalty=-1.0'),
    (lambda m, p, x: decoding.sample(m, p, x, jax.random.key(0),
                                     max_new_tokens=3, top_p=0.0), 'top_p=0.0'),
    (lambda m, p, x: decoding.sample(m, p, x, jax.random.key(0),
                                     max_new_tokens=3, top_k=1.5), 'top_k=1.5'),
    (lambda m, p, x: decoding.sample(m, p, x, jax.random.key(0),
                                     max_new_tokens=3, temperature=-1.0),
     'temperature=-1.0'),
    (lambda m, p, x: decoding.greedy(m, p, {'src': x}, max_new_tokens=3),
     'prompts are int tokens'),
    (lambda m, p, x: decoding.greedy(m, p, x, max_new_tokens=3,
                                     prompt_lengths=jnp.array([1, 2, 3])),
     r'prompt_lengths has shape \(3,\)'),
    (lambda m, p, x: decoding.greedy(tr.ViT(), p, x, max_new_tokens=3),
     'ViT does not decode'),
])
def test_bad_arguments_are_one_line_errors(call, message):
  model, params = _lm_and_params()
  with pytest.raises(ValueError, match=message) as error:
    call(model, params, _tokens(9, (B, PROMPT)))
  assert '\n' not in str(error.value)


def test_token_ids_are_bigjax_datas():
  from bigjax.data import synthetic
  from bigjax.data import text
  for module in (synthetic, text):
    assert (decoding.PAD_ID, decoding.BOS_ID, decoding.EOS_ID) == (
        module.PAD_ID, module.BOS_ID, module.EOS_ID)


# ---- The recurrent token models --------------------------------------------


def test_models_are_registered():
  assert MODELS['transformer_lm'] is tr.DecoderLM
  assert MODELS['encoder_decoder'] is tr.EncoderDecoder
  assert MODELS['rnn_lm'] is recurrent.RNNLM
  assert MODELS['rnn_seq2seq'] is recurrent.RNNSeq2Seq


def _lstm(inputs, hidden):
  return 4 * hidden * (hidden + inputs) + 4 * hidden


def _counts(model, inputs):
  return param_counts.count_parameters(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.PRNGKey(0),
      inputs))


@pytest.mark.parametrize('tie', [False, True])
def test_rnn_lm_parameter_counts(tie):
  e, h = 8, 12
  model = recurrent.RNNLM(vocab_size=V, hidden_size=h, num_layers=2,
                          embedding_dim=e, tie_embeddings=tie)
  counts = _counts(model, _tokens())
  output = {'output_projection': h * e} if tie else {'logits': h * V}
  want = {'embed': V * e, 'rnn': _lstm(e, h) + _lstm(h, h), **output}
  assert counts == {'unique': sum(want.values()),
                    'effective': sum(want.values()),
                    **{f'{k}/{m}': n for m, n in want.items()
                       for k in ('unique', 'effective')}}


@pytest.mark.parametrize('attention_kind, attention_params', [
    ('none', 0), ('additive', 2 * 12 + 2 * 12 * 12), ('dot', 12 * 12)])
def test_rnn_seq2seq_parameter_counts(attention_kind, attention_params):
  h = 12
  model = recurrent.RNNSeq2Seq(vocab_size=V, hidden_size=h,
                               attention=attention_kind)
  counts = _counts(model, {'src': _tokens(), 'tgt': _tokens()})
  assert counts['unique/embed'] == V * h
  assert counts['unique/encoder'] == counts['unique/decoder'] == _lstm(h, h)
  assert counts['unique/logits'] == h * V
  # Additive: key kernel and bias, query kernel, energy vector; dot: key.
  assert counts.get('unique/attention', 0) == attention_params
  assert counts.get('unique/attention_output', 0) == (
      0 if attention_kind == 'none' else 2 * h * h)


def test_seq2seq_attention_matches_numpy():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(B, 3, 5)).astype(np.float32)
  memory = rng.normal(size=(B, 4, 6)).astype(np.float32)
  valid = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  for score in attention.SCORES:
    module = attention.Seq2SeqAttention(score, features=7)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), queries,
                            memory)
    params = jax.tree.map(
        lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
        nn.unbox(shapes['params']))
    out = jax.jit(module.apply)({'params': params}, queries, memory,
                                memory_valid=valid)
    keys = memory @ params['key']['kernel']
    if score == 'additive':
      keys = keys + params['key']['bias']
      q = queries @ params['query']['kernel']
      scores = np.tanh(q[:, :, None] + keys[:, None]) @ params['energy']
    else:
      scores = np.einsum('btd,bsd->bts', queries, keys)
    scores = np.where(valid[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, weights @ memory, atol=1e-5)
