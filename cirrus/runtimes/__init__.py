"""Where replicas run. The runtime is the only code that spawns, signals or reaps processes."""
