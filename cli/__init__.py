"""The `tokenrl-mlx` command line (installed as the `tokenrl_cli` package)."""
