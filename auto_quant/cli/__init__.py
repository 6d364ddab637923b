"""Command-line interface: flags and recipes → one validated plan → the AutoRound API; nothing else."""
