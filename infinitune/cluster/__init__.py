"""Ray: connecting to a cluster, starting the training workers, restarting them on failure."""
