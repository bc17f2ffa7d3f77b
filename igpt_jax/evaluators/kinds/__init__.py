"""The evaluator kinds' code, one module per kind of igpt_jax.evaluators.KINDS: loss, probe, sample. Each has an
`Evaluator(name, entry, rt)` whose `run(params, step, stop)` returns a base.Result."""
