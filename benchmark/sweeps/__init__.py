"""Many runs: grid specs and shards, the grid runner, the selection protocol's search."""
