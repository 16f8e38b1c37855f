"""Face-recognition training on generated shards: iResNet + margin head (ArcFace / CosFace) + partial FC."""
