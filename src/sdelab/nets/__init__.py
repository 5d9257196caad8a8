"""Networks: time embeddings, MLP, U-Net, classifiers, the FID Inception-v3."""
