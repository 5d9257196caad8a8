"""Networks: time embeddings, MLP, U-Net."""
