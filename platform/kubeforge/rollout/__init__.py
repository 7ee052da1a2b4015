"""Canary and A/B rollout of a served model: what to query, how to judge it, and what to do next.

* `kubeforge.rollout.decision`: the pure decision logic (no I/O, no clock: time is passed in), for the
  local rollout controller and the Kubernetes operator to drive alike;
* `kubeforge.rollout.stats`: the A/B statistical comparisons (two-proportion test, Mann-Whitney U on
  Prometheus histogram buckets);
* `kubeforge.rollout.queries`: the serving metric names and the PromQL that feeds both;
* `kubeforge.rollout.prometheus`: instant queries against a real Prometheus server, the only I/O here.

Nothing here imports numpy or scipy at module level (scipy only inside the Fisher's-exact path of
`stats`), so importing the package stays as light as the spec.
"""
