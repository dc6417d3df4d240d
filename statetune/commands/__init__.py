"""One module per CLI command: its options dataclass and a thin function over the library."""
