"""The generation pipeline as plain Python + torch. Runs whole jobs in-process; never imports Ray."""
