"""Using states: sampling, generation, chat."""
