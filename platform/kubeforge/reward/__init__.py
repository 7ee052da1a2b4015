"""The reward stage: a scalar reward head on a causal LM, trained on preference pairs (see `stage`)."""
