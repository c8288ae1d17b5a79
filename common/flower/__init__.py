"""What the Flower ServerApp and ClientApp share: campaign formats and node keys."""
