"""One training step's pieces: batches, VAE posteriors and their store, noise and target, losses, masks, prior rows."""
