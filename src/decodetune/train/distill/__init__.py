"""Knowledge distillation: a teacher LM into a smaller Llama student that shares its tokenizer.

* :mod:`.losses` — forward KL, reverse KL, generalized JSD (GKD), CE mix, per completion token.
* :mod:`.student` — student spec (YAML), layer extraction / random init, save / load.
* :mod:`decodetune.models.norms` (a lower layer, since model loaders need it) — LayerNorm and padding-aware
  ``MaskedBatchNorm`` swapped in for RMSNorm, and ``maybe_patch_norm`` for loading such students.
* :mod:`.data` — prompt rows (with an ``augment(rows) -> rows`` hook), teacher / on-policy sampling,
  padding and completion masks, the teacher-logit cache.
* :mod:`.trainer` — :func:`~.trainer.distill`: DDP (gloo / nccl), gradient accumulation, checkpoints
  and exact resume, progress bar, loss curve PNG.
* :mod:`.evaluate` — student vs teacher: perplexity, top-1 agreement, KL, tokens/s, causal leak.

Submodules import torch; import them directly (this package's ``__init__`` stays light).
"""
