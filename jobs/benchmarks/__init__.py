"""`facegen bench` benchmarks, one module each, every one exposing `register(subparsers)`."""
