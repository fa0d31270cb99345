"""The main job: a next-word model trained on standard-library text, with negatives from the service."""
