"""SQuAD 2.0: loading it, the seed's prompt template, batching, and scoring answers."""
