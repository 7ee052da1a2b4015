"""The rl stage: a policy optimised against rewards with GRPO on the shared engine."""
