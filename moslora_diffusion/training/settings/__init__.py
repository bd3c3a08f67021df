"""What a run is asked to do: the flag machinery, TrainConfig with its checks, and the trigger word's checks."""
