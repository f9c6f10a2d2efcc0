"""Training on top of decoding: knowledge distillation (:mod:`decodetune.train.distill`) and data
augmentation (:mod:`decodetune.train.augment`). Nothing here is imported by the decoding path."""
