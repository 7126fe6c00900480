"""Pre-training objectives: one tokenized document in, a list of examples out (pure numpy).

    objective = UL2()                               # or CLM(), PrefixLM(); gin: gin/objectives/
    vocab = VocabInfo.from_vocabulary(seqio_vocab)
    objective.check(vocab, seq_len)                 # ValueError if it cannot work
    for ex in objective.examples(tokens_T, rng, seq_len, vocab): ...
    assert (np.concatenate([reconstruct(ex, vocab) for ex in ...]) == tokens_T).all()

`objective.feature_converter` names the seqio converter ('lm' or 'prefix_lm') and
`objective.features` the example fields. Gin names: midas_jax.objectives.{CLM,PrefixLM,UL2,Denoiser}.
"""

from midas_jax.objectives.base import MODES, VocabInfo, flatten, reconstruct
from midas_jax.objectives.clm import CLM
from midas_jax.objectives.prefix_lm import PrefixLM
from midas_jax.objectives.ul2 import DEFAULT_DENOISERS, UL2, Denoiser, noise_mask, span_counts

OBJECTIVES = {'clm': CLM, 'prefix_lm': PrefixLM, 'ul2': UL2}

__all__ = ['MODES', 'VocabInfo', 'flatten', 'reconstruct', 'CLM', 'PrefixLM', 'UL2', 'Denoiser',
           'DEFAULT_DENOISERS', 'noise_mask', 'span_counts', 'OBJECTIVES']
