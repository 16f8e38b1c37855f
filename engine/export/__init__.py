"""Exports of a generated dataset to the formats face-recognition trainers already read."""
