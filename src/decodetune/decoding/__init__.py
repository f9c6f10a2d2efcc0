"""Our batched decoding engine: processors, samplers, beam search and :func:`generate`.

Pipeline per step (fixed order): repetition penalty (prompt + output) -> presence / frequency penalties
(output) -> no_repeat_ngram_size -> min_new_tokens -> the distribution samplers in each row's
``full_sampler_order`` (default temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff)
-> argmax (greedy) or a seeded draw (sampling). See :mod:`.processors`, :mod:`.sampler`, :mod:`.beam`.
"""

from decodetune.decoding.engine import generate
from decodetune.decoding.types import Generation

__all__ = ["Generation", "generate"]
