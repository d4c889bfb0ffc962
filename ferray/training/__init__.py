"""Training: the head on embeddings and the fine-tune on aligned faces, on Ray Train."""
