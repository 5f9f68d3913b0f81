"""What every stage shares and nothing else: the one error type the entry points print as one line
(`errors`), settings dataclasses as the one source of defaults and choices with their Hydra schemas (`config`),
dtype names (`dtypes`), rank, world size and SLURM job from the launcher's environment (`dist_env`), one process
per directory (`lock`) and command-line flags from a settings dataclass (`cli_args`).
May import no other subpackage."""
