"""What is trained (the state, directly or through an encoder) and how states are stored."""
