"""Where bucket objects live: the disk store (and the in-memory one tests use)."""
