"""The bucket listener: routing, hits, producers, the HTTP channel."""
