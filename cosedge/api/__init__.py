"""The COS API on the bucket listener: request signatures, the origin API, listing and purge."""
