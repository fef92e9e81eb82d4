"""DeepLab fine-tuning: models, losses, metrics, inference and training methods."""
