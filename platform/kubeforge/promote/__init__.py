"""The promote stage: the pipeline's model gated on its stages' metrics, approved by a person when the
manifest asks, and given the `challenger` (or `champion`) alias."""
