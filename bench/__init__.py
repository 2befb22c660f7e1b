"""sf-bench: our runtime against the reference, side by side (`sfedge.bench.cli`). Every measurement runs in its own
worker process (`spawn`), so peak resident memory belongs to one backend."""
