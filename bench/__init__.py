"""vapora's benchmarks: not tests. Each reports ratios against a floor measured in the same run."""
