"""Everything Ray: actors, the Ray executor, Ray Train hosting, job submission."""
