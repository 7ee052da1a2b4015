"""The evaluate stage: held-out perplexity and generation metrics of the candidate, its base and the champion."""
