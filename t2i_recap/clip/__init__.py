"""Recap-CLIP: contrastive CLIP training on the trainer's shards, captions and caption mixing."""
