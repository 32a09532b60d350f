"""bigjax: parameter sharing and attention as pure functional Flax modules."""
