"""The voxqueue benchmark: the pipeline against the direct-SDK pattern, in one run. See BENCHMARKS.md."""
