"""User entry points: the `facegen` CLI, job specs and cluster submission."""
