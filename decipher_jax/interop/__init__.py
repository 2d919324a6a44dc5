"""Weight conversion to and from formats people already hold (MONAI ViT, Hugging Face BERT)."""
