"""Entry points: absl flags only; the work is done in bigjax."""
