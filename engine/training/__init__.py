"""GAN training as plain Python + torch: datasets (`data`), the ADA augment pipe (`augment`), losses and
the loop. Ray Train hosting lives in cluster/; nothing here imports Ray."""
