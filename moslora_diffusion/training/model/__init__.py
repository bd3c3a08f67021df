"""What a run trains: the frozen base with adapters, its prompt conditioning, trigger vectors, optimizer, EMA."""
