"""t2v-slurm benchmarks; entry point: bench/run.py."""
